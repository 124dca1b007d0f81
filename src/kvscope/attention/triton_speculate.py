"""InfiniGen's speculation for one layer: approximate attention scores from the partial key cache,
then each KV head's top ``k`` tokens, as three Triton kernels (CUDA) or the torch reference.

Run with torch ops, one speculation is about forty kernels (the partial-key gather, an einsum, the
max / subtract / count passes, ``topk`` over the whole context and its bookkeeping): at batch 1 on
an H100 about 0.3 ms a layer, which sits on the decode step's critical path between one layer's
fetch and the next. The kernels here do the same work in three launches:

1. ``_logits_kernel``: per (row, KV head, chunk of tokens) the logits of the head's ``G`` query
   heads against the partial keys of the row's tokens, read straight through the row's slot list,
   and each chunk's maximum.
2. ``_relative_kernel``: each token's score relative to its head's best, ``max_g(logit_g - max_t
   logit_g)`` (over all heads too when whole tokens are selected), and per head how many tokens
   score above ``-alpha`` (InfiniGen's count).
3. ``_select_kernel``: per row, ``k`` = the mean count over the row's heads, floored, at least 1 and
   at most the row's ``cap``; each head then keeps its ``min(k, length)`` best tokens. The
   ``k``-th best score is found by bisection over the scores' bit patterns (31 passes over the row,
   held in registers up to 16k tokens; a five-way search with four counts packed in one int64 per
   pass was measured slower on an H100), then the kept tokens are compacted in position order,
   their host rows written, and the pool's selection counters bumped.

Semantics (both paths): ties at the ``k``-th score go to lower positions; kept tokens come first in
position order and the rest of each head's ``Kp`` entries are invalid. Rows of the result: a token's
host slot times ``Hkv`` plus the head (one head's row, ``per_head``) or the slot itself (whole token).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

#: A tensor-parallel group's in-place reduction over its ranks: ``(tensor, "sum" | "max") -> tensor``.
AllReduce = Callable[[torch.Tensor, str], torch.Tensor]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton use the torch path
    triton = None

_LOGIT_TOKENS = 64  # tokens per program of the logits kernel
_REL_TOKENS = 256  # tokens per program of the relative-score kernel
_SELECT_CHUNK = 16384  # tokens of a row the selection kernel holds in registers at once
_KEY_INF = 0x7F800000  # bit pattern of +inf: keys of real scores are below it


if triton is not None:

    @triton.jit
    def _logits_kernel(
        qp_ptr, pk_ptr, slots_ptr, lens_ptr, logits_ptr, cmax_ptr,
        C, NCHUNK, scale,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr, TC: tl.constexpr,
    ):
        bh = tl.program_id(0)
        ch = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        n = tl.load(lens_ptr + b)
        t = ch * TC + tl.arange(0, TC)
        tmask = t < n
        slot = tl.load(slots_ptr + b.to(tl.int64) * C + t, mask=tmask, other=0)
        g = tl.arange(0, GP)
        gmask = g < G
        acc = tl.zeros((GP, TC), dtype=tl.float32)
        key_row = pk_ptr + slot * (HKV * DP) + h * DP
        q_row = qp_ptr + (bh * G + g) * DP
        # One column at a time keeps registers low; a row's 2 * DP bytes share cache lines.
        for c in range(DP):
            k_c = tl.load(key_row + c, mask=tmask, other=0.0).to(tl.float32)
            q_c = tl.load(q_row + c, mask=gmask, other=0.0)
            acc += q_c[:, None] * k_c[None, :]
        logits = tl.where(tmask[None, :], acc * scale, float("-inf"))
        out = logits_ptr + (bh * G + g[:, None]).to(tl.int64) * C + t[None, :]
        tl.store(out, logits, mask=gmask[:, None] & (t < C)[None, :])
        tl.store(cmax_ptr + (bh * G + g) * NCHUNK + ch, tl.max(logits, axis=1), mask=gmask)

    @triton.jit
    def _relative_kernel(
        logits_ptr, cmax_ptr, rel_ptr, counts_ptr,
        C, NCHUNK, neg_alpha,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, NCP: tl.constexpr,
        PER_HEAD: tl.constexpr, TR: tl.constexpr,
    ):
        b = tl.program_id(0)
        ch = tl.program_id(1)
        t = ch * TR + tl.arange(0, TR)
        tmask = t < C
        g = tl.arange(0, GP)
        gmask = g < G
        chunks = tl.arange(0, NCP)
        best = tl.full((TR,), float("-inf"), dtype=tl.float32)
        for h in range(HKV):
            bh = b * HKV + h
            cm = tl.load(cmax_ptr + (bh * G + g[:, None]) * NCHUNK + chunks[None, :],
                         mask=gmask[:, None] & (chunks < NCHUNK)[None, :], other=float("-inf"))
            head_max = tl.max(cm, axis=1)  # [GP]
            head_max = tl.where(gmask, head_max, 0.0)
            lg = tl.load(logits_ptr + (bh * G + g[:, None]).to(tl.int64) * C + t[None, :],
                         mask=gmask[:, None] & tmask[None, :], other=float("-inf"))
            rel = tl.max(lg - head_max[:, None], axis=0)  # [TR]
            if PER_HEAD:
                tl.store(rel_ptr + bh.to(tl.int64) * C + t, rel, mask=tmask)
                tl.atomic_add(counts_ptr + bh, tl.sum((rel > neg_alpha).to(tl.int32), axis=0))
            else:
                best = tl.maximum(best, rel)
        if not PER_HEAD:
            tl.store(rel_ptr + b.to(tl.int64) * C + t, best, mask=tmask)
            tl.atomic_add(counts_ptr + b, tl.sum((best > neg_alpha).to(tl.int32), axis=0))

    @triton.jit
    def _row_keys(rel_ptr, row, start, n, C, CHUNK: tl.constexpr):
        # Scores <= 0 as int32 keys ordered like -score (smaller key = better); +inf where no token.
        t = start + tl.arange(0, CHUNK)
        ok = t < n
        r = tl.load(rel_ptr + row.to(tl.int64) * C + t, mask=ok, other=0.0)
        key = (0.0 - tl.minimum(r, 0.0)).to(tl.int32, bitcast=True)
        return tl.where(ok, key, 0x7F800000), ok

    @triton.jit
    def _select_kernel(
        rel_ptr, counts_ptr, lens_ptr, real_ptr, cap_ptr, slots_ptr, counters_ptr,
        rows_ptr, valid_ptr, kept_ptr,
        C, KP, HEADS,
        H: tl.constexpr, NC: tl.constexpr, NCP: tl.constexpr, HKV: tl.constexpr, PER_HEAD: tl.constexpr,
        CHUNK: tl.constexpr, NCH: tl.constexpr, KB: tl.constexpr,
    ):
        row = tl.program_id(0)
        b = row // H
        h = row % H
        # k: the mean count over the row's heads (InfiniGen), floored, in [1, cap of the row]; the
        # row's NC counts sum to the count over its HEADS heads (NC = 1: already summed over ranks).
        cols = tl.arange(0, NCP)
        total = tl.sum(tl.load(counts_ptr + b * NC + cols, mask=cols < NC, other=0), axis=0)
        k = tl.floor(total.to(tl.float32) / HEADS)
        k = tl.minimum(tl.maximum(k, 1.0), tl.load(cap_ptr + b))
        n = tl.load(lens_ptr + b).to(tl.int32)
        k_eff = tl.minimum(tl.minimum(k.to(tl.int32), n), KP) * tl.load(real_ptr + b).to(tl.int32)
        # Bisection for the smallest key T with at least k_eff keys <= T (the k-th best score).
        lo = tl.full((), 0, tl.int32)
        hi = tl.full((), 0x7F800000, tl.int32)
        if NCH == 1:
            key, ok = _row_keys(rel_ptr, row, 0, n, C, CHUNK)
            for _ in range(31):
                mid = lo + (hi - lo) // 2
                enough = tl.sum((key <= mid).to(tl.int32), axis=0) >= k_eff
                hi = tl.where(enough, mid, hi)
                lo = tl.where(enough, lo, mid + 1)
        else:
            for _ in range(31):
                mid = lo + (hi - lo) // 2
                below = 0
                for c in tl.static_range(NCH):
                    key, ok = _row_keys(rel_ptr, row, c * CHUNK, n, C, CHUNK)
                    below += tl.sum((key <= mid).to(tl.int32), axis=0)
                enough = below >= k_eff
                hi = tl.where(enough, mid, hi)
                lo = tl.where(enough, lo, mid + 1)
        thr = hi
        # Compaction in position order: all keys below T, then ties at T by position.
        better = 0
        for c in tl.static_range(NCH):
            key, ok = _row_keys(rel_ptr, row, c * CHUNK, n, C, CHUNK)
            better += tl.sum((key < thr).to(tl.int32), axis=0)
        ties_needed = k_eff - better
        base = 0
        tie_base = 0
        for c in tl.static_range(NCH):
            key, ok = _row_keys(rel_ptr, row, c * CHUNK, n, C, CHUNK)
            tie = (key == thr) & ok
            tie_rank = tie_base + tl.cumsum(tie.to(tl.int32), axis=0) - 1
            # With k_eff = 0 (padding rows) the bisection ends at T = 0 and no key is below it.
            sel = ok & (key < thr) | (tie & (tie_rank < ties_needed))
            pos = base + tl.cumsum(sel.to(tl.int32), axis=0) - 1
            t = c * CHUNK + tl.arange(0, CHUNK)
            slot = tl.load(slots_ptr + b.to(tl.int64) * C + t, mask=sel, other=0)
            if PER_HEAD:
                out = slot * HKV + h
            else:
                out = slot
            tl.store(rows_ptr + row.to(tl.int64) * KP + pos, out, mask=sel)
            tl.atomic_add(counters_ptr + slot, sel.to(tl.int32), mask=sel)
            base += tl.sum(sel.to(tl.int32), axis=0)
            tie_base += tl.sum(tie.to(tl.int32), axis=0)
        tl.store(kept_ptr + row, base)
        for j0 in range(0, KP, KB):
            j = j0 + tl.arange(0, KB)
            jm = j < KP
            tl.store(valid_ptr + row.to(tl.int64) * KP + j, (j < base).to(tl.int8), mask=jm)
            tl.store(rows_ptr + row.to(tl.int64) * KP + j, tl.zeros((KB,), dtype=tl.int64), mask=jm & (j >= base))


def speculate_rows(
    qp: torch.Tensor, partial_keys: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor, real: torch.Tensor,
    scale: float, alpha: float, cap: torch.Tensor, per_head: bool, kp: int, counters: torch.Tensor,
    use_triton: bool | None = None, all_reduce: AllReduce | None = None, world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select the rows one speculative layer fetches.

    Args:
        qp: ``[B, Hkv, G, d']`` float32, the layer's skewed partial queries.
        partial_keys: ``[N, Hkv, d']`` the layer's partial key cache (rows are host slots).
        slots: ``[B, C]`` int64 host slots of each row's earlier tokens (entries past ``lens`` unused).
        lens: ``[B]`` int64 tokens per row (>= 1); real: ``[B]`` bool, False for padding rows.
        scale: attention scale; alpha: InfiniGen's threshold below each head's best logit.
        cap: ``[B]`` float32, the most tokens a head of each row keeps (``k``'s upper bound).
        per_head: each KV head its own tokens (True) or whole tokens by their best head.
        kp: entries per head in the result (>= the most tokens kept).
        counters: ``[num_slots + 1]`` int32 selection counters, bumped per kept (token, head).
        use_triton: force or forbid the kernels; default: kernels on CUDA.
        all_reduce: with tensor parallelism (``world`` ranks, each holding ``Hkv`` of the
            ``world x Hkv`` KV heads), the group's in-place reduction (``"sum"``/``"max"``). Then
            ``k`` is the mean count over every rank's heads, and whole tokens are ranked by their
            best head over every rank, so each rank selects what one rank holding all heads would.
    Returns:
        rows ``[B, H, kp]`` int64 host rows (kept first, in position order), valid ``[B, H, kp]``
        bool, kept ``[B, H]`` int32 tokens kept per head; ``H = Hkv`` if ``per_head`` else 1.
    """
    if use_triton is None:
        use_triton = slots.is_cuda and triton is not None
    if use_triton:
        return _speculate_triton(qp, partial_keys, slots, lens, real, scale, alpha, cap, per_head, kp, counters,
                                 all_reduce, world)
    return _speculate_torch(qp, partial_keys, slots, lens, real, scale, alpha, cap, per_head, kp, counters,
                            all_reduce, world)


