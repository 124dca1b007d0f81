"""The engine core: one :class:`LLMEngine` in a process of its own, driven by one or more HTTP
front ends.

``kvscope serve`` (process mode, the default) runs :func:`run_engine_core` in a ``spawn``ed child
(CUDA cannot be used in a forked one), with one command pipe and one output pipe per front end
(``--api-server-count``, default 1). The child builds the engine itself from a picklable
``build()`` (no front end ever loads the weights), sends an :class:`EngineInfo` (tokenizer, limits)
down every output pipe once, then loops:

1. take the front ends' commands: without blocking while the engine has work, blocking while idle
   (an idle server costs nothing); a batch of one front end's commands is one pickled list;
2. apply them in order: ``(ADD, ids, prompts, params, arrival_time)`` adds one HTTP request's
   prompts, all or none; ``(ABORT, ids)`` aborts (the KV is freed before the next step);
   ``(STOP,)`` aborts that front end's requests and says goodbye to it;
3. run one step;
4. send each front end that has news ONE message for the turn: ``(events, outputs, stats)`` (written
   by a thread per front end, so that a front end that falls behind never holds up a step).

Each request belongs to the front end that added it: its events and outputs go to that front end
only, so a turn costs O(batch) whatever the number of front ends. ``events``: ``(ACCEPTED,
first_id)``, ``(REJECTED, first_id, message, prompt_index)``, ``(ADD_FAILED, first_id, message)``,
``(FAILED, ids, message, step_error)`` (requests failed by a step that raised, or by an error of the
loop; their KV is freed; ``step_error`` is set for one front end only, so that a step counts once
in the server's metrics), ``(STOPPED,)``. ``outputs``: one tuple per request that moved, carrying
only what is new since the last message (see :meth:`_Sent.delta`), so a message costs O(batch),
not O(tokens so far). ``stats``: ``engine.stats()`` after any add or abort, when the engine falls
idle, otherwise at most every ``STATS_INTERVAL_S``, to every front end; None when not taken this turn.
The stats also carry the loop's own time (:class:`LoopTimes`): where the core's turns go (taking
and applying commands, the step, the messages) and a histogram of turn lengths, so that a server
whose requests wait can tell a long step from a core busy with admission. A turn longer than
:data:`SLOW_TURN_S` is logged as a warning with its parts and the tokens its step computed.

Failures stay contained as on the thread (:mod:`kvscope.serve.async_engine`): a rejected prompt
fails its request alone, a step that raises fails the requests then in flight and the loop serves
on. A front end that goes away (its command pipe closes, or a write to it fails) has its requests
aborted, their KV freed, and the others are served on. The child ignores SIGINT (Ctrl-C reaches the
whole process group; the front ends shut down gracefully and then stop it), and exits when every
front end has gone.
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
from bisect import bisect_left
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from kvscope.errors import ConfigError, KVScopeError, RequestError
from kvscope.sampling_params import RequestOutputKind
from kvscope.serve.engine_api import STATS_INTERVAL_S, TURN_BUCKETS, EngineInfo, abort_all

if TYPE_CHECKING:
    from kvscope.llm import LLM
    from kvscope.request import Request

log = logging.getLogger("kvscope.serve")

ADD, ABORT, STOP = "add", "abort", "stop"
READY, START_FAILED = "ready", "start_failed"
ACCEPTED, REJECTED, ADD_FAILED, FAILED, STOPPED = "accepted", "rejected", "add_failed", "failed", "stopped"

#: A turn longer than this is logged as a warning with its parts: every stream the core serves
#: waited that long for its next token.
SLOW_TURN_S = 0.5

#: One request's news in a step message: request id, first scheduled time, new token times,
#: finished, one ``(index, new token ids, finish_reason, text_end, error, new logprobs, new logits
#: rows)`` per sample, and ``(finished_time, num_prefix_cached_tokens, num_preemptions)`` once
#: finished (else None).
Delta = tuple[str, float | None, list[float], bool, list[tuple[Any, ...]], tuple[float | None, int, int] | None]


def send(conn: Connection, message: Any) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def run_engine_core(build: Callable[[], LLM], clients: list[tuple[Connection, Connection]]) -> None:
    """The child's entry point: build the engine, announce it to every front end (``clients``: one
    ``(commands, outputs)`` pipe pair each), serve until every front end has gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        llm = build()
        info, stats = EngineInfo.of(llm), llm.engine.stats()
    except BaseException as e:  # noqa: BLE001 - reported to the server, which raises it
        if not isinstance(e, KVScopeError):
            log.exception("kvscope: the engine core could not start")
        for _, outputs in clients:
            send(outputs, (START_FAILED, _picklable(e)))
        return
    for _, outputs in clients:
        send(outputs, (READY, info, stats))
    # The model and everything start-up made live as long as the core: out of the collector's
    # sight, the collections that each step's objects trigger scan only those.
    gc.collect()
    gc.freeze()
    try:
        EngineCore(llm, clients).run()
    finally:
        llm.close()
    # Nothing is left to clean up, and the interpreter's teardown (torch's modules) takes a second
    # that the server's shutdown would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class LoopTimes:
    """Cumulative seconds of the core's working turns by part, and their lengths' histogram. A turn
    that waited for commands while idle counts from when they arrived: waiting is not work."""

    __slots__ = ("admit", "step", "output", "buckets", "total")

    def __init__(self) -> None:
        self.admit = self.step = self.output = self.total = 0.0
        self.buckets = [0] * (len(TURN_BUCKETS) + 1)

    def add(self, admit: float, step: float, output: float) -> float:
        """Counts one turn by part; returns its length."""
        self.admit += admit
        self.step += step
        self.output += output
        turn = admit + step + output
        self.total += turn
        self.buckets[bisect_left(TURN_BUCKETS, turn)] += 1
        return turn

    def stats(self) -> dict[str, Any]:
        """The ``core_*`` keys of the stats: seconds by part, turns, and the histogram."""
        return {"core_admit_seconds": self.admit, "core_step_seconds": self.step,
                "core_output_seconds": self.output, "core_turns": sum(self.buckets),
                "core_turn_seconds_sum": self.total, "core_turn_buckets": list(self.buckets)}


