"""The Triton decode kernel over ``quant``'s blocks against the torch reference (dequantize, then
``attend_decode``) on the same cache state, at 1, 2 and 4 context splits and the automatic choice.

On CPU the kernel runs through Triton's interpreter in a child process (``TRITON_INTERPRET=1`` must
be set before triton is first imported; see tests/test_triton_decode.py), which reports one JSON
result per case; the tests here judge them. The GPU test compiles the kernel in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kvscope.attention.fp8_codes import fp8_to_f16  # noqa: E402

# (spec, Hq, Hkv, D, context lengths before the decode step)
CASES = [
    ("quant:dtype=fp8", 4, 2, 16, [1, 23, 70]),
    # 141 tokens: three 64-token tiles, so that 4 splits really split (41 and 6 fit in one tile).
    ("quant:dtype=fp8,scale=head", 8, 1, 32, [40, 5, 140]),
    # 31 -> 32: the decode token fills a block, quantized in this very step; 32 -> 33: one residual token.
    ("quant:dtype=int8", 4, 2, 16, [31, 32, 70]),
    ("quant:dtype=int4", 4, 2, 32, [1, 63, 100]),
    # A group of 3 query heads (padded lanes); value groups of 16 channels (head_dim < group_size).
    ("quant:dtype=int4,group_size=64", 6, 2, 16, [64, 10]),
    ("quant:dtype=int8,group_size=64", 2, 2, 64, [130]),
    # Ragged: fp8 at 151 tokens in 64-token tiles (4 splits of 64, 64, 23, 0 tokens) beside a
    # sequence inside one block.
    ("quant:dtype=fp8", 4, 2, 16, [150, 3]),
]
# KIVI's splits cut block-aligned ranges (fp8's whole tiles), so e.g. int4 at 101 tokens (3
# quantized blocks + 5 residual tokens) gives at 2 splits [0, 64) and [64, 101) (a quantized
# block and the residual in one split), at 4 splits three one-block splits, the residual alone,
# and empty splits for the short sequences. None: the automatic choice (see _child_main).
SPLITS = [1, 2, 4, None]

# The fp8 kernel on a pool of random codes (subnormals included) under shuffled block tables, so
# that every tile of several blocks gathers non-contiguous ones: (Hq, Hkv, D, lengths, tokens per
# tile (None: the default), query dtype). Groups of 1, 2, 4 and 8 query heads, all padded to tl.dot's
# 16 rows; no length a multiple of its tile. bfloat16 queries are not here: Triton's interpreter
# multiplies bfloat16 operands of tl.dot as their raw uint16 bits (test_gpu covers bfloat16).
SHUFFLED = [
    (2, 2, 16, [200, 7, 65], None, torch.float32),
    (4, 2, 32, [129, 1, 100], 32, torch.float32),
    (8, 1, 16, [77, 300], 128, torch.float32),
    (8, 2, 32, [150, 33, 290], None, torch.float16),
    (8, 1, 32, [45, 3, 70], 16, torch.float16),
]
# Same codes and scales as the reference, so float32 differs by rounding alone; float16 also
# rounds the probabilities fed to tl.dot and the output (2^-11 relative each).
SHUFFLED_TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def run_case(spec: str, hq: int, hkv: int, d: int, lens: list[int], device: str, dtype: torch.dtype, seed: int,
             splits: list[int | None]):
    """Prefill requests of ``lens`` in two interleaved chunks each (non-contiguous block tables),
    write one decode token per request, and return ({split count: kernel output}, reference output,
    whether every table is contiguous) of layer 0."""
    from kvscope.attention.torch_ref import attend_decode
    from kvscope.attention.triton_quant_decode import quant_decode_attention
    from kvscope.kv import registry
    from kvscope.kv.base import KVSetup, StepBatch
    from kvscope.models.config import ModelConfig
    from kvscope.request import Request
    from kvscope.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    model = ModelConfig(arch="llama", vocab_size=8, hidden_size=hq * d, intermediate_size=8, num_layers=1,
                        num_heads=hq, num_kv_heads=hkv, head_dim=d, max_position_embeddings=4096)
    s = registry.create(spec)
    s.bind(KVSetup(model, torch.device(device), dtype, 8 << 20, 4096, 8, 0))
    reqs = [Request(f"r{i}", [1] * n, SamplingParams(max_tokens=1)) for i, n in enumerate(lens)]

    def step(batch_reqs, news):
        qs = [0]
        for r, n in zip(batch_reqs, news):
            assert s.allocate(r, r.num_computed_tokens + n)
            qs.append(qs[-1] + n)
        batch = StepBatch(batch_reqs, news, torch.zeros(qs[-1]), torch.zeros(qs[-1]), qs)
        attn = s.begin_step(batch)
        k = (torch.randn(qs[-1], hkv, d, generator=gen) * 2 + 0.3).to(device, dtype)
        v = torch.randn(qs[-1], hkv, d, generator=gen).to(device, dtype)
        return batch, attn, k, v

    halves = [(n // 2, n - n // 2) for n in lens]
    for part in range(2):
        todo = [(r, h[part]) for r, h in zip(reqs, halves) if h[part]]
        for r, n in todo:  # one request per step, alternating: their blocks interleave in the pool
            batch, attn, k, v = step([r], [n])
            attn.attend(0, torch.zeros(n, hq, d, device=device, dtype=dtype), k, v)
            r.num_computed_tokens += n
            s.end_step(batch)
    batch, attn, k, v = step(reqs, [1] * len(reqs))
    q = torch.randn(len(reqs), hq, d, generator=gen).to(device, dtype)
    s.cache.write(0, k, v, attn.plan)
    kv = s.cache.gather(0, attn.plan)
    width = max(t.numel() for t in attn.plan.tables)
    index = torch.zeros(len(reqs), width, dtype=torch.long, device=device)
    for i, t in enumerate(attn.plan.tables):
        index[i, : t.numel()] = t
    ctx = torch.tensor([n + 1 for n in lens], device=device)
    ref = attend_decode(q.double(), kv[0][index].double(), kv[1][index].double(), ctx, d**-0.5)
    tables = [s.tables[r.request_id] for r in reqs]
    tw = max(map(len, tables))
    tables_t = torch.tensor([t + [0] * (tw - len(t)) for t in tables], dtype=torch.int32, device=device)
    res = torch.tensor([s._res_of[r.request_id] for r in reqs], dtype=torch.int32, device=device) if s.kivi else None
    outs = {n: quant_decode_attention(q, s.cache, 0, tables_t, ctx.int(), res, d**-0.5, num_splits=n) for n in splits}
    contiguous = all(b - a == 1 for t in tables for a, b in zip(t, t[1:]))
    return outs, ref, contiguous


def run_shuffled(hq: int, hkv: int, d: int, lens: list[int], block_n: int | None, dtype: torch.dtype, seed: int,
                 splits: list[int | None]):
    """fp8 decode over random codes in 16-token blocks, each sequence's table a random slice of a
    shuffled pool padded with an id far outside it (never to be read); return ({split count:
    output}, float64 reference from torch's float8_e4m3fn decoding, tokens whose predecessor
    within their tile lives in a non-adjacent block)."""
    from kvscope.attention.torch_ref import attend_decode
    from kvscope.attention.triton_quant_decode import quant_decode_attention
    from kvscope.kv.quant_cache import FP8Cache
    from kvscope.models.config import ModelConfig

    gen = torch.Generator().manual_seed(seed)
    bs, tile = 16, block_n or (128 if dtype != torch.float32 else 64)
    width = -(-max(lens) // bs)
    model = ModelConfig(arch="llama", vocab_size=8, hidden_size=hq * d, intermediate_size=8, num_layers=1,
                        num_heads=hq, num_kv_heads=hkv, head_dim=d, max_position_embeddings=4096)
    cache = FP8Cache(model, len(lens) * width + 5, bs, torch.device("cpu"), dtype, per_head=True)
    codes = torch.randint(0, 256, cache.data.shape, generator=gen, dtype=torch.uint8)
    cache.data.copy_(torch.where(codes & 0x7F == 0x7F, codes - 1, codes))  # 0x7F/0xFF: e4m3fn's NaNs
    cache.scale[0, 0] = torch.rand(hkv, generator=gen) * 0.01 + 0.002
    cache.scale[0, 1] = torch.rand(hkv, generator=gen) * 0.05 + 0.01
    pool = torch.randperm(cache.data.shape[2] // bs, generator=gen)
    tables = torch.full((len(lens), width), 1 << 30, dtype=torch.int32)
    for i, n in enumerate(lens):
        tables[i, : -(-n // bs)] = pool[i * width: i * width + -(-n // bs)]
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    outs = {n: quant_decode_attention(q, cache, 0, tables, ctx, None, d**-0.5, num_splits=n, block_n=block_n)
            for n in splits}
    kv = cache.data[0].view(torch.float8_e4m3fn).double() * cache.scale[0].double()[:, None, :, None]
    slots = (tables.long().clamp(max=pool.numel() - 1)[:, :, None] * bs + torch.arange(bs)).flatten(1)
    ref = attend_decode(q.double(), kv[0][slots], kv[1][slots], ctx.long(), d**-0.5)
    t = torch.arange(1, width * bs)
    jumps = sum(int(((t < n) & (t % tile > 0) & (t % bs == 0)
                     & (tables[i, t // bs] != tables[i, t // bs - 1] + 1)).sum()) for i, n in enumerate(lens))
    return outs, ref, jumps


@triton.jit
def _decode_kernel(codes_ptr, out_ptr):
    """``out[i] = fp8_to_f16(codes[i])`` for 256 codes (jitted helpers resolve module globals)."""
    i = tl.arange(0, 256)
    tl.store(out_ptr + i, fp8_to_f16(tl.load(codes_ptr + i).to(tl.int32)))


def decode_every_code() -> dict:
    """The fp8 kernel's code decoding over all 256 bytes against torch's float8_e4m3fn (bit for
    bit, NaN codes left out; -0.0 must stay negative)."""
    codes = torch.arange(256, dtype=torch.uint8)
    out = torch.empty(256, dtype=torch.float16)
    _decode_kernel[(1,)](codes, out)
    ref = codes.view(torch.float8_e4m3fn).half()
    keep = ~ref.isnan()
    return {"equal_bits": bool(torch.equal(out[keep].view(torch.int16), ref[keep].view(torch.int16))),
            "codes": int(keep.sum()), "subnormals": int((keep & (ref != 0) & (ref.abs() < 2**-6)).sum())}


def _judge(outs: dict, ref: torch.Tensor, chosen: list[int]) -> dict:
    """Per split count: relative error against ``ref`` and the facts the tests check."""
    return {n: {"rel_err": ((out.double() - ref).norm() / ref.norm()).item(), "nan": bool(out.isnan().any()),
                "shape_ok": out.shape == ref.shape, "auto": chosen[-1], "same_as_1": bool(torch.equal(out, outs[1]))}
            for n, out in outs.items()}


def _child_main() -> None:
    """Entry point of the interpreter process: one JSON line with every (case, splits) result."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from kvscope.attention import decode_splits, triton_quant_decode

    # On CPU the automatic choice is always 1 split (one "multiprocessor"); these make it split the
    # tiny contexts here as it splits long ones on a GPU.
    decode_splits._PROGRAMS_PER_SM, decode_splits._MIN_SPLIT_TOKENS = 64, 16
    chosen = []  # what the automatic choice gave, as the kernel's caller saw it

    def record(*args):
        chosen.append(decode_splits.default_num_splits(*args))
        return chosen[-1]

    triton_quant_decode.default_num_splits = record
    results = {}
    for i, case in enumerate(CASES):
        try:
            outs, ref, contiguous = run_case(*case, device="cpu", dtype=torch.float32, seed=i, splits=SPLITS)
        except Exception as e:  # reported by the case's own tests in the parent
            results.update({f"{i}:{n}": {"error": f"{type(e).__name__}: {e}"} for n in SPLITS})
            continue
        for n, r in _judge(outs, ref, chosen).items():
            results[f"{i}:{n}"] = dict(r, contiguous=contiguous)
    for i, case in enumerate(SHUFFLED):
        try:
            outs, ref, jumps = run_shuffled(*case, seed=100 + i, splits=SPLITS)
        except Exception as e:
            results.update({f"s{i}:{n}": {"error": f"{type(e).__name__}: {e}"} for n in SPLITS})
            continue
        for n, r in _judge(outs, ref, chosen).items():
            results[f"s{i}:{n}"] = dict(r, jumps=jumps)
    results["decode"] = decode_every_code()
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted_results(triton_interpreter) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__)
    code = f"import sys; sys.path.insert(0, {str(here.parent)!r}); import {here.stem} as t; t._child_main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("splits", SPLITS, ids=[f"splits={n}" for n in SPLITS])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0].split(':')[1]}-H{c[1]}/{c[2]}-D{c[3]}" for c in CASES])