def _group_counts(counts: torch.Tensor, all_reduce: AllReduce | None, world: int) -> tuple[torch.Tensor, int]:
    """Per row, the count entries whose sum is the count over all heads, and how many heads that is:
    ``counts`` ``[B, H]`` itself on one rank, else its per-row sum over every rank's heads ``[B, 1]``."""
    if all_reduce is None or world == 1:
        return counts, counts.shape[1]
    return all_reduce(counts.sum(-1, keepdim=True, dtype=torch.int64), "sum"), counts.shape[1] * world


def _speculate_torch(qp, partial_keys, slots, lens, real, scale, alpha, cap, per_head, kp, counters, all_reduce,
                     world):
    b, c = slots.shape
    hkv = qp.shape[1]
    pk = partial_keys[slots].float()  # [B, C, Hkv, d']
    logits = torch.einsum("bhgc,bthc->bhgt", qp, pk) * scale
    in_row = torch.arange(c, device=slots.device)[None, :] < lens[:, None]  # [B, C]
    logits = logits.masked_fill(~in_row[:, None, None, :], float("-inf"))
    rel = (logits - logits.amax(-1, keepdim=True)).amax(2)  # [B, Hkv, C], 0 at each head's best
    if not per_head:
        rel = rel.amax(1, keepdim=True)  # [B, 1, C]: a token's best score over all heads
        if all_reduce is not None:
            rel = all_reduce(rel.contiguous(), "max")
    h = rel.shape[1]
    counts, heads = _group_counts((rel > -alpha).sum(-1), all_reduce if per_head else None, world)  # [B, H]
    k = torch.minimum((counts.sum(-1) / heads).floor().clamp(min=1), cap)
    k_eff = torch.minimum(k.long(), lens).clamp(max=kp) * real  # [B]
    order = torch.sort(rel, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(c, device=rel.device).expand_as(order))
    sel = rank < k_eff[:, None, None]  # [B, H, C]
    tok = slots[:, None, :].expand(-1, h, -1)
    values = tok * hkv + torch.arange(h, device=tok.device)[None, :, None] if per_head else tok
    pos = torch.where(sel, sel.long().cumsum(-1) - 1, kp)
    rows = torch.zeros(b, h, kp + 1, dtype=torch.long, device=slots.device).scatter_(-1, pos, values)[..., :kp]
    kept = sel.sum(-1).to(torch.int32)
    counters.index_add_(0, tok[sel], torch.ones_like(tok[sel], dtype=counters.dtype))
    valid = torch.arange(kp, device=slots.device) < kept[..., None]
    return rows, valid, kept


