"""The server's side of the engine-core process (:mod:`kvscope.serve.engine_core`).

:class:`EngineProcess` has :class:`~kvscope.serve.async_engine.AsyncEngine`'s interface, with the
engine in a ``spawn``ed child instead of on a thread: the HTTP front end (parsing, detokenizing,
server-sent events) no longer shares a GIL with the engine's host work, so neither slows the other.

Two daemon threads of the server move bytes: a sender batches the event loop's commands (add,
abort, stop) into one pickled list per write, so the loop never blocks on a full pipe; a receiver
reads the core's step messages and hands them to the event loop with one
``loop.call_soon_threadsafe`` per read (all messages waiting then). On the loop,
:meth:`EngineProcess._on_messages` applies each message: the newest stats, accept/reject answers,
and the new tokens of each request, appended in place to one cumulative :class:`RequestOutput` per
request (the readers' view is the thread mode's), then one queue item per HTTP request.

With ``--api-server-count N`` each of the N front-end processes holds an :meth:`EngineProcess.attach`
on one core that the parent process started: its own pipes, its own requests (ids prefixed by its
index), and one slot of a shared count of requests in flight (admission and metrics are the
server's, not the front end's).

If the core dies (killed, out of memory, a crash in native code), the requests in flight fail with
:class:`EngineFailure` (500, or an error event on a stream already started), and the server
reports itself unhealthy: ``/health`` and every new request answer 503 until it is restarted (as
vLLM's server does when its engine core dies; a restart would reload the model).
"""
from __future__ import annotations

import asyncio
import atexit
import queue
import threading
from collections.abc import Callable, MutableSequence, Sequence
from typing import TYPE_CHECKING, Any

from kvscope.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvscope.engine.sampling_params import SamplingParams
from kvscope.models.tokenizer import Tokenizer
from kvscope.serve.core_process import CoreConnection, CoreProcess
from kvscope.serve.engine_api import (
    EngineFailure,
    EngineInfo,
    EngineStopped,
    Group,
    OutputStream,
    RequestRejected,
    ServeError,
    StepObserver,
    await_accepted,
    notify,
    request_ids,
)
from kvscope.serve.engine_core import (
    ABORT,
    ACCEPTED,
    ADD,
    ADD_FAILED,
    FAILED,
    REJECTED,
    STOP,
    STOPPED,
    Delta,
    recv,
    send,
)

if TYPE_CHECKING:
    from kvscope.llm import LLM

_SHUTTING_DOWN = "the server is shutting down"


class _Track:
    """One engine request as its readers see it: a cumulative output, grown in place."""

    __slots__ = ("group", "index", "output", "_decode")

    def __init__(self, rid: str, group: Group, prompt: list[int], params: SamplingParams, arrival_time: float,
                 tokenizer: Tokenizer) -> None:
        self.group = group
        self.index = group.index[rid]
        skip = params.skip_special_tokens
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip)  # the final text only
        metrics = RequestMetrics(arrival_time=arrival_time, first_scheduled_time=None, token_times=[],
                                 finished_time=None, num_prompt_tokens=len(prompt), num_prefix_cached_tokens=0,
                                 num_preemptions=0)
        self.output = RequestOutput(request_id=rid, prompt=None, prompt_token_ids=prompt, outputs=[],
                                    finished=False, metrics=metrics)

    def update(self, delta: Delta) -> None:
        _, scheduled, times, finished, samples, end = delta
        out, m = self.output, self.output.metrics
        if m.first_scheduled_time is None:
            m.first_scheduled_time = scheduled
        m.token_times += times
        completions = out.outputs
        for index, ids, reason, text_end, error, logprobs, logits in samples:
            while len(completions) <= index:  # forked samples appear with their first token
                self._new_completion(len(completions))
            c = completions[index]
            c.token_ids += ids
            c.finish_reason, c.text_end, c.error = reason, text_end, error
            if logprobs:
                c.logprobs += logprobs
            if logits:
                c.logits += logits
        out.finished = finished
        if end is not None:
            m.finished_time, m.num_prefix_cached_tokens, m.num_preemptions = end

    def _new_completion(self, index: int) -> None:
        self.output.outputs.append(CompletionOutput(index=index, token_ids=[], finish_reason=None,
                                                    _decode=self._decode))


class _Pending:
    """A submitted group waiting for the core's accept or reject."""

    __slots__ = ("group", "tracks", "aborted")

    def __init__(self, group: Group, tracks: list[_Track]) -> None:
        self.group, self.tracks, self.aborted = group, tracks, False


