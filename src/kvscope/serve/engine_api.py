"""What the HTTP layer needs of an engine, whichever way it runs: on a thread of the server
(:class:`~kvscope.serve.async_engine.AsyncEngine`) or in a process of its own
(:class:`~kvscope.serve.engine_client.EngineProcess`).

Both offer ``start`` / ``shutdown`` / ``is_running`` / ``num_requests`` / ``stats`` / ``submit`` /
``abort`` and an ``observer`` (metrics), fail requests with the :class:`ServeError` kinds below, and
hand outputs to the event loop through one :class:`OutputStream` per HTTP request. Only the engine
is imported here (no FastAPI, no pydantic): the engine-core process imports this module too.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvscope.engine.outputs import RequestOutput
from kvscope.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvscope.llm import LLM

log = logging.getLogger("kvscope.serve")

#: Between steps with no request added or aborted, ``stats()`` (which walks every block table) is
#: sampled at most this often; it is taken after every add, abort and when the engine falls idle.
STATS_INTERVAL_S = 0.05
#: Upper bounds (s) of the engine core's turn-length histogram in its stats (``core_turn_buckets``:
#: one count per bound, then the turns longer than the last).
TURN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeError(Exception):
    """A request could not be served; ``status`` is the HTTP status it maps to."""

    status = 500


class RequestRejected(ServeError):
    """The engine refused a prompt (``index``: its position in the request's batch of prompts)."""

    status = 400

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class EngineFailure(ServeError):
    """The engine raised (or its process died) while serving the request."""

    status = 500


class EngineStopped(ServeError):
    """The engine is not running: the server is shutting down, or the engine's process died."""

    status = 503


class StepObserver(Protocol):
    """Told about outputs, removals and step failures (metrics); must not raise and must be quick.
    Called on the engine thread (thread mode) or on the event loop (process mode)."""

    def on_outputs(self, outputs: list[RequestOutput]) -> None: ...

    def on_removed(self, request_ids: list[str], reason: str) -> None:
        """Requests ended without a final output: ``"abort"`` (client gone, shutdown) or ``"error"``."""

    def on_step_error(self) -> None: ...


@dataclass(frozen=True)
class ServingLimits:
    """What the server knows of its engine, read once before the engine starts."""

    max_model_len: int
    vocab_size: int
    supports_fork: bool
    strategy: str
    max_num_seqs: int


@dataclass(frozen=True)
class EngineInfo:
    """What the front end keeps of a loaded engine: the model spec, its tokenizer and its limits
    (picklable: the engine-core process sends it to the server once the model is loaded)."""

    model: str
    tokenizer: Tokenizer
    limits: ServingLimits

    @classmethod
    def of(cls, llm: LLM) -> EngineInfo:
        engine = llm.engine
        return cls(llm.config.model, llm.tokenizer, ServingLimits(
            max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size,
            supports_fork=engine.kv.supports_fork, strategy=engine.kv.name, max_num_seqs=llm.config.max_num_seqs))


def request_ids(request_id: str, num_prompts: int) -> list[str]:
    """Engine request ids of one HTTP request: ``request_id``, or ``request_id-i`` for a batch."""
    return [request_id] if num_prompts == 1 else [f"{request_id}-{i}" for i in range(num_prompts)]


@dataclass
class Group:
    """The engine requests of one HTTP request (one per prompt), and where their outputs go."""

    ids: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.index = {rid: i for i, rid in enumerate(self.ids)}


class _Engine(Protocol):
    def abort(self, request_ids: list[str]) -> None: ...

    def _release(self, n: int) -> None: ...


class OutputStream:
    """The outputs of one submitted group, read on the event loop.

    Each ``await stream.next()`` returns ``{prompt index: newest RequestOutput}`` for the prompts
    that moved. Outputs are cumulative (all tokens so far), so when a slow reader falls behind, the
    outputs waiting in its queue collapse into the newest: a client never makes the server buffer
    more than one output per prompt. ``close()`` must always be called: it aborts whatever has not
    finished (a client that went away) and releases the request's admission slot.
    """

    def __init__(self, engine: _Engine, group: Group) -> None:
        self._engine = engine
        self._group = group
        self._finished: set[int] = set()
        self._closed = False

    @property
    def finished(self) -> bool:
        return len(self._finished) == len(self._group.ids)

    async def next(self) -> dict[int, RequestOutput]:
        items = [await self._group.queue.get()]
        while not self._group.queue.empty():
            items.append(self._group.queue.get_nowait())
        updates: dict[int, RequestOutput] = {}
        for kind, payload in items:
            if kind == "error":
                raise payload
            for i, out in payload:
                updates[i] = out
                if out.finished:
                    self._finished.add(i)
        return updates

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> dict[int, RequestOutput]:
        if self.finished:
            raise StopAsyncIteration
        return await self.next()

    async def final(self) -> list[RequestOutput]:
        """Wait until every prompt finished; their last outputs in prompt order."""
        latest: dict[int, RequestOutput] = {}
        async for updates in self:
            latest.update(updates)
        return [latest[i] for i in range(len(self._group.ids))]

    def close(self, abort: bool = True) -> None:
        """Release the admission slot and abort what has not finished (unless nothing of it is in
        the engine: ``abort=False``)."""
        if self._closed:
            return
        self._closed = True
        self._engine._release(len(self._group.ids))
        unfinished = [rid for i, rid in enumerate(self._group.ids) if i not in self._finished]
        if unfinished and abort:
            self._engine.abort(unfinished)


async def await_accepted(stream: OutputStream, group: Group) -> OutputStream:
    """Wait for the engine's answer to a submitted group: the stream once every prompt is accepted,
    else the rejection raised (the stream closed without an abort: nothing of it is in the engine).
    Cancelled while waiting (client gone): the add still lands, then the abort."""
    try:
        kind, payload = await group.queue.get()
    except BaseException:
        stream.close()
        raise
    if kind == "error":
        stream.close(abort=False)
        raise payload
    return stream


def notify(observer: StepObserver | None, method: str, *args: Any) -> None:
    """Call ``observer.method(*args)``, logging (never raising) what it raises: metrics must never
    take the engine down."""
    if observer is None:
        return
    try:
        getattr(observer, method)(*args)
    except Exception:
        log.exception("kvscope: step observer %s failed", method)


def abort_all(engine: Any, request_ids: list[str]) -> None:
    """Abort each of ``request_ids`` on ``engine`` (freeing its KV), logging, never raising, an abort
    that fails: the others must still be freed."""
    for rid in request_ids:
        try:
            engine.abort(rid)
        except Exception:
            log.exception("kvscope: abort of %s failed", rid)


def put_all(pairs: list[tuple[asyncio.Queue, tuple[str, Any]]]) -> None:
    for q, item in pairs:
        q.put_nowait(item)
