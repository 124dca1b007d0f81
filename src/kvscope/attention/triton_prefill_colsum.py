"""Column sums of causal paged prefill attention in Triton: H2O's prefill statistic.

For each sequence ``b`` of a varlen prefill batch (the layout of
:mod:`kvscope.attention.triton_prefill`: rows ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` of ``q``, a
chunk of ``n`` tokens of which token ``j`` sits at position ``T - n + j`` of ``T = context_lens[b]``
cached tokens and sees keys ``0 .. T - n + j``), KV head ``h`` and cached token ``t``::

    colsum[b, h, t] = sum over the chunk's rows j and the query heads g of h's group of P[j, g, t]

with ``P`` the softmax probabilities of the prefill. No ``[heads, n, T]`` matrix is materialised:
the prefill kernel stores each row's log-sum-exp (``lse_out``), and this kernel recomputes the
scores tile by tile and turns them into probabilities with it, ``P = exp(scale * q.k - lse)``.

Design: one program per (key tile, KV head, sequence) keeps its ``BLOCK_N`` keys in registers and
streams the query tiles that can see them (the chunk's tokens from ``t - (T - n)`` on; earlier
tiles are skipped), ``BLOCK_M`` rows of ``TOKENS`` tokens times the group's ``G`` query heads, as
in the prefill kernel. Scores go through tensor-core ``tl.dot`` in the input dtype (float32: ieee),
probabilities accumulate in float32 element-wise over the tiles and are reduced over the rows once
at the end. Only the query tiles overlapping the key tile's diagonal need the causal mask. Early
key tiles are seen by the most rows, and the grid hands them out first.

With ``fold_scores`` (``[num_slots, Hkv]`` float32, a layer's per-slot scores) the sums are added to
the score of each key's slot (``block_tables[b, t // block_size] * block_size + t % block_size``)
in place: a program owns its keys' entries, so no atomics are needed as long as no slot appears
twice among the batch's cached tokens (true of an evicting strategy's slots).

Cost beside the prefill: one more ``q.k`` product and an ``exp2`` per visible (query, key) pair,
no ``P @ V``: about half the prefill's arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvscope.attention.paged_inputs import check_fold_scores, check_paged_inputs, check_varlen_batch
from kvscope.attention.prefill_tiles import query_rows
from kvscope.attention.triton_prefill import paged_prefill_attention, tile_config

_LOG2E = 1.4426950408889634
_LOG2E_C = tl.constexpr(_LOG2E)


@triton.jit
def _add_query_tile(
    acc, k, t, q_ptr, lse_ptr, lens_ptr, b, q_start, q_len, tok0, kv_head, qk_scale,
    stride_qt, stride_qh, stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr,
    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Add the probabilities of the query tile starting at token ``tok0`` for the keys ``t``
    ``[BLOCK_N]`` (``k`` ``[BLOCK_N, D_PAD]``) to ``acc`` ``[BLOCK_M, BLOCK_N]``; with ``CAUSAL``
    row ``r`` sees only keys ``t <= pos[r]``. Padding rows add nothing."""
    q, q_rows, heads, row_ok, pos, _, _, _ = query_rows(
        q_ptr, lens_ptr, b, q_start, q_len, tok0, kv_head, stride_qt, stride_qh, HEAD_DIM, D_PAD, GROUP, TOKENS,
        BLOCK_M)
    # Padding rows repeat a real row (query_rows), so their log-sum-exp was stored too.
    lse = tl.load(lse_ptr + q_rows * stride_lt + heads * stride_lh) * _LOG2E_C
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    visible = row_ok[:, None]
    if CAUSAL:
        visible = visible & (t[None, :] <= pos[:, None])
    # Masked before exp2: an invisible score may be far above the row's log-sum-exp.
    s = tl.where(visible, s, float("-inf"))
    return acc + tl.exp2(s - lse[:, None])


