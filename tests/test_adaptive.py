"""``adaptive``: admission thresholds, pressure rising and falling, compression instead of
preemption, and the invariant that every request holds KV in exactly one child."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope import LLM, SamplingParams
from kvscope.engine.request import Request
from kvscope.errors import ConfigError
from kvscope.kv.adaptive import AdaptiveStrategy
from kvscope.study.adaptive_derivation import derive_thresholds
from kvscope.kv.base import KVSetup
from kvscope.models.dummy import preset_config
from kvscope.study.spec import parse_spec

CFG = preset_config("tiny-llama")
BS = 4


def bound(num_blocks: int, **kw) -> AdaptiveStrategy:
    """An adaptive strategy over a shared pool of exactly ``num_blocks`` blocks of 4 tokens."""
    s = AdaptiveStrategy(block_size=BS, **kw)
    slot = CFG.kv_bytes_per_token(torch.float32) + s.long.extra_slot_bytes(CFG)
    s.bind(KVSetup(CFG, torch.device("cpu"), torch.float32, num_blocks * BS * slot, 512, 64, 0))
    assert s.full.pool.num_blocks == num_blocks
    return s


def req(rid: str, prompt: int, max_tokens: int) -> Request:
    return Request(rid, [1] * prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_threshold_edges():
    s = bound(64, long_threshold=100)
    below, at = req("below", 60, 39), req("at", 60, 40)  # 99 and 100 tokens requested
    assert s.allocate(below, 60) and s.allocate(at, 60)
    assert s.route["below"] is s.full and s.route["at"] is s.long
    assert s.stats()["adaptive_admitted_full"] == 1 and s.stats()["adaptive_admitted_long_length"] == 1
    # A prompt larger than the full child's pool goes long whatever its length threshold.
    assert s._choose(req("huge", 64 * BS + 1, 1))[1] == "admitted_long_length"


def test_pressure_rising_routes_new_requests_long_and_relief_lifts_budgets():
    s = bound(10, long_threshold=10_000, pressure=0.8, relief=0.5)
    a = req("a", 32, 4)  # 8 of 10 blocks: use 0.8 = pressure
    assert s.allocate(a, 32) and s.route["a"] is s.full
    b = req("b", 4, 4)
    assert s.allocate(b, 4) and s.route["b"] is s.long
    assert s.stats()["adaptive_admitted_long_pressure"] == 1
    s.free(a)
    s.free(b)
    assert s.full.pool.num_free == 10 and not s.route


def test_engine_compresses_instead_of_preempting_then_relieves():
    # 6 requests of 40 prompt tokens and 70 or 10 output tokens in a pool of 200 tokens: `paged`
    # preempts; the short ones finish early, so the pressure falls while long ones still run.
    prompts = [[(7 * i + j) % 200 + 4 for j in range(40)] for i in range(6)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (70, 10) * 3]
    paged = LLM("dummy:tiny-llama", strategy="paged:block_size=4", kv_memory_bytes=200 * 512, max_model_len=128)
    paged.generate(prompts, params, use_tqdm=False)
    assert paged.engine.stats()["num_preemptions"] > 0
    llm = LLM("dummy:tiny-llama", strategy="adaptive:block_size=4,long_threshold=10000,pressure=0.95,relief=0.5",
              kv_memory_bytes=200 * (512 + 2 * 2 * 12), max_model_len=128)
    outs = llm.generate(prompts, params, use_tqdm=False)
    st_ = llm.engine.stats()
    assert [len(o.outputs[0].token_ids) for o in outs] == [70, 10] * 3
    assert st_["adaptive_compressed_under_pressure"] > 0 and st_["num_evictions"] > 0
    assert st_["num_preemptions"] == 0
    assert st_["adaptive_relieved"] > 0  # the pool emptied as requests finished
    assert st_["blocks_used"] == 0 and st_["adaptive_requests_full"] == st_["adaptive_requests_long"] == 0


@pytest.mark.parametrize("long_args", [None, {"alpha": 1e9, "budget_ratio": None, "calibration": "random",
                                              "dense_layers": 1}], ids=["offload", "infinigen-lossless"])
def test_engine_offloads_instead_of_preempting(long_args, tmp_path, monkeypatch):
    """With a host child, a full request that cannot grow moves its computed KV to the host pool
    instead of being preempted; both children are lossless here, so the greedy tokens are paged's."""
    monkeypatch.setenv("KVSCOPE_CACHE_DIR", str(tmp_path))
    prompts = [[(7 * i + j) % 200 + 4 for j in range(40)] for i in range(6)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (70, 10) * 3]
    ref = LLM("dummy:tiny-llama", strategy="paged", kv_memory_bytes=8 << 20, max_model_len=128)
    ref_tokens = [o.token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    long = "offload" if long_args is None else "infinigen"
    # The full child gets 200 tokens of KV, the host child the rest (it buffers every held token).
    strategy = AdaptiveStrategy(long=long, long_args=long_args, long_threshold=10_000, pressure=0.95,
                                long_share=0.8, block_size=4)
    llm = LLM("dummy:tiny-llama", strategy=strategy, kv_memory_bytes=1000 * 512, max_model_len=128)
    outs = llm.generate(prompts, params, use_tqdm=False)
    st_ = llm.engine.stats()
    assert st_["adaptive_offloaded_under_pressure"] > 0 and st_["num_preemptions"] == 0
    assert [o.token_ids for o in outs] == ref_tokens
    assert st_["host_blocks_used"] == 0 and st_["blocks_used"] == 0  # everything freed at the end


def test_full_requests_equal_paged():
    prompts = [[(3 * i + j) % 200 + 4 for j in range(n)] for i, n in enumerate((5, 17, 30))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = LLM("dummy:tiny-llama", strategy="paged", kv_memory_bytes=8 << 20).generate(prompts, params, use_tqdm=False)
    out = LLM("dummy:tiny-llama", strategy="adaptive", kv_memory_bytes=8 << 20).generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("adaptive:long=paged", "long must be one of"),
        ("adaptive:pressure=1.5", "pressure must be in"),
        ("adaptive:relief=0.95", "relief (0.95) must be below pressure"),
        ("adaptive:long_threshold=0", "long_threshold must be an integer >= 1"),
    ],
)
def test_bad_parameters(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM("dummy:tiny-llama", strategy=spec)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 40), st.integers(1, 30)), min_size=1, max_size=40),
       st.sampled_from([None, 45, 60]))
