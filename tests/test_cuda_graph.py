"""CUDA-graph decode: bucket choice and configuration on CPU; on a GPU, graphs against eager
steps and HF transformers (float32 greedy tokens and logits)."""
from __future__ import annotations

import random

import pytest
import torch

from hf_ref import hf_greedy, make_tiny_checkpoint
from kvscope import LLM, SamplingParams
from kvscope.config import EngineConfig
from kvscope.engine.cuda_graph import default_graph_sizes, pure_decode
from kvscope.kv.graphs import bucket_for
from kvscope.errors import ConfigError


def test_default_sizes_follow_vllm():
    assert default_graph_sizes(1) == [1]
    assert default_graph_sizes(6) == [1, 2, 4, 6]
    assert default_graph_sizes(8) == [1, 2, 4, 8]
    assert default_graph_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    assert default_graph_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


@pytest.mark.parametrize(
    "new, rows, expected",
    [
        ([1], [0], 1),
        ([1, 1, 1], [0, 1, 2], 4),  # padded to the next bucket
        ([1] * 8, list(range(8)), 8),
        ([1] * 9, list(range(9)), None),  # above the largest bucket
        ([1, 3], [0, 1], None),  # a prefill chunk in the step
        ([1, 1], [0], None),  # a row that is not sampled
    ],
)
def test_graph_bucket(new, rows, expected):
    bucket = bucket_for([1, 2, 4, 8], len(new)) if pure_decode(new, rows) else None
    assert bucket == expected


@pytest.mark.parametrize("sizes", [[], [0, 4], [2.5], [True], [128]])
def test_bad_graph_sizes_are_named(sizes):
    with pytest.raises(ConfigError, match="cuda_graph_sizes"):
        EngineConfig(cuda_graph_sizes=sizes, max_num_seqs=64)


def test_cpu_engine_runs_eagerly(tmp_path):
    path = tmp_path / "llama"
    make_tiny_checkpoint("llama", path)
    llm = LLM(str(path), kv_memory_bytes=4 << 20, max_model_len=128)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["cuda_graph_replays"] == 0 and stats["cuda_graph_sizes"] == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("strategy", ["paged", "contiguous"])
def test_graphs_equal_eager_and_hf_on_cuda(tmp_path, kind, strategy):
    """Float32: decode steps replayed from graphs (batches padded to a bucket, and single requests)
    give HF's greedy tokens and logits, as the eager steps do."""
    path = tmp_path / kind
    hf = make_tiny_checkpoint(kind, path)
    rng = random.Random(3)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (5, 17, 33, 1, 64, 9)]
    refs = [hf_greedy(hf, p, 20) for p in prompts]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, return_logits=True)
    outs = {}
    for eager in (True, False):
        llm = LLM(str(path), device="cuda", strategy=strategy, enforce_eager=eager, kv_memory_bytes=8 << 20,
                  max_model_len=256, max_num_seqs=8)
        got = llm.generate(prompts, params, use_tqdm=False) + llm.generate(prompts[:1], params, use_tqdm=False)
        replays = llm.engine.stats()["cuda_graph_replays"]
        assert (replays == 0) if eager else (replays >= 2 * 19), replays
        outs[eager] = got
        for out, (tokens, logits) in zip(got, refs + refs[:1]):
            assert out.token_ids == tokens
            ours = torch.stack(out.outputs[0].logits)
            assert torch.allclose(ours, logits, atol=1e-3, rtol=0), (ours - logits).abs().max()
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ["h2o:budget=24,recent=8,block_size=4", "snapkv:budget=24,window=8,block_size=4",
                                  "streaming:budget=24,sinks=4,block_size=4"])
