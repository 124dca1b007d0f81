"""Static decode steps per rank under tensor parallelism: every rank runs the pure-decode steps
through its own graph runner, in lockstep, and gives what one rank gives eagerly.

On the CPU the ranks' runners run the static steps without capture (gloo cannot be captured;
``tensor_parallel_engine(..., static_steps=True)``): ``infinigen``'s in this process (torch path),
the block-table steps of ``paged`` and ``h2o`` through Triton's interpreter in a child process (see
tests/test_triton_decode.py for why a child). The reference is one rank run eagerly on the same
schedule. On two GPUs the same comparison runs with the graphs captured (NCCL inside them).

The schedule (:func:`drive`): three prompts prefill in step 1, decode in steps 2-3, a fourth prompt
joins at step 4 (its prefill rides with the three decodes: a step that must run eagerly on every
rank), then every step is pure decode until the fourth finishes at step 15. So 13 of the 15 steps
replay a static step, on each rank.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvscope import LLM, SamplingParams
from kvscope.config import EngineConfig
from kvscope.distributed.launch import tensor_parallel_engine
from kvscope.distributed.worker import run_as_planned
from kvscope.engine.engine import LLMEngine

two_cores = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="tensor parallelism needs one core per rank process")

MODEL = "dummy:tiny-llama"  # 4 heads, 2 KV heads, 2 layers
KV = 1 << 20  # one rank's pool at TP 1; TP 2 gets half per rank (the same tokens)
PROMPTS = [[(7 * i + 11 * n) % 250 + 4 for i in range(n)] for n in (37, 5, 60, 18)]  # no shared prefix
MAX_TOKENS = 12
STEPS, REPLAYS = 15, 13  # see the module docstring
COUNTS = ("num_blocks", "blocks_used", "blocks_free", "blocks_cached", "num_evictions", "freed_blocks",
          "host_num_blocks", "host_blocks_used")


def drive(engine: LLMEngine) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Run the schedule of the module docstring; per request id, its tokens and logits ``[T, vocab]``."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, return_logits=True)
    engine.add_requests(PROMPTS[:3], [params] * 3)
    done = {}
    while engine.has_unfinished_requests():
        if engine.num_steps == 3:
            engine.add_request(PROMPTS[3], params, request_id="late")
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.outputs[0].token_ids, torch.stack(out.outputs[0].logits))
    return done


def engine_kwargs(strategy: str, tp: int, backend: str) -> dict:
    return dict(model=MODEL, strategy=strategy, kv_memory_bytes=KV // tp, max_model_len=256, max_num_seqs=4,
                attention_backend=backend, tensor_parallel_size=tp)


def compare(strategy: str, backend: str = "torch") -> dict:
    """TP 1 eager and TP 2 static steps on the same schedule: plain data (for the child process too)."""
    ref_engine = LLM(**engine_kwargs(strategy, 1, backend)).engine
    ref = drive(ref_engine)
    engine = tensor_parallel_engine(EngineConfig(**engine_kwargs(strategy, 2, backend)), static_steps=True)
    try:
        got = drive(engine)
        ranks = engine.runner.rank_stats()
    finally:
        engine.runner.close()
    return {
        "ref_tokens": {k: v[0] for k, v in ref.items()}, "tokens": {k: v[0] for k, v in got.items()},
        "logit_diff": max(float((ref[k][1] - got[k][1]).abs().max()) for k in ref),
        "steps": engine.num_steps, "ref_replays": ref_engine.runner.graph_replays,
        "replays": [s["cuda_graph_replays"] for s in ranks],
        "counts": [{k: v for k, v in s.items() if k in COUNTS} for s in ranks],
        "ref_counts": {k: v for k, v in ref_engine.kv.stats().items() if k in COUNTS},
    }


def check(res: dict) -> None:
    assert res["tokens"] == res["ref_tokens"] and len(res["tokens"]) == 4
    assert res["logit_diff"] <= 1e-5
    assert res["ref_replays"] == 0  # the reference ran eagerly
    # Every pure-decode step replayed a static step on both ranks; steps 1 and 4 ran eagerly on both.
    assert res["steps"] == STEPS and res["replays"] == [REPLAYS, REPLAYS]
    assert res["counts"][0] == res["counts"][1] == res["ref_counts"]


@two_cores
@pytest.mark.parametrize("strategy", ["infinigen:dense_layers=1",
                                      "infinigen:dense_layers=1,budget_ratio=None,alpha=0.01"])
def test_infinigen_static_steps_tp2_equal_tp1_eager(strategy):
    # Uncapped (alpha 0.01), k is the mean count over every head: the all-reduce runs inside the
    # static step on every rank.
    check(compare(strategy))


_CHILD = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from test_tensor_parallel_graphs import compare
print(json.dumps({s: compare(s, "triton") for s in ("paged", "h2o:heavy_ratio=0.2,recent_ratio=0.2")}))
'''


@pytest.fixture(scope="module")
def block_table_results(triton_interpreter) -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@two_cores
@pytest.mark.parametrize("strategy", ["paged", "h2o:heavy_ratio=0.2,recent_ratio=0.2"])
def test_block_table_static_steps_tp2_equal_tp1_eager(block_table_results, strategy):
    check(block_table_results[strategy])


def test_a_worker_whose_plan_differs_from_rank_0s_raises():
    # Rank 0 sent bucket 2; this rank's own plan says 4: running either would leave the ranks'
    # collectives mismatched, so it raises before running anything.
    ran = []
    graphs = SimpleNamespace(plan=lambda batch, rows: 4, replay=lambda batch, key: ran.append(key))
    runner = SimpleNamespace(graphs=graphs, graph_replays=0, run=lambda batch, rows: ran.append(None))
    batch = SimpleNamespace(requests=[object(), object()])
    with pytest.raises(RuntimeError, match="rank 1 diverged from rank 0: .* 4 here and 2 on rank 0"):
        run_as_planned(1, runner, batch, [0, 1], 2)
    assert ran == []
    run_as_planned(1, runner, batch, [0, 1], 4)
    assert ran == [4] and runner.graph_replays == 1


# Two GPUs: a tensor_parallel_size=2 config on fewer is refused earlier, for that reason.
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_static_steps_refused_on_cuda():
    from kvscope.errors import ConfigError

    with pytest.raises(ConfigError, match="static_steps"):
        tensor_parallel_engine(EngineConfig(**engine_kwargs("paged", 2, "auto"), device="cuda"), static_steps=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("strategy", ["paged", "h2o:heavy_ratio=0.2,recent_ratio=0.2", "infinigen:dense_layers=1"])
def test_cuda_graphs_per_rank_tp2_equal_tp1(strategy):
    """Two GPUs: TP 2 with graphs captured on each rank (all-reduces inside them) against TP 1 with
    its own graphs, float32; both replay the 13 pure-decode steps."""
    kw = dict(device="cuda", dtype="float32")
    ref_llm = LLM(**engine_kwargs(strategy, 1, "auto"), **kw)
    ref = drive(ref_llm.engine)
    llm = LLM(**engine_kwargs(strategy, 2, "auto"), **kw)
    try:
        got = drive(llm.engine)
        ranks = llm.rank_stats()
        assert llm.engine.stats()["cuda_graph_sizes"] == [1, 2, 4]
    finally:
        llm.close()
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in ref.items()}
    diff = max(float((ref[k][1] - got[k][1]).abs().max()) for k in ref)
    assert diff <= 1e-4, diff  # TF32 off by default; the all-reduce sums in another order
    assert ref_llm.engine.runner.graph_replays == REPLAYS
    assert [s["cuda_graph_replays"] for s in ranks] == [REPLAYS, REPLAYS]


@pytest.mark.parametrize("tp", [2, 4])
def test_cost_model_replays_tp_decode_steps(tp):
    """Under TP a decode-only step pays the replayed per-layer overhead (graphs per rank), a step
    with a prefill chunk the eager one, as on one device; hand-computed over Llama-3-70B's 80 layers."""
    import dataclasses

    from kvscope.advise.cost_model import CostModel
    from kvscope.advise.hardware import H200
    from kvscope.advise.options import option_from_spec, resolve_model
    from kvscope.advise.simulate import EngineLimits, SimRequest, StepWork

    m, paged, limits = resolve_model("llama-3-70b"), option_from_spec("paged"), EngineLimits(tensor_parallel_size=tp)
    hw = dataclasses.replace(H200, step_overhead_s_per_layer=1e-4, eager_step_overhead_s_per_layer=1e-3)
    free = dataclasses.replace(H200, step_overhead_s_per_layer=0.0, eager_step_overhead_s_per_layer=0.0)
    cost, base = CostModel(m, hw, limits=limits), CostModel(m, free, limits=limits)
    decode = StepWork([SimRequest(0.0, 127, 2, computed=127, generated=1)], [])
    mixed = StepWork([SimRequest(0.0, 127, 2, computed=127, generated=1)], [(SimRequest(0.0, 64, 2), 64)])
    assert cost.step_seconds(paged, decode) == pytest.approx(base.step_seconds(paged, decode) + 80 * 1e-4)
    assert cost.step_seconds(paged, mixed) == pytest.approx(base.step_seconds(paged, mixed) + 80 * 1e-3)
