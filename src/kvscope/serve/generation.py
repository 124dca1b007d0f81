"""What the two generation endpoints share: admission, submission, waiting (aborting when the
client goes away), server-sent events, usage and finish reasons."""
from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kvscope.engine.outputs import CompletionOutput, RequestOutput
from kvscope.models.tokenizer import Tokenizer
from kvscope.serve.async_engine import AsyncEngine
from kvscope.serve.engine_client import EngineProcess
from kvscope.serve.engine_api import EngineFailure, OutputStream, RequestRejected, ServeError, ServingLimits
from kvscope.serve.errors import APIError, from_serve_error
from kvscope.serve.metrics import ServerMetrics
from kvscope.serve.params import Plan
from kvscope.serve.protocol import UsageInfo

SSE_DONE = "data: [DONE]\n\n"


@dataclass
class ServingContext:
    """Everything a request handler needs; one per app."""

    engine: AsyncEngine | EngineProcess
    tokenizer: Tokenizer
    model_name: str
    model_root: str
    limits: ServingLimits
    max_queue: int
    metrics: ServerMetrics


# A random tag drawn once per process (front ends are spawned: each draws its own), then a
# counter: unique ids without a uuid4 per request, whose urandom call was 13% of a front end's
# CPU per request in a sampling profile (benchmarks/results/serve_frontend_cpu.md).
_PROCESS_TAG = uuid.uuid4().hex[:16]
_SERIAL = itertools.count()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{_PROCESS_TAG}{next(_SERIAL):x}"


async def submit(ctx: ServingContext, plan: Plan, request_id: str) -> OutputStream:
    """Admit the request (503 + Retry-After when ``max_queue`` requests are in flight) and hand it to
    the engine; a prompt the engine refuses is a 400 blamed on the prompt field."""
    n = len(plan.prompts)
    if ctx.engine.num_requests + n > ctx.max_queue:
        raise APIError(
            503, f"the server is full: {ctx.engine.num_requests} requests in flight (--max-queue "
            f"{ctx.max_queue}); retry later", code="queue_full", headers={"Retry-After": "1"})
    try:
        return await ctx.engine.submit(plan.prompts, plan.params, request_id, time.perf_counter())
    except RequestRejected as e:
        raise APIError(400, str(e) if n == 1 else f"prompt {e.index}: {e}", plan.prompt_param) from None
    except ServeError as e:
        raise from_serve_error(e) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def final_outputs(request: Request, stream: OutputStream) -> list[RequestOutput] | None:
    """The finished outputs, or None when the client disconnected first (the caller's ``close()``
    then aborts the request)."""
    final = asyncio.ensure_future(stream.final())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({final, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        final.cancel()
        gone.cancel()
    if final.cancelled():
        return None
    try:
        return final.result()
    except ServeError as e:
        raise from_serve_error(e) from None


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose ``on_close`` runs when the response ends, however it ends
    (finished, client disconnected, server stopping): an unfinished request is always aborted."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class EventTemplate:
    """The ``data:`` events of one streamed choice whose chunks differ only in their text and
    finish reason: ``payload`` is a chunk (as plain JSON data) with :attr:`TEXT` and :attr:`REASON`
    where those go. What a chunk costs per token per stream matters at hundreds of streams, and
    filling two holes is several times cheaper than building and dumping the pydantic models (same
    JSON: compact, UTF-8 unescaped, fields in the models' order)."""

    TEXT, REASON = "\x00text\x00", "\x00reason\x00"

    def __init__(self, payload: dict[str, object]) -> None:
        head, rest = _dumps(payload).split(_dumps(self.TEXT))
        middle, tail = rest.split(_dumps(self.REASON))
        self._head, self._middle, self._tail = f"data: {head}", middle, f"{tail}\n\n"

    def __call__(self, text: str, reason: str | None) -> str:
        # _dumps of a str takes the C string encoder; None would go through the generic path.
        return (f"{self._head}{_dumps(text)}{self._middle}{'null' if reason is None else _dumps(reason)}"
                f"{self._tail}")


def sse(payload: BaseModel, include_usage: bool) -> str:
    """One ``data:`` event; without ``include_usage`` the ``usage`` key is left out, as OpenAI does."""
    return f"data: {payload.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


async def event_stream(
    stream: OutputStream,
    chunks: Callable[[dict[int, RequestOutput]], list[str]],
    head: list[str],
    tail: Callable[[], list[str]],
) -> AsyncIterator[str]:
    """``head``, then ``chunks(updates)`` per engine update, then ``tail()`` and ``[DONE]``. An engine
    failure mid-stream (the status line has gone out) becomes an OpenAI error event. The events of
    one update go out in one write (each write costs a trip through the HTTP stack and a syscall)."""
    try:
        if head:
            yield "".join(head)
        async for updates in stream:
            events = chunks(updates)
            if events:
                yield "".join(events)
        end = "".join(tail())
    except ServeError as e:
        end = f"data: {from_serve_error(e).body().model_dump_json()}\n\n"
    finally:
        stream.close()
    yield end + SSE_DONE


class Chunks(Protocol):
    """The streamed events of one request (an endpoint's own chunk format)."""

    def head(self) -> list[str]:
        """Events before the first engine update."""

    def update(self, updates: dict[int, RequestOutput]) -> list[str]:
        """Events for one engine update (prompt index -> its output so far)."""

    def tail(self) -> list[str]:
        """Events after the last update (usage), before ``[DONE]``."""


async def respond(ctx: ServingContext, raw: Request, plan: Plan, request_id: str, chunks: Chunks | None,
                  body: Callable[[list[RequestOutput]], BaseModel]) -> Response:
    """Submit ``plan`` and answer: server-sent ``chunks`` when it streams, else ``body`` of the final
    outputs. Whatever ends the request (finished, failed, client gone), it is closed, so an
    unfinished one is aborted and its KV freed."""
    stream = await submit(ctx, plan, request_id)
    if chunks is not None:
        return EventStreamResponse(event_stream(stream, chunks.update, chunks.head(), chunks.tail), stream.close)
    try:
        outputs = await final_outputs(raw, stream)
    finally:
        stream.close()
    if outputs is None:
        return Response(status_code=499)  # the client has gone; nobody reads this
    return JSONResponse(body(outputs).model_dump())


def usage(outputs: Iterable[RequestOutput]) -> UsageInfo:
    prompt = completion = 0
    for out in outputs:
        prompt += len(out.prompt_token_ids)
        completion += sum(len(c.token_ids) for c in out.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def finish_reason(completion: CompletionOutput) -> str | None:
    """The engine's ``stop``/``length`` (OpenAI's names too); an engine ``error`` fails the request
    (500). A request the server aborts has no reader left to see ``abort``."""
    if completion.finish_reason == "error":
        raise EngineFailure(completion.error or "the engine failed this request")
    return completion.finish_reason
