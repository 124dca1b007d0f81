"""How far a point's goodput and RULER accuracy could move with other requests: 95% Wilson score
intervals over the requests (or samples) the rows counted.

The rows keep counts, not per-request values: goodput is ``good requests / duration`` and accuracy
a mean of per-sample 0/1 scores, so a binomial interval on ``good / requests`` (scaled back to
req/s) and on ``accuracy`` is what they support. Timing noise between runs is not in it; the
report's run-to-run threshold (:data:`kvscope.report.rows.NOISE`, or the seeds' spread) covers that.
Perplexity has no interval: the rows do not keep per-token losses.
"""
from __future__ import annotations

import math

from kvscope.report.rows import Row, finite, get

#: Normal quantile of a two-sided 95% interval.
Z95 = 1.959964


def wilson(successes: float, trials: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / trials`` (``trials`` > 0).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or ``trials``
    successes: 16 of 16 gives (0.806, 1)."""
    if trials <= 0:
        raise ValueError(f"wilson needs trials > 0, got {trials}")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def goodput_interval(rows: list[Row]) -> tuple[float, float] | None:
    """95% interval of the goodput (req/s) of one configuration's rows (its seeds, pooled): Wilson
    on the share of requests that met every SLO, times requests / duration. None without goodput."""
    good = requests = duration = 0.0
    for r in rows:
        g, d = get(r, "metrics", "request_goodput"), get(r, "metrics", "duration")
        n = (get(r, "metrics", "completed") or 0) + (get(r, "metrics", "failed") or 0)
        if not (finite(g) and finite(d) and d > 0 and n > 0):
            continue
        good += g * d
        requests += n
        duration += d
    if requests == 0:
        return None
    lo, hi = wilson(min(good, requests), requests)
    return lo * requests / duration, hi * requests / duration


def accuracy_interval(rows: list[Row]) -> tuple[float, float] | None:
    """95% Wilson interval of the RULER accuracy of one configuration's rows (samples pooled over
    seeds). None without an accuracy and its sample count."""
    right = samples = 0.0
    for r in rows:
        acc, n = get(r, "quality", "ruler", "accuracy"), get(r, "quality", "ruler", "num_samples")
        if finite(acc) and finite(n) and n > 0:
            right += acc * n
            samples += n
    return wilson(right, samples) if samples else None


def requests_per_point(rows: list[Row]) -> int | None:
    """Requests one point of these rows served (completed + failed; the largest over seeds)."""
    counts = [(get(r, "metrics", "completed") or 0) + (get(r, "metrics", "failed") or 0) for r in rows]
    return max(counts) if counts and max(counts) > 0 else None
