"""The engine on a thread of the server, driven from asyncio (``kvscope serve --no-engine-process``;
by default the engine runs in a process of its own: :mod:`kvscope.serve.engine_client`).

One daemon thread owns the :class:`LLMEngine`: it is the only thread that calls ``add_request``,
``step``, ``abort`` and ``stats``. Request handlers on the event loop talk to it through a FIFO of
commands (add a group of prompts, abort ids, stop); the thread drains that FIFO before every step,
and blocks on it when the engine is idle, so an idle server costs nothing. Outputs go back to each
request's ``asyncio.Queue`` through ``loop.call_soon_threadsafe``, batched to one callback per
turn of the loop, after the turn's stats snapshot. Because adds and aborts are applied between
steps on the engine thread, the engine needs no locks and an abort frees the request's KV before
the next step runs.

Failures stay contained: ``add_request`` raising :class:`RequestError` / :class:`ConfigError`
rejects that request alone (:class:`RequestRejected`, a 400); ``step`` raising fails the requests
then in flight (:class:`EngineFailure`, a 500), aborts them to free their KV, and the loop goes on
serving new requests.

Why a thread and not ``run_in_executor`` per step: one long-lived thread keeps every engine call
on one thread without a lock, runs steps back to back while there is work (no event-loop hop
between steps), and leaves the event loop free for HTTP while a step runs (PyTorch releases the
GIL in its kernels).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvscope.engine.outputs import RequestOutput
from kvscope.engine.sampling_params import SamplingParams
from kvscope.errors import ConfigError, RequestError
from kvscope.serve.engine_api import (
    STATS_INTERVAL_S,
    EngineFailure,
    EngineStopped,
    Group,
    OutputStream,
    RequestRejected,
    ServeError,
    StepObserver,
    abort_all,
    await_accepted,
    notify,
    put_all,
    request_ids,
)

if TYPE_CHECKING:
    from kvscope.engine.engine import LLMEngine

log = logging.getLogger("kvscope.serve")


@dataclass
class _Add:
    group: Group
    prompts: list[list[int]]
    params: SamplingParams
    arrival_time: float


@dataclass
class _Abort:
    ids: list[str]


_STOP = object()


class AsyncEngine:
    """An :class:`LLMEngine` served from its own thread; see the module docstring.

    Args:
        engine: the engine; after :meth:`start`, no other thread may call it.
        observer: told about every step's outputs, aborts and step failures (metrics); may also be
            set as the ``observer`` attribute before :meth:`start`.
    """

    def __init__(self, engine: LLMEngine, observer: StepObserver | None = None) -> None:
        self._engine = engine
        self.observer = observer
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._live: dict[str, Group] = {}  # engine thread only
        self._outbox: list[tuple[Group, tuple[str, Any]]] = []  # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._num_requests = 0  # event-loop thread only
        self._stats: dict[str, Any] = {}
        self._stats_time = 0.0

    # ---- event-loop side ---------------------------------------------------------------------
    def start(self) -> None:
        self._refresh_stats(force=True)  # before the thread exists, so still single-threaded
        self._thread = threading.Thread(target=self._run, name="kvscope-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail whatever is in flight with :class:`EngineStopped` and stop the thread."""
        self._stopping = True
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():  # adds that raced with the stop
            late = []
            while not self._commands.empty():
                late.append(self._commands.get_nowait())
            self._reject_adds(late)
            self._flush()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_requests(self) -> int:
        """Engine requests submitted and not yet closed (waiting, running, or being read)."""
        return self._num_requests

    @property
    def stats(self) -> dict[str, Any]:
        """The newest ``engine.stats()`` taken on the engine thread (see ``STATS_INTERVAL_S``)."""
        return self._stats

    async def submit(
        self, prompts: Sequence[list[int]], params: SamplingParams, request_id: str, arrival_time: float
    ) -> OutputStream:
        """Queue one engine request per prompt (ids ``request_id``, or ``request_id-i`` for a batch)
        and wait until the engine accepted all of them.

        All or none: if the engine rejects one prompt, none is served and :class:`RequestRejected`
        names the prompt. The caller must ``close()`` the returned stream.
        """
        if not self.is_running:
            raise EngineStopped("the server is shutting down")
        group = Group(request_ids(request_id, len(prompts)), asyncio.get_running_loop())
        stream = OutputStream(self, group)
        self._num_requests += len(group.ids)
        self._commands.put(_Add(group, [list(p) for p in prompts], params, arrival_time))
        return await await_accepted(stream, group)

    def abort(self, request_ids: list[str]) -> None:
        """Abort engine requests (thread-safe; applied before the engine's next step)."""
        self._commands.put(_Abort(list(request_ids)))

    def _release(self, n: int) -> None:
        self._num_requests -= n

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                idle = not self._engine.has_unfinished_requests()
                commands = [self._commands.get()] if idle else []
                while not self._commands.empty():
                    commands.append(self._commands.get_nowait())
                if _STOP in commands:
                    self._fail_live(EngineStopped("the server is shutting down"), "abort")
                    self._reject_adds(commands)
                    self._flush()
                    return
                for cmd in commands:
                    self._apply(cmd)
                if self._engine.has_unfinished_requests():
                    self._step()
                # Stats before outputs: a client that sees its request end, or its add accepted,
                # then reads stats that include it.
                self._refresh_stats(force=bool(commands) or not self._engine.has_unfinished_requests())
            except Exception as e:  # a bug outside step(): keep serving, fail what was in flight
                log.exception("kvscope engine loop error")
                self._fail_live(EngineFailure(f"engine loop error: {type(e).__name__}: {e}"), "error")
            self._flush()

    def _apply(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            aborted = [rid for rid in cmd.ids if self._live.pop(rid, None) is not None]
            for rid in aborted:
                self._engine.abort(rid)
            if aborted:
                notify(self.observer, "on_removed", aborted, "abort")
            return
        group, added = cmd.group, []
        try:
            for i, (rid, prompt) in enumerate(zip(group.ids, cmd.prompts)):
                try:
                    self._engine.add_request(prompt, cmd.params, request_id=rid, arrival_time=cmd.arrival_time)
                except (RequestError, ConfigError) as e:
                    raise RequestRejected(str(e), i) from None
                added.append(rid)
        except Exception as e:
            for rid in added:
                self._engine.abort(rid)
            err = e if isinstance(e, ServeError) else EngineFailure(f"add_request failed: {type(e).__name__}: {e}")
            self._deliver([(group, ("error", err))])
            return
        for rid in added:
            self._live[rid] = group
        self._deliver([(group, ("accepted", None))])

    def _reject_adds(self, commands: list[Any]) -> None:
        self._deliver([(c.group, ("error", EngineStopped("the server is shutting down")))
                       for c in commands if isinstance(c, _Add)])

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as e:
            log.exception("kvscope engine step failed; failing the requests in flight")
            notify(self.observer, "on_step_error")
            self._fail_live(EngineFailure(f"engine step failed: {type(e).__name__}: {e}"), "error")
            return
        # The engine's final output of a request aborted here was accounted for at the abort.
        outputs = [out for out in outputs if out.request_id in self._live]
        notify(self.observer, "on_outputs", outputs)
        per_group: dict[int, tuple[Group, list[tuple[int, RequestOutput]]]] = {}
        for out in outputs:
            group = self._live[out.request_id]
            if out.finished:
                del self._live[out.request_id]
            per_group.setdefault(id(group), (group, []))[1].append((group.index[out.request_id], out))
        self._deliver([(group, ("outputs", outs)) for group, outs in per_group.values()])

    def _fail_live(self, error: ServeError, reason: str) -> None:
        """End every request in flight with ``error`` (to its reader) and free its KV."""
        groups = {id(g): g for g in self._live.values()}
        ids = list(self._live)
        abort_all(self._engine, ids)
        self._live.clear()
        if ids:
            notify(self.observer, "on_removed", ids, reason)
        self._deliver([(g, ("error", error)) for g in groups.values()])

    def _deliver(self, items: list[tuple[Group, tuple[str, Any]]]) -> None:
        """Queue items for their groups; :meth:`_flush` sends them at the end of the loop's turn."""
        self._outbox.extend(items)

    def _flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple[str, Any]]]] = {}
        for group, item in self._outbox:
            by_loop.setdefault(group.loop, []).append((group.queue, item))
        self._outbox = []
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, pairs)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass

    def _refresh_stats(self, force: bool) -> None:
        now = time.perf_counter()
        if force or now - self._stats_time >= STATS_INTERVAL_S:
            self._stats = self._engine.stats()
            self._stats_time = now

