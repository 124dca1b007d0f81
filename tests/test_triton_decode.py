"""The Triton paged decode kernel against the torch reference.

On CPU the kernels run through Triton's interpreter, in a child process. Triton fixes at decoration
time whether a function is interpreted or compiled, and that includes its own standard library
(``tl.max``, ``tl.cdiv``, ...), decorated when ``triton`` is first imported: the interpreter only
works in a process that imported triton with ``TRITON_INTERPRET=1``, and a compiled kernel cannot
be built in one that did. So one child process (``TRITON_INTERPRET=1`` in its environment only)
runs every CPU case and reports its measurements; the tests here judge them, one test per case.
Nothing leaks into other test modules, and the GPU test below uses the compiled module in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvscope.attention.torch_ref import attend_decode

pytest.importorskip("triton")


def make_case(batch, num_heads, num_kv_heads, head_dim, block_size, lens, *, dtype, device, seed):
    """Random q and a pool with spare blocks; each sequence's table is a random, non-contiguous
    choice of blocks, padded with unrelated block ids past its length."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(lens) // block_size)
    num_blocks = 2 * batch * max_blocks + 3
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(batch, num_heads, head_dim, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    lens = torch.tensor(lens)
    return (
        q.to(device, dtype),
        k.to(device, dtype),
        v.to(device, dtype),
        tables.to(device, torch.int32),
        lens.to(device, torch.int32),
    )


def reference(q, k, v, tables, lens, scale):
    """Float64 output ``[B, Hq, D]`` and group-summed probabilities ``[B, Hkv, max_blocks * bs]``."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    tables, lens = tables.long().cpu(), lens.long().cpu()
    block_size, num_kv_heads, head_dim = k.shape[1:]
    batch, num_heads = q.shape[:2]
    slots = (tables[:, :, None] * block_size + torch.arange(block_size)).flatten(1)  # [B, Tcap]
    kg = k.reshape(-1, num_kv_heads, head_dim)[slots]  # [B, Tcap, Hkv, D]
    vg = v.reshape(-1, num_kv_heads, head_dim)[slots]
    out = attend_decode(q, kg, vg, lens, scale)
    group = num_heads // num_kv_heads
    scores = torch.einsum("bhd,bthd->bht", q, kg.repeat_interleave(group, dim=2)) * scale
    valid = torch.arange(slots.shape[1])[None, :] < lens[:, None]
    probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
    return out, probs.view(batch, num_kv_heads, group, -1).sum(2)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double().cpu() - ref).norm() / ref.norm()).item()


# (B, Hq, Hkv, D, block_size, context lens, num_splits, use_dot, block_n)
CASES = [
    (1, 4, 2, 16, 4, [1], 1, False, 16),
    (1, 4, 2, 32, 16, [37], 3, True, 16),
    (3, 4, 2, 16, 4, [1, 23, 70], 2, False, 16),
    (3, 4, 2, 16, 4, [1, 23, 40], 4, False, 16),
    (3, 4, 2, 32, 16, [33, 1, 47], 1, True, 32),
    (3, 2, 2, 16, 16, [17, 48, 1], 2, False, 32),
    (1, 2, 2, 32, 4, [29], 5, True, 16),
    (3, 8, 1, 32, 4, [40, 1, 13], 2, True, 32),
    (1, 8, 1, 16, 16, [61], 2, False, 16),
    # Tiles smaller than a block, and more splits than tiles (most splits empty).
    (3, 4, 2, 16, 16, [1, 30, 45], 16, False, 8),
    # Head dim that is no power of two (masked lanes).
    (3, 4, 2, 24, 4, [9, 1, 50], 2, True, 16),
    # The defaults (splits, tile, score path).
    (3, 8, 1, 32, 4, [5, 1, 38], None, None, None),
]


def _poison_outputs(module) -> None:
    """Every output and workspace buffer starts as NaN, so an element left unwritten (or a
    workspace element read before it was written) shows in the result."""

    def alloc(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    module._alloc = alloc


def _run_case(module, batch, hq, hkv, d, bs, lens, splits, use_dot, block_n) -> dict:
    """Float32 kernel vs float64 reference: errors and checks of one case (run in the child)."""
    q, k, v, tables, ctx = make_case(
        batch, hq, hkv, d, bs, lens, dtype=torch.float32, device="cpu", seed=batch * 1000 + sum(lens) + d
    )
    scale = d**-0.5
    ref_out, ref_colsum = reference(q, k, v, tables, ctx, scale)
    knobs = {name: x for name, x in (("use_dot", use_dot), ("block_n", block_n)) if x is not None}
    out, colsum = module.paged_decode_attention(q, k, v, tables, ctx, scale, bs, splits, emit_colsum=True, **knobs)
    # Without the statistic (no logits written), through the engine's flat [num_slots, Hkv, D] view.
    plain = module.paged_decode_attention(q, k.flatten(0, 1), v.flatten(0, 1), tables, ctx, scale, bs, splits, **knobs)
    fold = _fold_check(module, q, k, v, tables, ctx, scale, bs, splits, knobs, ref_out, ref_colsum)
    return {
        "fold_out_err": fold["out_err"],
        "fold_err": fold["held_err"] if fold["untouched_ok"] else float("inf"),
        "shapes_ok": out.shape == (batch, hq, d) and colsum.shape == (batch, hkv, tables.shape[1] * bs),
        "nan": bool(out.isnan().any() or colsum.isnan().any() or plain.isnan().any()),
        "out_err": rel_err(out, ref_out),
        "plain_err": rel_err(plain, ref_out),
        "colsum_err": rel_err(colsum, ref_colsum),
    }


def held_slots(tables, lens, block_size) -> list[torch.Tensor]:
    """Per sequence, the slots of its tokens ``0 .. lens[b] - 1`` in order (CPU, int64)."""
    tables, lens = tables.long().cpu(), lens.cpu()
    return [
        tables[b][torch.arange(int(lens[b])) // block_size] * block_size + torch.arange(int(lens[b])) % block_size
        for b in range(tables.shape[0])
    ]


def fold_reference(scores, tables, lens, ref_colsum, block_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``scores [num_slots, Hkv]`` (CPU) after adding each held token's group-summed
    probability (``ref_colsum [B, Hkv, Tcap]``) to its slot's row, and the mask of held slots."""
    expect = scores.double().cpu().clone()
    held = torch.zeros(scores.shape[0], dtype=torch.bool)
    for b, slot in enumerate(held_slots(tables, lens, block_size)):
        expect[slot] += ref_colsum[b, :, : len(slot)].T
        held[slot] = True
    return expect, held


def _fold_check(module, q, k, v, tables, ctx, scale, bs, splits, knobs, ref_out, ref_colsum) -> dict:
    """Fold into per-slot scores that start non-zero: each held token's sum lands on its slot's row,
    and every other entry (slots of blocks past a length or of no sequence) keeps its bits."""
    scores = torch.rand(k.shape[0] * bs, k.shape[2])
    before = scores.clone()
    expect, held = fold_reference(scores, tables, ctx, ref_colsum, bs)
    out = module.paged_decode_attention(q, k, v, tables, ctx, scale, bs, splits, fold_scores=scores, **knobs)
    return {
        "out_err": rel_err(out, ref_out),
        "held_err": float((scores[held].double() - expect[held]).abs().max()),
        "untouched_ok": bool(torch.equal(scores[~held], before[~held])),
    }


# fold_scores cases: (B, Hq, Hkv, D, block_size, context lens, num_splits, use_dot, block_n). The
# fold kernel's token tile is 128 tokens at up to 32 padded query heads, 64 at 64: lengths span
# several tiles and end inside a block and inside a tile.
FOLD_CASES = [
    (2, 3, 3, 16, 4, [7, 150], 2, False, 16),  # group 1, 3 KV heads (padded to 4)
    (3, 8, 2, 16, 16, [1, 129, 45], 3, True, 32),  # group 4
    (2, 6, 6, 16, 16, [261, 17], 1, False, 32),  # group 1, 6 KV heads (padded to 8)
    (2, 9, 3, 16, 4, [70, 131], 2, True, 16),  # group 3 (padded to 4), 3 KV heads
    (2, 48, 6, 16, 16, [150, 63], 2, True, 32),  # group 8, 6 KV heads: 64-token tiles
    (1, 4, 1, 16, 4, [1], 1, False, 16),  # one KV head, one token
    (2, 32, 8, 16, 16, [200, 77], None, None, None),  # Llama-3-8B's heads, the defaults
]


def _run_fold_case(module, batch, hq, hkv, d, bs, lens, splits, use_dot, block_n, seed=None) -> dict:
    """fold_scores against the float64 reference, scattered into a random slot table (in the child)."""
    seed = batch * 1000 + sum(lens) + hq if seed is None else seed
    q, k, v, tables, ctx = make_case(batch, hq, hkv, d, bs, lens, dtype=torch.float32, device="cpu", seed=seed)
    ref_out, ref_colsum = reference(q, k, v, tables, ctx, d**-0.5)
    knobs = {name: x for name, x in (("use_dot", use_dot), ("block_n", block_n)) if x is not None}
    return _fold_check(module, q, k, v, tables, ctx, d**-0.5, bs, splits, knobs, ref_out, ref_colsum)


def _fold_property(module) -> dict:
    """Hypothesis over head counts, groups, block sizes, lengths and splits (in the child: the
    interpreter lives there). A failure comes back with hypothesis' falsifying example."""
    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st

    # No shrinking: at a quarter second per interpreted example it could outlast the child's timeout.
    @settings(max_examples=12, deadline=None, derandomize=True, database=None, phases=[Phase.generate])
    @given(
        hkv=st.sampled_from([1, 2, 3, 5, 6, 8]),
        group=st.sampled_from([1, 2, 3, 4, 8]),
        bs=st.sampled_from([4, 8, 16]),
        lens=st.lists(st.integers(1, 200), min_size=1, max_size=3),
        splits=st.integers(1, 4),
        use_dot=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def prop(hkv, group, bs, lens, splits, use_dot, seed):
        r = _run_fold_case(module, len(lens), hkv * group, hkv, 16, bs, lens, splits, use_dot, 16, seed)
        assert r["untouched_ok"] and r["held_err"] < 1e-5 and r["out_err"] < 1e-4, r

    try:
        prop()
    except Exception as e:
        notes = " ".join(getattr(e, "__notes__", []))
        return {"error": f"{type(e).__name__}: {e} {notes}"}
    return {}


def _child_main() -> None:
    """Entry point of the interpreter process: one JSON line, each case's measurements (or the error
    it raised) under ``case/i`` and ``fold/i``, and the fold property's outcome under ``fold_property``."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from kvscope.attention import triton_decode

    _poison_outputs(triton_decode)
    results = {}
    for kind, cases, run in (("case", CASES, _run_case), ("fold", FOLD_CASES, _run_fold_case)):
        for i, case in enumerate(cases):
            try:
                results[f"{kind}/{i}"] = run(triton_decode, *case)
            except Exception as e:  # reported by the case's own test in the parent
                results[f"{kind}/{i}"] = {"error": f"{type(e).__name__}: {e}"}
    results["fold_property"] = _fold_property(triton_decode)
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted_results(triton_interpreter) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__)
    code = f"import sys; sys.path.insert(0, {str(here.parent)!r}); import {here.stem} as t; t._child_main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("index", range(len(CASES)), ids=[
    f"B{c[0]}-H{c[1]}/{c[2]}-D{c[3]}-bs{c[4]}-S{c[6]}-dot{c[7]}-n{c[8]}" for c in CASES
])
def test_interpreted_matches_reference_float32(interpreted_results, index):
    r = interpreted_results[f"case/{index}"]
    assert "error" not in r, r.get("error")
    assert r["shapes_ok"] and not r["nan"]
    assert r["out_err"] < 1e-4
    assert r["plain_err"] < 1e-4
    assert r["colsum_err"] < 1e-4
    assert r["fold_out_err"] < 1e-4
    assert r["fold_err"] < 1e-5


@pytest.mark.parametrize("index", range(len(FOLD_CASES)), ids=[
    f"B{c[0]}-H{c[1]}/{c[2]}-bs{c[4]}-T{max(c[5])}-S{c[6]}" for c in FOLD_CASES
])
def test_interpreted_fold_scores(interpreted_results, index):
    """fold_scores adds the group-summed probabilities of held tokens to their (scattered) slots."""
    r = interpreted_results[f"fold/{index}"]
    assert "error" not in r, r.get("error")
    assert r["untouched_ok"], "an entry of no held token changed"
    assert r["held_err"] < 1e-5
    assert r["out_err"] < 1e-4


def test_interpreted_fold_scores_property(interpreted_results):
    r = interpreted_results["fold_property"]
    assert "error" not in r, r.get("error")


def test_rejects_bad_inputs():
    """Argument checks run before any launch, so the compiled module serves on CPU too."""
    from kvscope.attention.triton_decode import paged_decode_attention as attend

    q, k, v, tables, ctx = make_case(1, 4, 2, 16, 4, [5], dtype=torch.float32, device="cpu", seed=1)
    with pytest.raises(ValueError, match="int32"):
        attend(q, k, v, tables.long(), ctx, 0.25, 4)
    with pytest.raises(ValueError, match="dtype"):
        attend(q.double(), k, v, tables, ctx, 0.25, 4)
    with pytest.raises(ValueError, match="num_blocks"):
        attend(q, k, v, tables, ctx, 0.25, 8)
    with pytest.raises(ValueError, match="shapes"):
        attend(q[:, :3], k, v, tables, ctx, 0.25, 4)
    with pytest.raises(ValueError, match="fold_scores"):
        attend(q, k, v, tables, ctx, 0.25, 4, fold_scores=torch.zeros(k.shape[0] * 4, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_gpu(dtype, splits):
    """Compiled kernel at Llama-3-8B head shapes, within the dtype's rounding of float64."""
    from kvscope.attention.triton_decode import paged_decode_attention

    bs, d = 16, 128
    lens = [1, 1000, 4096, 17, 2500]
    q, k, v, tables, ctx = make_case(5, 32, 8, d, bs, lens, dtype=dtype, device="cuda", seed=3)
    ref_out, ref_colsum = reference(q, k, v, tables, ctx, d**-0.5)
    out, colsum = paged_decode_attention(q, k, v, tables, ctx, d**-0.5, bs, splits, emit_colsum=True)
    torch.cuda.synchronize()
    assert out.dtype == dtype and not out.isnan().any()
    # bf16 keeps 8 significant bits (2^-8 = 4e-3 relative per element), fp16 11, and the
    # probabilities are rounded to the cache dtype before the product with V.
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}[dtype]
    assert rel_err(out, ref_out) < tol
    assert rel_err(colsum, ref_colsum) < max(tol, 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fold_scores(dtype):
    """Compiled fold_scores at Llama-3-8B head shapes: held slots gain the reference sums (within the
    column sums' tolerance above), every other entry keeps its bits."""
    from kvscope.attention.triton_decode import paged_decode_attention

    bs, d = 16, 128
    lens = [1, 1000, 4096, 17, 2500]
    q, k, v, tables, ctx = make_case(5, 32, 8, d, bs, lens, dtype=dtype, device="cuda", seed=4)
    _, ref_colsum = reference(q, k, v, tables, ctx, d**-0.5)
    scores = torch.rand(k.shape[0] * bs, 8, device="cuda")
    before = scores.cpu()
    expect, held = fold_reference(before, tables, ctx, ref_colsum, bs)
    paged_decode_attention(q, k, v, tables, ctx, d**-0.5, bs, fold_scores=scores)
    after = scores.cpu()
    assert torch.equal(after[~held], before[~held])
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-4}[dtype]
    gained, expected_gain = (after.double() - before.double())[held], (expect - before.double())[held]
    assert rel_err(gained, expected_gain) < max(tol, 1e-3)