def test_every_request_is_in_exactly_one_child(ops, min_length):
    s = bound(24, long_threshold=40, pressure=0.7, relief=0.3, pressure_min_length=min_length)
    live: dict[str, Request] = {}
    for slot, prompt, grow in ops:
        rid = f"r{slot}"
        if rid in live and grow % 3 == 0:
            s.free(live.pop(rid))
        elif rid in live:
            r = live[rid]
            target = min(r.num_computed_tokens + grow, r.num_prompt_tokens + 30)
            if s.allocate(r, target):  # as the scheduler does: room first, then the tokens
                r.num_computed_tokens = target
            else:
                s.free(live.pop(rid))  # preemption
        else:
            r = req(rid, prompt, 30)
            if s.allocate(r, prompt):
                r.num_computed_tokens = prompt
                live[rid] = r
        in_full = set(s.full.tables)
        in_long = set(s.long.tables)
        assert in_full.isdisjoint(in_long) and in_full | in_long == set(live) == set(s.route)
        held = sum(len(t) for t in s.full.tables.values()) + sum(len(t) for t in s.long.tables.values())
        assert held == s.full.pool.num_used
    for r in list(live.values()):
        s.free(r)
    assert s.full.pool.num_free == 24 and not s.route and not s.compressed


# ---- thresholds derived from a study's results file -------------------------------------------------
def _row(strategy, workload, goodput, n, tokens, ruler=None, ppl=None, status="ok", kv=25165824, rate="inf", seed=0,
         agree=None):
    """A results.jsonl row as the study runner writes it (only the fields the derivation reads)."""
    quality = {} if agree is None else {"agreement": {"match_fraction": agree}}
    if ruler is not None:
        quality["ruler"] = {"accuracy": ruler}
    if ppl is not None:
        quality["perplexity"] = {"perplexity": ppl}
    return {"id": f"{strategy}-{workload['kind']}-{seed}", "status": status,
            "config": {"model": "m", "strategy": strategy, "kv_memory": kv, "workload": workload, "rate": rate,
                       "seed": seed},
            "metrics": {"completed": n, "failed": 0, "total_input_tokens": tokens[0], "total_output_tokens": tokens[1],
                        "request_goodput": goodput, "output_throughput": 10 * goodput},
            "quality": quality}