class EngineProcess:
    """An engine core in a child process, served to the event loop; see the module docstring.

    Args:
        build: makes the :class:`~kvscope.llm.LLM` in the child; must pickle (a module-level
            function or a ``functools.partial`` of one, e.g. of ``LLM`` with its arguments).

    The constructor starts the child and waits until the model is loaded (it raises what the
    child's ``build`` raised); :attr:`info` then holds the tokenizer and limits. :meth:`start` on
    the event loop begins serving; :meth:`shutdown` (or :meth:`close`) stops the child.
    :meth:`attach` makes one front end of several instead, on a core another process started.
    """

    def __init__(self, build: Callable[[], LLM]) -> None:
        self._core: CoreProcess | None = CoreProcess(build, 1)
        self._setup(self._core.connections[0], [0], 0, "")

    @classmethod
    def attach(cls, connection: CoreConnection, in_flight: MutableSequence[int], index: int) -> EngineProcess:
        """Front end ``index`` of several on one core (``kvscope serve --api-server-count``), through
        its pipes ``connection``; ``in_flight``: every front end's count of requests in flight
        (shared memory, one slot each), so that admission and metrics see the whole server.
        Stopping it says goodbye to the core, which exits once every front end has."""
        self = cls.__new__(cls)
        self._core = None
        self._setup(connection, in_flight, index, f"{index}-")  # request ids unique across front ends
        return self

    def _setup(self, connection: CoreConnection, in_flight: MutableSequence[int], slot: int,
               id_prefix: str) -> None:
        self.observer: StepObserver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The loop's commands of one iteration go to the sender thread as one list: a put per
        # request woke the thread (and traded the GIL) once per request of a burst.
        self._outbox: queue.SimpleQueue[list[tuple[Any, ...]]] = queue.SimpleQueue()
        self._batch: list[tuple[Any, ...]] = []  # event loop only: commands not yet handed over
        self._threads: list[threading.Thread] = []
        self._state = "loaded"  # -> "running" -> "dead" | "stopping" -> "closed"
        self._death = ""
        self._live: dict[str, _Track] = {}  # event loop only, as is everything below
        self._pending: dict[str, _Pending] = {}  # first request id of the group -> its group
        self._in_flight, self._slot, self._id_prefix = in_flight, slot, id_prefix
        self._commands, self._messages, self._pid = connection.commands, connection.messages, connection.pid
        self.info: EngineInfo = connection.info
        self._stats: dict[str, Any] = connection.stats
        atexit.register(self.close)  # runs before multiprocessing's exit hook, which joins the child

    @property
    def pid(self) -> int | None:
        """The engine core's process id."""
        return self._pid

    # ---- the AsyncEngine interface (event loop) --------------------------------------------------
    def start(self) -> None:
        """Begin serving on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._state = "running"
        self._threads = [threading.Thread(target=self._send_commands, name="kvscope-core-send", daemon=True),
                         threading.Thread(target=self._receive, name="kvscope-core-receive", daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def is_running(self) -> bool:
        return self._state == "running"

    @property
    def num_requests(self) -> int:
        """Engine requests submitted and not yet closed (waiting, running, or being read), by every
        front end of the server."""
        return sum(self._in_flight)

    @property
    def stats(self) -> dict[str, Any]:
        """The newest ``engine.stats()`` the core sent (see ``STATS_INTERVAL_S``)."""
        return self._stats

    async def submit(
        self, prompts: Sequence[list[int]], params: SamplingParams, request_id: str, arrival_time: float
    ) -> OutputStream:
        """As :meth:`AsyncEngine.submit <kvscope.serve.async_engine.AsyncEngine.submit>`."""
        if not self.is_running:
            raise EngineStopped(self._death or _SHUTTING_DOWN)
        prompts = [list(p) for p in prompts]
        group = Group(request_ids(self._id_prefix + request_id, len(prompts)), asyncio.get_running_loop())
        stream = OutputStream(self, group)
        tokenizer = self.info.tokenizer
        tracks = [_Track(rid, group, p, params, arrival_time, tokenizer) for rid, p in zip(group.ids, prompts)]
        self._pending[group.ids[0]] = _Pending(group, tracks)
        self._in_flight[self._slot] += len(group.ids)
        self._command((ADD, group.ids, prompts, params, arrival_time))
        return await await_accepted(stream, group)

    def abort(self, request_ids: list[str]) -> None:
        """Abort engine requests (on the event loop; the core frees their KV before its next step)."""
        removed = [rid for rid in request_ids if self._live.pop(rid, None) is not None]
        pending = self._pending.get(request_ids[0]) if request_ids else None
        if pending is not None:  # accepted or not, the core sees the add first: count it at the answer
            pending.aborted = True
        if removed:
            notify(self.observer, "on_removed", removed, "abort")
        if self._state == "running":
            self._command((ABORT, list(request_ids)))

    def _command(self, command: tuple[Any, ...]) -> None:
        """Queue ``command`` for the core (event loop); the iteration's commands leave together."""
        self._batch.append(command)
        if len(self._batch) == 1:
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch:  # a stop may have taken them
            self._outbox.put(batch)

    def _release(self, n: int) -> None:
        self._in_flight[self._slot] -= n

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail whatever is in flight with :class:`EngineStopped` and stop the child (any thread)."""
        if self._state in ("stopping", "closed"):
            return
        self._state = "stopping"
        self._stop_core(timeout)
        for t in self._threads:
            t.join(timeout)
        self._commands.close()
        self._messages.close()
        if self._threads:
            self._call(self._fail_all, EngineStopped(_SHUTTING_DOWN), "abort")

    def close(self) -> None:
        """Stop the child if it still runs (what the command line calls on its way out)."""
        self.shutdown()
        self._state = "closed"
        atexit.unregister(self.close)

    # ---- threads ---------------------------------------------------------------------------------
    def _stop_core(self, timeout: float) -> None:
        """Say goodbye to the core (it aborts this front end's requests, and exits once every front
        end has); a core of this front end's own that does not exit within ``timeout`` seconds is
        terminated."""
        if self._threads:
            # after what the loop queued; also ends the sender, whose write then fails if the core is gone
            batch, self._batch = self._batch, []
            self._outbox.put([*batch, (STOP,)])
        else:  # never started: nothing reads the outbox
            try:
                send(self._commands, [(STOP,)])
            except OSError:  # the core is gone
                pass
        if self._core is not None:
            self._core.stop(timeout)

    def _send_commands(self) -> None:
        while True:
            batch = self._outbox.get()
            while not self._outbox.empty():
                batch += self._outbox.get_nowait()
            try:
                send(self._commands, batch)
            except OSError:  # the core is gone
                return
            if batch[-1][0] == STOP:
                return

    def _receive(self) -> None:
        try:
            while True:
                messages = [recv(self._messages)]
                while self._messages.poll():
                    messages.append(recv(self._messages))
                self._call(self._on_messages, messages)
                if any(event[0] == STOPPED for event in messages[-1][0]):
                    return
        except (EOFError, OSError):  # the pipe closed without a goodbye: the core died
            pass
        self._call(self._on_death, self._core.exitcode(5) if self._core is not None else None)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]
        except RuntimeError:  # that event loop is closed: nobody is waiting any more
            pass

    # ---- event loop ----------------------------------------------------------------------------
    def _on_messages(self, messages: list[tuple[list, list[Delta], dict[str, Any] | None]]) -> None:
        for events, deltas, stats in messages:
            # Stats before outputs: a client that sees its request end, or its add accepted, then
            # reads stats that include it.
            if stats is not None:
                self._stats = stats
            for event in events:
                self._on_event(event)
            if not deltas:
                continue
            outputs, per_group = [], {}
            for delta in deltas:
                track = self._live.get(delta[0])
                if track is None:  # aborted here since: accounted for at the abort
                    continue
                track.update(delta)
                if track.output.finished:
                    del self._live[delta[0]]
                outputs.append(track.output)
                per_group.setdefault(id(track.group), (track.group, []))[1].append((track.index, track.output))
            notify(self.observer, "on_outputs", outputs)
            for group, items in per_group.values():
                group.queue.put_nowait(("outputs", items))

    def _on_event(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == FAILED:
            _, ids, message, step_error = event
            if step_error:
                notify(self.observer, "on_step_error")
            self._fail([rid for rid in ids if rid in self._live], EngineFailure(message), "error")
            return
        if kind == STOPPED:
            return
        pending = self._pending.pop(event[1], None)
        if pending is None:
            return
        group = pending.group
        if kind == ACCEPTED:
            if pending.aborted:  # the abort followed the add into the core
                notify(self.observer, "on_removed", group.ids, "abort")
                return
            for track in pending.tracks:
                self._live[track.output.request_id] = track
            group.queue.put_nowait(("accepted", None))
        elif kind == REJECTED:
            group.queue.put_nowait(("error", RequestRejected(event[2], event[3])))
        elif kind == ADD_FAILED:
            group.queue.put_nowait(("error", EngineFailure(event[2])))

    def _fail(self, ids: list[str], error: ServeError, reason: str) -> None:
        """End the live requests ``ids`` with ``error`` (to their readers)."""
        groups = {}
        for rid in ids:
            track = self._live.pop(rid)
            groups[id(track.group)] = track.group
        if ids:
            notify(self.observer, "on_removed", ids, reason)
        for group in groups.values():
            group.queue.put_nowait(("error", error))

    def _fail_all(self, error: ServeError, reason: str) -> None:
        self._fail(list(self._live), error, reason)
        for pending in self._pending.values():
            pending.group.queue.put_nowait(("error", error))
        self._pending.clear()

    def _on_death(self, exitcode: int | None) -> None:
        if self._state != "running":
            return
        self._state = "dead"
        code = "" if exitcode is None else f" (exit code {exitcode})"  # a front end of several cannot know it
        self._death = f"the engine process died{code}; the server must be restarted"
        self._fail_all(EngineFailure(self._death), "error")
