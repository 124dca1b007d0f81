"""vLLM's serving-benchmark metrics, computed from :class:`~kvscope.bench.serve.RequestRecord` lists.

Definitions and key names follow ``calculate_metrics`` and the result dict of vLLM's
``vllm/benchmarks/serve.py`` (``vllm bench serve``, formerly ``benchmarks/benchmark_serving.py``):

- TTFT: arrival -> first output token. E2EL: arrival -> last output token.
- TPOT: ``(E2EL - TTFT) / (output_tokens - 1)``, only over requests with more than one output
  token. ITL: every gap between consecutive output tokens, pooled over all requests. For a record
  of an HTTP client, whose times are those of streamed chunks, ``output_tokens`` is the server's
  count when it gave one (:attr:`RequestRecord.output_len`) and ITL the gaps between chunks, as in
  vLLM.
- For each of ``ttft``, ``tpot``, ``itl``, ``e2el``: ``mean_<m>_ms``, ``median_<m>_ms``,
  ``std_<m>_ms`` (population, ``np.std``) and ``p<q>_<m>_ms`` for each percentile ``q``
  (``np.percentile``, linear interpolation; ``p99_ttft_ms``, ``p99.9_ttft_ms``), in milliseconds.
- ``completed`` and ``failed`` requests, ``total_input_tokens`` and ``total_output_tokens`` (of
  completed requests), and per second of ``duration``: ``request_throughput``,
  ``output_throughput``, ``total_token_throughput`` (input + output tokens) and
  ``request_goodput``: completed requests that meet every given SLO (``None`` without SLOs). As in
  vLLM, a request with one output token has TPOT 0 for the goodput test.

Two deliberate differences: ``duration`` is first arrival -> last output token of the run (vLLM
times its client from before the first request to after the last response, the same span up to
client overhead), and a statistic over no values (e.g. TPOT when every request produced one
token) is ``None`` where vLLM reports 0.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from kvscope.bench.serve import RequestRecord
from kvscope.errors import ConfigError

SLO_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (90.0, 99.0)


def _parse_slos(goodput: Mapping[str, float]) -> dict[str, float]:
    """SLO limits in seconds from ``{"ttft": ms, ...}`` or ``{"ttft_ms": ms, ...}``."""
    slos = {}
    for key, value in goodput.items():
        name = key.removesuffix("_ms")
        if name not in SLO_METRICS:
            raise ConfigError(f"unknown SLO {key!r}; use {', '.join(SLO_METRICS)} (milliseconds), e.g. ttft_ms")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"SLO {key!r} must be a number of milliseconds >= 0, got {value!r}")
        slos[name] = value / 1000.0
    return slos


def _percentile_label(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def _stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    """mean / median / std / percentiles of ``values_s`` (seconds) in ms, keyed as vLLM keys them."""
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    empty = ms.size == 0
    out: dict[str, float | None] = {
        f"mean_{name}_ms": None if empty else float(np.mean(ms)),
        f"median_{name}_ms": None if empty else float(np.median(ms)),
        f"std_{name}_ms": None if empty else float(np.std(ms)),
    }
    for p in percentiles:
        out[f"p{_percentile_label(p)}_{name}_ms"] = None if empty else float(np.percentile(ms, p))
    return out


def serving_metrics(
    records: Iterable[RequestRecord | Mapping[str, Any]],
    goodput: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """vLLM's serving metrics of one run, as a JSON-serialisable dict (see the module docstring).

    Args:
        records: :class:`RequestRecord` objects or their ``to_dict()`` form.
        goodput: SLO limits in milliseconds, keys ``ttft``/``tpot``/``e2el`` (vLLM's ``--goodput``
            names) or the same with ``_ms``; a request is good when every given metric is <= its limit.
        percentiles: in [0, 100]; each gives a ``p<q>_<metric>_ms`` key.
    """
    recs = [r if isinstance(r, RequestRecord) else RequestRecord.from_dict(dict(r)) for r in records]
    if not recs:
        raise ConfigError("serving_metrics needs at least one request record")
    for p in percentiles:
        if not 0 <= p <= 100:
            raise ConfigError(f"percentiles must be in [0, 100], got {p!r}")
    slos = _parse_slos(goodput) if goodput else {}

    ttfts, tpots, itls, e2els = [], [], [], []
    total_input = total_output = good = 0
    for r in recs:
        if not r.success:
            continue
        times, n_out = r.token_times, r.output_len
        ttft, e2el = times[0] - r.arrival_time, times[-1] - r.arrival_time
        tpot = (e2el - ttft) / (n_out - 1) if n_out > 1 else None
        ttfts.append(ttft)
        e2els.append(e2el)
        if tpot is not None:
            tpots.append(tpot)
        itls.extend(np.diff(times).tolist())
        total_input += r.prompt_len
        total_output += n_out
        observed = {"ttft": ttft, "tpot": tpot or 0.0, "e2el": e2el}
        good += all(observed[m] <= limit for m, limit in slos.items())
    completed = len(ttfts)

    end = max((r.token_times[-1] for r in recs if r.success), default=None)
    duration = end - min(r.arrival_time for r in recs) if end is not None else 0.0

    def per_second(count: float) -> float | None:
        return count / duration if duration > 0 else None

    return {
        "duration": duration,
        "completed": completed,
        "failed": len(recs) - completed,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": per_second(completed),
        "request_goodput": per_second(good) if slos else None,
        "output_throughput": per_second(total_output),
        "total_token_throughput": per_second(total_input + total_output),
        **_stats("ttft", ttfts, percentiles),
        **_stats("tpot", tpots, percentiles),
        **_stats("itl", itls, percentiles),
        **_stats("e2el", e2els, percentiles),
    }
