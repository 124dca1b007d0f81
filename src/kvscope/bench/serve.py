"""The serving driver: a workload enters the engine on the wall clock while the engine runs.

One thread does both sides. Each turn of the loop hands the engine every request whose arrival
time has come (``add_request(..., arrival_time=<scheduled arrival>)``), then runs one engine step;
when the engine is idle it sleeps until the next arrival. A request that comes due while a step
runs is added right after it, with its scheduled arrival time, so the time it waited counts in its
TTFT as it would for a client of a busy server. All times are ``time.perf_counter`` (the engine's
clock) and are stored in seconds since the start of the run.

Modes:

- ``"timed"``: open loop at the requests' ``arrival_time`` offsets (:mod:`kvscope.workload.arrivals`).
- ``"offline"``: everything at offset 0, whatever the offsets say.
- :class:`~kvscope.workload.arrivals.ClosedLoop`: ``clients`` users, each sending the next request
  (in workload order) when its previous one finished plus the think time; offsets are ignored and a
  request's arrival is the moment its client sent it.

Text prompts are tokenized before the clock starts, so tokenization is not part of any latency.
Every request asks for exactly its ``output_len`` tokens: ``SamplingParams(max_tokens=output_len,
ignore_eos=True, temperature=0)`` unless ``sampling`` overrides the other fields.
"""
from __future__ import annotations

import heapq
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from kvscope.engine.outputs import RequestOutput
from kvscope.sampling_params import RequestOutputKind, SamplingParams
from kvscope.errors import ConfigError, RequestError
from kvscope.workload.arrivals import ClosedLoop
from kvscope.workload.requests import WorkloadRequest

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from kvscope.llm import LLM


