"""A new eviction policy, defined here and nowhere else, runs through the engine, has a kept share,
is ranked by the advisor and serves as adaptive's long child: the strategy plug-in contract."""
from __future__ import annotations

import pytest
import torch

from kvscope import LLM, SamplingParams
from kvscope.advise import advise, fixed_workload, resolve_model
from kvscope.advise.hardware import H100
from kvscope.advise.options import option_from_spec
from kvscope.kv import registry
from kvscope.kv.eviction import EvictionStrategy
from kvscope.kv.statistics import ACCUMULATED


# ---- the whole new strategy ------------------------------------------------------------------------
class LoudKeys(EvictionStrategy):
    """Keep the tokens whose keys have the largest norm, plus the attention they received
    (a made-up policy: the key norm starts the score, accumulated attention adds to it)."""

    name = "loudkeys"
    statistic = ACCUMULATED

    def initial_scores(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return k.float().norm(dim=-1)  # [N, Hkv]
# -----------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def loudkeys():
    registry.register(LoudKeys)
    yield
    registry.unregister(LoudKeys.name)


PROMPTS = [[(7 * i + j) % 200 + 4 for j in range(40 + 9 * i)] for i in range(3)]


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_runs_through_the_engine_equal_to_paged_at_full_budget_and_frees_its_kv():
    ref = LLM("dummy:tiny-llama", strategy="paged", kv_memory_bytes=8 << 20).generate(PROMPTS, greedy(), use_tqdm=False)
    llm = LLM("dummy:tiny-llama", strategy="loudkeys:budget=4096", kv_memory_bytes=8 << 20)
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in ref]
    small = LLM("dummy:tiny-llama", strategy="loudkeys:budget_ratio=0.25", kv_memory_bytes=8 << 20)
    assert all(len(o.outputs[0].token_ids) == 12 for o in small.generate(PROMPTS, greedy(), use_tqdm=False))
    st = small.engine.stats()
    assert st["evicted_tokens"] > 0 and st["blocks_used"] == 0


def test_facts_and_kept_share():
    assert registry.kept_share("loudkeys:budget_ratio=0.3") == 0.3
    assert registry.kept_share("loudkeys") == 0.2 and registry.kept_share("loudkeys:budget=50") is None
    f = registry.facts("loudkeys")
    assert f.residence == "device" and not f.lossless and f.long_child and not f.graph_decode  # keyed scores
    assert "loudkeys" in registry.long_children()


def test_ranked_by_the_advisor():
    options = [option_from_spec(s) for s in ("paged", "loudkeys:budget_ratio=0.2")]
    assert options[1] is not None and options[1].evicts and options[1].budget_ratio == 0.2
    adv = advise(fixed_workload(4096, 256, rate=4.0), resolve_model("llama-3-8b"), H100, quality_floor=0.0,
                 options=options)
    assert {row["strategy"] for row in adv.options} == {"paged", "loudkeys:budget_ratio=0.2"}
    assert adv.feasible and adv.recommended in {"paged", "loudkeys:budget_ratio=0.2"}
    # Ranked, not ruled out: eviction predicted from its kept share (quality unmeasured, no floor).
    assert [r["ruled_out"] for r in adv.options if r["strategy"].startswith("loudkeys")] == [None]


def test_serves_as_adaptive_long_child():
    llm = LLM("dummy:tiny-llama", strategy="adaptive:long=loudkeys,long_budget_ratio=0.5,long_threshold=62,block_size=4",
              kv_memory_bytes=8 << 20)
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    st = llm.engine.stats()
    assert st["adaptive_long"] == "loudkeys" and st["adaptive_long_budget_ratio"] == 0.5
    assert st["adaptive_admitted_long_length"] == 1 and st["adaptive_admitted_full"] == 2  # 58 + 12 >= 62
    assert st["num_evictions"] > 0 and st["blocks_used"] == 0


def test_adaptive_graph_queries_ask_each_child_for_its_requests():
    # block_tables / held_tokens (the CUDA-graph decode path, GPU-only) answered per child, in batch order.
    from kvscope.kv.base import StepBatch

    llm = LLM("dummy:tiny-llama", strategy="adaptive:long=loudkeys,long_threshold=62,block_size=4",
              kv_memory_bytes=8 << 20)
    eng = llm.engine
    for p in PROMPTS:
        eng.add_request(p, greedy(12))  # 52 and 61 tokens stay full, 70 goes long
    for _ in range(5):
        eng.step()
    reqs = list(eng.scheduler.running)
    kv = eng.kv
    assert {id(kv.route[r.request_id]) for r in reqs} == {id(kv.full), id(kv.long)}
    n = len(reqs)
    batch = StepBatch(reqs, [1] * n, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                      list(range(n + 1)))
    owner = [kv.route[r.request_id] for r in reqs]
    assert kv.block_tables(batch) == [o.tables[r.request_id] for o, r in zip(owner, reqs)]
    assert kv.held_tokens(batch) == [kv.long.resident[r.request_id] if o is kv.long else r.num_computed_tokens
                                     for o, r in zip(owner, reqs)]


def test_appears_in_a_study_report_with_its_kept_share(tmp_path):
    from kvscope.report import kept_fraction, write_report
    from kvscope.study import parse_spec, run_study

    spec = {"name": "loud", "models": ["dummy:tiny-llama"], "strategies": ["paged", "loudkeys:budget_ratio=0.25"],
            "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 16, "output_len": 4}],
            "rates": ["inf"], "kv_memory": ["1MiB"]}
    rows = run_study(parse_spec(spec, check_packages=False), tmp_path, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert kept_fraction("loudkeys:budget_ratio=0.25") == 0.25
    _, md = write_report(tmp_path)
    assert "loudkeys 25%" in md.read_text()
