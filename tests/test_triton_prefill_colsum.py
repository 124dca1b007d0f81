"""The prefill column-sum kernel (H2O's prefill statistic) and the prefill kernel's log-sum-exp
against a float64 reference, and H2O's Triton prefill path in the engine against its torch path.

On CPU the kernels run through Triton's interpreter in one child process (see
``test_triton_decode.py`` for why); the child runs every case and prints its measurements as one
JSON line, the tests here judge them. The interpreter multiplies bfloat16 ``tl.dot`` operands as
their raw bits, so its cases are float32 and float16; bfloat16 runs in the GPU tests.
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch
from prefill_harness import interpreted, run_jobs
from prefill_harness import ok as _ok
from test_triton_prefill import make_prefill_case, prefill_reference, rel_err

pytest.importorskip("triton")


def colsum_reference(q, k, tables, cu, ctxs, scale):
    """Float64 column sums ``[B, Hkv, max ctx]`` (explicit causal softmax per sequence, summed over
    its rows and each KV head's query heads) and log-sum-exp ``[Nq, Hq]`` (natural log)."""
    q, k = q.double().cpu(), k.double().cpu()
    tables, cu, ctxs = tables.long().cpu(), cu.long().cpu(), ctxs.long().cpu()
    block_size, hkv, d = k.shape[1:]
    hq = q.shape[1]
    sums = torch.zeros(len(ctxs), hkv, int(ctxs.max()), dtype=torch.float64)
    lse = torch.zeros(q.shape[:2], dtype=torch.float64)
    for b in range(len(ctxs)):
        s, e, t = int(cu[b]), int(cu[b + 1]), int(ctxs[b])
        n = e - s
        if n == 0:
            continue
        slots = (tables[b][:, None] * block_size + torch.arange(block_size)).flatten()[:t]
        kg = k.reshape(-1, hkv, d)[slots].repeat_interleave(hq // hkv, 1)  # [t, Hq, D]
        logits = torch.einsum("nhd,thd->hnt", q[s:e], kg) * scale
        pos = t - n + torch.arange(n)
        logits = logits.masked_fill(torch.arange(t)[None, None, :] > pos[None, :, None], float("-inf"))
        lse[s:e] = logits.logsumexp(-1).T
        sums[b, :, :t] = logits.softmax(-1).view(hkv, hq // hkv, n, t).sum((1, 2))
    return sums, lse


def slots_of(tables, ctxs, block_size):
    """Per sequence its context's slot ids ``[t]`` (block ``t // bs`` of its table, offset ``t % bs``)."""
    tables = tables.long().cpu()
    return [(tables[b][:, None] * block_size + torch.arange(block_size)).flatten()[: int(t)]
            for b, t in enumerate(ctxs.tolist())]


# (Hq, Hkv, D, block_size, chunk lengths, context lengths, dtype, knobs). block_size 1 is the
# engine's layout (a context is a list of slots); tables are shuffled blocks of a larger pool.
KERNEL_CASES = [
    (4, 2, 16, 1, [7, 12, 3], [7, 30, 20], torch.float32, {"block_m": 16, "block_n": 16}),  # G 2, chunks
    (8, 2, 16, 4, [13, 0, 30], [40, 5, 30], torch.float32, {"block_m": 16, "block_n": 16}),  # G 4, empty
    (6, 2, 24, 4, [11, 4], [11, 29], torch.float32, {"block_n": 16}),  # G 3 (leftover rows), D 24
    (4, 1, 16, 1, [5, 17, 1], [33, 17, 9], torch.float32, {"block_m": 16, "block_n": 32}),  # MQA, 1 row
    (8, 2, 16, 4, [13, 7, 30], [13, 40, 61], torch.float16, {"block_m": 32, "block_n": 16}),
    (4, 4, 16, 16, [20, 9], [45, 9], torch.float16, {}),  # G 1, default tiles (one query tile)
]
TOL = {torch.float32: 1e-5, torch.float16: 1e-4}


def _run_kernel_case(hq, hkv, d, bs, chunks, ctxs, dtype, knobs) -> dict:
    """Both modes of the column-sum kernel and the prefill's LSE, against float64 (in the child)."""
    from kvscope.attention.triton_prefill import paged_prefill_attention
    from kvscope.attention.triton_prefill_colsum import paged_prefill_with_column_sums, prefill_column_sums

    q, k, v, tables, cu, lens = make_prefill_case(hq, hkv, d, bs, chunks, ctxs, dtype=dtype, device="cpu",
                                                  seed=sum(ctxs) + d + bs)
    scale = d**-0.5
    ref_sums, ref_lse = colsum_reference(q, k, tables, cu, lens, scale)
    lse = torch.full(q.shape[:2], float("nan"))
    out = paged_prefill_attention(q, k, v, tables, cu, lens, scale, bs, lse_out=lse)
    plain = paged_prefill_attention(q, k, v, tables, cu, lens, scale, bs)
    sums = prefill_column_sums(q, k, tables, cu, lens, lse, scale, bs, **knobs)
    # Fold into random scores through the engine's flat [num_slots, Hkv, D] view: each context
    # token's sum is added to its slot's row, every other row is left as it was.
    gen = torch.Generator().manual_seed(len(chunks))
    before = torch.rand(k.shape[0] * bs, hkv, generator=gen)
    scores = before.clone()
    prefill_column_sums(q, k.flatten(0, 1), tables, cu, lens, lse, scale, bs, max(ctxs), fold_scores=scores,
                        **knobs)
    expected = before.double().clone()
    for b, slots in enumerate(slots_of(tables, lens, bs)):
        expected[slots] += ref_sums[b, :, : len(slots)].T
    both_out, both_sums = paged_prefill_with_column_sums(q, k, v, tables, cu, lens, scale, bs)
    return {
        "lse_err": (lse.double() - ref_lse).abs().max().item(),
        "lse_nan": bool(lse.isnan().any()),
        "out_same": torch.equal(out, plain),
        "out_err": rel_err(out, prefill_reference(q, k, v, tables, cu, lens, scale)),
        "shape_ok": sums.shape == ref_sums.shape,
        "sums_err": rel_err(sums, ref_sums),
        "fold_err": rel_err(scores - before, expected - before.double()),
        "fold_abs": (scores.double() - expected).abs().max().item(),
        "both_err": rel_err(both_sums, ref_sums) + rel_err(both_out, out),
    }


def _run_step_case(backend: str, chunks: list[list[int]], compress: bool, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> dict:
    """H2O's attention, step by step, on random q/k/v: per step and layer the output, and after each
    step every request's scores and kept positions (in the child: the Triton backend interpreted)."""
    from kvscope.engine.request import Request
    from kvscope.kv import eviction_attention, eviction_triton_prefill
    from kvscope.kv.base import KVSetup, StepBatch
    from kvscope.kv.registry import create
    from kvscope.models.dummy import preset_config
    from kvscope.sampling_params import SamplingParams

    calls = {"groups": 0, "folded": 0}
    build, fold = eviction_attention.build_group, eviction_triton_prefill.paged_prefill_with_column_sums

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    cfg = preset_config("tiny-llama")
    s = create("h2o:budget=10,recent=3,block_size=4" + (",compress_prompt=true" if compress else ""))
    s.bind(KVSetup(cfg, torch.device(device), dtype, 4 << 20, 128, 4, 0, attention_backend=backend))
    hq, hkv, d, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    lens = [sum(c) for c in zip(*chunks)]
    prompt_lens = [sum(c for c in col if c > 1) for col in zip(*chunks)]
    reqs = [Request(f"r{i}", [1] * n, SamplingParams(max_tokens=4, ignore_eos=True))
            for i, n in enumerate(prompt_lens)]
    g = torch.Generator().manual_seed(11)
    qkv = [tuple(torch.randn(L, n, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv)) for n in lens]
    done = [0] * len(reqs)
    outs, scores, kept = [], [], []
    eviction_attention.build_group = count("groups", build)
    eviction_triton_prefill.paged_prefill_with_column_sums = count("folded", fold)
    try:
        for step in chunks:
            live = [i for i, c in enumerate(step) if c]
            for i in live:
                assert s.allocate(reqs[i], reqs[i].num_computed_tokens + step[i])
            pos = [torch.arange(done[i], done[i] + step[i]) for i in live]
            starts = [0, *itertools.accumulate(step[i] for i in live)]
            batch = StepBatch([reqs[i] for i in live], [step[i] for i in live],
                              torch.ones(starts[-1], dtype=torch.long, device=device), torch.cat(pos).to(device), starts)
            att = s.begin_step(batch)
            for layer in range(L):
                q, k, v = (torch.cat([qkv[i][part][layer, p] for i, p in zip(live, pos)]) for part in range(3))
                outs.append(att.attend(layer, q, k, v))
            for i in live:
                reqs[i].num_computed_tokens += step[i]
                done[i] += step[i]
            s.end_step(batch)
            for r in reqs:
                slots = s._slots(s.tables[r.request_id], s.resident[r.request_id])
                scores.append(s.scores[:, slots].clone())
                kept.append(s.resident_positions(r).clone())
    finally:
        eviction_attention.build_group = build
        eviction_triton_prefill.paged_prefill_with_column_sums = fold
    return {"outs": outs, "scores": scores, "kept": kept, "calls": calls, "evictions": s.num_evictions}


# Steps of (per request) new tokens: chunked prompts (0: the request sits the step out; 1 after
# its prompt: a decode row), with or without eviction after every prefill chunk (compress_prompt:
# a chunk then attends over a context whose slots no longer hold its tokens in position order).
STEP_CASES = [
    ([[12, 9, 5], [11, 0, 9], [6, 1, 1], [1, 1, 1]], False),
    ([[12, 9, 5], [11, 5, 9], [6, 1, 7], [1, 1, 1]], True),
]


def _compare_steps(chunks, compress, device="cpu", dtype=torch.float32) -> dict:
    ref, got = (_run_step_case(b, chunks, compress, device, dtype) for b in ("torch", "triton"))
    return {
        "out_err": max(rel_err(a, b) for a, b in zip(got["outs"], ref["outs"])),
        "score_err": max(rel_err(a, b) for a, b in zip(got["scores"], ref["scores"])),
        "kept_equal": all(torch.equal(a, b) for a, b in zip(got["kept"], ref["kept"])),
        "evictions": [ref["evictions"], got["evictions"]],
        "torch_calls": ref["calls"], "triton_calls": got["calls"],
    }


# Whole engine runs on the tiny checkpoint, Triton backend against torch: prompts prefilled in
# chunks (max_num_batched_tokens 16) beside other requests' decode rows.
ENGINE_CASES = [
    "h2o:budget=12,recent=4,block_size=4",
    "h2o:budget=12,recent=4,block_size=4,compress_prompt=true",  # evictions between a prompt's chunks
]
ENGINE_NEW = 6


def _run_engine_case(path: str, strategy: str) -> dict:
    from kvscope import LLM, SamplingParams
    from kvscope.kv import eviction_triton_prefill

    rng = random.Random(4)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (37, 5, 50, 21)]
    sp = SamplingParams(max_tokens=ENGINE_NEW, temperature=0.0, ignore_eos=True, return_logits=True)
    fold = eviction_triton_prefill.paged_prefill_with_column_sums
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return fold(*args, **kwargs)

    runs = {}
    eviction_triton_prefill.paged_prefill_with_column_sums = counted
    try:
        for backend in ("torch", "triton"):
            llm = LLM(path, strategy=strategy, kv_memory_bytes=4 << 20, attention_backend=backend,
                      max_num_batched_tokens=16, max_num_seqs=4)
            runs[backend] = (llm.generate(prompts, sp, use_tqdm=False), llm.engine.stats())
    finally:
        eviction_triton_prefill.paged_prefill_with_column_sums = fold
    (ref, ref_stats), (got, got_stats) = runs["torch"], runs["triton"]
    diff = max((torch.stack(a.outputs[0].logits) - torch.stack(b.outputs[0].logits)).abs().max().item()
               for a, b in zip(ref, got))
    return {"tokens_equal": [a.token_ids for a in ref] == [b.token_ids for b in got], "max_logit_diff": diff,
            "evicted": [ref_stats["evicted_tokens"], got_stats["evicted_tokens"]], "folded_calls": calls[0]}


def _child_main(checkpoint: str) -> None:
    """Entry point of the interpreter process (:func:`prefill_harness.run_jobs`)."""
    jobs = {}
    for i, case in enumerate(KERNEL_CASES):
        jobs[f"kernel{i}"] = lambda case=case: _run_kernel_case(*case)
    for i, case in enumerate(STEP_CASES):
        jobs[f"steps{i}"] = lambda case=case: _compare_steps(*case)
    for i, spec in enumerate(ENGINE_CASES):
        jobs[f"engine{i}"] = lambda spec=spec: _run_engine_case(checkpoint, spec)
    run_jobs(jobs)


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory, triton_interpreter) -> dict:
    return interpreted(__file__, tmp_path_factory)


@pytest.mark.parametrize("index", range(len(KERNEL_CASES)), ids=[
    f"H{c[0]}/{c[1]}-D{c[2]}-bs{c[3]}-n{c[4]}-T{c[5]}-{str(c[6]).removeprefix('torch.')}" for c in KERNEL_CASES
])
def test_column_sums_and_lse_match_float64(interpreted_results, index):
    r = _ok(interpreted_results, f"kernel{index}")
    tol = TOL[KERNEL_CASES[index][6]]
    assert r["shape_ok"] and not r["lse_nan"]
    assert r["lse_err"] < 1e-4  # absolute, on values of order log(T)
    assert r["out_same"]  # the LSE store leaves the output as it was
    assert r["out_err"] < (1e-5 if KERNEL_CASES[index][6] == torch.float32 else 2e-3)
    assert r["sums_err"] < tol
    assert r["fold_err"] < tol and r["fold_abs"] < 1e-4  # added to the slots' rows, no other row moved
    assert r["both_err"] < tol


@pytest.mark.parametrize("index", range(len(STEP_CASES)), ids=["keep-prompt", "compress-prompt"])
def test_h2o_triton_prefill_steps_match_torch(interpreted_results, index):
    r = _ok(interpreted_results, f"steps{index}")
    assert r["out_err"] < 1e-5 and r["score_err"] < 1e-5
    assert r["kept_equal"]
    assert r["evictions"][0] == r["evictions"][1] > 0
    # Triton prefill chunks go through the kernels, never through the padded torch groups.
    assert r["triton_calls"]["groups"] == 0 and r["triton_calls"]["folded"] > 0
    assert r["torch_calls"]["groups"] > 0 and r["torch_calls"]["folded"] == 0


@pytest.mark.parametrize("index", range(len(ENGINE_CASES)), ids=["keep-prompt", "compress-prompt"])
def test_engine_h2o_triton_prefill_matches_torch(interpreted_results, index):
    r = _ok(interpreted_results, f"engine{index}")
    assert r["tokens_equal"]
    assert r["max_logit_diff"] < 1e-4
    assert r["evicted"][0] == r["evicted"][1] > 0
    assert r["folded_calls"] > 0


def test_rejects_bad_inputs():
    """Argument checks run before any launch (no interpreter in this process)."""
    from kvscope.attention.triton_prefill import paged_prefill_attention
    from kvscope.attention.triton_prefill_colsum import prefill_column_sums

    q, k, v, tables, cu, lens = make_prefill_case(4, 2, 16, 4, [3, 2], [5, 2], dtype=torch.float32, device="cpu",
                                                  seed=1)
    lse = torch.zeros(q.shape[:2])
    with pytest.raises(ValueError, match="lse_out"):
        paged_prefill_attention(q, k, v, tables, cu, lens, 0.25, 4, lse_out=lse[:, :1])
    with pytest.raises(ValueError, match="lse must be"):
        prefill_column_sums(q, k, tables, cu, lens, lse.double(), 0.25, 4)
    with pytest.raises(ValueError, match="fold_scores"):
        prefill_column_sums(q, k, tables, cu, lens, lse, 0.25, 4, fold_scores=torch.zeros(40, 3))
    with pytest.raises(ValueError, match="int32"):
        prefill_column_sums(q, k, tables, cu.long(), lens, lse, 0.25, 4)
    with pytest.raises(ValueError, match="batch sizes"):
        prefill_column_sums(q, k, tables, cu[:2], lens, lse, 0.25, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [1, 16])
def test_gpu_column_sums(dtype, block_size):
    """Compiled kernels at Llama-3-8B head shapes (G 4, D 128) on chunks after cached prefixes and
    whole prompts, shuffled tables; column sums and LSE within float32 rounding of float64 (the
    inputs are the same rounded values), the output within the dtype's rounding."""
    from kvscope.attention.triton_prefill_colsum import paged_prefill_with_column_sums, prefill_column_sums
    from kvscope.attention.triton_prefill import paged_prefill_attention

    hq, hkv, d = 32, 8, 128
    chunks, ctxs = [300, 1, 1024, 57, 512], [300, 700, 3000, 57, 2048]
    q, k, v, tables, cu, lens = make_prefill_case(hq, hkv, d, block_size, chunks, ctxs, dtype=dtype, device="cuda",
                                                  seed=block_size)
    scale = d**-0.5
    ref_sums, ref_lse = colsum_reference(q, k, tables, cu, lens, scale)
    out, sums = paged_prefill_with_column_sums(q, k, v, tables, cu, lens, scale, block_size)
    lse = torch.empty(q.shape[:2], device="cuda")
    paged_prefill_attention(q, k, v, tables, cu, lens, scale, block_size, lse_out=lse)
    scores = torch.rand(k.shape[0] * block_size, hkv, device="cuda")
    before = scores.clone()
    prefill_column_sums(q, k, tables, cu, lens, lse, scale, block_size, fold_scores=scores)
    torch.cuda.synchronize()
    expected = before.double().cpu()
    for b, slots in enumerate(slots_of(tables, lens, block_size)):
        expected[slots] += ref_sums[b, :, : len(slots)].T
    assert (lse.double().cpu() - ref_lse).abs().max() < 1e-3
    assert rel_err(sums, ref_sums) < 1e-4
    assert (scores.double().cpu() - expected).abs().max() < 1e-3
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    assert rel_err(out, prefill_reference(q, k, v, tables, cu, lens, scale)) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(len(STEP_CASES)), ids=["keep-prompt", "compress-prompt"])
def test_gpu_h2o_triton_prefill_steps_match_torch(index, dtype):
    """The step comparison compiled on a GPU. bfloat16: the torch path multiplies float32
    probabilities by V, the kernel bfloat16 ones, so outputs agree to bfloat16 rounding; the scores
    to float32 rounding (both from float32 logits of the same bfloat16 inputs)."""
    r = _compare_steps(*STEP_CASES[index], device="cuda", dtype=dtype)
    assert r["out_err"] < (1e-5 if dtype == torch.float32 else 1e-2)
    assert r["score_err"] < (1e-5 if dtype == torch.float32 else 1e-3)
    if dtype == torch.float32:
        assert r["kept_equal"]
    assert r["triton_calls"]["groups"] == 0 and r["triton_calls"]["folded"] > 0
