"""Request rates relative to a configuration's own saturation (``rates: ["0.25x", "1x"]``).

A fixed rate is idle for a small model and an overload for a large one, or for a strategy that
moves KV over PCIe. A relative rate ``"fx"`` is ``f`` times the request throughput the same
configuration reaches offline: every request of the workload submitted at once to a fresh engine.
An external system (``systems:``) is measured the same way, every request sent at once to its
server. That measurement is taken once per configuration group (:data:`GROUP_KEYS`: the point's config
without its rate and burstiness, which an offline run does not have) and shared by the group's
points; a resumed run reads it back from the rows already written, so the points of one group use
one basis even when they run in different processes (chunks of a time-limited run).

The row of a relative point records the absolute rate it ran at as ``config.rate`` (what the report
and ``advise`` read), the spec's relative rate as ``config.rate_relative`` and the measurement as
``rate_basis``; the point's id is the hash of its spec config (with the relative rate), so a rerun
finds it.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from kvscope.bench.metrics import serving_metrics
from kvscope.errors import RequestError
from kvscope.study.spec import Point

#: What the offline throughput of a point depends on: its config without rate and burstiness.
GROUP_KEYS = ("model", "strategy", "system", "kv_memory", "workload", "engine", "seed", "device", "dtype",
              "max_model_len")


def group_key(config: dict[str, Any]) -> str:
    """The measurement group of a point's (or a row's) config, as a canonical string."""
    return json.dumps({k: config.get(k) for k in GROUP_KEYS}, sort_keys=True, default=str)


def rate_basis(point: Point, offline: dict[str, dict[str, Any]],
               measure: Callable[[Point], dict[str, Any]]) -> dict[str, Any]:
    """The offline measurement of ``point``'s group from ``offline`` (the run's cache), taken with
    ``measure(point)`` when the group has none yet; ``measured_by`` is the id of the point that took it.

    ``measure`` returns at least ``request_throughput`` (requests/s); a measurement in which no
    request completed is no basis (:class:`RequestError`, the point's error), and is not kept.
    """
    key = group_key(point.config)
    if key not in offline:
        result = measure(point)
        if not result.get("request_throughput", 0) > 0:
            raise RequestError(f"rate {point.config['rate']!r}: the offline run completed no request "
                               f"({result.get('errors') or 'no error recorded'}), so there is no throughput to scale")
        offline[key] = {**{f"offline_{k}": v for k, v in result.items()}, "measured_by": point.id}
    return offline[key]


def offline_metrics(run: Any) -> dict[str, Any]:
    """What an offline run (``records`` and ``wall_time_s``: an in-process or an HTTP serving run)
    gives the basis: request and output throughput, wall time, completed requests, first errors."""
    m = serving_metrics(run.records)
    return {"request_throughput": m["request_throughput"], "output_throughput": m["output_throughput"],
            "wall_time_s": run.wall_time_s, "completed": m["completed"],
            "errors": sorted({r.error for r in run.records if r.error})[:5]}


def absolute_rate(point: Point, basis: dict[str, Any]) -> float:
    """Requests/s of a relative point: its factor times the group's offline request throughput."""
    factor = point.relative_rate
    assert factor is not None, "absolute_rate is for relative points"
    return factor * float(basis["offline_request_throughput"])


def seed_from_rows(offline: dict[str, dict[str, Any]], rows: Iterable[dict[str, Any]]) -> None:
    """Fill the run's cache ``offline`` with the measurements that ``ok`` rows of earlier runs used."""
    for row in rows:
        if row.get("status") == "ok" and isinstance(row.get("rate_basis"), dict):
            offline.setdefault(group_key(row["config"]), row["rate_basis"])


def relative_row_fields(point: Point, rate: float, basis: dict[str, Any]) -> dict[str, Any]:
    """The fields a relative point's row adds or replaces (module docstring)."""
    return {"config": {**point.config, "rate": rate, "rate_relative": point.config["rate"]}, "rate_basis": basis}
