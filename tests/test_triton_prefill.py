"""The Triton prefill attention and KV write kernels against the torch reference, and the engine's
Triton backend against its torch backend.

On CPU the kernels run through Triton's interpreter in one child process (``TRITON_INTERPRET=1``
in its environment only), for the reason given in ``test_triton_decode.py``: the child runs every
case and prints its measurements as one JSON line; the tests here judge them, one test per case.
"""
from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
import torch
from prefill_harness import interpreted, run_jobs
from prefill_harness import ok as _ok

from kvscope.attention.torch_ref import attend_causal

pytest.importorskip("triton")


def make_prefill_case(num_heads, num_kv_heads, head_dim, block_size, chunks, ctxs, *, dtype, device, seed):
    """Random q ``[sum(chunks), Hq, D]`` and a pool with spare blocks; each sequence's table is a
    random, non-contiguous choice of blocks. Sequence ``b`` holds ``ctxs[b]`` tokens, the last
    ``chunks[b]`` of which are its new (query) tokens."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(chunks)
    max_blocks = -(-max(ctxs) // block_size)
    num_blocks = 2 * batch * max_blocks + 3
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(sum(chunks), num_heads, head_dim, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    cu = torch.tensor([0] + chunks).cumsum(0)
    return (
        q.to(device, dtype),
        k.to(device, dtype),
        v.to(device, dtype),
        tables.to(device, torch.int32),
        cu.to(device, torch.int32),
        torch.tensor(ctxs).to(device, torch.int32),
    )


def prefill_reference(q, k, v, tables, cu, ctxs, scale):
    """Float64 ``[Nq, Hq, D]``: each sequence's chunk through ``attend_causal`` over its gathered K/V."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    block_size, num_kv_heads, head_dim = k.shape[1:]
    out = torch.zeros_like(q)
    for b in range(len(ctxs)):
        s, e, t = int(cu[b]), int(cu[b + 1]), int(ctxs[b])
        slots = (tables[b].long().cpu()[:, None] * block_size + torch.arange(block_size)).flatten()[:t]
        kg = k.reshape(-1, num_kv_heads, head_dim)[slots]
        vg = v.reshape(-1, num_kv_heads, head_dim)[slots]
        out[s:e] = attend_causal(q[s:e], kg, vg, scale)
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


# (Hq, Hkv, D, block_size, chunk lengths, context lengths, knobs). A chunk equal to its context is
# a whole prompt; a shorter one continues a cached prefix (chunked prefill or a prefix-cache hit).
PREFILL_CASES = [
    (4, 4, 16, 4, [9], [9], {}),  # G = 1, whole prompt
    (4, 4, 32, 16, [5, 12, 1], [20, 12, 33], {}),  # G = 1, chunk after a prefix, whole, one token
    (8, 2, 16, 4, [13, 7, 30], [13, 40, 61], {}),  # G = 4
    (8, 2, 32, 16, [17, 3, 16], [50, 3, 16], {"block_m": 32, "block_n": 16}),  # G = 4, tiles < chunk
    (16, 4, 16, 16, [40, 25], [40, 77], {"block_m": 16, "block_n": 32}),  # G = 4, 4 tokens per tile
    (6, 2, 24, 4, [11, 4], [11, 29], {"block_n": 16}),  # G = 3 (leftover rows), D no power of two
    (4, 1, 16, 4, [0, 6, 2], [5, 6, 9], {}),  # MQA, an empty chunk
    # Nine sequences whose first query positions fall on every side of a key-tile boundary (the
    # split between the unmasked and the causally masked key range).
    (4, 2, 16, 4, [3, 7, 10, 14, 15, 16, 17, 18, 2], [16, 7, 32, 15, 31, 47, 31, 63, 31],
     {"block_m": 16, "block_n": 16}),
]


