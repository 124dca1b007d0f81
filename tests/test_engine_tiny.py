"""Engine vs HF transformers on small random Llama, Qwen2 and OPT checkpoints, plus scheduler
behaviours (chunked prefill, preemption, prefix caching, fork) that must not change outputs."""
from __future__ import annotations

import random

import pytest
import torch

from hf_ref import hf_greedy, make_tiny_checkpoint
import functools
import os

from kvscope import LLM as _LLM
from kvscope import SamplingParams

# The same tests run on a GPU with KVSCOPE_TEST_DEVICE=cuda (the HF reference stays on the CPU).
DEVICE = os.environ.get("KVSCOPE_TEST_DEVICE", "cpu")
LLM = functools.partial(_LLM, device=DEVICE)
from kvscope.errors import ConfigError, RequestError

KINDS = ["llama", "qwen2", "opt"]
NEW = 24


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_checkpoint(request.param, path)
    rng = random.Random(1)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (5, 17, 33, 1, 64, 9)]
    refs = [hf_greedy(hf, p, NEW) for p in prompts]
    return str(path), prompts, refs


def greedy(n=NEW, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True, **kw)


def assert_matches(outs, refs):
    for out, (tokens, logits) in zip(outs, refs):
        assert out.token_ids == tokens
        ours = torch.stack(out.outputs[0].logits)
        assert torch.allclose(ours, logits, atol=1e-3, rtol=0), (ours - logits).abs().max()


@pytest.mark.parametrize("strategy", ["paged", "contiguous"])
def test_single_and_batched_equal_hf(tiny, strategy):
    path, prompts, refs = tiny
    llm = LLM(path, strategy=strategy, kv_memory_bytes=8 << 20, max_model_len=256)
    for p, ref in zip(prompts, refs):
        assert_matches(llm.generate([p], greedy(), use_tqdm=False), [ref])
    assert_matches(llm.generate(prompts, greedy(), use_tqdm=False), refs)


def test_chunked_prefill_and_tight_budget(tiny):
    path, prompts, refs = tiny
    llm = LLM(path, kv_memory_bytes=8 << 20, max_num_batched_tokens=7, max_num_seqs=3)
    assert_matches(llm.generate(prompts, greedy(), use_tqdm=False), refs)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_outputs(tiny, mode):
    path, prompts, refs = tiny
    # 10 blocks of 16 tokens: the batch needs far more, so requests are preempted and resumed.
    bpt = LLM(path, kv_memory_bytes=8 << 20).engine.kv.bytes_per_token
    llm = LLM(path, kv_memory_bytes=10 * 16 * bpt, preemption_mode=mode)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0
    if mode == "swap":
        assert stats["num_swap_preemptions"] > 0
        assert stats["swapped_out_bytes"] == stats["swapped_in_bytes"] > 0
    for out, (tokens, logits) in zip(outs, refs):
        assert out.token_ids == tokens
    assert stats["blocks_used"] == 0 and stats["host_kv_bytes"] == 0


def test_prefix_cache_computes_only_new_tokens(tiny):
    path, prompts, refs = tiny
    llm = LLM(path, kv_memory_bytes=8 << 20)
    base = prompts[4]  # 64 tokens = 4 full blocks
    llm.generate([base], greedy(4), use_tqdm=False)
    computed_before = llm.engine.stats()["num_computed_tokens"]
    extended = base + [7, 8, 9]
    out = llm.generate([extended], greedy(4), use_tqdm=False)[0]
    assert out.metrics.num_prefix_cached_tokens == 64
    # 3 new prompt tokens, then 3 decode steps of one token each.
    assert llm.engine.stats()["num_computed_tokens"] - computed_before == 3 + 3
    fresh = LLM(path, kv_memory_bytes=8 << 20, strategy="paged:enable_prefix_caching=False")
    ref = fresh.generate([extended], greedy(4), use_tqdm=False)[0]
    assert out.token_ids == ref.token_ids
    assert fresh.engine.stats()["prefix_cache_hit_tokens"] == 0


