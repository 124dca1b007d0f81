"""A step-level replay of the engine's scheduler with analytical step times.

Requests arrive, are admitted first come first served while ``max_num_seqs`` and the KV pool allow,
and share each step's token budget (running requests first, one token per decoding request, prompt
chunks with the rest), as ``engine/scheduler.py`` does. Each step lasts what the cost model says
(:class:`StepCost`). Simplifications: a request reserves its pool space at admission (the cost
model's ``held_tokens``), so there is no preemption; sampling, stop strings and prefix caching are
not modelled.

Every iteration of the replay either advances time to the next arrival, retires a request that
can never fit, or runs a step that computes at least one token (limits are >= 1), so it ends
within :func:`max_iterations`; the loop still stops there with :class:`SimulationError` rather
than spin on a case this argument missed.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvscope.advise.workload import Workload
from kvscope.errors import ConfigError, KVScopeError


class SimulationError(KVScopeError):
    """The scheduler replay made no progress (a bug in the replay or in a cost function it was given)."""


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings the simulation follows (``EngineConfig``'s names and defaults)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    #: Ranks the model is split over (see ``advise/parallel.py``).
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        # With 0 the replay admits nothing or computes nothing, and would never end.
        for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")


@dataclass
class SimRequest:
    """One request's progress; times in seconds from the start of the run."""

    arrival: float
    prompt_len: int
    output_len: int
    computed: int = 0  # prompt tokens computed
    generated: int = 0  # output tokens produced
    held: int = 0  # pool tokens reserved
    first_token: float | None = None
    finish: float | None = None

    @property
    def decoding(self) -> bool:
        return self.computed >= self.prompt_len

    @property
    def context(self) -> int:
        """Tokens in the KV cache before this step's token (prompt + outputs so far)."""
        return self.computed + max(self.generated - 1, 0)


@dataclass(frozen=True)
class StepWork:
    """What one step computes: decode requests and prefill chunks (request, new tokens)."""

    decodes: list[SimRequest]
    prefills: list[tuple[SimRequest, int]]


@dataclass
class SimResult:
    """Per-request times (seconds) and run totals.

    ``ttft``/``tpot``/``e2el``: ``[served requests]``; ``failed``: requests that never fit the pool;
    ``duration``: start of the run (time 0) to the last finish; ``peak_held_tokens`` and
    ``peak_running``: maxima over steps.
    """

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    e2el: list[float] = field(default_factory=list)
    output_tokens: int = 0
    failed: int = 0
    duration: float = 0.0
    steps: int = 0
    peak_held_tokens: int = 0
    peak_running: int = 0


HoldFn = Callable[[SimRequest], int]


def max_iterations(workload: Workload) -> int:
    """Bound on the replay's iterations: one per token to compute (each step computes one or more),
    plus, per request, one to reach its arrival and one to admit or retire it."""
    return sum(workload.prompt_lens) + sum(workload.output_lens) + 2 * workload.num_requests + 1


def simulate(
    workload: Workload,
    pool_tokens: int,
    limits: EngineLimits,
    admit_tokens: HoldFn,
    running_tokens: HoldFn,
    step_seconds: Callable[[StepWork], float],
) -> SimResult:
    """Replay ``workload`` and return per-request latencies.

    ``admit_tokens(r)``: pool tokens a request needs to be admitted; ``running_tokens(r)``: what it
    holds after a step (e.g. an evicting strategy's budget once it decodes); ``pool_tokens``: the
    pool's capacity in tokens; ``step_seconds``: duration of one step (seconds).
    """
    arrivals = workload.arrivals()
    order = sorted(range(workload.num_requests), key=lambda i: arrivals[i])
    pending = deque(SimRequest(arrivals[i], workload.prompt_lens[i], workload.output_lens[i]) for i in order)
    waiting: deque[SimRequest] = deque()
    running: list[SimRequest] = []
    res = SimResult()
    now, held = 0.0, 0
    cap = max_iterations(workload)
    for _ in range(cap + 1):
        if not (pending or waiting or running):
            break
        while pending and pending[0].arrival <= now:
            waiting.append(pending.popleft())
        if not running and not waiting:
            now = pending[0].arrival
            continue
        while waiting and len(running) < limits.max_num_seqs:
            need = admit_tokens(waiting[0])
            if need > pool_tokens:  # can never fit, even alone
                waiting.popleft()
                res.failed += 1
                continue
            if held + need > pool_tokens:
                break
            r = waiting.popleft()
            r.held = need
            held += need
            running.append(r)
        if not running:
            continue
        budget = limits.max_num_batched_tokens
        decodes, prefills = [], []
        for r in running:
            if budget <= 0:
                break
            if r.decoding:
                decodes.append(r)
                budget -= 1
            else:
                n = min(r.prompt_len - r.computed, budget)
                prefills.append((r, n))
                budget -= n
        now += step_seconds(StepWork(decodes, prefills))
        res.steps += 1
        res.peak_running = max(res.peak_running, len(running))
        res.peak_held_tokens = max(res.peak_held_tokens, held)
        for r, n in prefills:
            r.computed += n
            if r.decoding:  # the prompt's last chunk also samples the first output token
                r.generated = 1
                r.first_token = now
        for r in decodes:
            r.generated += 1
        for r in running:
            if r.first_token is not None and r.generated >= r.output_len:
                r.finish = now
        for r in [r for r in running if r.finish is None]:
            new = running_tokens(r)
            held += new - r.held
            r.held = new
        for r in [r for r in running if r.finish is not None]:
            held -= r.held
            res.ttft.append(r.first_token - r.arrival)
            res.e2el.append(r.finish - r.arrival)
            if r.output_len > 1:
                res.tpot.append((r.finish - r.first_token) / (r.output_len - 1))
            res.output_tokens += r.output_len
        running = [r for r in running if r.finish is None]
    else:
        raise SimulationError(f"scheduler replay of {workload.name!r} made no progress in {cap} iterations "
                              f"({len(pending)} requests not arrived, {len(waiting)} waiting, {len(running)} running; "
                              f"limits {limits})")
    res.duration = now
    return res


def percentile(values: list[float], q: float) -> float:
    """``q``-th percentile of ``values`` (nan when empty)."""
    return float(np.percentile(values, q)) if values else math.nan
