"""A study run that stops starting points near a time limit (``kvscope study run --time-limit``).

A long study runs as chunks, one process each, where a job may hold the machine only for a few
minutes at a time (a batch queue's limit, a shared GPU): each chunk runs points until the next one
would likely end past the limit, and the next chunk resumes from the results file. The estimate of a point is the mean elapsed time (``elapsed_s`` of its row)
of the finished points most like it, this run's and earlier runs' alike, taken from the first of
these that has any: the same model, strategy name, workload and rate; the same model, workload and
rate; the same model; any point. A point with no estimate at all runs (it is the first). Rows of
earlier runs are read as written, so the first point of a model in a chunk, which also pays the
model's load, can run over its estimate: leave that margin in the limit (``docs/results/h200/PLAN.md``).
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from kvscope.errors import ConfigError


def _kinds(config: dict[str, Any]) -> list[str]:
    """The keys a point's estimate is looked up by, the most specific first (module docstring)."""
    # The strategy's name without its arguments: h2o at 10% and at 50% cost about the same to serve.
    name = str(config.get("strategy", "")).split(":", 1)[0]
    # A relative point's row records its absolute rate, its spec config the relative one: key on the latter.
    rate = config.get("rate_relative", config.get("rate"))
    model, workload = config.get("model"), json.dumps(config.get("workload"), sort_keys=True)
    return [json.dumps([model, name, workload, rate]), json.dumps([model, workload, rate]), json.dumps([model]), "*"]


class TimeLimit:
    """Whether to start the next point, ``seconds`` after this object was made (by ``clock``)."""

    def __init__(self, seconds: float, clock: Callable[[], float] | None = None) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0 \
                or not math.isfinite(seconds):
            raise ConfigError(f"--time-limit: must be a number of seconds > 0, got {seconds!r}")
        self._clock = clock or time.monotonic
        self.deadline = self._clock() + seconds
        self._elapsed: dict[str, list[float]] = defaultdict(list)

    def seed(self, rows: Iterable[dict[str, Any]]) -> None:
        """Count the points of ``rows``, results already written (earlier chunks), in the estimates."""
        for row in rows:
            if isinstance(row.get("elapsed_s"), (int, float)) and isinstance(row.get("config"), dict):
                self.record(row["config"], float(row["elapsed_s"]))

    def record(self, config: dict[str, Any], elapsed_s: float) -> None:
        """Count a finished point (its config, spec's or row's) that took ``elapsed_s``."""
        for kind in _kinds(config):
            self._elapsed[kind].append(elapsed_s)

    def estimate(self, config: dict[str, Any]) -> float | None:
        """Seconds the point of ``config`` will likely take; None when no point has finished."""
        for kind in _kinds(config):
            if times := self._elapsed.get(kind):
                return sum(times) / len(times)
        return None

    def allows(self, config: dict[str, Any]) -> bool:
        """Whether the point of ``config`` likely ends before the deadline."""
        left = self.deadline - self._clock()
        estimate = self.estimate(config)
        return left > 0 and (estimate is None or estimate <= left)