SHORT = {"kind": "sharegpt", "num_requests": 5}
MID = {"kind": "ruler", "task": "niah_single_1", "length": 512, "num_samples": 2}
LONG = {"kind": "ruler", "task": "niah_single_1", "length": 2048, "num_samples": 2}
H2O, SNAP, INFG = "h2o:heavy_ratio=0.1,recent_ratio=0.1", "snapkv:budget_ratio=0.2", "infinigen:budget_ratio=0.2,calibration_len=512"


def _results(tmp_path, snap_mid_accuracy=0.85, extra=()):
    """Three scenarios, lengths 100 (short), 400 (mid) and 1600 (long) tokens per request:

    - short: h2o's goodput is within 5% of paged's -> "full";
    - mid: h2o is fastest but fails the floor (RULER 0 vs 1); snapkv (2.0 vs paged 1.0, RULER 0.85)
      and infinigen (1.5, RULER 0.9) qualify at floor 0.8 -> "long", best snapkv;
    - long: snapkv fails the floor (0.5); infinigen (0.9 vs 0.5) qualifies -> "long", best infinigen.
    """
    rows = [
        _row("paged", SHORT, 2.0, 5, (400, 100), ppl=10.0), _row(H2O, SHORT, 2.05, 5, (400, 100), ppl=11.0),
        _row("paged", MID, 1.0, 2, (760, 40), ruler=1.0), _row(H2O, MID, 3.0, 2, (760, 40), ruler=0.0),
        _row(SNAP, MID, 2.0, 2, (760, 40), ruler=snap_mid_accuracy), _row(INFG, MID, 1.5, 2, (760, 40), ruler=0.9),
        _row("paged", LONG, 0.5, 2, (3168, 32), ruler=1.0), _row(SNAP, LONG, 1.0, 2, (3168, 32), ruler=0.5),
        _row(INFG, LONG, 0.9, 2, (3168, 32), ruler=1.0),
        # ignored: other strategies, failed points
        _row("contiguous", LONG, 9.0, 2, (3168, 32), ruler=1.0), _row("adaptive", LONG, 9.0, 2, (3168, 32), ruler=1.0),
        _row("streaming", MID, 9.0, 2, (760, 40), ruler=1.0, status="error"),
        *extra,
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "torn', encoding="utf-8")
    return path


def test_thresholds_derived_by_hand(tmp_path):
    path = _results(tmp_path)
    t = derive_thresholds(path)
    assert t.metric == "request_goodput"
    assert [(s.length, s.verdict, s.best) for s in t.scenarios] == [
        (1600.0, "long", INFG), (400.0, "long", SNAP), (100.0, "full", H2O)]  # sorted by workload label
    # Stump: cut between 100 ("full") and 400 ("long"), no error; ceil(sqrt(100 * 400)) = 200.
    assert (t.long_threshold, t.misclassified) == (200, 0)
    # One win each; snapkv's ratio over paged (2.0) beats infinigen's (1.8).
    assert (t.long, t.long_args, t.long_budget_ratio) == ("snapkv", {"budget_ratio": 0.2}, 0.2)
    # A higher floor disqualifies snapkv at mid (0.85 < 0.9): infinigen wins both scenarios.
    t = derive_thresholds(path, quality_floor=0.9)
    assert (t.long_threshold, t.long, t.long_args) == (200, "infinigen", {"budget_ratio": 0.2, "calibration_len": 512})
    # Restricted to one child name.
    assert derive_thresholds(path, long="infinigen").long == "infinigen"
    # Without goodput everywhere, output throughput is the metric (here, the same verdicts).
    rows = [json.loads(line) for line in path.read_text().splitlines()[:-1]]
    rows[0]["metrics"]["request_goodput"] = None
    assert derive_thresholds("x", rows=rows).metric == "output_throughput"


def test_thresholds_never_by_length_when_paged_is_not_beaten(tmp_path):
    # h2o fails the floor on the short workload; infinigen qualifies on the long one but is within the
    # margin of paged's goodput there.
    rows = [_row("paged", SHORT, 2.0, 5, (400, 100), ppl=10.0), _row(H2O, SHORT, 4.0, 5, (400, 100), ppl=20.0),
            _row("paged", LONG, 1.0, 2, (3168, 32), ruler=1.0), _row(INFG, LONG, 1.04, 2, (3168, 32), ruler=1.0)]
    t = derive_thresholds("hand", rows=rows)
    assert [s.verdict for s in t.scenarios] == ["full", "full"]
    # No length goes long; the child for pool pressure is the one that qualifies (h2o does not: 10/20).
    assert (t.long_threshold, t.long) == (None, "infinigen")
    assert derive_thresholds("hand", rows=rows[:2] + [rows[2], _row(SNAP, LONG, 9.0, 2, (3168, 32), ruler=0.1)]).long is None
    # Non-monotone data: the stump misclassifies the fewest, ties going to the larger threshold.
    rows += [_row("paged", MID, 1.0, 2, (760, 40), ruler=1.0), _row(INFG, MID, 2.0, 2, (760, 40), ruler=1.0)]
    t = derive_thresholds("hand", rows=rows)
    assert (t.long_threshold, t.misclassified) == (None, 1)  # T=400 errs at 1600, "never" at 400: a tie


def test_adaptive_uses_derived_thresholds_and_explicit_arguments_win(tmp_path):
    path = str(_results(tmp_path))
    # Through the engine's spec string: the derived values, their source, and routing at the threshold.
    llm = LLM("dummy:tiny-llama", strategy=f"adaptive:thresholds_from={path},block_size=4")
    a, st_ = llm.engine.kv, llm.engine.stats()
    assert st_["adaptive_long_threshold"] == 200 and st_["adaptive_long"] == "snapkv"
    assert st_["adaptive_long_budget_ratio"] == 0.2 and a.long.budget_ratio == 0.2
    # snapkv fails the floor at 1600 tokens (the longest it was measured at): pressure sends it
    # nothing shorter than 1601.
    assert st_["adaptive_thresholds_derived"] == ["long_threshold", "long", "long_args", "pressure_min_length"]
    assert st_["adaptive_pressure_min_length"] == 1601
    assert st_["adaptive_thresholds_source"].startswith(f"{path}: 3 scenarios (2 where")
    assert a._choose(req("below", 150, 49))[1] == "admitted_full"
    assert a._choose(req("at", 150, 50))[1] == "admitted_long_length"
    s = AdaptiveStrategy(block_size=BS, thresholds_from=path, long_threshold=300, long="h2o", long_budget_ratio=0.4)
    assert (s.long_threshold, s.long_name, s.long.heavy_ratio) == (300, "h2o", 0.2)
    # h2o gains nowhere, so pressure is derived as 1.0 (full pool); it meets the floor on the short
    # workload only (perplexity 10 / 11) and fails it at 400 tokens, so pressure sends it nothing shorter than 401.
    assert s.derived_keys == ["pressure", "pressure_min_length"] and s.pressure == 1.0
    assert s.pressure_min_length == 401
    # An explicit child restricts the derivation to it, and its measured arguments come along. infinigen
    # was not measured on the short workload, so only mid and long count: both "long", so the threshold
    # is the shorter one's length.
    s = AdaptiveStrategy(block_size=BS, thresholds_from=path, long="infinigen")
    assert (s.long_threshold, s.long_name, s.derived_keys) == (400, "infinigen", ["long_threshold", "long_args"])
    assert s.long.calibration_len == 512
    assert bound(8, long_threshold=100).stats()["adaptive_thresholds_source"] == "arguments"


def test_pressure_derived_as_full_pool_when_no_scenario_gains(tmp_path):
    # infinigen qualifies but stays within the margin of paged: no scenario is "long".
    rows = [_row("paged", LONG, 1.0, 2, (3168, 32), ruler=1.0), _row(INFG, LONG, 1.04, 2, (3168, 32), ruler=1.0)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = AdaptiveStrategy(block_size=BS, thresholds_from=str(path))
    assert (s.long_threshold, s.long_name, s.pressure) == (None, "infinigen", 1.0)
    assert s.derived_keys == ["long_threshold", "long", "long_args", "pressure", "long_share"]
    # The host child gets only what one request of max_model_len needs: its rows in both prefetch
    # buffers (2 buffers x K,V x kv heads x head dim x 4 B) and its partial keys (layers x kv heads x d' x 4 B).
    d = s.long._partial_dim(CFG.head_dim)
    per_token = 2 * 2 * CFG.num_kv_heads * CFG.head_dim * 4 + CFG.num_layers * CFG.num_kv_heads * d * 4
    budget = 1 << 20
    s.bind(KVSetup(CFG, torch.device("cpu"), torch.float32, budget, 128, 64, 1 << 30))
    assert s.long.buffer_tokens == 128 and s.long.max_request_tokens() == 128
    assert s.long_share == 128 * per_token / budget
    assert s.full.pool.num_blocks == (budget - 128 * per_token) // (CFG.kv_bytes_per_token(torch.float32) * BS)
    assert s.stats()["adaptive_long_share"] == s.long_share
    # A budget the host child alone fills is refused by name; a share given explicitly is kept.
    with pytest.raises(ConfigError, match="needs .* device bytes to serve one request of max_model_len=128"):
        AdaptiveStrategy(block_size=BS, thresholds_from=str(path)).bind(
            KVSetup(CFG, torch.device("cpu"), torch.float32, 128 * per_token, 128, 64, 1 << 30))
    assert AdaptiveStrategy(block_size=BS, thresholds_from=str(path), long_share=0.5).long_share == 0.5
    # Given explicitly, pressure wins; and where a scenario gains, pressure keeps its default.
    assert AdaptiveStrategy(block_size=BS, thresholds_from=str(path), pressure=0.7).pressure == 0.7
    assert AdaptiveStrategy(block_size=BS, thresholds_from=str(_results(tmp_path))).pressure == 0.9
    # At pressure 1.0 a request goes long only once the pool is full.
    s = bound(10, long_threshold=10_000, pressure=1.0)
    assert s.allocate(req("a", 36, 4), 36) and s.route["a"] is s.full  # 9 of 10 blocks
    assert s.allocate(req("b", 4, 4), 4) and s.route["b"] is s.full  # the 10th
    assert s._choose(req("c", 4, 4))[1] == "admitted_long_pressure"


def test_the_measure_closest_to_the_served_requests_decides():
    # snapkv is 10% faster on short requests and keeps 0.95 of paged's perplexity, but its served
    # answers agree with full KV on 6% of tokens (paged: 94%): agreement decides, and it fails.
    rows = [_row("paged", SHORT, 12.4, 5, (400, 100), ppl=25.3, agree=0.94),
            _row(SNAP, SHORT, 13.6, 5, (400, 100), ppl=26.7, agree=0.06)]
    t = derive_thresholds("hand", rows=rows)
    assert [s.verdict for s in t.scenarios] == ["full"] and t.long is None
    rows[1]["quality"]["agreement"]["match_fraction"] = 0.9  # 0.96 of paged's: it qualifies
    t = derive_thresholds("hand", rows=rows)
    assert [s.verdict for s in t.scenarios] == ["long"] and t.long == "snapkv"
    rows[1]["quality"]["perplexity"]["perplexity"] = 100.0  # agreement still decides over perplexity
    assert derive_thresholds("hand", rows=rows).long == "snapkv"
    # On RULER prompts the task score decides: offload answers every needle though its 128-token
    # continuations agree with paged's on 79% of tokens (0.79 < 0.8 x 1.0); h2o agrees on 90% but
    # answers 12% of the needles.
    rows = [_row("paged", LONG, 3.0, 16, (61000, 2048), ruler=1.0, agree=1.0),
            _row("offload", LONG, 4.0, 16, (61000, 2048), ruler=1.0, agree=0.79),
            _row(H2O, LONG, 5.0, 16, (61000, 2048), ruler=0.12, agree=0.9)]
    t = derive_thresholds("hand", rows=rows)
    assert (t.scenarios[0].best, t.scenarios[0].qualified) == ("offload", {H2O: False, "offload": True})


def test_pressure_sends_long_only_lengths_where_the_child_meets_the_floor(tmp_path):
    # The H100 mixed calibration's shape: snapkv ruins short chat answers (agreement 0.06) but keeps
    # the long prompts' needles (0.875) and beats paged there; so lengths >= ceil(sqrt(250 x 3900))
    # go long, and pressure may send snapkv nothing shorter either.
    rows = [_row("paged", SHORT, 12.4, 5, (1000, 250), agree=0.94), _row(SNAP, SHORT, 13.6, 5, (1000, 250), agree=0.06),
            _row("paged", LONG, 4.0, 2, (7768, 32), ruler=1.0), _row(SNAP, LONG, 8.0, 2, (7768, 32), ruler=0.875)]
    t = derive_thresholds("hand", rows=rows)
    assert (t.long_threshold, t.long, t.pressure_min_length) == (988, "snapkv", 988)
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = bound(300, thresholds_from=str(path), pressure=0.5, relief=0.4, long_threshold=10_000)
    assert s.derived_keys == ["long", "long_args", "pressure_min_length"]
    assert s.allocate(req("a", 600, 4), 600) and s.route["a"] is s.full  # 150 of 300 blocks: pressure
    assert s._choose(req("short", 900, 87))[1] == "admitted_full"  # 987 tokens
    assert s._choose(req("edge", 900, 88))[1] == "admitted_long_pressure"  # 988
    # A running short request that cannot grow is not compressed: it waits, or is preempted, as under paged.
    r = req("b", 600, 4)
    assert s.allocate(r, 600) and s.route["b"] is s.full  # 300 of 300 blocks
    blocks = list(s.full.tables["b"])
    r.num_computed_tokens = 600
    assert not s.allocate(r, 601) and s.route["b"] is s.full and s.full.tables["b"] == blocks
    assert s.counts["compressed_under_pressure"] == 0
    # Without the limit (explicitly 1), the same request is compressed instead.
    s = bound(300, thresholds_from=str(path), pressure=1.0, relief=0.4, long_threshold=10_000, pressure_min_length=1)
    assert s.allocate(req("a", 600, 4), 600) and s.allocate(r, 600)
    assert s.allocate(r, 601) and s.route["b"] is s.long and s.counts["compressed_under_pressure"] == 1


@pytest.mark.parametrize("long", ["snapkv", "offload"])
def test_graphs_replay_only_steps_without_long_rows_when_the_child_has_none(long):
    from kvscope.kv.base import StepBatch

    if long == "offload":  # a host child: its own pool beside the full child's
        s = AdaptiveStrategy(block_size=BS, long_threshold=100, long=long, long_args={"host_kv_bytes": 1 << 22})
        s.bind(KVSetup(CFG, torch.device("cpu"), torch.float32, 1 << 22, 512, 64, 0))
    else:
        s = bound(64, long_threshold=100, long=long)
    short, longer = req("short", 20, 10), req("long", 90, 20)
    assert s.allocate(short, 20) and s.allocate(longer, 90)
    assert not s._long_in_graphs() and s.graph_statistics() is None

    def batch(*reqs):
        return StepBatch(requests=list(reqs), num_new_tokens=[1] * len(reqs), input_ids=torch.zeros(len(reqs)),
                         positions=torch.zeros(len(reqs)), query_start=list(range(len(reqs) + 1)))

    assert s.graph_ready(batch(short)) and not s.graph_ready(batch(short, longer))
    assert not s.graph_ready(batch(longer))


@pytest.mark.parametrize("content, message", [
    (None, "no such results file"),
    ([_row("paged", LONG, 1.0, 2, (3168, 32), ruler=1.0)], "no scenario .* holds both an ok 'paged' row"),
    ([_row("paged", LONG, 1.0, 2, (3168, 32), ruler=1.0), _row(INFG, LONG, 2.0, 2, (3168, 32), status="error")],
     "no scenario .*; strategies with ok rows: paged$"),
    ([_row("paged", LONG, 1.0, 2, (3168, 32)), _row(INFG, LONG, 2.0, 2, (3168, 32))],
     "no candidate row has a quality figure"),
    ([_row("paged", LONG, 1.0, 0, (0, 0), ruler=1.0), _row(INFG, LONG, 2.0, 0, (0, 0), ruler=1.0)],
     "no usable scenario has a request_goodput figure and a completed request"),
])
def test_thresholds_bad_input_names_the_problem(tmp_path, content, message):
    path = tmp_path / "results.jsonl"
    if content is not None:
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    with pytest.raises(ConfigError, match=f"thresholds_from='{path}': {message}"):
        AdaptiveStrategy(thresholds_from=str(path))
    with pytest.raises(ConfigError, match="^strategies\\[0\\]: adaptive: thresholds_from="):
        parse_spec({"models": ["m"], "strategies": [f"adaptive:thresholds_from={path}"],
                    "workloads": [{"type": "fixed", "num_requests": 1, "input_len": 4, "output_len": 2}]},
                   check_packages=False)
