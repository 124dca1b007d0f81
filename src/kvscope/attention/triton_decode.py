"""Paged decode attention in Triton: one query token per sequence over a block-table KV cache.

Layout (the engine's ``SlotKVCache``): ``kv[layer, 0]`` is ``[num_slots, Hkv, D]`` with
``slot = block_id * block_size + offset``, so ``kv[layer, 0].view(num_blocks, block_size, Hkv, D)``
is the K cache this module reads, and ``kv[layer, 1]`` likewise the V cache. Sequence ``b``'s token
``t`` lives at ``block_tables[b, t // block_size]``, offset ``t % block_size``.

Decode is memory bound: each step reads every cached K and V byte once and does about two
multiply-adds per byte. Hence the design:

* **Grouped-query.** One program serves one (sequence, KV head, split) and all ``G = Hq // Hkv``
  query heads that share that KV head, so every K/V tile is read from memory once per group, not
  once per query head.
* **Flash-decoding.** With few sequences, ``B * Hkv`` programs cannot keep the memory system busy,
  so each sequence's tokens are cut into ``num_splits`` contiguous ranges handled by separate
  programs. Each writes its normalised partial output and log-sum-exp to a workspace, and a small
  second kernel merges the splits. With one split the first kernel writes the output directly.
* **Online softmax in float32**, in base 2: the softmax scale is multiplied by ``log2(e)`` once so
  that the inner loop uses ``exp2``.
* **Scores.** ``[G, BLOCK_N]`` scores through ``tl.dot`` with the group padded to 16 rows (tensor
  cores; the padding rows are wasted, but the kernel is bound by memory, not arithmetic), or, with
  ``use_dot=False``, by a broadcast multiply-and-sum on the CUDA cores (no padding, no minimum
  tile). The default is ``tl.dot``: on an H100 at G = 4 the broadcast form, whose ``[G, BLOCK_N,
  D]`` product needs many registers, ran 4-5x slower (benchmarks/gpu/NOTES.md).

H2O statistic (``emit_colsum=True``): per (sequence, KV head, token) the sum over the group's
query heads of the softmax probabilities. The probabilities need the final max and sum-exp, known
only after the last split, so the main pass also stores the scaled logits ``[B, Hq, Tcap]``
(float32) and a third kernel turns them into probabilities with the merged log-sum-exp and sums
them over the group. Extra traffic per token and KV head: ``G * 4`` bytes of logits written,
read back, and 4 bytes of column sum written, i.e. ``(8 G + 4)`` bytes beside the ``4 D`` bytes of
bf16 K and V read: 36 / 512 = 7% for Llama-3-8B (G = 4, D = 128). A second pass over K instead
would add ``2 D`` bytes (50%). Measured on an H100 the statistic costs 13-15% at 1 GB of KV: the
logits stores slow the main kernel by 9%, more than their 3% of the bytes, and the third kernel
adds 20 us per GB of KV.

With ``fold_scores`` (a layer's per-slot scores ``[num_slots, Hkv]``, heads contiguous) the third
kernel adds each held token's sums to its slot's row in place instead. There one program serves
a token tile of one sequence for every KV head, so that it reads and writes whole rows (``4 Hkv``
contiguous bytes, one 32-byte sector at Hkv = 8). The first version had one program per KV head,
whose read-modify-write touched 4 bytes of every sector: on an H100 at Llama-3.1-8B shapes (32
layers) it cost 1.07 ms per decode step at 64 sequences x 1024 tokens and 0.42 ms at 16 x 4096,
more than the statistic's extra cost in the attention kernel. Kernel alone, 32 layers' distinct
buffers per step, H100: 427 -> 227 us at 64 x 1024 and 421 -> 228 us at 16 x 4096 (the same bytes
at copy bandwidth: 133 us). Tiles of 64 to 256 tokens with 2 to 16 warps were within 5%; fewer
than 16 logits per thread (32 tokens at 4 warps, 64 at 8) ran up to 3x slower.
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
from kvscope.attention.online_softmax import softmax_step
from kvscope.attention.paged_inputs import check_fold_scores, check_paged_inputs

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["stride_tb", "stride_lb", "stride_gb"])  # vary per step: a compile per new class
def _split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr,
    o_ptr, lse_ptr, logits_ptr,
    qk_scale, num_splits,
    stride_qb, stride_qh,
    stride_kblk, stride_ktok, stride_kh,
    stride_vblk, stride_vtok, stride_vh,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_gb, stride_gh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    GROUP: tl.constexpr, G_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EMIT_LOGITS: tl.constexpr,
):
    """One (sequence, KV head, split): attention of the group's ``G`` query heads over the split.

    Writes ``o[b, h, split, :]`` (the split's softmax-normalised output, or the final output when
    there is one split) and ``lse[b, h, split]`` (base-2 log-sum-exp of the split's scaled logits;
    ``-inf`` for an empty split), for the group's heads ``h``. With ``EMIT_LOGITS`` also
    ``logits[b, h, t]`` for the split's tokens ``t`` (scaled, base 2).
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(lens_ptr + b)
    lo, hi = split_bounds(ctx, num_splits, split, BLOCK_N)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if not USE_DOT:
        q = q.to(tl.float32)

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    for start in range(lo, hi, BLOCK_N):
        t = start + n
        t_mask = t < hi
        # int64: a pool of several GiB has element offsets beyond 2**31.
        block = tl.load(tables_ptr + b * stride_tb + t // PAGE, mask=t_mask, other=0).to(tl.int64)
        offset = t % PAGE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_base + block[:, None] * stride_kblk + offset[:, None] * stride_ktok + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_base + block[:, None] * stride_vblk + offset[:, None] * stride_vtok + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))
        if EMIT_LOGITS:
            tl.store(
                logits_ptr + b * stride_gb + heads[:, None] * stride_gh + t[None, :],
                s,
                mask=g_mask[:, None] & t_mask[None, :],
            )
        # The first tile always holds a valid token (lo < hi), as softmax_step needs.
        p, alpha, l, m = softmax_step(s, m, l)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv

    # An empty split (a sequence shorter than the others' splits) contributes weight zero.
    out, lse = split_result(m, l, acc)
    tl.store(
        o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :],
        out,
        mask=g_mask[:, None] & d_mask[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _colsum_kernel(
    logits_ptr, lse_ptr, lens_ptr, colsum_ptr,
    num_tokens,
    stride_gb, stride_gh,
    stride_lb, stride_lh,
    stride_cb, stride_ch,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One (sequence, KV head, token tile): ``colsum[b, kv, t] = sum_g 2^(logit[b, h_g, t] - lse[b, h_g])``.

    ``colsum`` is ``[B, Hkv, num_tokens]`` (``num_tokens`` the table's capacity); tokens at or past
    the sequence's length get 0.
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.arange(0, G_PAD)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    ctx = tl.load(lens_ptr + b)
    lse = tl.load(lse_ptr + b * stride_lb + heads * stride_lh, mask=g_mask, other=0.0)
    logits = tl.load(
        logits_ptr + b * stride_gb + heads[:, None] * stride_gh + t[None, :],
        mask=g_mask[:, None] & (t < ctx)[None, :],
        other=float("-inf"),
    )
    colsum = tl.sum(tl.exp2(logits - lse[:, None]), axis=0)
    tl.store(colsum_ptr + b * stride_cb + kv_head * stride_ch + t, colsum, mask=t < num_tokens)


@triton.jit(do_not_specialize=["stride_tb"])  # varies per step: a compile per new class
def _fold_kernel(
    logits_ptr, lse_ptr, lens_ptr, tables_ptr, scores_ptr,
    stride_gb, stride_gh,
    stride_lb, stride_lh,
    stride_tb, stride_ss,
    KV_HEADS: tl.constexpr, KV_PAD: tl.constexpr,
    GROUP: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, PAGE: tl.constexpr,
):
    """One (sequence, token tile), every KV head: ``scores[slot(b, t), kv] += sum_g 2^(logit[b, kv * G
    + g, t] - lse[b, kv * G + g])`` for the tile's tokens ``t < context_lens[b]``.

    ``scores`` is ``[num_slots, Hkv]`` with contiguous heads and ``slot(b, t) = tables[b, t // PAGE]
    * PAGE + t % PAGE``; other slots, and tokens at or past the length, are not touched. A slot
    belongs to one sequence and a token to one tile, so a (slot, head) to one program: no atomics.
    The update is one ``[BLOCK_T, KV_PAD]`` tile whose rows are a slot's ``Hkv`` contiguous floats
    (one 32-byte sector at Hkv = 8): a program per KV head would touch 4 bytes per sector.
    """
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    kv = tl.arange(0, KV_PAD)
    g = tl.arange(0, G_PAD)
    ctx = tl.load(lens_ptr + b)
    held = t < ctx
    kv_mask = kv < KV_HEADS
    heads = kv[:, None] * GROUP + g[None, :]  # [KV_PAD, G_PAD] query heads
    head_mask = kv_mask[:, None] & (g < GROUP)[None, :]
    lse = tl.load(lse_ptr + b * stride_lb + heads * stride_lh, mask=head_mask, other=0.0)
    # [BLOCK_T, KV_PAD, G_PAD]; padding lanes and unheld tokens read -inf, i.e. probability 0.
    logits = tl.load(
        logits_ptr + b * stride_gb + heads[None, :, :] * stride_gh + t[:, None, None],
        mask=held[:, None, None] & head_mask[None, :, :],
        other=float("-inf"),
    )
    colsum = tl.sum(tl.exp2(logits - lse[None, :, :]), axis=2)  # [BLOCK_T, KV_PAD]
    # int64: a pool of several GiB has element offsets beyond 2**31.
    block = tl.load(tables_ptr + b * stride_tb + t // PAGE, mask=held, other=0).to(tl.int64)
    score = scores_ptr + (block * PAGE + t % PAGE)[:, None] * stride_ss + kv[None, :]
    mask = held[:, None] & kv_mask[None, :]
    tl.store(score, tl.load(score, mask=mask, other=0.0) + colsum, mask=mask)


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and workspace buffer comes from here (tests poison them through this seam)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_size: int,
    num_splits: int | None = None,
    *,
    emit_colsum: bool = False,
    fold_scores: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one new token per sequence over its paged K/V.

    Args:
        q: ``[B, Hq, D]`` float32, float16 or bfloat16 (the cache's dtype), last dim contiguous.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]`` (or the flat ``[num_slots, Hkv, D]``),
            last dim contiguous; ``Hq`` must be a multiple of ``Hkv``.
        block_tables: ``[B, max_blocks]`` int32 block ids; entries past a sequence's last block are
            never read.
        context_lens: ``[B]`` int32 tokens per sequence, each in ``1 .. max_blocks * block_size``.
        scale: softmax scale (``D ** -0.5`` for every supported family).
        block_size: tokens per block.
        num_splits: sequence splits per (sequence, KV head); None picks
            :func:`default_num_splits`. Any value is correct, including more splits than tiles.
        emit_colsum: also return the H2O statistic (see the module docstring for its cost).
        fold_scores: ``[num_slots, Hkv]`` float32 (a layer's per-slot scores, contiguous heads): add
            the H2O statistic of every held token to its slot's score in place, instead of
            returning it (no ``[B, Hkv, capacity]`` tensor, and only held tokens are touched).
        block_n, num_warps, num_stages: tuning knobs (tokens per tile, warps per program,
            software-pipelining depth); None picks the defaults tuned on an H100.
        use_dot: scores and ``P @ V`` through ``tl.dot`` (tensor cores) rather than broadcast
            multiply-and-sum (see the module docstring).
    Returns:
        ``out`` ``[B, Hq, D]`` in q's dtype; with ``emit_colsum`` also ``colsum``
        ``[B, Hkv, max_blocks * block_size]`` float32, the sum over each KV head's query heads of the
        softmax probability of every token, 0 past ``context_lens[b]``; with ``fold_scores`` only
        ``out`` (the statistic went into ``fold_scores``).
    """
    k_cache, v_cache = check_paged_inputs(q, k_cache, v_cache, block_size, block_tables, context_lens)
    if fold_scores is not None:
        check_fold_scores(fold_scores, k_cache.shape[2])
        emit_colsum = True
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    device = q.device
    group = num_heads // num_kv_heads
    capacity = block_tables.shape[1] * block_size

    # Tuned on an H100 at Llama-3-8B shapes (benchmarks/gpu/NOTES.md): 128-token tiles, 4 warps and
    # 2 stages in 16-bit; float32 halves the tile so that its K and V tiles take the same 32 KB each.
    if block_n is None:
        block_n = 128 if q.element_size() == 2 else 64
    if num_warps is None:
        num_warps = 4
    if num_stages is None:
        num_stages = 2
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, capacity, device)
    # tl.dot needs at least 16 along every dimension.
    g_pad = max(triton.next_power_of_2(group), 16 if use_dot else 1)
    d_pad = max(triton.next_power_of_2(head_dim), 16 if use_dot else 1)
    if use_dot and block_n < 16:
        raise ValueError("use_dot needs block_n >= 16")
    # Triton's float32 dot defaults to tf32 (~3e-4 relative error); float32 callers want float32.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    out = _alloc(batch, num_heads, head_dim, device=device, dtype=q.dtype)
    if num_splits == 1:
        part, part_stride_s = out, 0
    else:
        part = _alloc(batch, num_heads, num_splits, head_dim, device=device, dtype=torch.float32)
        part_stride_s = part.stride(2)
    part_lse = _alloc(batch, num_heads, num_splits, device=device, dtype=torch.float32)
    # Without emit_colsum the logits pointer is never dereferenced (EMIT_LOGITS is off).
    logits = _alloc(batch, num_heads, capacity, device=device, dtype=torch.float32) if emit_colsum else part_lse

    _split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        part, part_lse, logits,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        part.stride(0), part.stride(1), part_stride_s,
        part_lse.stride(0), part_lse.stride(1),
        logits.stride(0), logits.stride(1),
        HEAD_DIM=head_dim, D_PAD=d_pad, GROUP=group, G_PAD=g_pad,
        PAGE=block_size, BLOCK_N=block_n,
        USE_DOT=use_dot, DOT_PRECISION=precision, EMIT_LOGITS=emit_colsum,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits == 1:
        lse = part_lse[:, :, 0]
    else:
        lse = _alloc(batch, num_heads, device=device, dtype=torch.float32)
        merge_splits(part, part_lse, out, lse)
    if not emit_colsum:
        return out

    if fold_scores is not None:
        # Every KV head of a tile in one program (module docstring); about 4K logits per program.
        kv_pad, g_pad = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(group)
        block_t = min(128, max(16, 4096 // (kv_pad * g_pad)))
        _fold_kernel[(batch, triton.cdiv(capacity, block_t))](
            logits, lse, context_lens, block_tables, fold_scores,
            logits.stride(0), logits.stride(1),
            lse.stride(0), lse.stride(1),
            block_tables.stride(0), fold_scores.stride(0),
            KV_HEADS=num_kv_heads, KV_PAD=kv_pad, GROUP=group, G_PAD=g_pad,
            BLOCK_T=block_t, PAGE=block_size,
            num_warps=4,
        )
        return out
    colsum = _alloc(batch, num_kv_heads, capacity, device=device, dtype=torch.float32)
    block_t = 256
    _colsum_kernel[(batch, num_kv_heads, triton.cdiv(capacity, block_t))](
        logits, lse, context_lens, colsum,
        capacity,
        logits.stride(0), logits.stride(1),
        lse.stride(0), lse.stride(1),
        colsum.stride(0), colsum.stride(1),
        GROUP=group, G_PAD=triton.next_power_of_2(group), BLOCK_T=block_t,
        num_warps=4,
    )
    return out, colsum
