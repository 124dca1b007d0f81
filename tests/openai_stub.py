"""A small OpenAI-compatible server for tests: streams tokens at set delays, on a loopback port.

``/v1/completions`` and ``/v1/chat/completions`` stream ``max_tokens`` chunks: the first
``first_token_s`` after the request, the next ones ``itl_s`` apart (``slow_itl_s`` for a prompt
that contains ``SLOW``), then a ``usage`` chunk when asked for (``stream_options.include_usage``)
and ``data: [DONE]``. A prompt that contains ``FAIL`` gets HTTP 500. The chat endpoint sends the
assistant's role in a chunk of its own at once, before the first token, as some servers do.
``generate(prompt, max_tokens)`` gives the text (default ``"t0 t1 ..."``), sent in ``max_tokens``
slices of near-equal length, ``tokens_per_chunk`` tokens' worth per chunk. Every request body is
kept in ``Stub.bodies``.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL_ID = "stub-model"


@dataclass
class Stub:
    base_url: str = ""
    first_token_s: float = 0.05
    itl_s: float = 0.01
    slow_itl_s: float = 1.0
    usage: bool = True
    tokens_per_chunk: int = 1
    generate: Callable[[str | list[int], int], str] | None = None
    bodies: list[dict[str, Any]] = field(default_factory=list)


def _pieces(text: str, n: int) -> list[str]:
    """``text`` cut into ``n`` consecutive slices (some may be empty) that join back to it."""
    cuts = [round(k * len(text) / n) for k in range(n + 1)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def _app(stub: Stub) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]}

    async def serve(request: Request, chat: bool) -> Any:
        body = await request.json()
        stub.bodies.append(body)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if isinstance(prompt, str) and "FAIL" in prompt:
            return JSONResponse({"error": {"message": "stub failure", "code": 500}}, status_code=500)
        n = int(body["max_tokens"])
        text = stub.generate(prompt, n) if stub.generate else "".join(f"t{k} " for k in range(n))
        pieces = _pieces(text, n)
        itl = stub.slow_itl_s if isinstance(prompt, str) and "SLOW" in prompt else stub.itl_s
        k = stub.tokens_per_chunk
        chunks = ["".join(pieces[i:i + k]) for i in range(0, n, k)]

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def choice(piece: str, last: bool) -> dict[str, Any]:
            reason = "length" if last else None
            if chat:
                return {"index": 0, "delta": {"content": piece}, "finish_reason": reason}
            return {"index": 0, "text": piece, "finish_reason": reason}

        async def stream() -> Any:
            if chat:
                yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})
            await asyncio.sleep(stub.first_token_s)
            for i, piece in enumerate(chunks):
                if i:
                    await asyncio.sleep(itl * k)
                yield event({"id": "cmpl-stub", "model": MODEL_ID, "choices": [choice(piece, i == len(chunks) - 1)]})
            if stub.usage and (body.get("stream_options") or {}).get("include_usage"):
                prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
                yield event({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                      "total_tokens": prompt_tokens + n}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await serve(request, chat=True)

    return app


@contextmanager
def openai_stub(**options: Any) -> Iterator[Stub]:
    """Run a :class:`Stub` (fields from ``options``) on 127.0.0.1 in a thread; yields it with its
    ``base_url`` set (``http://127.0.0.1:PORT``)."""
    stub = Stub(**options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    stub.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(_app(stub), log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the stub server did not start"
    try:
        yield stub
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
