"""``kvscope serve``: an OpenAI-compatible HTTP server over one :class:`~kvscope.engine.engine.LLMEngine`.

Modules (the web framework is imported only by ``app``, ``routes``, ``openai_*`` and ``server``,
so :mod:`kvscope.serve.async_engine` works without the ``serve`` extra):

- ``async_engine``: the engine on its own thread, requests handed in and outputs streamed out
  to asyncio.
- ``protocol``: OpenAI request/response shapes (pydantic).
- ``params``: a validated request -> prompt token ids and :class:`SamplingParams`.
- ``detokenize``: streamed text deltas and logprobs from cumulative outputs.
- ``openai_completions`` / ``openai_chat``: the two generation endpoints.
- ``metrics``: Prometheus collectors on a private registry.
- ``app``: the FastAPI application; ``server``: uvicorn around it.
"""
