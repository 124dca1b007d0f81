"""When requests arrive: seeded open-loop arrival processes and the closed-loop client model.

Open loop (the load does not depend on how fast the engine serves), as vLLM's serving benchmark
generates it: inter-arrival gaps are drawn from ``Gamma(shape=b, scale=1 / (r * b))``, whose mean
is ``1 / r`` whatever the burstiness ``b`` and whose coefficient of variation is ``1 / sqrt(b)``.
``b = 1`` is the exponential distribution, i.e. a Poisson process; ``b < 1`` is burstier,
``b > 1`` more regular. ``r = inf`` sends everything at once (offline).

The first request arrives at offset 0 and each later one one gap after its predecessor (the
order of ``benchmarks/benchmark_serving.py``: send, then wait), so ``n`` arrivals use ``n - 1``
gaps and the run starts with work to do. (Recent ``vllm bench serve`` also rescales all offsets so
that the last one falls at ``n / r``; these are left as drawn, so their gaps keep the gamma law.)

Closed loop (the load follows the engine): :class:`ClosedLoop` only describes it; the serving
driver (:func:`kvscope.bench.serve.run_workload`) executes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvscope.errors import ConfigError

SeedLike = int | np.random.Generator


def _generator(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_count(num_requests: int) -> None:
    if not isinstance(num_requests, int) or num_requests < 0:
        raise ConfigError(f"num_requests must be a non-negative integer, got {num_requests!r}")


def gamma_arrivals(num_requests: int, rate: float, burstiness: float = 1.0, seed: SeedLike = 0) -> np.ndarray:
    """Arrival offsets in seconds, float64 ``[num_requests]``, non-decreasing, first at 0.

    Args:
        rate: mean requests per second (> 0); ``math.inf`` puts every arrival at 0.
        burstiness: gamma shape ``b`` (> 0); 1 is Poisson.
        seed: an int or a :class:`numpy.random.Generator` (consumed, for composing streams).
    """
    _check_count(num_requests)
    if not rate > 0:  # also rejects NaN
        raise ConfigError(f"rate must be > 0 requests/s (math.inf for offline), got {rate!r}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ConfigError(f"burstiness must be a finite number > 0, got {burstiness!r}")
    if math.isinf(rate) or num_requests == 0:
        return np.zeros(num_requests)
    gaps = _generator(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


def poisson_arrivals(num_requests: int, rate: float, seed: SeedLike = 0) -> np.ndarray:
    """Poisson arrivals at ``rate`` requests/s: :func:`gamma_arrivals` with burstiness 1."""
    return gamma_arrivals(num_requests, rate, 1.0, seed)


def offline_arrivals(num_requests: int) -> np.ndarray:
    """Every request at offset 0 (``rate = inf``): float64 zeros ``[num_requests]``."""
    return gamma_arrivals(num_requests, math.inf)


@dataclass(frozen=True)
class ClosedLoop:
    """``clients`` concurrent users: each sends its next request when its previous one finished
    (or was rejected) and ``think_time_s`` seconds have passed. Requests are handed out in workload
    order to whichever client is free first, so at most ``clients`` are ever in flight."""

    clients: int
    think_time_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.clients, int) or self.clients < 1:
            raise ConfigError(f"clients must be an integer >= 1, got {self.clients!r}")
        if not (self.think_time_s >= 0 and math.isfinite(self.think_time_s)):
            raise ConfigError(f"think_time_s must be a finite number >= 0, got {self.think_time_s!r}")
