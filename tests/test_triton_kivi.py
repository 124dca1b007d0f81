"""The KIVI decode kernel (``_kivi_kernel`` through ``quant_decode_attention``) over random codes
and scales under shuffled block tables, against the torch codec's dequantization followed by a
float64 ``attend_decode``.

Its tiles span several blocks (``block_n // group_size`` of them, each with its own key scale and
zero row) or part of one, so every sequence's table here is a random slice of a shuffled pool,
padded with an id far outside the pool: a tile that assumed its blocks adjacent, or read a table
entry past the sequence, would read the wrong codes or fault. On CPU the kernel runs through
Triton's interpreter in a child process (see tests/test_triton_quant.py), which prints one JSON
line of results; bfloat16 only on a GPU (the interpreter multiplies bfloat16 ``tl.dot`` operands
as their raw bits).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sm90_usage import sm90_usage

pytest.importorskip("triton")


def _sweep(group: int) -> list[int]:
    """``group`` lengths whose residuals are 0 .. group - 1, over 1 to 4 quantized blocks."""
    return [group * (1 + (3 * r) % 4) + r for r in range(group)]


# (bits, group_size, Hq, Hkv, D, lengths, tokens per tile (None: the default), query dtype).
# Groups of 1, 2, 4 and 8 query heads; tiles of 4, 2 and 1 blocks and of half a block; value
# groups of 16 channels (one per token, head_dim < group_size) and of 32 (two per token).
CASES = [
    (4, 32, 2, 2, 16, _sweep(32), None, torch.float32),  # 64-token tiles: 2 blocks
    (8, 64, 2, 1, 16, _sweep(64), 128, torch.float32),
    (4, 64, 8, 2, 32, [1, 63, 300, 129], 32, torch.float32),  # a tile is half a block
    (8, 32, 8, 1, 64, [250, 31, 97, 160], 128, torch.float32),  # 4 blocks a tile
    (4, 32, 4, 2, 64, [390, 5, 33, 200], None, torch.float16),  # 128-token tiles: 4 blocks
    (8, 64, 8, 2, 32, [300, 64, 190], None, torch.float16),
    (4, 64, 4, 1, 64, _sweep(64), None, torch.float16),
]
SPLITS = [1, 2, None]  # None: the automatic choice (made to split here, see _child_main)
# Same codes and scales as the reference: float32 differs by rounding alone; float16 also rounds
# the probabilities fed to tl.dot and the output (2^-11 relative each).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def run_kivi(bits: int, group: int, hq: int, hkv: int, d: int, lens: list[int], block_n: int | None,
             dtype: torch.dtype, seed: int, splits: list[int | None], device: str = "cpu"):
    """Random KIVI cache (codes, scales, zeros, residual rows), shuffled tables; return ({split
    count: output}, float64 reference, tokens that start a block inside a tile whose previous
    block is not the pool's previous one)."""
    from kvscope.attention.torch_ref import attend_decode
    from kvscope.attention.triton_quant_decode import quant_decode_attention
    from kvscope.kv.quant_cache import KiviCache
    from kvscope.models.config import ModelConfig

    gen = torch.Generator().manual_seed(seed)
    full = [n // group for n in lens]
    model = ModelConfig(arch="llama", vocab_size=8, hidden_size=hq * d, intermediate_size=8, num_layers=1,
                        num_heads=hq, num_kv_heads=hkv, head_dim=d, max_position_embeddings=4096)
    cache = KiviCache(model, sum(full) + 5, group, len(lens) + 3, torch.device("cpu"), dtype, bits, min(group, d))
    for codes in (cache.kq, cache.vq):  # any byte is a valid int8 code or int4 pair
        codes.copy_(torch.randint(0, 256, codes.shape, generator=gen, dtype=torch.uint8))
    levels = (1 << bits) - 1
    for scale, zero in ((cache.k_scale, cache.k_zero), (cache.v_scale, cache.v_zero)):
        scale.copy_((torch.rand(scale.shape, generator=gen) * 3 + 0.5) / levels)  # ranges 0.5 .. 3.5
        zero.copy_(torch.randn(zero.shape, generator=gen) - 1)
    cache.residual.copy_(torch.randn(cache.residual.shape, generator=gen))
    pool = torch.randperm(cache.kq.shape[1], generator=gen)
    width = -(-max(lens) // group)
    tables = torch.full((len(lens), width), 1 << 30, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(full):
        tables[i, :nb] = pool[used: used + nb]
        used += nb
    res_slots = torch.randperm(cache.residual.shape[2], generator=gen)[: len(lens)].int()
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)

    def dev(x: torch.Tensor) -> torch.Tensor:
        return x.to(device)

    if device != "cpu":
        for name in ("kq", "vq", "k_scale", "k_zero", "v_scale", "v_zero", "residual"):
            setattr(cache, name, dev(getattr(cache, name)))
    outs = {n: quant_decode_attention(dev(q), cache, 0, dev(tables), dev(ctx), dev(res_slots), d**-0.5,
                                      num_splits=n, block_n=block_n).cpu() for n in splits}
    # The reference: the codec's float32 dequantization rounded to the cache's dtype (as
    # KiviCache.gather), each sequence's blocks in table order, then its residual rows.
    k, v = (x.cpu().to(dtype).double() for x in cache.dequantize(0, torch.arange(cache.kq.shape[1], device=device)))
    res = cache.residual[0].cpu().double()
    ks, vs = (torch.zeros(len(lens), max(lens), hkv, d, dtype=torch.float64) for _ in range(2))
    for i, n in enumerate(lens):
        blocks = tables[i, : full[i]].long()
        ks[i, :n] = torch.cat([k[blocks].flatten(0, 1), res[0, res_slots[i], : n % group]])
        vs[i, :n] = torch.cat([v[blocks].flatten(0, 1), res[1, res_slots[i], : n % group]])
    ref = attend_decode(q.double(), ks, vs, ctx.long(), d**-0.5)
    tile = block_n or (128 if dtype != torch.float32 else 64)
    t = torch.arange(1, width * group)
    jumps = sum(int(((t < nb * group) & (t % tile > 0) & (t % group == 0)
                     & (tables[i, t // group] != tables[i, (t // group - 1).clamp(min=0)] + 1)).sum())
                for i, nb in enumerate(full))
    return outs, ref, jumps


def _child_main() -> None:
    """Entry point of the interpreter process: one JSON line with every (case, splits) result."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from kvscope.attention import decode_splits, triton_quant_decode

    # On CPU the automatic choice is 1 split (one "multiprocessor"); these make it split here.
    decode_splits._PROGRAMS_PER_SM, decode_splits._MIN_SPLIT_TOKENS = 256, 16
    chosen = []

    def record(*args):
        chosen.append(decode_splits.default_num_splits(*args))
        return chosen[-1]

    triton_quant_decode.default_num_splits = record
    results = {}
    for i, case in enumerate(CASES):
        try:
            outs, ref, jumps = run_kivi(*case, seed=i, splits=SPLITS)
        except Exception as e:  # reported by the case's own tests in the parent
            results.update({f"{i}:{n}": {"error": f"{type(e).__name__}: {e}"} for n in SPLITS})
            continue
        for n, out in outs.items():
            results[f"{i}:{n}"] = {"rel_err": ((out.double() - ref).norm() / ref.norm()).item(),
                                   "nan": bool(out.isnan().any()), "shape_ok": out.shape == ref.shape,
                                   "dtype_ok": out.dtype == case[7], "auto": chosen[-1],
                                   "same_as_1": bool(torch.equal(out, outs[1])), "jumps": jumps}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted_results(triton_interpreter) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__)
    code = f"import sys; sys.path.insert(0, {str(here.parent)!r}); import {here.stem} as t; t._child_main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _case_id(c) -> str:
    return f"int{c[0]}-G{c[1]}-H{c[2]}/{c[3]}-D{c[4]}-tile{c[6]}-{str(c[7])[6:]}"


@pytest.mark.parametrize("splits", SPLITS, ids=[f"splits={n}" for n in SPLITS])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_interpreted_kivi_shuffled_tables(interpreted_results, index, splits):
    r = interpreted_results[f"{index}:{splits}"]
    assert "error" not in r, r.get("error")
    assert r["shape_ok"] and r["dtype_ok"] and not r["nan"]
    assert r["rel_err"] < TOL[CASES[index][7]]
    group, block_n, dtype = CASES[index][1], CASES[index][6], CASES[index][7]
    if (block_n or (64 if dtype == torch.float32 else 128)) > group:
        assert r["jumps"] > 0  # tiles really gather non-adjacent blocks
    if splits != 1:
        assert r["auto"] > 1 and not r["same_as_1"]  # really split: a merge ran


def test_sweeps_cover_every_residual_length():
    """The sweep cases hold a sequence of every residual length, 0 .. group_size - 1."""
    for bits, group, *_, lens, _, _ in CASES:
        if len(lens) == group:
            assert sorted(n % group for n in lens) == list(range(group))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (4, 64), (8, 64)])
def test_gpu_bfloat16(bits, group):
    """Compiled kernel at Llama-3-8B head shapes in bfloat16 (128-token tiles), every residual
    length, within bfloat16 rounding of the float64 reference."""
    outs, ref, jumps = run_kivi(bits, group, 32, 8, 128, _sweep(group) + [1, 1000], None, torch.bfloat16, seed=bits,
                                splits=[1, 4, None], device="cuda")
    assert jumps > 0
    for out in outs.values():
        assert out.dtype == torch.bfloat16 and not out.isnan().any()
        assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[torch.bfloat16]


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 64)])
def test_compiles_for_sm90_without_spills(bits, group, tmp_path):
    """Compiled for an H100 (no GPU needed) at Llama-3-8B head shapes in bfloat16 with the launch
    quant_decode_attention uses: no register spills (ptxas puts them on the stack)."""
    from kvscope.attention.triton_quant_decode import KIVI_LAUNCH, _kivi_kernel

    const = {"GROUP": 4, "GQ": 16, "D": 128, "BS": group, "BITS": bits, "VGROUP": group, "BLOCK_N": 128,
             "NB": 128 // group, "DOT_PRECISION": "tf32"}
    ptrs = {"q_ptr": "*bf16", "res_ptr": "*bf16", "o_ptr": "*bf16", "lse_ptr": "*fp32", "kq_ptr": "*u8",
            "vq_ptr": "*u8", "tables_ptr": "*i32", "lens_ptr": "*i32", "slots_ptr": "*i32"}
    ptrs = {n: ptrs.get(n, "*fp16") for n in _kivi_kernel.arg_names if n.endswith("_ptr")}
    # As the launcher specializes them at these shapes: pointers and most strides multiples of 16.
    odd = frozenset({"num_splits", "stride_vh", "stride_tb", "stride_lb", "stride_lh"})
    usage = sm90_usage(_kivi_kernel, const, ptrs, KIVI_LAUNCH, tmp_path, odd)
    assert " STACK:0 " in usage and " LOCAL:0 " in usage, usage
