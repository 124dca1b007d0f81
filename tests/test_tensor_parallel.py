"""Tensor parallelism on the CPU (gloo, 2 processes): outputs equal one rank's, KV kept in lockstep
on every rank, bad configurations refused, a dead worker an error rather than a hang.

The reference is the same engine on one rank: same dummy weights (each rank keeps its slices of
the single-device draw), same pool in tokens (``kv_memory_bytes`` is per rank, so TP 2 gets half).
"""
from __future__ import annotations

import gc
import os
import signal
import time

import pytest
import torch

import dataclasses

from kvscope import LLM, SamplingParams
from kvscope.advise.cost_model import CostModel
from kvscope.advise.hardware import H200
from kvscope.advise.options import option_from_spec, resolve_model
from kvscope.advise.simulate import EngineLimits
from kvscope.cli import main
from kvscope.errors import ConfigError
from kvscope.models.fused import checkpoint_tensors
from kvscope.models.loader import load_model
from kvscope.models.parallel import load_shard, shard_config, shard_dim

two_cores = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="tensor parallelism needs one core per rank process")

MODEL = "dummy:tiny-llama"  # 4 heads, 2 KV heads, 2 layers
KV = 1 << 20  # one rank's pool: 128 blocks of 16 tokens
PROMPTS = [[(7 * i + 11 * n) % 250 + 4 for i in range(n)] for n in (37, 5, 60, 18)]  # no shared prefix
# Per-request counts, equal on every rank and to one rank's; ``evicted_tokens`` counts (token, KV
# head) pairs, so the ranks' sum is one rank's.
COUNTS = ("num_blocks", "blocks_used", "blocks_free", "blocks_cached", "num_evictions", "freed_blocks",
          "host_num_blocks", "host_blocks_used", "host_evicted_tokens")


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True)


def run(tp: int, strategy: str, prompts=PROMPTS, kv: int = KV, **kw):
    llm = LLM(MODEL, strategy=strategy, kv_memory_bytes=kv // tp, max_model_len=256, tensor_parallel_size=tp, **kw)
    try:
        outs = llm.generate(prompts, greedy(), use_tqdm=False)
        return outs, llm.rank_stats(), llm.engine.stats()
    finally:
        llm.close()


def counts(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k in COUNTS}


def test_shards_are_slices_of_the_single_device_model():
    # Under checkpoint names: the fused projections are compared part by part.
    full = checkpoint_tensors(load_model(MODEL).model)
    shards = [checkpoint_tensors(load_shard(MODEL, torch.device("cpu"), torch.float32, 0, r, 2).model)
              for r in range(2)]
    for name, t in full.items():
        dim = shard_dim(name)
        got = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim)
        assert torch.equal(got, t), name
    assert shards[0]["model.layers.0.self_attn.k_proj.weight"].shape[0] == 16  # one KV head of 16 dims