def _run_prefill_case(module, hq, hkv, d, bs, chunks, ctxs, knobs) -> dict:
    """Float32 kernel vs float64 reference (run in the child)."""
    q, k, v, tables, cu, lens = make_prefill_case(
        hq, hkv, d, bs, chunks, ctxs, dtype=torch.float32, device="cpu", seed=sum(ctxs) + d
    )
    scale = d**-0.5
    ref = prefill_reference(q, k, v, tables, cu, lens, scale)
    out = module.paged_prefill_attention(q, k, v, tables, cu, lens, scale, bs, **knobs)
    # Through the engine's flat [num_slots, Hkv, D] view, into a slice of a larger output: rows
    # outside the chunks must stay untouched.
    big = torch.full((q.shape[0] + 3, hq, d), 7.0)
    module.paged_prefill_attention(
        q, k.flatten(0, 1), v.flatten(0, 1), tables, cu, lens, scale, bs, max(chunks), out=big[2:-1], **knobs
    )
    untouched = bool((big[:2] == 7).all() and (big[-1:] == 7).all())
    return {
        "shape_ok": out.shape == q.shape,
        "nan": bool(out.isnan().any()),
        "err": rel_err(out, ref),
        "out_param_err": rel_err(big[2:-1], ref),
        "untouched": untouched,
    }


# (N, Hkv, D, num_slots, cache dtype, input dtype, skipped rows: slot -1, as CUDA-graph padding)
WRITE_CASES = [
    (7, 2, 16, 40, torch.float32, torch.float32, 0),
    (5, 3, 24, 19, torch.float16, torch.float32, 0),  # cast on the store; odd heads and head dim
    (1, 1, 16, 4, torch.bfloat16, torch.bfloat16, 0),
    (6, 2, 16, 12, torch.float32, torch.float32, 2),  # the last two rows write nothing
]


def _run_write_case(module, n, hkv, d, num_slots, cache_dtype, in_dtype, skipped) -> dict:
    gen = torch.Generator().manual_seed(n * 100 + d)
    # k is a non-contiguous view (every other head of a wider tensor), as the model's may be.
    k = torch.randn(n, 2 * hkv, d, generator=gen).to(in_dtype)[:, ::2]
    v = torch.randn(n, hkv, d, generator=gen).to(in_dtype)
    slots = torch.randperm(num_slots, generator=gen)[:n]
    k_cache = torch.randn(num_slots, hkv, d, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_slots, hkv, d, generator=gen).to(cache_dtype)
    kept = n - skipped
    k_ref = k_cache.clone().index_copy_(0, slots[:kept], k[:kept].to(cache_dtype))
    v_ref = v_cache.clone().index_copy_(0, slots[:kept], v[:kept].to(cache_dtype))
    slots[kept:] = -1
    module.write_kv(k, v, k_cache, v_cache, slots.int() if n % 2 else slots)
    return {"k_equal": torch.equal(k_cache, k_ref), "v_equal": torch.equal(v_cache, v_ref)}


# Step layouts through the engine's backends: (block size, per request (cached, new) tokens,
# one slab per request as `contiguous` has it). Row kinds interleave so that the decode and the
# prefill rows are not contiguous runs of the batch.
BACKEND_CASES = [
    (4, [(7, 1), (0, 9), (20, 1), (3, 5)], False),  # decode, prefill, decode, prefill
    (16, [(30, 1), (2, 1), (44, 1)], False),  # decode only
    (4, [(0, 13), (8, 6)], False),  # prefill only
    (64, [(5, 1), (0, 12), (31, 4)], True),  # contiguous slabs
]


def _run_backend_case(block_size, reqs, slabs) -> dict:
    """SlotAttention (torch) and TritonSlotAttention on the same step, from identical caches."""
    from kvscope.kv.slot_cache import SlotKVCache, block_table_attention

    gen = torch.Generator().manual_seed(block_size + len(reqs))
    model = SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=16)
    hq, layer = 8, 1
    need = [-(-(c + n) // block_size) for c, n in reqs]
    num_blocks = sum(need) + 5
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for m in need:
        # Spare blocks at the end of a table (allocated ahead) must not matter.
        tables.append(order[used : used + m] + ([order[-1]] if not slabs else []))
        used += m
    caches = [SlotKVCache(model, num_blocks * block_size, torch.device("cpu"), torch.float32) for _ in range(2)]
    init = torch.randn(caches[0].kv.shape, generator=gen)
    starts = [0]
    for _, n in reqs:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], hq, 16, generator=gen)
    k = torch.randn(starts[-1], 2, 16, generator=gen)
    v = torch.randn(starts[-1], 2, 16, generator=gen)
    outs = []
    for cache, backend in zip(caches, ("torch", "triton")):
        cache.kv.copy_(init)
        attn = block_table_attention(cache, tables, block_size, [c for c, _ in reqs], starts, 0.25, backend)
        outs.append(attn.attend(layer, q, k, v))
    return {
        "kind": type(attn).__name__,
        "cache_equal": torch.equal(caches[0].kv, caches[1].kv),
        "err": rel_err(outs[1], outs[0]),
    }