def test_interpreted_matches_reference(interpreted_results, index, splits):
    r = interpreted_results[f"{index}:{splits}"]
    assert "error" not in r, r.get("error")
    assert r["shape_ok"] and not r["nan"]
    # Same codes, same scales: only float32 rounding of the dequantization, softmax and merge differs.
    assert r["rel_err"] < 1e-5
    if len(CASES[index][4]) > 1:
        assert not r["contiguous"]  # the block tables really jump around the pool


@pytest.mark.parametrize("index", range(len(CASES)))
def test_split_choice(interpreted_results, index):
    """The automatic choice really splits here (so its runs test a merge), and more than one split
    does change the arithmetic (so the split tests are not one-split runs in disguise)."""
    r = {n: interpreted_results[f"{index}:{n}"] for n in SPLITS}
    assert all("error" not in x for x in r.values())
    assert r[None]["auto"] > 1
    assert not r[4]["same_as_1"]


@pytest.mark.parametrize("splits", SPLITS, ids=[f"splits={n}" for n in SPLITS])
@pytest.mark.parametrize("index", range(len(SHUFFLED)),
                         ids=[f"H{c[0]}/{c[1]}-D{c[2]}-tile{c[4]}-{str(c[5])[6:]}" for c in SHUFFLED])
def test_interpreted_fp8_shuffled_tables(interpreted_results, index, splits):
    r = interpreted_results[f"s{index}:{splits}"]
    assert "error" not in r, r.get("error")
    assert r["shape_ok"] and not r["nan"]
    assert r["rel_err"] < SHUFFLED_TOL[SHUFFLED[index][5]]
    if SHUFFLED[index][4] != 16:  # a 16-token tile is one block
        assert r["jumps"] > 0  # tiles really gather blocks from around the pool
    if splits == 4:
        assert not r["same_as_1"] and r["auto"] > 1  # really split (a merge ran), as test_split_choice


def test_interpreted_fp8_decoding_is_exact(interpreted_results):
    r = interpreted_results["decode"]
    assert r == {"equal_bits": True, "codes": 254, "subnormals": 14}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ["quant:dtype=fp8", "quant:dtype=fp8,scale=head", "quant:dtype=int8",
                                  "quant:dtype=int4", "quant:dtype=int4,group_size=64"])
def test_gpu(spec):
    """Compiled kernel at Llama-3-8B head shapes in bfloat16, within bfloat16 rounding of the
    float64 reference over the same dequantized K/V."""
    outs, ref, _ = run_case(spec, 32, 8, 128, [1, 500, 1000, 33], device="cuda", dtype=torch.bfloat16, seed=0,
                            splits=[1, 8, None])
    torch.cuda.synchronize()
    for out in outs.values():
        assert out.dtype == torch.bfloat16 and not out.isnan().any()
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
