"""The engine core: one :class:`LLMEngine` in a process of its own, driven by the HTTP server.

``kvscope serve`` (process mode, the default) runs :func:`run_engine_core` in a ``spawn``ed child
(CUDA cannot be used in a forked one). The child builds the engine itself from a picklable
``build()`` (the server never loads the weights), sends an :class:`EngineInfo` (tokenizer, limits)
once, then loops:

1. take the server's commands: without blocking while the engine has work, blocking while idle
   (an idle server costs nothing); a batch of commands is one pickled list;
2. apply them in order: ``(ADD, ids, prompts, params, arrival_time)`` adds one HTTP request's
   prompts, all or none; ``(ABORT, ids)`` aborts (the KV is freed before the next step);
   ``(STOP,)`` aborts everything and ends the loop;
3. run one step;
4. send ONE message for the turn: ``(events, outputs, stats)`` (written by a thread of the core's,
   so that a server that falls behind never holds up a step).

``events``: ``(ACCEPTED, first_id)``, ``(REJECTED, first_id, message, prompt_index)``,
``(ADD_FAILED, first_id, message)``, ``(FAILED, ids, message, step_error)`` (requests failed by a
step that raised, or by an error of the loop; their KV is freed), ``(STOPPED,)``. ``outputs``: one
tuple per request that moved, carrying only what is new since the last message (see
:meth:`_Sent.delta`), so a message costs O(batch), not O(tokens so far). ``stats``:
``engine.stats()`` after any add or abort, when the engine falls idle, otherwise at most every
``STATS_INTERVAL_S``; None when not taken this turn.

Failures stay contained as on the thread (:mod:`kvscope.serve.async_engine`): a rejected prompt
fails its request alone, a step that raises fails the requests then in flight and the loop serves
on. The child ignores SIGINT (Ctrl-C reaches the whole process group; the server shuts down
gracefully and then stops the core), and exits when the server goes away (its command pipe closes).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from kvscope.errors import ConfigError, KVScopeError, RequestError
from kvscope.sampling_params import RequestOutputKind
from kvscope.serve.engine_api import STATS_INTERVAL_S, EngineInfo, abort_all

if TYPE_CHECKING:
    from kvscope.llm import LLM
    from kvscope.request import Request

log = logging.getLogger("kvscope.serve")

ADD, ABORT, STOP = "add", "abort", "stop"
READY, START_FAILED = "ready", "start_failed"
ACCEPTED, REJECTED, ADD_FAILED, FAILED, STOPPED = "accepted", "rejected", "add_failed", "failed", "stopped"

#: One request's news in a step message: request id, first scheduled time, new token times,
#: finished, one ``(index, new token ids, finish_reason, text_end, error, new logprobs, new logits
#: rows)`` per sample, and ``(finished_time, num_prefix_cached_tokens, num_preemptions)`` once
#: finished (else None).
Delta = tuple[str, float | None, list[float], bool, list[tuple[Any, ...]], tuple[float | None, int, int] | None]


def send(conn: Connection, message: Any) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def run_engine_core(build: Callable[[], LLM], commands: Connection, outputs: Connection) -> None:
    """The child's entry point: build the engine, announce it, serve until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        llm = build()
        info, stats = EngineInfo.of(llm), llm.engine.stats()
    except BaseException as e:  # noqa: BLE001 - reported to the server, which raises it
        if not isinstance(e, KVScopeError):
            log.exception("kvscope: the engine core could not start")
        send(outputs, (START_FAILED, _picklable(e)))
        return
    send(outputs, (READY, info, stats))
    # The model and everything start-up made live as long as the core: out of the collector's
    # sight, the collections that each step's objects trigger scan only those.
    gc.collect()
    gc.freeze()
    try:
        EngineCore(llm, commands, outputs).run()
    finally:
        llm.close()
    # Nothing is left to clean up, and the interpreter's teardown (torch's modules) takes a second
    # that the server's shutdown would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _Outbox:
    """Writes the core's messages to the server from a thread of its own: a server that falls
    behind (its event loop busy with HTTP) never holds up a step, its messages wait here rather
    than in a full pipe. The thread only writes (the write releases the GIL); pickling stays on the
    loop, where the objects are."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.broken = False  # a write failed: the server is gone
        self._thread = threading.Thread(target=self._write, name="kvscope-core-out", daemon=True)
        self._thread.start()

    def put(self, message: Any) -> None:
        self._queue.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        """Write what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join()

    def _write(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                self._conn.send_bytes(data)
            except OSError:
                self.broken = True
                return


def _picklable(e: BaseException) -> BaseException:
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:  # an exception type whose arguments do not survive pickling
        return RuntimeError(f"{type(e).__name__}: {e}")


class _Sent:
    """One request of the server's: its samples (the engine's own list, see ``LLMEngine.samples``)
    and how much of each the server has been sent (tokens, end, token times)."""

    __slots__ = ("samples", "counts", "reasons", "times")

    def __init__(self, samples: list[Request]) -> None:
        self.samples = samples
        self.counts: list[int] = []  # tokens sent, by sample index
        self.reasons: list[str | None] = []  # finish reason sent, by sample index
        self.times = 0

    def delta(self) -> Delta | None:
        """What the request gained since the last call (None: nothing); marks it sent."""
        counts, reasons = self.counts, self.reasons
        news = []
        for r in self.samples:
            i = r.child_index
            while len(counts) <= i:  # a sample forked since
                counts.append(0)
                reasons.append(None)
            tokens, reason, k = r.output_token_ids, r.finish_reason, counts[i]
            if len(tokens) == k and reason == reasons[i]:
                continue
            counts[i], reasons[i] = len(tokens), reason
            # () for what was not asked for: no empty list to build and pickle
            news.append((i, tokens[k:], reason, r.text_end, r.error, r.logprobs[k:] if r.logprobs else (),
                         r.logits[k:] if r.logits else ()))
        if not news:
            return None
        head = self.samples[0]
        times = head.token_times[self.times:]
        self.times = len(head.token_times)
        finished = None not in reasons  # every sample's end sent (the engine's RequestOutput.finished)
        end = (head.finished_time, head.num_prefix_cached_tokens, head.num_preemptions) if finished else None
        return head.request_id, head.first_scheduled_time, times, finished, news, end


class EngineCore:
    """The loop of the module docstring around ``llm.engine``."""

    def __init__(self, llm: LLM, commands: Connection, outputs: Connection) -> None:
        self._engine = llm.engine
        self._commands = commands
        self._outbox = _Outbox(outputs)
        self._live: dict[str, _Sent] = {}  # requests the server still reads
        self._events: list[tuple[Any, ...]] = []
        self._stats_time = 0.0

    def run(self) -> None:
        try:
            self._serve()
        finally:
            self._outbox.close()

    def _serve(self) -> None:
        engine = self._engine
        while not self._outbox.broken:
            try:
                batch = self._receive(block=not engine.has_unfinished_requests())
            except (EOFError, OSError):  # the server is gone: nobody to serve
                return
            outputs: list[Delta] = []
            stats = None
            try:
                for cmd in batch:
                    if cmd[0] == STOP:
                        self._abort(list(self._live))
                        self._outbox.put(([*self._events, (STOPPED,)], [], None))
                        return
                    self._apply(cmd)
                if engine.has_unfinished_requests():
                    outputs = self._step()
                stats = self._stats(force=bool(batch) or not engine.has_unfinished_requests())
            except Exception as e:  # a bug outside step(): keep serving, fail what was in flight
                log.exception("kvscope engine loop error")
                self._fail_live(f"engine loop error: {type(e).__name__}: {e}", step_error=False)
            if self._events or outputs or stats is not None:
                self._outbox.put((self._events, outputs, stats))
                self._events = []

    def _receive(self, block: bool) -> list[tuple[Any, ...]]:
        batch = recv(self._commands) if block else []
        while self._commands.poll():
            batch += recv(self._commands)
        return batch

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        if cmd[0] == ABORT:
            self._abort(cmd[1])
            return
        _, ids, prompts, params, arrival_time = cmd
        # The engine builds no per-step outputs; each step's news is read from the requests' samples.
        params = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
        added: list[str] = []
        try:
            for i, (rid, prompt) in enumerate(zip(ids, prompts)):
                try:
                    self._engine.add_request(prompt, params, request_id=rid, arrival_time=arrival_time)
                except (RequestError, ConfigError) as e:
                    self._events.append((REJECTED, ids[0], str(e), i))
                    break
                added.append(rid)
            else:
                for rid in added:
                    self._live[rid] = _Sent(self._engine.samples(rid))
                self._events.append((ACCEPTED, ids[0]))
                return
        except Exception as e:
            self._events.append((ADD_FAILED, ids[0], f"add_request failed: {type(e).__name__}: {e}"))
        for rid in added:  # all or none
            self._engine.abort(rid)

    def _abort(self, ids: list[str]) -> None:
        for rid in ids:
            if self._live.pop(rid, None) is not None:
                self._engine.abort(rid)

    def _step(self) -> list[Delta]:
        try:
            self._engine.step()  # its outputs are finished requests': the samples say it all
        except Exception as e:
            log.exception("kvscope engine step failed; failing the requests in flight")
            self._fail_live(f"engine step failed: {type(e).__name__}: {e}", step_error=True)
            return []
        deltas, done = [], []
        for rid, sent in self._live.items():
            delta = sent.delta()
            if delta is not None:
                deltas.append(delta)
                if delta[3]:
                    done.append(rid)
        for rid in done:
            del self._live[rid]
        return deltas

    def _fail_live(self, message: str, step_error: bool) -> None:
        """End every request in flight (the server fails them with ``message``) and free its KV."""
        ids = list(self._live)
        abort_all(self._engine, ids)
        self._live.clear()
        self._events.append((FAILED, ids, message, step_error))

    def _stats(self, force: bool) -> dict[str, Any] | None:
        now = time.perf_counter()
        if not force and now - self._stats_time < STATS_INTERVAL_S:
            return None
        self._stats_time = now
        return self._engine.stats()
