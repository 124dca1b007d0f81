"""Triton decode attention over ``quant``'s quantized blocks, dequantizing in registers.

One program serves one (sequence, KV head, split) and the ``Hq // Hkv`` query heads that share the
KV head (so each quantized tile is read once per group), with an online softmax in float32. The
split over the context is the paged kernel's flash-decoding (:mod:`kvscope.attention.decode_splits`:
same split choice and merge; a split is whole tiles): with few sequences, ``B * Hkv`` programs
alone leave most of the device idle.

* fp8 (:class:`~kvscope.kv.quant_cache.FP8Cache`): codes ``[num_slots, Hkv, D]`` uint8 holding
  float8_e4m3fn bits, scales ``[Hkv]`` float32. The kernel follows
  :mod:`kvscope.attention.triton_decode`'s: tiles of ``block_n`` tokens (128 for 16-bit queries, 64
  for float32) spanning several blocks, each token looking up its own block; scores and the
  weighted sum through ``tl.dot`` with the group padded to 16 rows. The codes are decoded with
  integer operations into float16 (:func:`~kvscope.attention.fp8_codes.fp8_to_f16`, shared with
  the prefill kernel; exact, and the same in Triton's interpreter and on any GPU;
  no float8 type, which Triton lacks before sm_89) to values exact in any query dtype (e4m3: 3
  mantissa bits, magnitudes 2^-9 .. 448), so they feed ``tl.dot`` unscaled: the head's K scale
  multiplies the scores and its V scale the output, both scalars of the program. Measured on an
  H200 in benchmarks/results/kv_formats_decode.md.
* KIVI (:class:`~kvscope.kv.quant_cache.KiviCache`): a sequence's first ``len // G`` blocks are
  quantized (codes ``[num_blocks, G, Hkv, D * bits / 8]``, int4 two a byte, low nibble first; key
  scale/zero per channel ``[num_blocks, Hkv, D]``, value scale/zero per token and channel group
  ``[num_blocks, G, Hkv, D / Gv]``, float16); its last ``len % G`` tokens are read from its
  residual slot ``[R, G, Hkv, D]`` in the model's dtype. Tiles as fp8's: ``block_n`` tokens,
  ``block_n / G`` whole blocks (or part of one when ``block_n < G``), each token looking up its
  block, each block its key scale/zero row. Codes are dequantized in float32 and rounded to the
  query's dtype (what :meth:`KiviCache.gather` gives in the model's dtype), then ``tl.dot``. The
  residual is one more ``G``-token tile, masked to the split's range, in the split(s) holding it.
  Measured on an H200 in benchmarks/results/kv_formats_decode.md.

The torch reference is :meth:`FP8Cache.gather` / :meth:`KiviCache.gather` followed by
:func:`kvscope.attention.torch_ref.attend_decode`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvscope.attention.decode_splits import (
    default_num_splits,
    merge_splits,
    split_bounds,
    split_result,
)
from kvscope.attention.fp8_codes import fp8_to_f16
from kvscope.attention.kivi_codes import kivi_codes
from kvscope.attention.online_softmax import softmax_step
from kvscope.attention.triton_kivi_write import kivi_write
from kvscope.attention.triton_kv_write import write_kv
from kvscope.kv.quant_cache import FP8Cache, KiviCache, QuantPlan

_LOG2E = 1.4426950408889634
# The KIVI kernel's launch: at 4 warps ptxas (sm_90) spills registers of the int8 kernel at
# head_dim 128 in bfloat16 (its float32 dequantized tiles); at 8 neither int8 nor int4 spills
# (tests/test_triton_kivi.py). Not timed.
KIVI_LAUNCH = {"num_warps": 8, "num_stages": 2}


@triton.jit
def _store_split(o_ptr, lse_ptr, b, h, split, m_i, l_i, acc, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                 GROUP: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr):
    """The split's normalised output to ``o[b, head, split, :]`` (``stride_os`` 0: the final output
    ``[B, Hq, D]``) and its log-sum-exp to ``lse[b, head, split]``, for the group's heads."""
    rows = tl.arange(0, GQ)
    d = tl.arange(0, D)
    heads = h * GROUP + rows
    out, lse = split_result(m_i, l_i, acc)
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rows < GROUP)[:, None])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=rows < GROUP)


@triton.jit
def _dot_step(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One tile of the online softmax: ``q`` ``[G_PAD, D]``, ``k``/``v`` ``[BLOCK_N, D]`` in q's
    dtype, ``valid`` ``[BLOCK_N]`` (at least one true: m_new is finite from the first tile on)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    p, alpha, l_i, m_i = softmax_step(s, m_i, l_i)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["stride_tb"])  # varies per step: a compile per new class