def _speculate_triton(qp, partial_keys, slots, lens, real, scale, alpha, cap, per_head, kp, counters, all_reduce,
                      world):
    b, c = slots.shape
    hkv, g, dp = qp.shape[1], qp.shape[2], qp.shape[3]
    h = hkv if per_head else 1
    dev = slots.device
    qp = qp.contiguous()
    nchunk = triton.cdiv(c, _LOGIT_TOKENS)
    logits = torch.empty(b, hkv, g, c, dtype=torch.float32, device=dev)
    cmax = torch.empty(b, hkv, g, nchunk, dtype=torch.float32, device=dev)
    gp = triton.next_power_of_2(g)
    _logits_kernel[(b * hkv, nchunk)](
        qp, partial_keys, slots, lens, logits, cmax, c, nchunk, float(scale),
        HKV=hkv, G=g, GP=gp, DP=dp, TC=_LOGIT_TOKENS, num_warps=4,
    )
    rel = torch.empty(b, h, c, dtype=torch.float32, device=dev)
    counts = torch.zeros(b, h, dtype=torch.int32, device=dev)
    _relative_kernel[(b, triton.cdiv(c, _REL_TOKENS))](
        logits, cmax, rel, counts, c, nchunk, -float(alpha),
        HKV=hkv, G=g, GP=gp, NCP=triton.next_power_of_2(nchunk), PER_HEAD=per_head, TR=_REL_TOKENS, num_warps=4,
    )
    if all_reduce is not None and not per_head:  # whole tokens by their best head over every rank
        rel = all_reduce(rel, "max")
        in_row = torch.arange(c, device=dev)[None, :] < lens[:, None]
        counts = ((rel[:, 0] > -alpha) & in_row).sum(-1, keepdim=True, dtype=torch.int32)
    counts, heads = _group_counts(counts, all_reduce if per_head else None, world)
    rows = torch.empty(b, h, kp, dtype=torch.long, device=dev)
    valid = torch.empty(b, h, kp, dtype=torch.bool, device=dev)
    kept = torch.empty(b, h, dtype=torch.int32, device=dev)
    chunk = min(triton.next_power_of_2(c), _SELECT_CHUNK)
    _select_kernel[(b * h,)](
        rel, counts, lens, real, cap, slots, counters, rows, valid.view(torch.int8), kept,
        c, kp, float(heads),
        H=h, NC=counts.shape[1], NCP=triton.next_power_of_2(counts.shape[1]), HKV=hkv, PER_HEAD=per_head, CHUNK=chunk,
        NCH=triton.cdiv(c, chunk), KB=1024, num_warps=16 if chunk >= 8192 else 4,
    )
    return rows, valid, kept
