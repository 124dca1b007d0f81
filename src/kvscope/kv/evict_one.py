"""A decode step's eviction: requests one token over budget each give up one token per layer and
KV head, the lowest-scoring one outside the recent window, whose slot the newest token takes (a
copy of one token per layer and head; no compaction of the cache).

Two paths, the same result. :func:`replace_one_torch` is the reference and the CPU's: a dozen
tensor operations over ``[L, n, width, Hkv]`` gathers of the scores and positions. On a GPU it
costs more host time than device time (about two dozen launches and their index building every
decode step), which ``h2o``'s engine steps showed in a profile (``benchmarks/results/
strategy_profile.md``). :func:`replace_one_triton` does it in one launch: a program per (request,
layer) walks the request's block table once, keeps a running minimum per head, then moves the
newest token's K, V, score and position into each head's victim slot.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no Triton
    triton = None


#: The packed array's rows are a multiple of this many int64 long (see :func:`pack_tables`).
ROW_ALIGN = 16


def pack_tables(blocks: Sequence[Sequence[int]], held: Sequence[int], recent: Sequence[int]) -> np.ndarray:
    """The ``tables``, ``held`` and ``recent`` arguments of both paths as one ``[n, width]`` int64
    array, for one host-to-device copy: column 0 ``held``, column 1 ``recent``, columns
    ``2 : 2 + most`` the tables (:func:`unpack` takes the views), ``width`` = ``most + 2`` rounded up
    to :data:`ROW_ALIGN`.

    Why this layout: Triton compiles a kernel anew for each combination of its pointer arguments'
    16-byte alignment and its integers' divisibility by 16. With ``held`` and ``recent`` after a
    table of the step's longest length, their alignment and the row stride changed with that length,
    and serving compiled the eviction kernel again (seconds on a GPU, every stream stalled) whenever
    a step's longest table hit a new combination. Here every view starts at the same place in its
    row and the stride is always a multiple of 16.

    Each row of ``blocks`` is a request's block ids (at least one); shorter rows are padded with
    their last id, which the kernel never reads past ``held``. Built with numpy from one flat
    iterator: ``torch.tensor`` over a list of lists costs about 0.1 us an entry, half a millisecond
    of host time a decode step at 64 requests x 1k tokens.
    """
    n = len(blocks)
    lens = np.fromiter(map(len, blocks), dtype=np.int64, count=n)
    flat = np.fromiter(itertools.chain.from_iterable(blocks), dtype=np.int64, count=int(lens.sum()))
    most = int(lens.max())
    ends = np.cumsum(lens)
    packed = np.empty((n, -(-(most + 2) // ROW_ALIGN) * ROW_ALIGN), dtype=np.int64)
    packed[:, 0] = held
    packed[:, 1] = recent
    packed[:, 2:] = flat[ends - 1][:, None]
    rows = np.repeat(np.arange(n), lens)
    packed[rows, 2 + np.arange(flat.size) - np.repeat(ends - lens, lens)] = flat
    return packed


def unpack(packed: torch.Tensor, most: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tables [n, most], held [n], recent [n])``: views of :func:`pack_tables`' array (a copy of it
    on any device) whose longest table has ``most`` blocks."""
    return packed[:, 2 : 2 + most], packed[:, 0], packed[:, 1]


def replace_one_torch(kv: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                      held: torch.Tensor, recent: torch.Tensor, block_size: int) -> None:
    """Evict in place (see the module docstring).

    Args:
        kv: ``[L, 2, S, Hkv, D]`` the cache; scores ``[L, S, Hkv]`` float32; positions ``[L, S, Hkv]`` int64.
        tables: ``[n, blocks]`` int64 block ids of each request, covering its held tokens (padded).
        held: ``[n]`` int64 tokens each request holds (the newest one last).
        recent: ``[n]`` int64 first position of each request's recent window (never evicted).
    """
    width = int(tables.shape[1]) * block_size
    device = kv.device
    offsets = torch.arange(block_size, device=device)
    slots = (tables[:, :, None] * block_size + offsets).flatten(1)  # [n, width]; past a row's length: masked
    rank = scores[:, slots].clone()  # [L, n, width, Hkv]
    out = (torch.arange(width, device=device)[None, :] >= held[:, None])[None, :, :, None]
    rank[(positions[:, slots] >= recent[None, :, None, None]) | out] = float("inf")
    victim = rank.argmin(dim=2)  # [L, n, Hkv]
    L, n, H = victim.shape
    dst = torch.gather(slots[None, :, :, None].expand(L, n, width, H), 2, victim[:, :, None, :])[:, :, 0]
    last = slots[torch.arange(n, device=device), held - 1][None, :, None].expand(L, n, H)
    layer = torch.arange(L, device=device)[:, None, None].expand(L, n, H)
    head = torch.arange(H, device=device)[None, None, :].expand(L, n, H)
    kv[layer, :, dst, head] = kv[layer, :, last, head]
    scores[layer, dst, head] = scores[layer, last, head]
    positions[layer, dst, head] = positions[layer, last, head]