def _fp8_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, o_ptr, lse_ptr, qk_scale, num_splits,
                stride_qb, stride_qh, stride_cs, stride_ch, stride_tb, stride_ob, stride_oh, stride_os,
                stride_lb, stride_lh,
                GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    # In q's own dtype: the decoded codes are exact in it, so both products can go through tl.dot.
    q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    # The head's scales are scalars of the program: K's folds into the score scale, V's into the
    # output, instead of multiplying every decoded element.
    s_scale = qk_scale * tl.load(ks_ptr + h)
    v_scale = tl.load(vs_ptr + h)
    lo, hi = split_bounds(tl.load(lens_ptr + b), num_splits, split, BLOCK_N)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):  # empty when lo >= hi
        t = start + n
        valid = t < hi
        # A tile spans several blocks: each token looks up its own. int64: slot x stride can pass 2^31.
        block = tl.load(tables_ptr + b * stride_tb + t // PAGE, mask=valid, other=0).to(tl.int64)
        off = (block * PAGE + t % PAGE)[:, None] * stride_cs + h * stride_ch + d[None, :]
        k = fp8_to_f16(tl.load(k_ptr + off, mask=valid[:, None], other=0).to(tl.int32)).to(q.dtype)
        v = fp8_to_f16(tl.load(v_ptr + off, mask=valid[:, None], other=0).to(tl.int32)).to(q.dtype)
        # The first tile holds a valid token (lo < hi), as _dot_step needs.
        m_i, l_i, acc = _dot_step(q, k, v, valid, m_i, l_i, acc, s_scale, DOT_PRECISION)
    _store_split(o_ptr, lse_ptr, b, h, split, m_i, l_i, acc * v_scale, stride_ob, stride_oh, stride_os, stride_lb,
                 stride_lh, GROUP, G_PAD, D)


@triton.jit(do_not_specialize=["stride_tb"])  # varies per step: a compile per new class
def _kivi_kernel(q_ptr, kq_ptr, vq_ptr, kscale_ptr, kzero_ptr, vscale_ptr, vzero_ptr, res_ptr,
                 tables_ptr, lens_ptr, slots_ptr, o_ptr, lse_ptr, qk_scale, num_splits,
                 stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_kb, stride_kh,
                 stride_vb, stride_vt, stride_vh, stride_r2, stride_rs, stride_rt, stride_rh,
                 stride_tb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                 GROUP: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                 BITS: tl.constexpr, VGROUP: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GQ)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    # In q's own dtype: keys and values are dequantized to it (as the cache's gather rounds them to
    # the model's dtype), so both products go through tl.dot.
    q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    ctx = tl.load(lens_ptr + b)
    lo, hi = split_bounds(ctx, num_splits, split, BLOCK_N)
    qend = ctx // BS * BS  # tokens below are in quantized blocks, the rest in the residual
    q_hi = tl.minimum(hi, qend)
    m_i = tl.full([GQ], float("-inf"), tl.float32)
    l_i = tl.zeros([GQ], tl.float32)
    acc = tl.zeros([GQ, D], tl.float32)
    for start in range(lo, q_hi, BLOCK_N):  # empty when lo >= q_hi
        t = start + n
        valid = t < q_hi
        # Each token looks up its own block (a tile spans NB of them); int64: offsets pass 2^31.
        block = tl.load(tables_ptr + b * stride_tb + t // BS, mask=valid, other=0).to(tl.int64)
        rows = block * stride_cb + (t % BS) * stride_ct + h * stride_ch
        # Keys: one scale/zero row per block. start is a multiple of BLOCK_N (splits are whole
        # tiles), so the tile is NB whole blocks, or (NB == 1) lies inside one block.
        j = start // BS + tl.arange(0, NB)
        j_valid = j * BS < q_hi
        kblock = tl.load(tables_ptr + b * stride_tb + j, mask=j_valid, other=0).to(tl.int64)
        koff = kblock[:, None] * stride_kb + h * stride_kh + d[None, :]
        ks = tl.load(kscale_ptr + koff, mask=j_valid[:, None], other=0.0).to(tl.float32)
        kz = tl.load(kzero_ptr + koff, mask=j_valid[:, None], other=0.0).to(tl.float32)
        kc = tl.reshape(kivi_codes(kq_ptr, rows, valid, D, BITS).to(tl.float32), [NB, BLOCK_N // NB, D])
        k = tl.reshape(kc * ks[:, None, :] + kz[:, None, :], [BLOCK_N, D]).to(q.dtype)
        # Values: a scale/zero per token and group of VGROUP channels.
        voff = (block * stride_vb + (t % BS) * stride_vt + h * stride_vh)[:, None] + tl.arange(0, D // VGROUP)[None, :]
        vs = tl.load(vscale_ptr + voff, mask=valid[:, None], other=0.0).to(tl.float32)
        vz = tl.load(vzero_ptr + voff, mask=valid[:, None], other=0.0).to(tl.float32)
        vc = tl.reshape(kivi_codes(vq_ptr, rows, valid, D, BITS).to(tl.float32), [BLOCK_N, D // VGROUP, VGROUP])
        v = tl.reshape(vc * vs[:, :, None] + vz[:, :, None], [BLOCK_N, D]).to(q.dtype)
        m_i, l_i, acc = _dot_step(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)
    # The residual (tokens qend .. ctx - 1, fewer than BS) in full precision, by whichever split
    # holds them: one BS-token tile, masked to the split's range.
    if tl.maximum(lo, qend) < hi:
        slot = tl.load(slots_ptr + b).to(tl.int64)
        r = tl.arange(0, BS)
        r_valid = (qend + r >= lo) & (qend + r < hi)
        off = slot * stride_rs + r[:, None] * stride_rt + h * stride_rh + d[None, :]
        k = tl.load(res_ptr + off, mask=r_valid[:, None], other=0.0).to(q.dtype)
        v = tl.load(res_ptr + stride_r2 + off, mask=r_valid[:, None], other=0.0).to(q.dtype)
        m_i, l_i, acc = _dot_step(q, k, v, r_valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)
    _store_split(o_ptr, lse_ptr, b, h, split, m_i, l_i, acc, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                 GROUP, GQ, D)


def quant_decode_attention(q: torch.Tensor, cache: FP8Cache | KiviCache, layer: int, tables: torch.Tensor,
                           lens: torch.Tensor, res_slots: torch.Tensor | None, scale: float,
                           num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Decode attention of ``q`` ``[B, Hq, D]`` over layer ``layer`` of ``cache``.

    Args:
        tables: ``[B, W]`` int32 block ids (columns past a sequence's blocks are never read).
        lens: ``[B]`` int32 tokens per sequence (the new one included, already written).
        res_slots: (KIVI) ``[B]`` int32 residual slot of each sequence.
        num_splits: context splits per (sequence, KV head); None picks
            :func:`~kvscope.attention.decode_splits.default_num_splits` for a ``W``-block table.
            Any value is correct, including more splits than blocks.
        block_n: tokens per tile, a power of two >= 16; None picks 128 for 16-bit ``q``, 64 for
            float32. A tile may span several blocks (or, for KIVI, part of one): splits are whole tiles.
    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype.
    """
    B, Hq, D = q.shape
    bs = cache.block_size
    H = (cache.data.shape[3] if isinstance(cache, FP8Cache) else cache.kq.shape[3])
    if num_splits is None:
        num_splits = default_num_splits(B, H, tables.shape[1] * bs, q.device)
    group = Hq // H
    out = torch.empty_like(q)
    # One split writes the final output in place; more write float32 partials for merge_splits.
    part = out if num_splits == 1 else torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    outs = (part, part_lse, scale * _LOG2E, num_splits)
    out_strides = (part.stride(0), part.stride(1), 0 if num_splits == 1 else part.stride(2),
                   part_lse.stride(0), part_lse.stride(1))
    grid = (B, H, num_splits)
    # The paged kernel's H100-tuned shape (benchmarks/gpu/NOTES.md): 128-token tiles in 16-bit, 64
    # in float32, 4 warps, 2 stages; the group padded to 16 rows, tl.dot's minimum.
    if block_n is None:
        block_n = 128 if q.element_size() == 2 else 64
    g_pad = max(triton.next_power_of_2(group), 16)
    # Triton's float32 dot defaults to tf32 (~3e-4 relative error); float32 callers want float32.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if isinstance(cache, FP8Cache):
        k, v = cache.data[layer, 0], cache.data[layer, 1]
        _fp8_kernel[grid](q, k, v, cache.scale[layer, 0], cache.scale[layer, 1], tables, lens, *outs,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), tables.stride(0), *out_strides,
                          GROUP=group, G_PAD=g_pad, D=D, PAGE=bs, BLOCK_N=block_n, DOT_PRECISION=precision,
                          num_warps=4, num_stages=2)
    else:
        kq, vq, ks, kz = cache.kq[layer], cache.vq[layer], cache.k_scale[layer], cache.k_zero[layer]
        vs, vz, res = cache.v_scale[layer], cache.v_zero[layer], cache.residual[layer]
        _kivi_kernel[grid](q, kq, vq, ks, kz, vs, vz, res, tables, lens, res_slots, *outs,
                           q.stride(0), q.stride(1), kq.stride(0), kq.stride(1), kq.stride(2), ks.stride(0),
                           ks.stride(1), vs.stride(0), vs.stride(1), vs.stride(2), res.stride(0), res.stride(1),
                           res.stride(2), res.stride(3), tables.stride(0), *out_strides,
                           GROUP=group, GQ=g_pad, D=D, BS=bs, BITS=cache.bits, VGROUP=cache.value_group,
                           BLOCK_N=block_n, NB=max(block_n // bs, 1), DOT_PRECISION=precision, **KIVI_LAUNCH)
    if num_splits > 1:
        merge_splits(part, part_lse, out, torch.empty(B, Hq, dtype=torch.float32, device=q.device))
    return out


class TritonQuantDecode:
    """AttentionBackend for a decode-only step of ``quant``: the write through the cache's torch
    path (a step writes one token per sequence), attention by :func:`quant_decode_attention`."""

    def __init__(self, cache: FP8Cache | KiviCache, plan: QuantPlan, tables: list[list[int]], done: list[int],
                 res_slots: list[int], scale: float) -> None:
        device = plan.tables[0].device
        width = max(len(t) for t in tables)
        self.cache, self.plan, self.scale = cache, plan, scale
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
        self.lens = torch.tensor([n + 1 for n in done], dtype=torch.int32, device=device)
        self.res = torch.tensor(res_slots, dtype=torch.int32, device=device) if res_slots else None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer_idx, k, v, self.plan)
        return quant_decode_attention(q, self.cache, layer_idx, self.tables, self.lens, self.res, self.scale)


class StaticFP8Decode:
    """AttentionBackend of a captured ``quant:dtype=fp8`` decode step over one bucket's static
    buffers (:class:`~kvscope.kv.block_table_graphs.BlockTableStep`): no host work per layer.

    The new tokens are encoded at the layer's stored scales (:meth:`FP8Cache.codes`, never a
    calibration: the first prefill calibrated every layer before any decode step, see
    ``QuantStrategy.graph_ready``) and stored by ``paged``'s write kernel, which copies uint8 rows
    as they are and skips padding rows (slot -1); then :func:`quant_decode_attention` reads the
    static tables and lengths with the bucket's fixed split count.

    Args:
        cache: the strategy's fp8 storage.
        slots: ``[b]`` int32 slot of each row's new token (-1: padding, not written).
        tables: ``[b, W]`` int32 block tables (``W`` fixed per engine).
        lens: ``[b]`` int32 tokens per row after this step (its new token included).
        num_splits: context splits, fixed at capture.
    """

    def __init__(self, cache: FP8Cache, slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float,
                 num_splits: int) -> None:
        self.cache, self.slots, self.tables, self.lens = cache, slots, tables, lens
        self.scale, self.num_splits = scale, num_splits

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        data = self.cache.data[layer_idx]
        write_kv(*self.cache.codes(layer_idx, k, v), data[0], data[1], self.slots)
        return quant_decode_attention(q, self.cache, layer_idx, self.tables, self.lens, None, self.scale,
                                      self.num_splits)


class StaticKiviDecode:
    """AttentionBackend of a captured ``quant:dtype=int8|int4`` (KIVI) decode step over one bucket's
    static buffers (:class:`~kvscope.kv.quant_graphs.KiviStep`): no host work per layer.

    The new tokens are stored by :func:`~kvscope.attention.triton_kivi_write.kivi_write` (to the
    residual, or quantized with their group when they complete it; padding rows skipped), then
    :func:`quant_decode_attention` reads the static tables, lengths and residual slots with the
    bucket's fixed split count: the same kernels' reads as an eager Triton step.

    Args:
        cache: the strategy's KIVI storage.
        slots: ``[b]`` int32 ``block * G + offset`` of each row's new token (-1: padding).
        res_slots: ``[b]`` int32 residual slot of each row.
        tables: ``[b, W]`` int32 block tables (``W`` fixed per engine).
        lens: ``[b]`` int32 tokens per row after this step (its new token included).
        num_splits: context splits, fixed at capture.
    """

    def __init__(self, cache: KiviCache, slots: torch.Tensor, res_slots: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, scale: float, num_splits: int) -> None:
        self.cache, self.slots, self.res_slots, self.tables, self.lens = cache, slots, res_slots, tables, lens
        self.scale, self.num_splits = scale, num_splits

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kivi_write(k, v, self.cache, layer_idx, self.slots, self.res_slots)
        return quant_decode_attention(q, self.cache, layer_idx, self.tables, self.lens, self.res_slots, self.scale,
                                      self.num_splits)