def test_fork_n_greedy_copies_on_write(tiny):
    path, prompts, refs = tiny
    llm = LLM(path, kv_memory_bytes=8 << 20)
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, n=3)
    out = llm.generate([prompts[1]], sp, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert c.token_ids == refs[1][0]
    assert llm.engine.stats()["cow_copies"] > 0
    assert llm.engine.stats()["blocks_used"] == 0


def test_seeded_sampling_is_reproducible_and_filters_work(tiny):
    path, prompts, refs = tiny
    llm = LLM(path, kv_memory_bytes=8 << 20)
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
    a = llm.generate([prompts[0]], sp, use_tqdm=False)[0].token_ids
    # Same seed, now batched with other requests: the same tokens.
    b = llm.generate([prompts[2], prompts[0]], sp, use_tqdm=False)[1].token_ids
    assert a == b
    top1 = SamplingParams(max_tokens=NEW, temperature=0.7, top_k=1, ignore_eos=True, seed=5)
    assert llm.generate([prompts[0]], top1, use_tqdm=False)[0].token_ids == refs[0][0]
    nucleus = SamplingParams(max_tokens=NEW, temperature=0.7, top_p=1e-6, ignore_eos=True, seed=5)
    assert llm.generate([prompts[0]], nucleus, use_tqdm=False)[0].token_ids == refs[0][0]


def test_stop_token_ids_and_max_model_len(tiny):
    path, prompts, refs = tiny
    llm = LLM(path, kv_memory_bytes=8 << 20, max_model_len=40)
    tokens = refs[0][0]
    stop_at = tokens[5]
    out = llm.generate([prompts[0]], greedy(stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out.token_ids == tokens[: tokens.index(stop_at) + 1] and out.finish_reason == "stop"
    out = llm.generate([prompts[2]], greedy(), use_tqdm=False)[0]  # 33-token prompt, 40-token limit
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_bad_requests_raise_and_others_keep_running(tiny):
    path, prompts, refs = tiny
    llm = LLM(path, kv_memory_bytes=64 * 16 * 1024, max_model_len=128)
    eng = llm.engine
    a = eng.add_request(prompts[0], greedy())
    b = eng.add_request(prompts[1], greedy())
    eng.step()
    with pytest.raises(RequestError, match="max_model_len=128"):
        eng.add_request(list(range(1, 200)), greedy())
    with pytest.raises(RequestError, match="KV pool"):
        small = LLM(path, kv_memory_bytes=2 * 16 * eng.kv.bytes_per_token)
        small.engine.add_request(list(range(1, 40)), greedy())
    with pytest.raises(RequestError, match="token ids"):
        eng.add_request([1, 2, 999], greedy())
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request(prompts[2], greedy(), request_id=a)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert done[a].token_ids == refs[0][0] and done[b].token_ids == refs[1][0]
    with pytest.raises(RequestError, match="prompt 1"):
        llm.generate([prompts[0], list(range(1, 300))], greedy(), use_tqdm=False)
    assert not eng.has_unfinished_requests()
    assert llm.generate([prompts[0]], greedy(), use_tqdm=False)[0].token_ids == refs[0][0]


def test_abort_frees_memory(tiny):
    path, prompts, _ = tiny
    llm = LLM(path, kv_memory_bytes=8 << 20, async_scheduling=False)  # a token per step(), as below
    eng = llm.engine
    rid = eng.add_request(prompts[4], greedy())
    eng.step()
    assert eng.stats()["blocks_used"] > 0
    eng.abort(rid)
    assert eng.stats()["blocks_used"] == 0 and not eng.scheduler.running
    # The final output comes with the next step (as in vLLM); then the engine forgets the request.
    assert eng.has_unfinished_requests()
    (out,) = eng.step()
    assert out.request_id == rid and out.finished and out.finish_reason == "abort"
    assert len(out.token_ids) == 1  # the token of the step before the abort
    assert not eng.has_unfinished_requests() and not eng.requests and eng.step() == []


def test_config_errors(tiny):
    path, _, _ = tiny
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        LLM(path, strategy="nope")
    with pytest.raises(ConfigError, match="block_size"):
        LLM(path, strategy="paged:block_size=0")
    with pytest.raises(ConfigError, match="unknown argument"):
        LLM(path, strategy="paged", strategy_args={"heavy_ratio": 0.1})
    with pytest.raises(ConfigError, match="swap"):
        LLM(path, strategy="contiguous", preemption_mode="swap")
    with pytest.raises(ConfigError, match="smaller than one"):
        LLM(path, kv_memory_bytes=100)
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_contiguous_waste_is_measured(tiny):
    path, prompts, _ = tiny
    llm = LLM(path, strategy="contiguous", kv_memory_bytes=8 << 20, max_model_len=256, async_scheduling=False)
    eng = llm.engine
    eng.add_request(prompts[0], greedy(4))
    eng.step()
    s = eng.stats()
    assert s["kv_bytes_allocated"] == 256 * eng.kv.bytes_per_token
    assert s["kv_bytes_used"] == 5 * eng.kv.bytes_per_token
    assert s["internal_fragmentation"] == pytest.approx(1 - 5 / 256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["paged", "contiguous"])
def test_triton_backend_matches_torch_on_cuda(tiny, strategy):
    """The Triton kernels (KV write, prefill, decode) give the torch backend's greedy tokens; a small
    token budget mixes prefill chunks and decode rows in one step."""
    path, prompts, refs = tiny
    outs = {}
    for backend in ("torch", "triton"):
        llm = _LLM(path, device="cuda", strategy=strategy, attention_backend=backend, kv_memory_bytes=8 << 20,
                   max_model_len=256, max_num_batched_tokens=16)
        assert llm.engine.kv.setup.attention_backend == backend
        outs[backend] = llm.generate(prompts, greedy(), use_tqdm=False)
    assert [o.token_ids for o in outs["triton"]] == [o.token_ids for o in outs["torch"]]
    assert_matches(outs["triton"], refs)