@dataclass
class RequestRecord:
    """What happened to one request; times in seconds since the start of the run.

    ``token_times`` has one entry per output token (``[output_len]``); a request that was rejected
    or ended in an engine error has ``error`` set and counts as failed. A client of an HTTP server
    (:mod:`kvscope.bench.http_driver`) sees streamed chunks, not tokens: its ``token_times`` hold
    one entry per chunk and ``output_tokens`` the server's own count (``usage.completion_tokens``),
    which the metrics take for output tokens and TPOT, as vLLM's ``bench serve`` does.
    """

    request_id: str
    prompt_len: int
    expected_output_len: int
    arrival_time: float
    first_scheduled_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    num_prefix_cached_tokens: int = 0
    output_tokens: int | None = None  # None: one token_times entry per output token

    @property
    def success(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def output_len(self) -> int:
        """Output tokens actually produced."""
        return self.output_tokens if self.output_tokens is not None else len(self.token_times)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> RequestRecord:
        return cls(**row)


@dataclass
class ServingRun:
    """Result of :func:`run_workload`.

    Attributes:
        mode: ``"timed"``, ``"offline"`` or ``"closed_loop"``.
        records: one per workload request, in workload order.
        timeline: one sample per engine step: ``time`` (s since start) and the engine's
            ``num_running``, ``num_waiting``, ``num_preemptions`` (cumulative), ``kv_bytes_used``,
            ``kv_bytes_allocated`` and, when the strategy reports it, ``host_kv_bytes``.
        peak_device_memory_bytes: ``torch.cuda.max_memory_allocated`` over the run (reset at its
            start); None on CPU.
        peak_host_rss_bytes: the process's peak resident set size (``getrusage``); a lifetime peak,
            so it includes whatever ran before (model loading); None where unavailable.
        wall_time_s: start of the run to the end of its last step.
    """

    mode: str
    records: list[RequestRecord]
    timeline: list[dict[str, float]]
    peak_device_memory_bytes: int | None
    peak_host_rss_bytes: int | None
    wall_time_s: float

    def peaks(self) -> dict[str, float]:
        """Largest value of every timeline quantity during the run (``peak_kv_bytes_used``, ...)."""
        keys = {k for sample in self.timeline for k in sample if k not in ("time", "num_preemptions")}
        return {f"peak_{k}": max(s.get(k, 0) for s in self.timeline) for k in sorted(keys)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "wall_time_s": self.wall_time_s,
            "peak_device_memory_bytes": self.peak_device_memory_bytes,
            "peak_host_rss_bytes": self.peak_host_rss_bytes,
            **self.peaks(),
            "records": [r.to_dict() for r in self.records],
            "timeline": self.timeline,
        }


class _OpenLoop:
    """Requests due at fixed offsets (seconds after ``start``)."""

    def __init__(self, offsets: Sequence[float], start: float) -> None:
        self._queue = sorted((start + t, i) for i, t in enumerate(offsets))
        self._next = 0

    def due(self, now: float) -> list[tuple[int, float]]:
        """(request index, scheduled arrival) of the requests that have come due, in arrival order."""
        out = []
        while self._next < len(self._queue) and self._queue[self._next][0] <= now:
            when, i = self._queue[self._next]
            out.append((i, when))
            self._next += 1
        return out

    def done(self, when: float) -> None:
        """Open-loop arrivals do not depend on completions."""

    def next_arrival(self) -> float | None:
        return self._queue[self._next][0] if self._next < len(self._queue) else None


class _Clients:
    """Closed loop: a heap of the times at which idle clients send their next request."""

    def __init__(self, loop: ClosedLoop, num_requests: int, start: float) -> None:
        self._ready = [start] * loop.clients
        self._think = loop.think_time_s
        self._count = num_requests
        self._next = 0

    def due(self, now: float) -> list[tuple[int, float]]:
        out = []
        while self._ready and self._ready[0] <= now and self._next < self._count:
            out.append((self._next, heapq.heappop(self._ready)))
            self._next += 1
        return out

    def done(self, when: float) -> None:
        heapq.heappush(self._ready, when + self._think)

    def next_arrival(self) -> float | None:
        return self._ready[0] if self._ready and self._next < self._count else None


def _host_peak_rss() -> int | None:
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def _params(requests: Sequence[WorkloadRequest], sampling: dict[str, Any] | None) -> list[SamplingParams]:
    # Only finished outputs are read: the engine need not copy each growing output every step.
    base = {"temperature": 0.0, "ignore_eos": True, "output_kind": RequestOutputKind.FINAL_ONLY, **(sampling or {})}
    if base.get("n", 1) != 1:
        raise ConfigError("run_workload serves one sequence per request; sampling 'n' must be 1")
    return [SamplingParams(**{**base, "max_tokens": r.output_len}) for r in requests]


def run_workload(
    llm: LLM,
    requests: Sequence[WorkloadRequest],
    mode: str | ClosedLoop = "timed",
    sampling: dict[str, Any] | None = None,
    use_tqdm: bool = False,
) -> ServingRun:
    """Serve ``requests`` through ``llm.engine`` in ``mode`` (see the module docstring).

    Args:
        sampling: extra :class:`SamplingParams` fields for every request (``max_tokens`` is always
            the request's ``output_len``; ``n`` must stay 1).
        use_tqdm: show a progress bar of finished requests.

    A request the engine rejects (:class:`RequestError`) is recorded as failed with the message,
    and the run goes on. The engine must have no unfinished requests when the run starts. A fresh
    model's first steps pay one-time set-up (seconds on CPU); warm it up first (one short
    ``llm.generate``) or the first requests' latencies include it.
    """
    if not (mode in ("timed", "offline") or isinstance(mode, ClosedLoop)):
        raise ConfigError(f"mode must be 'timed', 'offline' or a ClosedLoop, got {mode!r}")
    engine = llm.engine
    if engine.has_unfinished_requests():
        raise ConfigError("run_workload needs an idle engine; it has unfinished requests")
    params = _params(requests, sampling)
    prompts = [llm.tokenizer.encode(r.prompt) if isinstance(r.prompt, str) else list(r.prompt) for r in requests]
    device = engine.config.torch_device
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)

    records: dict[int, RequestRecord] = {}
    timeline: list[dict[str, float]] = []
    bar = tqdm(total=len(requests), desc="serve", unit="req", disable=not use_tqdm)
    start = time.perf_counter()
    if isinstance(mode, ClosedLoop):
        source: _OpenLoop | _Clients = _Clients(mode, len(requests), start)
    else:
        source = _OpenLoop([0.0 if mode == "offline" else r.arrival_time for r in requests], start)

    def finish(i: int, record: RequestRecord, when: float) -> None:
        records[i] = record
        source.done(when)
        bar.update(1)

    while True:
        now = time.perf_counter()
        for i, arrival in source.due(now):
            try:
                engine.add_request(prompts[i], params[i], request_id=str(i), arrival_time=arrival)
            except RequestError as e:
                finish(i, RequestRecord(str(i), len(prompts[i]), requests[i].output_len, arrival - start,
                                        error=str(e)), now)
        if engine.has_unfinished_requests():
            outputs = engine.step()
            timeline.append({"time": time.perf_counter() - start, **engine.load()})
            for out in outputs:
                if out.finished:
                    record = _record(out, requests[int(out.request_id)].output_len, start)
                    finish(int(out.request_id), record, out.metrics.finished_time or time.perf_counter())
            continue
        wake = source.next_arrival()
        if wake is None:
            break
        time.sleep(max(0.0, wake - time.perf_counter()))
    wall = time.perf_counter() - start
    bar.close()
    return ServingRun(
        mode=mode if isinstance(mode, str) else "closed_loop",
        records=[records[i] for i in range(len(requests))],
        timeline=timeline,
        peak_device_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if on_cuda else None,
        peak_host_rss_bytes=_host_peak_rss(),
        wall_time_s=wall,
    )


def _record(out: RequestOutput, expected_output_len: int, start: float) -> RequestRecord:
    m = out.metrics
    return RequestRecord(
        request_id=out.request_id,
        prompt_len=m.num_prompt_tokens,
        expected_output_len=expected_output_len,
        arrival_time=m.arrival_time - start,
        first_scheduled_time=None if m.first_scheduled_time is None else m.first_scheduled_time - start,
        token_times=[t - start for t in m.token_times],
        finished_time=None if m.finished_time is None else m.finished_time - start,
        finish_reason=out.finish_reason,
        error=out.error,
        num_preemptions=m.num_preemptions,
        num_prefix_cached_tokens=m.num_prefix_cached_tokens,
    )