class _Outbox:
    """Writes the core's messages to the server from a thread of its own: a server that falls
    behind (its event loop busy with HTTP) never holds up a step, its messages wait here rather
    than in a full pipe. The thread only writes (the write releases the GIL); pickling stays on the
    loop, where the objects are."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
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
                self.conn.send_bytes(data)
            except OSError:
                self.broken = True
                return


def _picklable(e: BaseException) -> BaseException:
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:  # an exception type whose arguments do not survive pickling
        return RuntimeError(f"{type(e).__name__}: {e}")


class _Sent:
    """One request of a front end's: its samples (the engine's own list, see ``LLMEngine.samples``),
    how much of each the front end has been sent (tokens, end, token times), and that front end."""

    __slots__ = ("client", "samples", "counts", "reasons", "times")

    def __init__(self, client: _Client, samples: list[Request]) -> None:
        self.client = client
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


class _Client:
    """One front end: its command pipe, its outbox, and what it is sent at the end of this turn."""

    __slots__ = ("index", "commands", "outbox", "events", "outputs")

    def __init__(self, index: int, commands: Connection, outputs: Connection) -> None:
        self.index = index
        self.commands = commands
        self.outbox = _Outbox(outputs)
        self.events: list[tuple[Any, ...]] = []
        self.outputs: list[Delta] = []

    def close(self) -> None:
        """Write what is queued, then close both pipes."""
        self.outbox.close()
        self.outbox.conn.close()
        self.commands.close()


class EngineCore:
    """The loop of the module docstring around ``llm.engine``."""

    def __init__(self, llm: LLM, clients: list[tuple[Connection, Connection]]) -> None:
        self._engine = llm.engine
        self._clients = {c.commands: c for c in (_Client(i, *pair) for i, pair in enumerate(clients))}
        self._live: dict[str, _Sent] = {}  # requests a front end still reads
        self._stats_time = 0.0
        self._times = LoopTimes()

    def run(self) -> None:
        try:
            self._serve()
        finally:
            for client in self._clients.values():
                client.close()

    def _serve(self) -> None:
        engine = self._engine
        clock = time.perf_counter
        while self._clients:
            idle = not engine.has_unfinished_requests()
            tokens = engine.num_computed_tokens_total
            t0 = clock()
            batch = self._receive(block=idle)
            t1 = t2 = clock()
            if idle:
                t0 = t1
            stats = None
            try:
                for client, commands in batch:
                    for cmd in commands:
                        if cmd[0] == STOP:
                            self._drop(client, goodbye=True)
                            break
                        self._apply(client, cmd)
                t1 = t2 = clock()
                if engine.has_unfinished_requests():
                    self._step()
                t2 = clock()
                stats = self._stats(force=bool(batch) or not engine.has_unfinished_requests())
            except Exception as e:  # a bug outside step(): keep serving, fail what was in flight
                log.exception("kvscope engine loop error")
                self._fail_live(f"engine loop error: {type(e).__name__}: {e}", step_error=False)
            for client in list(self._clients.values()):
                if client.outbox.broken:  # a write failed: that front end is gone
                    self._drop(client, goodbye=False)
                elif client.events or client.outputs or stats is not None:
                    client.outbox.put((client.events, client.outputs, stats))
                    client.events, client.outputs = [], []
            turn = self._times.add(t1 - t0, t2 - t1, clock() - t2)
            if turn > SLOW_TURN_S:
                log.warning("kvscope: engine core turn of %.3f s: %d commands applied in %.3f s, a step of %d "
                            "tokens in %.3f s, messages in %.3f s; %d running, %d waiting after it",
                            turn, sum(len(c) for _, c in batch), t1 - t0, engine.num_computed_tokens_total - tokens,
                            t2 - t1, turn - (t2 - t0), len(engine.scheduler.running), len(engine.scheduler.waiting))

    def _receive(self, block: bool) -> list[tuple[_Client, list[tuple[Any, ...]]]]:
        """Each front end's waiting commands (blocking until some arrive when ``block``); a front
        end whose pipe closed is dropped."""
        ready = wait(list(self._clients)) if block else [conn for conn in self._clients if conn.poll()]
        batch = []
        for conn in ready:
            client = self._clients[conn]
            commands: list[tuple[Any, ...]] = []
            try:
                while conn.poll():
                    commands += recv(conn)
            except (EOFError, OSError):  # the front end is gone: its requests have no reader
                self._drop(client, goodbye=False)
                continue
            batch.append((client, commands))
        return batch

    def _drop(self, client: _Client, goodbye: bool) -> None:
        """Abort ``client``'s requests (freeing their KV) and stop serving it; ``goodbye``: it asked
        to stop and still reads, so it is told (STOPPED) once everything before is written."""
        if client.commands not in self._clients:
            return
        del self._clients[client.commands]
        ids = [rid for rid, sent in self._live.items() if sent.client is client]
        self._abort(ids)
        if goodbye:
            client.outbox.put(([*client.events, (STOPPED,)], [], None))
        else:
            log.warning("kvscope: front end %d went away; aborted its %d requests", client.index, len(ids))
        client.close()

    def _apply(self, client: _Client, cmd: tuple[Any, ...]) -> None:
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
                    client.events.append((REJECTED, ids[0], str(e), i))
                    break
                added.append(rid)
            else:
                for rid in added:
                    self._live[rid] = _Sent(client, self._engine.samples(rid))
                client.events.append((ACCEPTED, ids[0]))
                return
        except Exception as e:
            client.events.append((ADD_FAILED, ids[0], f"add_request failed: {type(e).__name__}: {e}"))
        for rid in added:  # all or none
            self._engine.abort(rid)

    def _abort(self, ids: list[str]) -> None:
        for rid in ids:
            if self._live.pop(rid, None) is not None:
                self._engine.abort(rid)

    def _step(self) -> None:
        """One step; each request's news goes to its front end's outputs."""
        try:
            self._engine.step()  # its outputs are finished requests': the samples say it all
        except Exception as e:
            log.exception("kvscope engine step failed; failing the requests in flight")
            self._fail_live(f"engine step failed: {type(e).__name__}: {e}", step_error=True)
            return
        done = []
        for rid, sent in self._live.items():
            delta = sent.delta()
            if delta is not None:
                sent.client.outputs.append(delta)
                if delta[3]:
                    done.append(rid)
        for rid in done:
            del self._live[rid]

    def _fail_live(self, message: str, step_error: bool) -> None:
        """End every request in flight (each front end fails its own with ``message``) and free its
        KV. A step error is counted by the first front end only: the server's metrics sum them."""
        ids = list(self._live)
        abort_all(self._engine, ids)
        per_client: dict[_Client, list[str]] = {c: [] for c in self._clients.values()}
        for rid in ids:
            per_client[self._live[rid].client].append(rid)
        self._live.clear()
        for i, (client, client_ids) in enumerate(per_client.items()):
            client.events.append((FAILED, client_ids, message, step_error and i == 0))

    def _stats(self, force: bool) -> dict[str, Any] | None:
        now = time.perf_counter()
        if not force and now - self._stats_time < STATS_INTERVAL_S:
            return None
        self._stats_time = now
        return self._engine.stats() | self._times.stats()
