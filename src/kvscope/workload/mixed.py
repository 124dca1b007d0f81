"""Mixed workloads: short ShareGPT requests with long RULER prompts among them.

A mixed workload of ``num_requests`` holds ``round(num_requests x long_fraction)`` long requests
(RULER needle-in-a-haystack samples, whose answers are scored, so quality is measured on them) and
ShareGPT requests for the rest. The long ones are spread evenly through the arrival order, the
``k``-th at position ``floor((2k + 1) x num_requests / (2 x num_long))`` (the middle of the ``k``-th
of ``num_long`` equal stretches), so every strategy of a study sees the same sequence and no
stretch of the run is all short or all long. Arrival times come separately
(:mod:`kvscope.workload.arrivals`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvscope.errors import ConfigError
from kvscope.workload.requests import WorkloadRequest


def num_long_requests(num_requests: int, long_fraction: float) -> int:
    """Long requests in a mixed workload: ``num_requests x long_fraction`` rounded half up, which
    must leave at least one request of each kind (else :class:`ConfigError`)."""
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 2:
        raise ConfigError(f"a mixed workload needs num_requests >= 2 (one short, one long), got {num_requests!r}")
    if isinstance(long_fraction, bool) or not isinstance(long_fraction, (int, float)) or not 0 < long_fraction < 1:
        raise ConfigError(f"long_fraction must be in (0, 1), got {long_fraction!r}")
    n = int(num_requests * long_fraction + 0.5)
    if not 1 <= n <= num_requests - 1:
        raise ConfigError(f"long_fraction={long_fraction} of num_requests={num_requests} gives {n} long requests; "
                          f"a mixed workload needs at least one long and one short request")
    return n


def long_positions(num_requests: int, num_long: int) -> list[int]:
    """Positions of the ``num_long`` long requests among ``num_requests`` (see the module docstring)."""
    if not 1 <= num_long < num_requests:
        raise ConfigError(f"need 1 <= num_long < num_requests, got {num_long} of {num_requests}")
    return [(2 * k + 1) * num_requests // (2 * num_long) for k in range(num_long)]


@dataclass(frozen=True)
class MixedWorkload:
    """The requests in arrival order and, for each long one, its position and its RULER sample's
    index in the list of long samples (``long_index[position] = sample index``)."""

    requests: list[WorkloadRequest]
    long_index: dict[int, int]

    @property
    def short_positions(self) -> list[int]:
        return [i for i in range(len(self.requests)) if i not in self.long_index]


def mix(short: Sequence[WorkloadRequest], long: Sequence[WorkloadRequest]) -> MixedWorkload:
    """Interleave ``long`` into ``short``: long request ``k`` at :func:`long_positions`' ``k``-th
    place, the short ones in their order around them."""
    n = len(short) + len(long)
    positions = long_positions(n, len(long))
    long_at = {p: k for k, p in enumerate(positions)}
    shorts = iter(short)
    requests = [long[long_at[i]] if i in long_at else next(shorts) for i in range(n)]
    return MixedWorkload(requests, long_at)