# Engine runs: (strategy, engine arguments); each compared between the two backends.
ENGINE_CASES = [
    ("paged", {"max_num_batched_tokens": 16, "max_num_seqs": 4}),  # chunked prefill, mixed steps
    ("paged:block_size=4", {}),  # then a prefix-cache hit: a chunk after cached blocks
    # Eviction: decode rows through the paged decode kernel, its column sums as the statistic.
    ("h2o:budget=12,recent=4,block_size=4", {"max_num_seqs": 4}),
    ("tova:budget=10,block_size=4", {}),
    ("snapkv:budget=12,window=4,block_size=4", {}),
]
ENGINE_NEW = 6


def _run_engine_case(path: str, strategy: str, engine_args: dict) -> dict:
    from kvscope import LLM, SamplingParams

    rng = random.Random(3)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (5, 21, 1, 40)]
    sp = SamplingParams(max_tokens=ENGINE_NEW, temperature=0.0, ignore_eos=True, return_logits=True)
    runs, runs_stats = {}, {}
    for backend in ("torch", "triton"):
        llm = LLM(path, strategy=strategy, kv_memory_bytes=4 << 20, attention_backend=backend, **engine_args)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        # A prompt that extends the first one: under paged its first full blocks come from the cache.
        outs += llm.generate([prompts[3] + [9, 10, 11]], sp, use_tqdm=False)
        runs[backend] = (llm.engine.kv.setup.attention_backend, outs)
        runs_stats[backend] = llm.engine.stats()
    (_, ref), (used, got) = runs["torch"], runs["triton"]
    diff = max(
        (torch.stack(a.outputs[0].logits) - torch.stack(b.outputs[0].logits)).abs().max().item()
        for a, b in zip(ref, got)
    )
    return {
        "backend": used,
        "tokens_equal": [a.token_ids for a in ref] == [b.token_ids for b in got],
        "max_logit_diff": diff,
        "prefix_hit": got[-1].metrics.num_prefix_cached_tokens,
        "evicted_equal": runs_stats["torch"].get("evicted_tokens") == runs_stats["triton"].get("evicted_tokens"),
    }


def _child_main(checkpoint: str) -> None:
    """Entry point of the interpreter process (:func:`prefill_harness.run_jobs`)."""
    from kvscope.attention import triton_kv_write, triton_prefill

    jobs = {}
    for i, case in enumerate(PREFILL_CASES):
        jobs[f"prefill{i}"] = lambda case=case: _run_prefill_case(triton_prefill, *case)
    for i, case in enumerate(WRITE_CASES):
        jobs[f"write{i}"] = lambda case=case: _run_write_case(triton_kv_write, *case)
    for i, case in enumerate(BACKEND_CASES):
        jobs[f"backend{i}"] = lambda case=case: _run_backend_case(*case)
    for i, case in enumerate(ENGINE_CASES):
        jobs[f"engine{i}"] = lambda case=case: _run_engine_case(checkpoint, *case)
    run_jobs(jobs)


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory, triton_interpreter) -> dict:
    return interpreted(__file__, tmp_path_factory)


@pytest.mark.parametrize("index", range(len(PREFILL_CASES)), ids=[
    f"H{c[0]}/{c[1]}-D{c[2]}-bs{c[3]}-n{c[4]}-T{c[5]}" for c in PREFILL_CASES
])
def test_prefill_interpreted_matches_reference_float32(interpreted_results, index):
    r = _ok(interpreted_results, f"prefill{index}")
    assert r["shape_ok"] and not r["nan"] and r["untouched"]
    assert r["err"] < 1e-5
    assert r["out_param_err"] < 1e-5


@pytest.mark.parametrize("index", range(len(WRITE_CASES)))
def test_kv_write_interpreted_equals_index_copy(interpreted_results, index):
    r = _ok(interpreted_results, f"write{index}")
    assert r["k_equal"] and r["v_equal"]


@pytest.mark.parametrize("index", range(len(BACKEND_CASES)))
def test_triton_slot_attention_matches_torch(interpreted_results, index):
    r = _ok(interpreted_results, f"backend{index}")
    assert r["kind"] == "TritonSlotAttention"
    assert r["cache_equal"]
    assert r["err"] < 1e-5


