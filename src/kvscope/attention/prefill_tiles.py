"""The program structure every paged prefill kernel shares; only the K/V tile loader differs
(``triton_prefill``'s 16-bit and fp8 blocks, ``triton_kivi_prefill``'s KIVI codes).

A program serves one (query tile, KV head, sequence) of a varlen batch (``cu_seqlens_q``,
``context_lens``): ``BLOCK_M`` rows of ``TOKENS`` query tokens times the ``GROUP`` query heads of
its KV head, heavy (late) tiles first. Its keys split in two ranges: those before the tile's first
query position, visible to every row (no causal mask), and the tiles overlapping the chunk's
diagonal, masked causally. A kernel calls :func:`tile_bounds`, returns when the tile is past its
sequence's chunk, then :func:`query_rows` and :func:`key_ranges`, folds its key tiles with
:func:`fold_tile`, and stores with :func:`store_rows`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kvscope.attention.online_softmax import softmax_step


@triton.jit
def tile_bounds(cu_ptr, TOKENS: tl.constexpr):
    """This program's KV head and sequence, and where its tile's chunk starts: ``(kv_head, b,
    q_start, q_len, tok0)``; the tile holds no query when ``tok0 >= q_len`` (the grid is sized for
    the batch's longest chunk)."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # heavy (late) tiles first
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    return kv_head, b, q_start, q_len, tile * TOKENS


@triton.jit
def query_rows(q_ptr, lens_ptr, b, q_start, q_len, tok0, kv_head, stride_qt, stride_qh,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """The tile's queries ``q`` ``[BLOCK_M, D_PAD]`` and what locates its rows: ``(q, q_rows, heads,
    row_ok, pos, ctx, d, d_mask)``, ``pos`` ``[BLOCK_M]`` each row's position in its sequence of
    ``ctx`` cached tokens."""
    ctx = tl.load(lens_ptr + b)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    tok = tok0 + r // GROUP
    row_ok = (r < TOKENS * GROUP) & (tok < q_len)
    # Padding rows repeat the tile's last real token, so that every row has a finite maximum (no
    # NaN from an all-masked row) and every load stays in bounds; they are never stored.
    tok = tl.minimum(tok, tl.minimum(tok0 + TOKENS, q_len) - 1)
    heads = kv_head * GROUP + r % GROUP
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=d_mask[None, :], other=0.0)
    return q, q_rows, heads, row_ok, ctx - q_len + tok, ctx, d, d_mask


@triton.jit
def key_ranges(ctx, q_len, tok0, TOKENS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(unmasked_end, key_end)``: whole key tiles below ``unmasked_end`` are visible to every row
    of the tile (all below ``ctx``); tiles from there to ``key_end`` overlap the diagonal."""
    first_pos = ctx - q_len + tok0
    return (first_pos + 1) // BLOCK_N * BLOCK_N, ctx - q_len + tl.minimum(tok0 + TOKENS, q_len)


@triton.jit
def fold_tile(acc, l, m, q, k, v, t, pos, qk_scale, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold a tile of keys ``t`` ``[BLOCK_N]`` (K and V ``[BLOCK_N, D_PAD]`` in q's dtype) into the
    running ``(acc, l, m)`` of the rows ``q`` ``[BLOCK_M, D_PAD]``; with ``CAUSAL`` row ``r`` sees only
    keys ``t <= pos[r]``. Returns the updated ``acc`` ``[BLOCK_M, D_PAD]``, ``l`` and ``m`` ``[BLOCK_M]``."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if CAUSAL:
        s = tl.where(t[None, :] <= pos[:, None], s, float("-inf"))
    # Key 0 is visible to every row and is in the first tile, as softmax_step needs.
    p, alpha, l, m = softmax_step(s, m, l)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l, m


@triton.jit
def store_rows(o_ptr, out, q_rows, heads, row_ok, d, d_mask, stride_ot, stride_oh):
    """Store the tile's real rows of ``out`` ``[BLOCK_M, D_PAD]`` (float32) in the output's dtype."""
    tl.store(o_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
