"""Serving metrics on synthetic timestamps, against values worked out by hand (vLLM's definitions)."""
from __future__ import annotations

import math

import pytest

from kvscope.bench.metrics import serving_metrics
from kvscope.bench.serve import RequestRecord
from kvscope.errors import ConfigError


def _rec(
    rid: str, prompt_len: int, arrival: float, tokens: list[float], error: str | None = None
) -> RequestRecord:
    return RequestRecord(rid, prompt_len, len(tokens) or 4, arrival, token_times=tokens, error=error)


@pytest.fixture
def records() -> list[RequestRecord]:
    # seconds; per request: TTFT, E2EL, TPOT = (E2EL - TTFT) / (n - 1), gaps
    return [
        _rec("a", 10, 0.0, [0.1, 0.15, 0.25, 0.3]),  # 100 ms, 300 ms, 66.67 ms, gaps 50/100/50 ms
        _rec("b", 20, 0.2, [0.6, 0.7]),  # 400 ms, 500 ms, 100 ms, gap 100 ms
        _rec("c", 5, 0.5, [0.55]),  # 50 ms, 50 ms, one token: no TPOT (0 for goodput), no gap
        _rec("d", 999, 0.6, [], error="request d: prompt too long"),  # failed: counts nowhere
        _rec("e", 7, 1.0, [1.3, 1.5, 2.0]),  # 300 ms, 1000 ms, 350 ms, gaps 200/500 ms
    ]


def test_counts_and_throughput(records):
    m = serving_metrics(records)
    assert m["completed"] == 4 and m["failed"] == 1
    assert m["total_input_tokens"] == 10 + 20 + 5 + 7
    assert m["total_output_tokens"] == 4 + 2 + 1 + 3
    assert m["duration"] == pytest.approx(2.0)  # first arrival 0.0 -> last token 2.0
    assert m["request_throughput"] == pytest.approx(4 / 2.0)
    assert m["output_throughput"] == pytest.approx(10 / 2.0)
    assert m["total_token_throughput"] == pytest.approx(52 / 2.0)
    assert m["request_goodput"] is None  # no SLOs given


def test_latency_statistics(records):
    m = serving_metrics(records)
    expected = {
        # TTFT [100, 400, 50, 300] ms; sorted [50, 100, 300, 400]; p90 at rank 2.7, p99 at 2.97
        "mean_ttft_ms": 212.5, "median_ttft_ms": 200.0, "std_ttft_ms": math.sqrt(81875 / 4),
        "p90_ttft_ms": 370.0, "p99_ttft_ms": 397.0,
        # TPOT [66.67, 100, 350] ms, request c excluded; p90 at rank 1.8, p99 at 1.98
        "mean_tpot_ms": (200 / 3 + 100 + 350) / 3, "median_tpot_ms": 100.0,
        "p90_tpot_ms": 300.0, "p99_tpot_ms": 345.0,
        # ITL pooled [50, 100, 50, 100, 200, 500] ms; p90 at rank 4.5, p99 at 4.95
        "mean_itl_ms": 1000 / 6, "median_itl_ms": 100.0, "p90_itl_ms": 350.0, "p99_itl_ms": 485.0,
        # E2EL [300, 500, 50, 1000] ms
        "mean_e2el_ms": 462.5, "median_e2el_ms": 400.0, "p90_e2el_ms": 850.0, "p99_e2el_ms": 985.0,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-9), key
    tpots = [200 / 3, 100.0, 350.0]
    mean = sum(tpots) / 3
    assert m["std_tpot_ms"] == pytest.approx(math.sqrt(sum((t - mean) ** 2 for t in tpots) / 3))


def test_goodput(records):
    # a: ttft 100 tpot 66.7 -> good; b: ttft 400 -> bad; c: ttft 50, one token (tpot 0) -> good;
    # e: tpot 350 -> bad. 2 good requests over 2 s.
    slos = {"ttft_ms": 350, "tpot_ms": 120}
    assert serving_metrics(records, slos)["request_goodput"] == pytest.approx(1.0)
    # vLLM's own SLO names; E2EL <= 100 ms leaves only c.
    vllm_slos = {"ttft": 350, "tpot": 120, "e2el": 100}
    assert serving_metrics(records, vllm_slos)["request_goodput"] == pytest.approx(0.5)
    # a limit is inclusive: a's TTFT is exactly 100 ms
    assert serving_metrics(records, {"ttft_ms": 100})["request_goodput"] == pytest.approx(2 / 2.0)


def test_key_names_and_percentiles(records):
    m = serving_metrics(records, percentiles=(50, 99.9))
    stats = {f"{s}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el")
             for s in ("mean", "median", "std", "p50", "p99.9")}
    assert set(m) == stats | {
        "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
        "request_goodput", "output_throughput", "total_token_throughput",
    }
    assert m["p50_ttft_ms"] == pytest.approx(m["median_ttft_ms"])


def test_dict_records_and_empty_tpot(records):
    assert serving_metrics([r.to_dict() for r in records]) == serving_metrics(records)
    single = serving_metrics([_rec("x", 3, 0.0, [0.2]), _rec("y", 3, 0.1, [0.4])])
    assert single["mean_tpot_ms"] is None and single["p99_itl_ms"] is None
    assert single["mean_ttft_ms"] == pytest.approx(250.0)


def test_bad_arguments(records):
    with pytest.raises(ConfigError, match="unknown SLO 'latency'"):
        serving_metrics(records, {"latency": 10})
    with pytest.raises(ConfigError, match="tpot_ms"):
        serving_metrics(records, {"tpot_ms": -1})
    with pytest.raises(ConfigError, match="percentiles"):
        serving_metrics(records, percentiles=(101,))
    with pytest.raises(ConfigError):
        serving_metrics([])
