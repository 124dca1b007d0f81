"""Engines for the serve tests, built by picklable module-level functions: an engine-core process
(``EngineProcess``) imports this module by name in its child to build them."""
from __future__ import annotations

import time

from kvscope import LLM

#: A chat template for the byte-level tokenizer of dummy models, which has none: each message as
#: ``<role>content``, then ``<assistant>``.
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"

#: Token ids of a prompt (bytes, for the byte-level tokenizer of dummy models) that makes every
#: step of a :func:`paced_llm` engine raise while the request is unfinished.
FAIL_STEP_PROMPT = list(b"!fail-this-step!")


def chat_llm(model: str, strategy: str, kv_memory: int) -> LLM:
    """An :class:`LLM` of a dummy model whose tokenizer has :data:`CHAT_TEMPLATE` (it travels with
    the pickled tokenizer to the server), so that /v1/chat/completions can be tested on it."""
    llm = LLM(model, strategy=strategy, kv_memory_bytes=kv_memory)
    llm.tokenizer._tok.chat_template = CHAT_TEMPLATE  # the HF tokenizer's own attribute
    return llm


def paced_llm(model: str, strategy: str, kv_memory: int, pace_s: float, async_scheduling: bool | None = None,
              chat: bool = False) -> LLM:
    """An :class:`LLM` whose steps each take ``pace_s`` longer (so that a test can act while
    requests still run), and fail while a request of prompt :data:`FAIL_STEP_PROMPT` is unfinished;
    ``chat``: with :data:`CHAT_TEMPLATE`, as :func:`chat_llm`."""
    llm = (chat_llm(model, strategy, kv_memory) if chat
           else LLM(model, strategy=strategy, kv_memory_bytes=kv_memory, async_scheduling=async_scheduling))
    engine = llm.engine
    real_step = engine.step

    def step() -> list:
        time.sleep(pace_s)
        if any(r.prompt_token_ids == FAIL_STEP_PROMPT and not r.is_finished for r in engine.requests.values()):
            raise RuntimeError("injected step failure")
        return real_step()

    engine.step = step  # type: ignore[method-assign]
    return llm
