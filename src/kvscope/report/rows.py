"""Reading study rows for the report: the metrics it compares, scenario labels, grouping, and the
two thresholds every table shares (:data:`NOISE`, :data:`QUALITY_FLOOR`)."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from kvscope.constants import QUALITY_FLOOR  # noqa: F401 - the tables' floor, imported from here
from kvscope.workload.mixed import num_long_requests

Row = dict[str, Any]

#: Relative difference under which two strategies are reported as tied. With several seeds the
#: threshold grows to twice the winner's relative standard deviation over seeds when that is larger.
NOISE = 0.05

# QUALITY_FLOOR, the floor of the report's tables, is the project's one floor (``kvscope advise
# --quality-floor``, ``adaptive``'s derivation): imported so that the report and the advice cannot
# disagree.


def get(row: Any, *keys: str) -> Any:
    """``row[k0][k1]...``, None where a level is missing or not a mapping."""
    for k in keys:
        row = row.get(k) if isinstance(row, dict) else None
    return row


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def num(v: float) -> str:
    """Three significant digits, thousands written out (``1,700``, not ``1.7e+03``)."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _mib(x: float | None) -> float | None:
    return None if x is None else x / 2**20


# name, where in a row, True when lower is better, unit
Metric = tuple[str, Callable[[Row], float | None], bool, str]
METRICS: list[Metric] = [
    ("TTFT p50", lambda r: get(r, "metrics", "median_ttft_ms"), True, "ms"),
    ("TTFT p99", lambda r: get(r, "metrics", "p99_ttft_ms"), True, "ms"),
    ("TPOT p50", lambda r: get(r, "metrics", "median_tpot_ms"), True, "ms"),
    ("TPOT p99", lambda r: get(r, "metrics", "p99_tpot_ms"), True, "ms"),
    ("output tok/s", lambda r: get(r, "metrics", "output_throughput"), False, "tok/s"),
    ("goodput req/s", lambda r: get(r, "metrics", "request_goodput"), False, "req/s"),
    ("peak KV used", lambda r: _mib(get(r, "engine_stats", "peak_kv_bytes_used")), True, "MiB"),
    ("perplexity", lambda r: get(r, "quality", "perplexity", "perplexity"), True, ""),
    ("RULER accuracy", lambda r: get(r, "quality", "ruler", "accuracy"), False, ""),
    ("agreement with full KV", lambda r: get(r, "quality", "agreement", "match_fraction"), False, ""),
]
METRIC = {m[0]: m[1] for m in METRICS}


def workload_label(w: dict[str, Any]) -> str:
    extra = ",".join(f"{k}={v}" for k, v in w.items() if k != "kind")
    return f"{w['kind']}({extra})"


def kv_label(kv: int | float) -> str:
    return f"{kv:.0%} free" if isinstance(kv, float) else f"{kv / 2**20:g}MiB"


def rate_text(rate: float | str) -> str:
    if rate_key(rate) == math.inf:
        return "all requests at once"
    if isinstance(rate, str) and rate.endswith("x"):
        return f"{rate} of its offline throughput"
    return f"{float(rate):g} req/s"


def workload_text(w: dict[str, Any]) -> str:
    """``sharegpt, 16 requests``, ``ruler niah_single_1 at length 512, 8 requests``, ``mixed, 16
    requests, 8 of them ruler niah_single_1 at length 512``."""
    n = w.get("num_requests") or w.get("num_samples")
    long = f"ruler {w.get('task', '')} at length {w['length']}".replace("  ", " ") if w.get("length") else ""
    parts = [w["kind"] if w["kind"] != "ruler" else long]
    if w.get("input_len"):
        parts.append(f"{w['input_len']}-token prompts")
    if n:
        parts.append(f"{n} request{'s' * (n != 1)}")
    if w.get("long_fraction") and long and n:
        parts[-1] += f", {num_long_requests(n, w['long_fraction'])} of them {long}"
    return ", ".join(parts)


def scenario(cfg: dict[str, Any]) -> tuple[str, str, str]:
    """(model, workload label, KV pool label) of a row's config."""
    return cfg["model"], workload_label(cfg["workload"]), kv_label(cfg["kv_memory"])


def rate_key(rate: float | str) -> float:
    """Sort key of a rate: req/s, ``inf``, or a relative rate's factor (``"0.5x"`` -> 0.5)."""
    if rate == "inf":
        return math.inf
    return float(rate[:-1]) if isinstance(rate, str) and rate.endswith("x") else float(rate)


def by_spec_rate(row: Row) -> Row:
    """``row`` as the report compares it: a point run at a rate relative to its configuration's
    saturation (``"0.5x"``) is grouped by that factor, since each strategy's absolute rate differs;
    the absolute rate stays in ``config.rate_abs``."""
    cfg = row["config"]
    if "rate_relative" not in cfg:
        return row
    return {**row, "config": {**cfg, "rate": cfg["rate_relative"], "rate_abs": cfg["rate"]}}


def top_rate(rows: list[Row]) -> float | str:
    """The highest request rate among ``rows`` ("inf", all at once, when present): where
    throughput shows a configuration's capacity."""
    return max((r["config"]["rate"] for r in rows), key=rate_key)


def by(rows: Iterable[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
    """Rows grouped by ``key``, the groups in a stable order (so output is the same every run)."""
    out: dict[Any, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def values(rows: Iterable[Row], get_value: Callable[[Row], float | None]) -> list[float]:
    """The finite values of ``get_value`` over ``rows`` (one per seed)."""
    return [v for v in map(get_value, rows) if finite(v)]


def mean_of(rows: Iterable[Row], get_value: Callable[[Row], float | None]) -> float | None:
    vs = values(rows, get_value)
    return statistics.fmean(vs) if vs else None


def noise_threshold(seed_values: list[float]) -> float:
    """Relative difference within which another value ties with a mean of ``seed_values``:
    :data:`NOISE`, or twice their relative standard deviation over seeds when that is larger."""
    if len(seed_values) < 2:
        return NOISE
    m = statistics.fmean(seed_values)
    return max(NOISE, 2 * statistics.stdev(seed_values) / abs(m)) if m else NOISE