@pytest.mark.parametrize("index", range(len(ENGINE_CASES)), ids=[c[0] for c in ENGINE_CASES])
def test_engine_triton_backend_matches_torch(interpreted_results, index):
    r = _ok(interpreted_results, f"engine{index}")
    assert r["backend"] == "triton"
    assert r["tokens_equal"]
    assert r["max_logit_diff"] < 1e-4
    assert r["evicted_equal"]
    if ENGINE_CASES[index][0].startswith("paged"):
        assert r["prefix_hit"] > 0


def test_backend_config():
    """Resolution and errors (no interpreter in this process)."""
    from kvscope.config import EngineConfig
    from kvscope.errors import ConfigError

    assert EngineConfig().resolved_attention_backend == "torch"  # auto on CPU
    assert EngineConfig(attention_backend="torch").resolved_attention_backend == "torch"
    with pytest.raises(ConfigError, match="unknown attention_backend"):
        EngineConfig(attention_backend="flash")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ConfigError, match="needs a CUDA device.*TRITON_INTERPRET=1"):
            EngineConfig(attention_backend="triton")


def test_rejects_bad_inputs():
    """Argument checks run before any launch, so the compiled module serves on CPU too."""
    from kvscope.attention.triton_kv_write import write_kv
    from kvscope.attention.triton_prefill import paged_prefill_attention as attend

    q, k, v, tables, cu, lens = make_prefill_case(
        4, 2, 16, 4, [3, 2], [5, 2], dtype=torch.float32, device="cpu", seed=1
    )
    with pytest.raises(ValueError, match="int32"):
        attend(q, k, v, tables, cu.long(), lens, 0.25, 4)
    with pytest.raises(ValueError, match="dtype"):
        attend(q.double(), k, v, tables, cu, lens, 0.25, 4)
    with pytest.raises(ValueError, match="num_blocks"):
        attend(q, k, v, tables, cu, lens, 0.25, 8)
    with pytest.raises(ValueError, match="shapes"):
        attend(q[:, :3], k, v, tables, cu, lens, 0.25, 4)
    with pytest.raises(ValueError, match="batch sizes"):
        attend(q, k, v, tables, cu[:2], lens, 0.25, 4)
    with pytest.raises(ValueError, match="out must be"):
        attend(q, k, v, tables, cu, lens, 0.25, 4, out=q[:, :2])
    flat = k.flatten(0, 1)
    with pytest.raises(ValueError, match="shapes"):
        write_kv(q[:, :2, :8], q[:, :2, :8], flat, flat.clone(), torch.arange(5))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(flat[:5], flat[:5], flat, flat.clone(), torch.arange(4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [1, 4])
def test_gpu_prefill(dtype, group):
    """Compiled kernel at Llama-3-8B head shapes (and MHA), within the dtype's rounding of float64."""
    from kvscope.attention.triton_prefill import paged_prefill_attention

    bs, d, hkv = 16, 128, 8
    chunks, ctxs = [300, 1, 1024, 57, 512], [300, 700, 3000, 57, 2048]
    q, k, v, tables, cu, lens = make_prefill_case(
        hkv * group, hkv, d, bs, chunks, ctxs, dtype=dtype, device="cuda", seed=3
    )
    ref = prefill_reference(q, k, v, tables, cu, lens, d**-0.5)
    out = paged_prefill_attention(q, k, v, tables, cu, lens, d**-0.5, bs)
    torch.cuda.synchronize()
    assert out.dtype == dtype and not out.isnan().any()
    # bf16 keeps 8 significant bits, fp16 11; the probabilities are rounded to the cache dtype
    # before the product with V.
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    assert rel_err(out, ref) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kv_write():
    from kvscope.attention.triton_kv_write import write_kv

    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(1000, 8, 128, device="cuda", generator=gen)
    v = torch.randn(1000, 8, 128, device="cuda", generator=gen)
    slots = torch.randperm(50_000, device="cuda", generator=gen)[:1000]
    k_cache = torch.zeros(50_000, 8, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, torch.zeros_like(k_cache).index_copy_(0, slots, k.bfloat16()))
    assert torch.equal(v_cache, torch.zeros_like(v_cache).index_copy_(0, slots, v.bfloat16()))
