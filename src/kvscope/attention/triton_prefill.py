"""Paged prefill (and chunked-prefill) attention in Triton: variable-length causal chunks over a
block-table KV cache.

Layout: the same as :mod:`kvscope.attention.triton_decode`. ``kv[layer, 0].view(num_blocks,
block_size, Hkv, D)`` is the K cache, ``kv[layer, 1]`` likewise V; sequence ``b``'s token ``t`` lives
in block ``block_tables[b, t // block_size]`` at offset ``t % block_size``. The chunk's own K/V must
already be written (the engine writes a step's K/V before attending).

Queries are flattened like the engine's step batch: sequence ``b``'s ``n_b`` new tokens are rows
``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` of ``q``. With ``T_b = context_lens[b]`` tokens cached
(the chunk included), query token ``j`` sits at position ``T_b - n_b + j`` and attends to keys
``0 .. T_b - n_b + j``: everything cached before the chunk, and the chunk causally.

Design (prefill is bound by arithmetic, unlike decode):

* **Grouped-query rows.** One program serves one (query tile, KV head, sequence). Its ``BLOCK_M``
  rows are ``BLOCK_M // G`` query tokens times the ``G = Hq // Hkv`` query heads of that KV head,
  so each K/V tile is loaded once for the whole group and feeds one ``[BLOCK_M, BLOCK_N]``
  tensor-core product. When ``G`` does not divide ``BLOCK_M`` the few leftover rows are padding.
* **Two key ranges.** Keys before the tile's first query position are visible to every row and
  need no causal mask; only the last few key tiles, which overlap the chunk's diagonal, are masked.
* **Online softmax in float32**, base 2 (``exp2`` with ``log2(e)`` folded into the scale).
* **Heavy tiles first.** Later query tiles attend to more keys; programs run roughly in launch
  order, so the grid hands out the last tiles first and the short ones fill in the tail.
* **Log-sum-exp on request.** ``lse_out`` receives each row's softmax normaliser (natural log),
  which :mod:`kvscope.attention.triton_prefill_colsum` needs to recompute the probabilities; a
  constexpr flag keeps the store out of the kernel compiled without it.

:func:`fp8_paged_prefill_attention` runs the same kernel over ``quant``'s fp8 cache
(:class:`~kvscope.kv.quant_cache.FP8Cache`): uint8 codes of float8_e4m3fn, one float32 scale per KV
head for K and for V. The codes are decoded in registers (:func:`kvscope.attention.fp8_codes.fp8_to_f16`)
to values exact in the query's dtype, so they feed ``tl.dot`` unscaled: a program serves one KV
head, whose K scale multiplies the score scale and whose V scale the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvscope.attention.fp8_codes import fp8_to_f16
from kvscope.attention.paged_inputs import check_paged_inputs, check_varlen_batch
from kvscope.attention.prefill_tiles import fold_tile, key_ranges, query_rows, store_rows, tile_bounds

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _attend_tile(
    acc, l, m, q, t, ctx, pos,
    k_base, v_base, table_ptr, qk_scale,
    stride_kblk, stride_ktok, stride_vblk, stride_vtok,
    d, d_mask,
    PAGE: tl.constexpr, CAUSAL: tl.constexpr, FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys ``t`` ``[BLOCK_N]`` into the running ``(acc, l, m)`` of the rows ``q``.

    With ``CAUSAL`` row ``r`` sees only keys ``t <= pos[r]``; without it every key is visible.
    With ``FP8`` the cache holds e4m3 codes, decoded here unscaled (the caller applies the scales).
    Returns the updated ``acc`` ``[BLOCK_M, D_PAD]``, ``l`` and ``m`` ``[BLOCK_M]``.
    """
    key_ok = t < ctx
    # int64: a pool of several GiB has element offsets beyond 2**31.
    block = tl.load(table_ptr + t // PAGE, mask=key_ok, other=0).to(tl.int64)
    offset = t % PAGE
    kv_mask = key_ok[:, None] & d_mask[None, :]
    k = tl.load(
        k_base + block[:, None] * stride_kblk + offset[:, None] * stride_ktok + d[None, :], mask=kv_mask, other=0
    )
    v = tl.load(
        v_base + block[:, None] * stride_vblk + offset[:, None] * stride_vtok + d[None, :], mask=kv_mask, other=0
    )
    if FP8:
        k = fp8_to_f16(k.to(tl.int32)).to(q.dtype)
        v = fp8_to_f16(v.to(tl.int32)).to(q.dtype)
    return fold_tile(acc, l, m, q, k, v, t, pos, qk_scale, CAUSAL, DOT_PRECISION)


@triton.jit(do_not_specialize=["stride_tb"])  # varies per step: a compile per new class
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tables_ptr, cu_ptr, lens_ptr, ks_ptr, vs_ptr,
    qk_scale,
    stride_qt, stride_qh,
    stride_kblk, stride_ktok, stride_kh,
    stride_vblk, stride_vtok, stride_vh,
    stride_ot, stride_oh,
    stride_lt, stride_lh,
    stride_tb,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    GROUP: tl.constexpr, TOKENS: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP8: tl.constexpr, DOT_PRECISION: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """One (query tile, KV head, sequence) (:mod:`kvscope.attention.prefill_tiles`).
    ``ks_ptr``/``vs_ptr``: the ``[Hkv]`` float32 scales of fp8 codes (read only with ``FP8``).
    With ``STORE_LSE`` also each real row's natural-log log-sum-exp to ``lse_ptr`` ``[Nq, Hq]``."""
    kv_head, b, q_start, q_len, tok0 = tile_bounds(cu_ptr, TOKENS)
    if tok0 >= q_len:
        return
    q, q_rows, heads, row_ok, pos, ctx, d, d_mask = query_rows(
        q_ptr, lens_ptr, b, q_start, q_len, tok0, kv_head, stride_qt, stride_qh, HEAD_DIM, D_PAD, GROUP, TOKENS, BLOCK_M)
    if FP8:  # the head's scales are scalars of the program, not a multiply per decoded element
        qk_scale = qk_scale * tl.load(ks_ptr + kv_head)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    table_ptr = tables_ptr + b * stride_tb
    n = tl.arange(0, BLOCK_N)
    unmasked_end, key_end = key_ranges(ctx, q_len, tok0, TOKENS, BLOCK_N)
    for start in range(0, unmasked_end, BLOCK_N):
        acc, l, m = _attend_tile(
            acc, l, m, q, start + n, ctx, pos, k_base, v_base, table_ptr, qk_scale,
            stride_kblk, stride_ktok, stride_vblk, stride_vtok, d, d_mask,
            PAGE=PAGE, CAUSAL=False, FP8=FP8, DOT_PRECISION=DOT_PRECISION,
        )
    for start in range(unmasked_end, key_end, BLOCK_N):
        acc, l, m = _attend_tile(
            acc, l, m, q, start + n, ctx, pos, k_base, v_base, table_ptr, qk_scale,
            stride_kblk, stride_ktok, stride_vblk, stride_vtok, d, d_mask,
            PAGE=PAGE, CAUSAL=True, FP8=FP8, DOT_PRECISION=DOT_PRECISION,
        )

    out = acc / l[:, None]
    if FP8:
        out = out * tl.load(vs_ptr + kv_head)
    store_rows(o_ptr, out, q_rows, heads, row_ok, d, d_mask, stride_ot, stride_oh)
    if STORE_LSE:
        # m and log2(l) are in units of the base-2 scores; natural log is the convention of
        # torch.logsumexp and flash attention.
        tl.store(lse_ptr + q_rows * stride_lt + heads * stride_lh, (m + tl.log2(l)) * _LN2, mask=row_ok)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    max_query_len: int | None = None,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged K/V (chunk included).

    Args:
        q: ``[Nq, Hq, D]`` float32, float16 or bfloat16 (the cache's dtype), last dim contiguous;
            sequence ``b``'s rows are ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]``.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]`` (or the flat ``[num_slots, Hkv, D]``),
            last dim contiguous; ``Hq`` must be a multiple of ``Hkv``.
        block_tables: ``[B, max_blocks]`` int32 block ids; entries past a sequence's last block are
            never read.
        cu_seqlens_q: ``[B + 1]`` int32 row offsets, non-decreasing (an empty chunk is allowed).
        context_lens: ``[B]`` int32 tokens cached per sequence after writing the chunk, each at
            least the chunk's length and at most ``max_blocks * block_size``.
        scale: softmax scale (``D ** -0.5`` for every supported family).
        block_size: tokens per block.
        max_query_len: the longest chunk; None reads it from ``cu_seqlens_q`` (a device sync).
        out: ``[Nq, Hq, D]`` tensor to write into (e.g. a slice of a larger output); rows outside
            the chunks are left untouched.
        block_m, block_n, num_warps, num_stages: tuning knobs (query rows and keys per tile, warps
            per program, software-pipelining depth); None picks the defaults tuned on an H100.
        lse_out: ``[Nq, Hq]`` float32 to receive each chunk row's log-sum-exp, natural log, of its
            scaled scores ``scale * q.k`` over the keys it sees (the softmax's normaliser:
            ``p = exp(scale * q.k - lse)``); rows outside the chunks are left untouched.
    Returns:
        ``out`` ``[Nq, Hq, D]`` in q's dtype.
    """
    k_cache, v_cache = check_paged_inputs(q, k_cache, v_cache, block_size, block_tables, cu_seqlens_q, context_lens)
    return _launch(q, k_cache, v_cache, None, block_tables, cu_seqlens_q, context_lens, scale, block_size,
                   max_query_len, out, block_m, block_n, num_warps, num_stages, lse_out)


def fp8_paged_prefill_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    max_query_len: int | None = None,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """:func:`paged_prefill_attention` over fp8 codes: keys ``k_codes * k_scale``, values
    ``v_codes * v_scale`` (per KV head), dequantized in registers.

    Args:
        q: ``[Nq, Hq, D]`` float32, float16 or bfloat16, last dim contiguous.
        k_codes, v_codes: ``[num_slots, Hkv, D]`` (or ``[num_blocks, block_size, Hkv, D]``) uint8
            holding float8_e4m3fn bits, last dim contiguous.
        k_scale, v_scale: ``[Hkv]`` float32 scales (a per-tensor scale repeated per head).
        The rest as in :func:`paged_prefill_attention`.
    Returns:
        ``out`` ``[Nq, Hq, D]`` in q's dtype.
    """
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    k_codes, v_codes = check_paged_inputs(q, k_codes, v_codes, block_size, block_tables, cu_seqlens_q,
                                          context_lens, cache_dtype=torch.uint8)
    num_kv_heads = k_codes.shape[2]
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s.shape != (num_kv_heads,) or s.dtype != torch.float32 or s.stride(0) != 1:
            raise ValueError(f"{name} must be [{num_kv_heads}] float32 and contiguous, got "
                             f"{tuple(s.shape)} {s.dtype}")
    return _launch(q, k_codes, v_codes, (k_scale, v_scale), block_tables, cu_seqlens_q, context_lens, scale,
                   block_size, max_query_len, out, block_m, block_n, num_warps, num_stages)


def tile_config(q: torch.Tensor, group: int, block_m: int | None, block_n: int | None, num_warps: int | None,
                num_stages: int | None) -> tuple[int, int, int, int, str]:
    """``(block_m, block_n, num_warps, num_stages, dot_precision)`` of a prefill-shaped launch over
    ``q`` ``[Nq, Hq, D]`` with ``group`` query heads per KV head; a None knob takes its default."""
    # Tuned on an H200 at Llama-3-8B shapes (benchmarks/gpu/NOTES.md): 16-bit takes 128 x 128 tiles,
    # 8 warps and 3 stages. Float32 (twice the bytes per element) and head dims above 128 take
    # smaller tiles so that q and the pipelined K/V tiles fit in shared memory (228 KB on Hopper).
    # fp8 codes take the same (untuned: their K/V tiles are half a 16-bit one's bytes).
    wide = q.element_size() == 4 or q.shape[2] > 128
    if block_m is None:
        block_m = 64 if wide else 128
    if block_n is None:
        block_n = 32 if wide else 128
    if num_warps is None:
        num_warps = 4 if wide else 8
    if num_stages is None:
        num_stages = 2 if wide else 3
    # Every row of a tile shares one KV head, so a tile holds at least one token's whole group;
    # tl.dot needs at least 16 along every dimension.
    block_m = max(block_m, triton.next_power_of_2(group), 16)
    if block_n < 16:
        raise ValueError("block_n must be at least 16 (tl.dot)")
    # Triton's float32 dot defaults to tf32 (~3e-4 relative error); float32 callers want float32.
    return block_m, block_n, num_warps, num_stages, "ieee" if q.dtype == torch.float32 else "tf32"


def _launch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None,
    block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
    block_size: int, max_query_len: int | None, out: torch.Tensor | None, block_m: int | None,
    block_n: int | None, num_warps: int | None, num_stages: int | None, lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The launch both entry points share, on checked block views ``[num_blocks, block_size, Hkv, D]``;
    ``scales``: (fp8) the ``[Hkv]`` K and V scales, None for a cache in q's dtype."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    batch = context_lens.shape[0]
    check_varlen_batch(cu_seqlens_q, context_lens, block_tables)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    if lse_out is not None and (lse_out.shape != q.shape[:2] or lse_out.dtype != torch.float32):
        raise ValueError(f"lse_out must be {tuple(q.shape[:2])} float32, got {tuple(lse_out.shape)} {lse_out.dtype}")
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
    if batch == 0 or max_query_len == 0:
        return out
    group = num_heads // num_kv_heads

    block_m, block_n, num_warps, num_stages, precision = tile_config(q, group, block_m, block_n, num_warps,
                                                                     num_stages)
    tokens = block_m // group
    block_tables = block_tables.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous()
    context_lens = context_lens.contiguous()
    # Without fp8 the scale pointers are never read: any tensor stands in.
    k_scale, v_scale = scales if scales is not None else (context_lens, context_lens)
    # Without lse_out the pointer is never dereferenced (STORE_LSE is off).
    lse = lse_out if lse_out is not None else context_lens
    lse_strides = (lse_out.stride(0), lse_out.stride(1)) if lse_out is not None else (0, 0)

    _prefill_kernel[(triton.cdiv(max_query_len, tokens), num_kv_heads, batch)](
        q, k_cache, v_cache, out, lse, block_tables, cu_seqlens_q, context_lens, k_scale, v_scale,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        *lse_strides,
        block_tables.stride(0),
        HEAD_DIM=head_dim, D_PAD=max(triton.next_power_of_2(head_dim), 16),
        GROUP=group, TOKENS=tokens,
        PAGE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        FP8=scales is not None, DOT_PRECISION=precision, STORE_LSE=lse_out is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