def test_eviction_graphs_equal_eager_on_cuda(tmp_path, spec):
    """Eviction decode steps replayed from graphs give the eager steps' tokens, logits and evictions
    (float32): h2o with its column sums folded in the graph and eviction after it; snapkv (prompt
    compressed once, eagerly) and streaming (sinks scored when written, eviction after the replay)
    as plain paged decode over their resident tokens."""
    path = tmp_path / "llama"
    make_tiny_checkpoint("llama", path)
    rng = random.Random(4)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (5, 40, 90, 17)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, return_logits=True)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(path), device="cuda", strategy=spec, enforce_eager=eager,
                  kv_memory_bytes=8 << 20, max_model_len=256, max_num_seqs=8)
        outs = llm.generate(prompts, params, use_tqdm=False)
        st = llm.engine.stats()
        assert (st["cuda_graph_replays"] == 0) == eager
        runs[eager] = (outs, st)
    (e_outs, e_st), (g_outs, g_st) = runs[True], runs[False]
    assert [o.token_ids for o in g_outs] == [o.token_ids for o in e_outs]
    for a, b in zip(g_outs, e_outs):
        x, y = torch.stack(a.outputs[0].logits), torch.stack(b.outputs[0].logits)
        assert torch.allclose(x, y, atol=1e-4, rtol=0), (x - y).abs().max()
    assert g_st["evicted_tokens"] == e_st["evicted_tokens"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adaptive_graphs_equal_eager_on_cuda():
    """adaptive with its h2o child, under pressure (requests compressed mid-run): decode steps
    replayed from one graph for both children's rows give the eager steps' tokens and logits."""
    prompts = [[(7 * i + j) % 200 + 4 for j in range(40)] for i in range(6)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True)
              for n in (70, 10) * 3]
    runs = {}
    for eager in (True, False):
        llm = LLM("dummy:tiny-llama", device="cuda", strategy="adaptive:block_size=4,long_threshold=10000,pressure=0.95",
                  enforce_eager=eager, kv_memory_bytes=200 * (512 + 2 * 2 * 12), max_model_len=128, max_num_seqs=8)
        outs = llm.generate(prompts, params, use_tqdm=False)
        st = llm.engine.stats()
        assert (st["cuda_graph_replays"] == 0) == eager
        assert st["adaptive_compressed_under_pressure"] > 0
        runs[eager] = outs
    assert [o.token_ids for o in runs[False]] == [o.token_ids for o in runs[True]]
    for a, b in zip(runs[False], runs[True]):
        x, y = torch.stack(a.outputs[0].logits), torch.stack(b.outputs[0].logits)
        assert torch.allclose(x, y, atol=1e-4, rtol=0), (x - y).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adaptive_with_uncaptured_child_replays_full_only_steps_on_cuda():
    """adaptive with offload (a host child, none of whose steps adaptive captures): steps with a long row run eagerly,
    steps of full rows alone replay the full child's graphs; tokens and logits equal the eager
    engine's."""
    prompts = [[(5 * i + j) % 200 + 4 for j in range(60 if i % 2 else 20)] for i in range(6)]
    # Long by length: 60 + 5 >= 64. Full: 20 + 40 < 64, and they outlive the long ones.
    params = [SamplingParams(max_tokens=5 if i % 2 else 40, temperature=0.0, ignore_eos=True, return_logits=True)
              for i in range(6)]
    runs = {}
    for eager in (True, False):
        llm = LLM("dummy:tiny-llama", device="cuda", strategy="adaptive:block_size=4,long=offload,long_threshold=64",
                  enforce_eager=eager, max_model_len=128, max_num_seqs=8)
        outs = llm.generate(prompts, params, use_tqdm=False)
        st = llm.engine.stats()
        assert (st["cuda_graph_replays"] > 0) != eager
        assert st["adaptive_admitted_long_length"] == 3 and st["adaptive_admitted_full"] == 3
        runs[eager] = outs
    assert [o.token_ids for o in runs[False]] == [o.token_ids for o in runs[True]]
    for a, b in zip(runs[False], runs[True]):
        x, y = torch.stack(a.outputs[0].logits), torch.stack(b.outputs[0].logits)
        assert torch.allclose(x, y, atol=1e-4, rtol=0), (x - y).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ["quant:dtype=fp8", "quant:dtype=fp8,scale=head"])
def test_quant_fp8_graphs_equal_eager_on_cuda(tmp_path, spec):
    """fp8 decode steps replayed from CUDA graphs (scales fixed by the first prefill, new tokens
    encoded and written inside the graph) give the eager steps' tokens and float32 logits; the
    split counts differ (the graph's from max_model_len), hence the tolerance."""
    path = tmp_path / "llama"
    make_tiny_checkpoint("llama", path)
    rng = random.Random(5)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (5, 17, 33, 1, 64, 9)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True)
              for n in (20, 7, 13, 20, 3, 11)]
    runs = {}
    for eager in (True, False):
        llm = LLM(str(path), device="cuda", strategy=spec, attention_backend="triton", enforce_eager=eager,
                  kv_memory_bytes=8 << 20, max_model_len=256, max_num_seqs=8)
        runs[eager] = llm.generate(prompts, params, use_tqdm=False)
        replays = llm.engine.stats()["cuda_graph_replays"]
        assert (replays == 0) if eager else (replays >= 19), replays
    assert [o.token_ids for o in runs[False]] == [o.token_ids for o in runs[True]]
    for a, b in zip(runs[False], runs[True]):
        x, y = torch.stack(a.outputs[0].logits), torch.stack(b.outputs[0].logits)
        assert torch.allclose(x, y, atol=1e-4, rtol=0), (x - y).abs().max()