def test_fused_shard_is_its_heads_of_q_k_v():
    """Rank r's qkv_proj is [its q heads, its k heads, its v heads] and its gate_up_proj [its gate
    rows, its up rows] (vLLM's layout), not rows r/N.. of the full fused weight."""
    full = load_model(MODEL).model.model.layers[1]
    d = 16  # tiny-llama: 4 q heads, 2 KV heads of 16 dims, MLP width 192
    for r in range(2):
        shard = load_shard(MODEL, torch.device("cpu"), torch.float32, 0, r, 2).model.model.layers[1]
        q = full.self_attn.q_weight[r * 2 * d:(r + 1) * 2 * d]
        k = full.self_attn.k_weight[r * d:(r + 1) * d]
        v = full.self_attn.v_weight[r * d:(r + 1) * d]
        assert torch.equal(shard.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
        gate_up = full.mlp.gate_up_proj.weight
        rows = slice(r * 96, (r + 1) * 96)
        assert torch.equal(shard.mlp.gate_up_proj.weight, torch.cat([gate_up[:192][rows], gate_up[192:][rows]]))


@two_cores
# infinigen with one dense layer (so layer 1 speculates): its defaults (alpha 4, budget_ratio 0.2),
# and uncapped, where k is the mean count over all heads (reduced over the ranks) on every step.
@pytest.mark.parametrize("strategy", [
    "paged", "h2o:heavy_ratio=0.2,recent_ratio=0.2", "snapkv:budget_ratio=0.3,window=4",
    "infinigen:dense_layers=1", "infinigen:dense_layers=1,budget_ratio=None,alpha=0.01",
    "infinigen:dense_layers=1,budget_ratio=None,alpha=0.01,select='token'",
    "quest:budget_ratio=0.3", "pyramidkv:budget_ratio=0.3,window=4"])
def test_tp2_equals_tp1(strategy):
    assert_tp2_equals_tp1(strategy, strategy)


@two_cores
def test_infinigen_pool_eviction_picks_one_ranks_victim():
    # A host pool of 4 blocks per rank (the same tokens at TP 1 and 2) that the 60-token prompt
    # outgrows: each of its decode steps replaces its least-selected old token, selections counted
    # over every rank's heads (without that, logits differed by 0.08).
    pool = 4 * 16 * 2 * 2 * 2 * 16 * 4
    spec = "infinigen:dense_layers=1,budget_ratio=None,alpha=0.01,host_kv_bytes={}"
    ref_ranks = assert_tp2_equals_tp1(spec.format(pool), spec.format(pool // 2), prompts=[PROMPTS[2], PROMPTS[0]])
    assert ref_ranks[0]["host_evicted_tokens"] > 0


def assert_tp2_equals_tp1(spec1: str, spec2: str, **kw) -> list[dict]:
    """Same tokens, logits within 1e-5, per-request counts equal on both ranks and to one rank's;
    returns one rank's stats."""
    ref, ref_ranks, _ = run(1, spec1, **kw)
    got, ranks, _ = run(2, spec2, **kw)
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la, lb = torch.stack(a.outputs[0].logits), torch.stack(b.outputs[0].logits)
        assert torch.allclose(la, lb, atol=1e-5, rtol=0), (la - lb).abs().max()
    assert len(ranks) == 2 and counts(ranks[0]) == counts(ranks[1]) == counts(ref_ranks[0])
    assert sum(s.get("evicted_tokens", 0) for s in ranks) == ref_ranks[0].get("evicted_tokens", 0)
    return ref_ranks


@two_cores
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_frees_kv_on_every_rank(mode):
    strategy = "paged"
    small = 8 * 16 * 2 * 2 * 2 * 16 * 4  # 8 blocks of 16 tokens: the four prompts cannot all run
    ref, _, ref_engine = run(1, strategy, kv=small, preemption_mode=mode)
    got, ranks, engine = run(2, strategy, kv=small, preemption_mode=mode)
    assert engine["num_preemptions"] == ref_engine["num_preemptions"] > 0
    assert engine["num_swap_preemptions"] == ref_engine["num_swap_preemptions"] == (engine["num_preemptions"] if mode == "swap" else 0)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    for s in ranks:
        assert s["blocks_used"] == 0 and s["blocks_free"] == s["num_blocks"]


@two_cores
def test_abort_frees_kv_on_every_rank():
    ref = run(1, "paged", prompts=PROMPTS[:1])[0]
    llm = LLM(MODEL, kv_memory_bytes=KV // 2, max_model_len=256, tensor_parallel_size=2)
    try:
        ids = llm.engine.add_requests(PROMPTS, [greedy(40)] * len(PROMPTS))
        for _ in range(3):
            llm.engine.step()
        held = llm.rank_stats()
        assert held[0]["blocks_used"] == held[1]["blocks_used"] > 0
        for rid in ids:
            llm.engine.abort(rid)
        assert all(s["blocks_used"] == 0 for s in llm.rank_stats())
        assert llm.generate(PROMPTS[:1], greedy(), use_tqdm=False)[0].outputs[0].token_ids == \
            ref[0].outputs[0].token_ids
    except BaseException:
        llm.close()
        raise
    # Dropping the LLM stops its workers (no close() call).
    workers = llm.engine.runner.group.context.processes
    del llm
    gc.collect()
    for p in workers:
        p.join(15)
        assert p.exitcode == 0


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 must divide the model's num_kv_heads"):
        LLM("dummy:tiny-qwen2", tensor_parallel_size=2)  # one KV head
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        LLM(MODEL, tensor_parallel_size=len(os.sched_getaffinity(0)) + 1)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        LLM(MODEL, tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="loaded_model"):
        LLM(MODEL, tensor_parallel_size=2, loaded_model=load_model(MODEL))
    with pytest.raises(ConfigError, match="intermediate_size"):
        shard_config(load_model("dummy:tiny-opt").config.__class__(
            arch="llama", vocab_size=8, hidden_size=8, intermediate_size=3, num_layers=1, num_heads=2,
            num_kv_heads=2, head_dim=4, max_position_embeddings=8), 2)


@two_cores
def test_dead_worker_is_an_error_not_a_hang():
    llm = LLM(MODEL, kv_memory_bytes=KV // 2, max_model_len=256, tensor_parallel_size=2)
    worker = llm.engine.runner.group.context.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    start = time.monotonic()
    out = llm.generate(PROMPTS[:1], greedy(), use_tqdm=False)[0]
    assert time.monotonic() - start < 10
    assert out.finish_reason == "error" and "rank 1" in out.error
    llm.close()


def test_cost_model_tp_term_by_hand():
    """Llama-3-70B decode on an H200 at TP 1/2/4/8 against the formula written out: one rank
    streams its share of the layer weights plus the whole embedding and head, and a step adds
    2 all-reduces per layer costing latency + 2 (N-1)/N x bytes / link rate."""
    m = resolve_model("llama-3-70b")
    hw = dataclasses.replace(H200, step_overhead_s_per_layer=0.0, eager_step_overhead_s_per_layer=0.0,
                             allreduce_latency_s=20e-6, interconnect_bytes_per_s=400e9)
    paged = option_from_spec("paged")
    batch, context = 8, 1024
    emb_head = 2 * 128256 * 8192  # embedding and LM head, untied, replicated on every rank
    times, comms = {}, {}
    for n in (1, 2, 4, 8):
        cost = CostModel(m, hw, limits=EngineLimits(tensor_parallel_size=n))
        weights = ((m.num_params() - emb_head) / n + emb_head) * 2
        kv_token = 2 * 80 * (8 // n) * 128 * 2
        assert cost.weight_bytes == int(weights) and cost.kv_bytes_per_token == kv_token
        hbm = int(weights) + kv_token * batch * (context + 1)
        flops = (2 * (m.num_params() - emb_head) / n * batch + 2 * 128256 * 8192 * batch
                 + 4 * 80 * 64 * 128 / n * batch * context)
        comm = 0.0 if n == 1 else 80 * 2 * (20e-6 + 2 * (n - 1) / n * batch * 8192 * 2 / 400e9)
        expect = max(hbm / hw.hbm_bytes_per_s, flops / hw.matmul_flops_per_s) + comm
        got = cost.decode_step_seconds(paged, batch, context)
        assert got == pytest.approx(expect, rel=1e-9)
        times[n], comms[n] = got - comm, comm
    # Weights dominate decode: the device time falls nearly N-fold (the replicated head keeps it above 1/N).
    for n in (2, 4, 8):
        assert 0.8 * n < times[1] / times[n] < n
    # Without latency the all-reduce grows with N as 2 (N - 1) / N: 1, 1.5, 1.75 times TP 2's.
    no_lat = {n: CostModel(m, dataclasses.replace(hw, allreduce_latency_s=0.0),
                           limits=EngineLimits(tensor_parallel_size=n)).tp.step_comm_seconds(batch) for n in (2, 4, 8)}
    assert [no_lat[n] / no_lat[2] for n in (2, 4, 8)] == pytest.approx([1.0, 1.5, 1.75])
    with pytest.raises(ConfigError, match="tensor_parallel_size=3"):
        CostModel(m, hw, limits=EngineLimits(tensor_parallel_size=3))


def test_advise_cli_tensor_parallel(capsys):
    assert main(["advise", "--model", "llama-3-70b", "--hardware", "h200", "--tensor-parallel-size", "4",
                 "--prompt-len", "512", "--output-len", "32", "--num-requests", "8", "--json"]) == 0
    assert "paged" in capsys.readouterr().out
