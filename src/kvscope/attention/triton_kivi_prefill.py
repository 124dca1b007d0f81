"""Paged prefill (and chunked-prefill) attention in Triton over ``quant``'s KIVI cache
(:class:`~kvscope.kv.quant_cache.KiviCache`), dequantizing in registers.

Queries as in :mod:`kvscope.attention.triton_prefill`: sequence ``b``'s ``n_b`` new tokens are rows
``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` of ``q``; with ``T_b = context_lens[b]`` tokens cached
after the step's write, query token ``j`` sits at position ``T_b - n_b + j`` and attends causally.

Where the keys are, after :meth:`KiviCache.write` of the step: positions ``[0, T_b // G * G)`` in
quantized blocks (block ``block_tables[b, t // G]``, row ``t % G``; ``G`` is the block size and the
quantization group), the last ``T_b % G`` in the sequence's residual slot ``res_slots[b]`` at row
``t % G``, in the model's dtype. A block is quantized as soon as it fills, so a chunk's own tokens
may already be codes.

The program structure is the paged prefill kernel's, shared through
:mod:`kvscope.attention.prefill_tiles` (grouped-query rows, unmasked tiles then the diagonal's
causal tiles, online softmax in float32 base 2, heavy tiles first); only the K/V tile loader differs (:func:`_kivi_tile`): for each key, codes (:func:`~kvscope.attention.kivi_codes.kivi_codes`)
times its block's per-channel key scale plus zero, and codes times the token's per-channel-group
value scale plus zero, in float32 and rounded to the query's dtype (what :meth:`KiviCache.gather`
gives in the model's dtype); or the residual row for keys past the quantized blocks. A tile may
mix both (the last quantized block and the residual): both loads are masked per key. Scales and
zeros are loaded per key (a key's block row repeats within the tile; served from cache). Tile
sizes are untuned.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvscope.attention.kivi_codes import kivi_codes
from kvscope.attention.prefill_tiles import fold_tile, key_ranges, query_rows, store_rows, tile_bounds
from kvscope.kv.quant_cache import KiviCache

_LOG2E = 1.4426950408889634


@triton.jit
def _kivi_tile(
    t, ctx, qend, table_ptr, slot, h,
    kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, res_ptr,
    stride_cb, stride_ct, stride_ch, stride_kb, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_r2, stride_rs, stride_rt, stride_rh,
    D: tl.constexpr, BS: tl.constexpr, BITS: tl.constexpr, VGROUP: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """K and V ``[BLOCK_N, D]`` float32 of keys ``t`` ``[BLOCK_N]`` of KV head ``h``: dequantized
    below ``qend``, the residual slot's rows (exact in float32) from ``qend`` to ``ctx``, zeros beyond."""
    d = tl.arange(0, D)
    quant = t < qend
    # int64: a pool of several GiB has element offsets beyond 2**31.
    block = tl.load(table_ptr + t // BS, mask=quant, other=0).to(tl.int64)
    row = t % BS
    codes_at = block * stride_cb + row * stride_ct + h * stride_ch
    koff = (block * stride_kb + h * stride_kh)[:, None] + d[None, :]
    ks = tl.load(ks_ptr + koff, mask=quant[:, None], other=0.0).to(tl.float32)
    kz = tl.load(kz_ptr + koff, mask=quant[:, None], other=0.0).to(tl.float32)
    k = kivi_codes(kq_ptr, codes_at, quant, D, BITS).to(tl.float32) * ks + kz
    voff = (block * stride_vb + row * stride_vt + h * stride_vh)[:, None] + tl.arange(0, D // VGROUP)[None, :]
    vs = tl.load(vs_ptr + voff, mask=quant[:, None], other=0.0).to(tl.float32)
    vz = tl.load(vz_ptr + voff, mask=quant[:, None], other=0.0).to(tl.float32)
    vc = tl.reshape(kivi_codes(vq_ptr, codes_at, quant, D, BITS).to(tl.float32), [BLOCK_N, D // VGROUP, VGROUP])
    v = tl.reshape(vc * vs[:, :, None] + vz[:, :, None], [BLOCK_N, D])
    in_res = (t >= qend) & (t < ctx)
    roff = (slot * stride_rs + row * stride_rt + h * stride_rh)[:, None] + d[None, :]
    kr = tl.load(res_ptr + roff, mask=in_res[:, None], other=0.0)
    vr = tl.load(res_ptr + stride_r2 + roff, mask=in_res[:, None], other=0.0)
    k = tl.where(quant[:, None], k, kr.to(tl.float32))
    v = tl.where(quant[:, None], v, vr.to(tl.float32))
    return k, v


@triton.jit
def _attend_tile(
    acc, l, m, q, t, pos, qk_scale, ctx, qend, table_ptr, slot, h,
    kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, res_ptr,
    stride_cb, stride_ct, stride_ch, stride_kb, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_r2, stride_rs, stride_rt, stride_rh,
    D: tl.constexpr, BS: tl.constexpr, BITS: tl.constexpr, VGROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys ``t`` ``[BLOCK_N]`` into the running ``(acc, l, m)`` of the rows ``q``
    ``[BLOCK_M, D]``; with ``CAUSAL`` row ``r`` sees only keys ``t <= pos[r]``."""
    k, v = _kivi_tile(t, ctx, qend, table_ptr, slot, h, kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, res_ptr,
                      stride_cb, stride_ct, stride_ch, stride_kb, stride_kh, stride_vb, stride_vt, stride_vh,
                      stride_r2, stride_rs, stride_rt, stride_rh,
                      D=D, BS=BS, BITS=BITS, VGROUP=VGROUP, BLOCK_N=BLOCK_N)
    # Rounded to q's dtype, as KiviCache.gather rounds to the model's dtype (the residual exactly).
    k, v = k.to(q.dtype), v.to(q.dtype)
    return fold_tile(acc, l, m, q, k, v, t, pos, qk_scale, CAUSAL, DOT_PRECISION)


@triton.jit(do_not_specialize=["stride_tb"])  # varies per step: a compile per new class
def _kivi_prefill_kernel(
    q_ptr, o_ptr, kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, res_ptr,
    tables_ptr, slots_ptr, cu_ptr, lens_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_ch, stride_kb, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_r2, stride_rs, stride_rt, stride_rh, stride_tb,
    D: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr, BS: tl.constexpr,
    BITS: tl.constexpr, VGROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (query tile, KV head, sequence) (:mod:`kvscope.attention.prefill_tiles`)."""
    h, b, q_start, q_len, tok0 = tile_bounds(cu_ptr, TOKENS)
    if tok0 >= q_len:
        return
    q, q_rows, heads, row_ok, pos, ctx, d, d_mask = query_rows(
        q_ptr, lens_ptr, b, q_start, q_len, tok0, h, stride_qt, stride_qh, D, D, GROUP, TOKENS, BLOCK_M)
    qend = ctx // BS * BS  # keys below are in quantized blocks, the rest in the residual
    slot = tl.load(slots_ptr + b).to(tl.int64)
    table_ptr = tables_ptr + b * stride_tb
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    unmasked_end, key_end = key_ranges(ctx, q_len, tok0, TOKENS, BLOCK_N)
    for start in range(0, unmasked_end, BLOCK_N):
        acc, l, m = _attend_tile(
            acc, l, m, q, start + n, pos, qk_scale, ctx, qend, table_ptr, slot, h,
            kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, res_ptr,
            stride_cb, stride_ct, stride_ch, stride_kb, stride_kh, stride_vb, stride_vt, stride_vh,
            stride_r2, stride_rs, stride_rt, stride_rh,
            D=D, BS=BS, BITS=BITS, VGROUP=VGROUP, BLOCK_N=BLOCK_N, CAUSAL=False, DOT_PRECISION=DOT_PRECISION,
        )
    for start in range(unmasked_end, key_end, BLOCK_N):
        acc, l, m = _attend_tile(
            acc, l, m, q, start + n, pos, qk_scale, ctx, qend, table_ptr, slot, h,
            kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, res_ptr,
            stride_cb, stride_ct, stride_ch, stride_kb, stride_kh, stride_vb, stride_vt, stride_vh,
            stride_r2, stride_rs, stride_rt, stride_rh,
            D=D, BS=BS, BITS=BITS, VGROUP=VGROUP, BLOCK_N=BLOCK_N, CAUSAL=True, DOT_PRECISION=DOT_PRECISION,
        )

    store_rows(o_ptr, acc / l[:, None], q_rows, heads, row_ok, d, d_mask, stride_ot, stride_oh)


def kivi_paged_prefill_attention(
    q: torch.Tensor,
    cache: KiviCache,
    layer: int,
    block_tables: torch.Tensor,
    res_slots: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over layer ``layer`` of a KIVI cache (the
    step's K/V already written by :meth:`KiviCache.write`).

    Args:
        q: ``[Nq, Hq, D]`` float32, float16 or bfloat16, last dim contiguous; ``D`` a power of two
            (at least 16), ``Hq`` a multiple of the cache's ``Hkv``.
        block_tables: ``[B, W]`` int32 block ids; entries past a sequence's quantized blocks are
            never read.
        res_slots: ``[B]`` int32 residual slot of each sequence.
        cu_seqlens_q: ``[B + 1]`` int32 row offsets, non-decreasing (an empty chunk is allowed).
        context_lens: ``[B]`` int32 tokens cached per sequence after the write, each at least the
            chunk's length.
        scale: softmax scale.
        max_query_len: the longest chunk; None reads it from ``cu_seqlens_q`` (a device sync).
        out: ``[Nq, Hq, D]`` tensor to write into; rows outside the chunks are left untouched.
        block_m, block_n, num_warps, num_stages: tuning knobs; None picks untuned defaults.
    Returns:
        ``out`` ``[Nq, Hq, D]`` in q's dtype.
    """
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or q.stride(-1) != 1:
        raise ValueError(f"q must be float32, float16 or bfloat16 with a contiguous last dim, got {q.dtype}")
    kq, vq, ks, kz = cache.kq[layer], cache.vq[layer], cache.k_scale[layer], cache.k_zero[layer]
    vs, vz, res = cache.v_scale[layer], cache.v_zero[layer], cache.residual[layer]
    _, num_heads, head_dim = q.shape
    num_kv_heads = ks.shape[1]
    if num_heads % num_kv_heads or ks.shape[2] != head_dim or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, cache keys [.., {num_kv_heads}, {ks.shape[2]}] "
                         "(head_dim must be a power of two >= 16)")
    batch = context_lens.shape[0]
    index = (block_tables, res_slots, cu_seqlens_q, context_lens)
    if any(t.dtype != torch.int32 for t in index):
        raise ValueError("block tables, residual slots, sequence offsets and lengths must be int32")
    if cu_seqlens_q.shape != (batch + 1,) or block_tables.shape[0] != batch or res_slots.shape != (batch,):
        raise ValueError(f"batch sizes do not match: cu_seqlens_q {tuple(cu_seqlens_q.shape)}, context_lens "
                         f"{tuple(context_lens.shape)}, block_tables {tuple(block_tables.shape)}, res_slots "
                         f"{tuple(res_slots.shape)}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
    if batch == 0 or max_query_len == 0:
        return out
    group = num_heads // num_kv_heads
    # Untuned: the paged kernel's H200 shape halved along keys, since the float32 dequantized K/V
    # tiles take registers beside the scores.
    wide = q.element_size() == 4 or head_dim > 128
    block_m = block_m or (64 if wide else 128)
    block_n = block_n or (32 if wide else 64)
    num_warps = num_warps or (4 if wide else 8)
    num_stages = num_stages or 2
    # Every row of a tile shares one KV head; tl.dot needs at least 16 along every dimension.
    block_m = max(block_m, triton.next_power_of_2(group), 16)
    if block_n < 16:
        raise ValueError("block_n must be at least 16 (tl.dot)")
    # Triton's float32 dot defaults to tf32 (~3e-4 relative error); float32 callers want float32.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_tables, res_slots = block_tables.contiguous(), res_slots.contiguous()
    cu_seqlens_q, context_lens = cu_seqlens_q.contiguous(), context_lens.contiguous()
    _kivi_prefill_kernel[(triton.cdiv(max_query_len, block_m // group), num_kv_heads, batch)](
        q, out, kq, vq, ks, kz, vs, vz, res, block_tables, res_slots, cu_seqlens_q, context_lens, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kq.stride(0), kq.stride(1), kq.stride(2), ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1), vs.stride(2),
        res.stride(0), res.stride(1), res.stride(2), res.stride(3), block_tables.stride(0),
        D=head_dim, GROUP=group, TOKENS=block_m // group, BS=cache.block_size, BITS=cache.bits,
        VGROUP=cache.value_group, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