@triton.jit(do_not_specialize=["num_tokens", "stride_tb"])  # varies per step: a compile per new class
def _colsum_kernel(
    q_ptr, k_ptr, lse_ptr, tables_ptr, cu_ptr, lens_ptr, out_ptr,
    qk_scale, num_tokens,
    stride_qt, stride_qh,
    stride_kblk, stride_ktok, stride_kh,
    stride_lt, stride_lh,
    stride_tb,
    stride_ob, stride_oh, stride_fs,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    GROUP: tl.constexpr, TOKENS: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FOLD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (key tile, KV head, sequence): the column sums of its ``BLOCK_N`` keys, added to
    ``out_ptr``'s ``[num_slots, Hkv]`` scores (``FOLD``) or stored to its ``[B, Hkv, num_tokens]``
    sums (which the caller zeroed: programs past a sequence's context store nothing)."""
    k0 = tl.program_id(0) * BLOCK_N  # early key tiles (the most rows) first
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    ctx = tl.load(lens_ptr + b)
    if (k0 >= ctx) | (q_len == 0):
        return
    t = k0 + tl.arange(0, BLOCK_N)
    key_ok = t < ctx
    d = tl.arange(0, D_PAD)
    # int64: a pool of several GiB has element offsets beyond 2**31.
    block = tl.load(tables_ptr + b * stride_tb + t // PAGE, mask=key_ok, other=0).to(tl.int64)
    offset = t % PAGE
    k = tl.load(k_ptr + kv_head * stride_kh + block[:, None] * stride_kblk + offset[:, None] * stride_ktok
                + d[None, :], mask=key_ok[:, None] & (d < HEAD_DIM)[None, :], other=0)

    # Chunk token j sits at position prefix + j: it sees key k0 from j = k0 - prefix on, and the
    # whole tile from j = k0 + BLOCK_N - 1 - prefix on (never, for a tile reaching past ctx).
    prefix = ctx - q_len
    first = tl.maximum(k0 - prefix, 0)
    full = tl.minimum(tl.maximum(k0 + BLOCK_N - 1 - prefix, first), q_len)
    masked_end = first + tl.cdiv(full - first, TOKENS) * TOKENS
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for tok0 in range(first, masked_end, TOKENS):
        acc = _add_query_tile(
            acc, k, t, q_ptr, lse_ptr, lens_ptr, b, q_start, q_len, tok0, kv_head, qk_scale,
            stride_qt, stride_qh, stride_lt, stride_lh,
            HEAD_DIM, D_PAD, GROUP, TOKENS, BLOCK_M, CAUSAL=True, DOT_PRECISION=DOT_PRECISION)
    for tok0 in range(masked_end, q_len, TOKENS):
        acc = _add_query_tile(
            acc, k, t, q_ptr, lse_ptr, lens_ptr, b, q_start, q_len, tok0, kv_head, qk_scale,
            stride_qt, stride_qh, stride_lt, stride_lh,
            HEAD_DIM, D_PAD, GROUP, TOKENS, BLOCK_M, CAUSAL=False, DOT_PRECISION=DOT_PRECISION)
    colsum = tl.sum(acc, axis=0)  # keys at or past ctx were masked: 0

    if FOLD:
        score = out_ptr + (block * PAGE + offset) * stride_fs + kv_head
        tl.store(score, tl.load(score, mask=key_ok, other=0.0) + colsum, mask=key_ok)
    else:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + kv_head * stride_oh + t, colsum, mask=t < num_tokens)


def prefill_column_sums(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    block_size: int,
    max_context_len: int | None = None,
    *,
    fold_scores: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Per sequence, KV head and cached token, the prefill's attention probabilities summed over the
    chunk's rows and the KV head's query heads (see the module docstring).

    Args:
        q, k_cache, block_tables, cu_seqlens_q, context_lens, scale, block_size: as for
            :func:`~kvscope.attention.triton_prefill.paged_prefill_attention` (``k_cache``
            ``[num_blocks, block_size, Hkv, D]`` or ``[num_slots, Hkv, D]``).
        lse: ``[Nq, Hq]`` float32, each chunk row's natural-log log-sum-exp (that function's
            ``lse_out``).
        max_context_len: the largest ``context_lens``; None reads it from the device (a sync).
        fold_scores: ``[num_slots, Hkv]`` float32 with contiguous heads: add each cached token's sum
            to its slot's row in place instead of returning the sums. A slot must not appear twice
            among the batch's cached tokens.
        block_m, block_n, num_warps, num_stages: tuning knobs (query rows and keys per tile, warps
            per program, software-pipelining depth); None picks defaults (untuned: the prefill's).
    Returns:
        ``fold_scores``, or the sums ``[B, Hkv, max_context_len]`` float32, 0 past each context.
    """
    k_cache, _ = check_paged_inputs(q, k_cache, k_cache, block_size, block_tables, cu_seqlens_q, context_lens)
    nq, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    batch = context_lens.shape[0]
    check_varlen_batch(cu_seqlens_q, context_lens, block_tables)
    if lse.shape != (nq, num_heads) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be [{nq}, {num_heads}] float32, got {tuple(lse.shape)} {lse.dtype}")
    if fold_scores is not None:
        check_fold_scores(fold_scores, num_kv_heads)
    if max_context_len is None:
        max_context_len = int(context_lens.max()) if batch else 0
    fold = fold_scores is not None
    out = fold_scores if fold else torch.zeros(batch, num_kv_heads, max_context_len, dtype=torch.float32,
                                               device=q.device)
    if batch == 0 or max_context_len == 0:
        return out
    group = num_heads // num_kv_heads

    # The prefill kernel's tiles, not tuned apart (benchmarks/gpu/prefill_statistic.py --tune
    # sweeps them): no [BLOCK_M, D] accumulator here, but a [BLOCK_M, BLOCK_N] float32 one instead.
    block_m, block_n, num_warps, num_stages, precision = tile_config(q, group, block_m, block_n, num_warps,
                                                                     num_stages)
    block_tables = block_tables.contiguous()

    _colsum_kernel[(triton.cdiv(max_context_len, block_n), num_kv_heads, batch)](
        q, k_cache, lse, block_tables, cu_seqlens_q.contiguous(), context_lens.contiguous(), out,
        scale * _LOG2E, max_context_len,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        lse.stride(0), lse.stride(1),
        block_tables.stride(0),
        0 if fold else out.stride(0), 0 if fold else out.stride(1), out.stride(0) if fold else 0,
        HEAD_DIM=head_dim, D_PAD=max(triton.next_power_of_2(head_dim), 16),
        GROUP=group, TOKENS=block_m // group,
        PAGE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        FOLD=fold, DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_prefill_with_column_sums(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    *,
    out: torch.Tensor | None = None,
    fold_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill's output and its column sums: :func:`paged_prefill_attention` with ``lse_out``,
    then :func:`prefill_column_sums`. Arguments as theirs.

    Returns:
        ``(out [Nq, Hq, D], fold_scores)`` or, without ``fold_scores``, ``(out, sums [B, Hkv, max_context_len])``.
    """
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    out = paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, block_size,
                                  max_query_len, out=out, lse_out=lse)
    sums = prefill_column_sums(q, k_cache, block_tables, cu_seqlens_q, context_lens, lse, scale, block_size,
                               max_context_len, fold_scores=fold_scores)
    return out, sums