if triton is not None:

    @triton.jit
    def _replace_one_kernel(kv_ptr, scores_ptr, pos_ptr, tables_ptr, held_ptr, recent_ptr, S, table_stride,
                            held_stride, recent_stride, H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr,
                            HP: tl.constexpr, DP: tl.constexpr):
        i = tl.program_id(0)
        layer = tl.program_id(1).to(tl.int64)  # the cache spans more than 2**31 elements
        held = tl.load(held_ptr + i * held_stride)
        recent = tl.load(recent_ptr + i * recent_stride)
        table = tables_ptr + i * table_stride
        heads = tl.arange(0, HP)
        hmask = heads < H
        best = tl.full([HP], float("inf"), tl.float32)
        best_j = tl.zeros([HP], tl.int64)
        for t0 in range(0, held, BLOCK_T):
            j = t0 + tl.arange(0, BLOCK_T)
            jmask = j < held
            slot = tl.load(table + j // BS, mask=jmask, other=0) * BS + j % BS
            m2 = jmask[:, None] & hmask[None, :]
            off = (layer * S + slot)[:, None] * H + heads[None, :]
            sc = tl.load(scores_ptr + off, mask=m2, other=float("inf"))
            ps = tl.load(pos_ptr + off, mask=m2, other=0)
            sc = tl.where(m2 & (ps < recent), sc, float("inf"))
            tile_min = tl.min(sc, axis=0)
            tile_arg = tl.argmin(sc, axis=0)  # the first of equal minima, as torch's argmin
            take = tile_min < best  # strict: an earlier tile keeps a tie
            best = tl.where(take, tile_min, best)
            best_j = tl.where(take, t0 + tile_arg, best_j)
        # No candidate at all leaves best_j at 0, as argmin over a row of inf does.
        last_j = held - 1
        last = tl.load(table + last_j // BS) * BS + last_j % BS
        dst = tl.load(table + best_j // BS, mask=hmask, other=0) * BS + best_j % BS  # [HP]
        src_off = (layer * S + last) * H + heads
        dst_off = (layer * S + dst) * H + heads
        tl.store(scores_ptr + dst_off, tl.load(scores_ptr + src_off, mask=hmask), mask=hmask)
        tl.store(pos_ptr + dst_off, tl.load(pos_ptr + src_off, mask=hmask), mask=hmask)
        dd = tl.arange(0, DP)
        m_hd = hmask[:, None] & (dd < D)[None, :]
        for c in range(2):  # K, then V
            base = (layer * 2 + c) * S
            src = ((base + last) * H + heads)[:, None] * D + dd[None, :]
            dst_kv = ((base + dst) * H + heads)[:, None] * D + dd[None, :]
            tl.store(kv_ptr + dst_kv, tl.load(kv_ptr + src, mask=m_hd), mask=m_hd)


def replace_one_triton(kv: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                       held: torch.Tensor, recent: torch.Tensor, block_size: int, block_t: int = 128) -> None:
    """:func:`replace_one_torch` in one launch (same arguments; the cache, scores and positions
    contiguous, the tables' rows contiguous: :func:`unpack`'s views of one packed copy may carry all three)."""
    for name, t in (("kv", kv), ("scores", scores), ("positions", positions)):
        if not t.is_contiguous():
            raise ValueError(f"replace_one_triton: {name} must be contiguous")
    if tables.stride(1) != 1:
        raise ValueError("replace_one_triton: each row of tables must be contiguous")
    L, _, S, H, D = kv.shape
    n = tables.shape[0]
    _replace_one_kernel[(n, L)](kv, scores, positions, tables, held, recent, S, tables.stride(0), held.stride(0),
                                recent.stride(0), H=H, D=D,
                                BS=block_size, BLOCK_T=block_t, HP=triton.next_power_of_2(H),
                                DP=triton.next_power_of_2(D))
