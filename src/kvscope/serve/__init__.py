"""``kvscope serve``: an OpenAI-compatible HTTP server over one :class:`~kvscope.engine.engine.LLMEngine`.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client; pydantic comes with FastAPI), except
``engine_api``, ``engine_core``, ``core_process``, ``engine_client``, ``async_engine`` and
``detokenize``, which use only the engine. Nothing here is imported by ``import kvscope``. Modules:

- ``engine_api``: what the two engine placements share (errors, output streams, engine info).
- ``engine_core`` / ``engine_client``: the engine in a process of its own (the default), and the
  server's side of it; ``core_process``: starting that process (one pipe pair per front end).
- ``frontends``: ``--api-server-count N``, N front-end processes on one port in front of one core.
- ``async_engine``: the engine on a thread of the server; requests handed in, outputs streamed out
  to asyncio.
- ``protocol``: OpenAI request/response shapes (pydantic).
- ``params``: a validated request -> prompt token ids and :class:`SamplingParams`, or a 400.
- ``detokenize``: streamed text deltas and logprobs from cumulative outputs.
- ``generation``: admission, submission, abort on disconnect, server-sent events.
- ``openai_completions`` / ``openai_chat``: the two generation endpoints.
- ``metrics``: Prometheus collectors on a private registry.
- ``errors``: OpenAI-shaped error bodies.
- ``app``: the FastAPI application (:func:`~kvscope.serve.app.create_app`); ``server``: uvicorn around it.
"""
