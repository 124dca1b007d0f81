"""``quest``'s page scores in Triton: the bound of ``q . k`` over each held page, per KV head, read
through the block tables (``kv/quest_pages.py`` has the formula and the torch reference,
:func:`~kvscope.kv.quest_pages.page_scores`).

The torch reference gathers every page's key bounds into ``[B, P, Hkv, D]`` tensors first; a
captured decode step (``kv/quest_graphs.py``) scores the bucket's whole block-table width ``W``
(fixed by ``max_model_len``), where that gather would cost memory and bandwidth by ``W`` rather than
by context. Here one program scores ``BLOCK_P`` pages of one (row, KV head): it loads the page ids
from the row's table and the bounds by block, only for pages below the row's ``num_pages`` (a
program wholly past them exits), and writes ``[B, Hkv, W]`` float32 scores, nothing else.

Per page the bound is ``sum_d max(q_d lo_d, q_d hi_d)`` in float32 for each of the group's query
heads, as a broadcast multiply-and-sum over chunks of ``BLOCK_D`` channels, then the maximum over
the group. A page's score depends only on its own bounds and the query, never on ``W`` or where the
page sits in the grid, so an eager step and a captured step score a page bit for bit alike (the
selection must not differ between them). Scores at or past a row's ``num_pages`` are left unwritten:
the selection masks them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_tb", "stride_ob", "stride_oh"])  # vary per step: a compile per new class
def _bound_kernel(
    q_ptr, kmin_ptr, kmax_ptr, tables_ptr, num_pages_ptr, out_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_tb, stride_ob, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    first = tl.program_id(2) * BLOCK_P
    n = tl.load(num_pages_ptr + b)
    if first < n:
        p = first + tl.arange(0, BLOCK_P)
        live = p < n
        block = tl.load(tables_ptr + b * stride_tb + p, mask=live, other=0).to(tl.int64)
        g = tl.arange(0, GP)
        in_group = g < G
        bound = tl.zeros([GP, BLOCK_P], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                        mask=in_group[:, None] & dm[None, :], other=0.0).to(tl.float32)  # [GP, BLOCK_D]
            at = block[:, None] * stride_kb + h * stride_kh + d[None, :]
            m = live[:, None] & dm[None, :]
            lo = tl.load(kmin_ptr + at, mask=m, other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_D]
            hi = tl.load(kmax_ptr + at, mask=m, other=0.0).to(tl.float32)
            qe = q[:, None, :]
            bound += tl.sum(tl.maximum(qe * lo[None, :, :], qe * hi[None, :, :]), axis=2)
        bound = tl.where(in_group[:, None], bound, float("-inf"))
        tl.store(out_ptr + b * stride_ob + h * stride_oh + p, tl.max(bound, axis=0), mask=live)


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, tables: torch.Tensor,
                      num_pages: torch.Tensor, block_p: int = 16) -> torch.Tensor:
    """Upper bound of ``q . k`` over each held page, per KV head.

    Args:
        q: ``[B, Hq, D]`` queries (unscaled), last dim contiguous.
        kmin, kmax: a layer's bounds ``[num_blocks, Hkv, D]``, last dim contiguous.
        tables: ``[B, W]`` int32 block id of each row's pages (entries past ``num_pages`` unread).
        num_pages: ``[B]`` int32 pages each row holds.
        block_p: pages per program.
    Returns:
        ``[B, Hkv, W]`` float32: per KV head, the maximum over its group's query heads of
        ``sum_d max(q_d kmin_d, q_d kmax_d)`` for pages below ``num_pages[b]``; unset past them.
    """
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    if tables.dtype != torch.int32 or num_pages.dtype != torch.int32:
        raise ValueError("tables and num_pages must be int32")
    if q.stride(-1) != 1 or kmin.stride() != kmax.stride() or kmin.stride(-1) != 1 or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and bounds {tuple(kmin.shape)}: contiguous last dims, Hq a "
                         "multiple of Hkv, kmin and kmax alike")
    width = tables.shape[1]
    out = torch.empty(b, hkv, width, dtype=torch.float32, device=q.device)
    g = hq // hkv
    grid = (b, hkv, triton.cdiv(width, block_p))
    _bound_kernel[grid](
        q, kmin, kmax, tables, num_pages, out,
        q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), tables.stride(0), out.stride(0), out.stride(1),
        G=g, GP=max(2, triton.next_power_of_2(g)), D=d, BLOCK_D=min(32, triton.next_power_of_2(d)), BLOCK_P=block_p,
    )
    return out
