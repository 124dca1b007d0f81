"""One step of ``quest``: the KV write with the page bounds, full attention for prefill chunks, and
decode attention over each KV head's selected pages (``kv/quest.py``).

Decode over selected pages reads the cache in place, two ways:

* torch (any device): each (row, KV head) gathers the slots of its pages, ``[B, Hkv, K * bs, D]``,
  and :func:`~kvscope.attention.torch_ref.attend_decode` runs over ``B * Hkv`` sequences of one KV
  head and its ``G`` query heads;
* triton (CUDA): the paged decode kernel over the same ``B * Hkv`` sequences, each with a block
  table of its own pages. A sequence has one KV head, so the cache is viewed as one-head blocks:
  block ``b``'s head ``h`` starts at element ``(b * bs * Hkv + h) * D`` of a layer's K, and rows of
  a block are ``Hkv * D`` apart, so an overlapping strided view with block stride ``D`` and row
  stride ``Hkv * D`` addresses it as virtual block ``b * bs * Hkv + h``. Nothing is copied.

Selected pages are in position order with the last (partial) page last, so a sequence's tokens are
``(keep - 1) * bs + last_len`` in block order: what both paths expect.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from kvscope.device_copy import to_device
from kvscope.attention.torch_ref import attend_decode
from kvscope.kv.quest_pages import PageBounds, PageSelection, page_scores
from kvscope.kv.slot_cache import SlotKVCache, block_table_attention


def _one_head_blocks(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[num_slots, Hkv, D]`` -> an overlapping view ``[V, block_size, 1, D]`` in which virtual block
    ``b * block_size * Hkv + h`` is block ``b``'s KV head ``h`` (see the module docstring)."""
    slots, hkv, d = cache.shape
    num_blocks = slots // block_size
    virtual = (num_blocks - 1) * block_size * hkv + hkv
    return cache.as_strided((virtual, block_size, 1, d), (d, hkv * d, d, 1))


def score_pages(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, tables: torch.Tensor,
                num_pages: torch.Tensor, triton: bool) -> torch.Tensor:
    """Page scores of each row's pages: ``q`` ``[B, Hq, D]``, a layer's bounds ``[num_blocks, Hkv,
    D]``, ``tables`` ``[B, P]`` and ``num_pages`` ``[B]`` (int32 for ``triton``, else ``tables``
    int64) -> ``[B, Hkv, P]`` float32, meaningful below ``num_pages``. ``triton``: the kernel of
    :mod:`kvscope.attention.triton_quest_scores`, which reads only held pages' bounds; else the
    gather and :func:`page_scores`. Eager and captured steps both score through here, so they
    select alike."""
    if triton:
        from kvscope.attention.triton_quest_scores import quest_page_scores

        return quest_page_scores(q, kmin, kmax, tables, num_pages)
    return page_scores(q, kmin[tables], kmax[tables])


def selected_lens(keep: torch.Tensor, last_len: torch.Tensor, block_size: int, num_kv_heads: int) -> torch.Tensor:
    """Tokens each (row, KV head) sequence of :func:`attend_selected` reads: ``keep`` ``[B]`` pages,
    the last with ``last_len`` ``[B]`` tokens -> ``[B * Hkv]`` int32."""
    return ((keep - 1) * block_size + last_len).repeat_interleave(num_kv_heads).to(torch.int32)


def attend_selected(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_tables: torch.Tensor,
                    pages: torch.Tensor, lens: torch.Tensor, scale: float, block_size: int,
                    triton: bool = False) -> torch.Tensor:
    """Decode attention of each KV head's query heads over that head's selected pages only.

    Args:
        q: ``[B, Hq, D]``.
        k_cache, v_cache: a layer's ``[num_slots, Hkv, D]``.
        page_tables: ``[B, P]`` int32 or int64 block id of each row's pages (padding past its pages).
        pages: ``[B, Hkv, K]`` selected page indices from :class:`PageSelection` (ascending, the
            row's last page last among its kept ones; ``P`` past them).
        lens: ``[B * Hkv]`` int32 tokens of each (row, KV head)'s selected pages (:func:`selected_lens`).
        triton: the paged Triton decode kernel (CUDA) rather than gather + torch attention.
    Returns:
        ``[B, Hq, D]``.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    k = pages.shape[2]
    blocks = page_tables.gather(1, pages.clamp(max=page_tables.shape[1] - 1).flatten(1)).view(b, hkv, k)
    qs = q.reshape(b * hkv, hq // hkv, d)
    heads = torch.arange(hkv, device=q.device, dtype=blocks.dtype)[None, :, None]
    if triton:
        from kvscope.attention.triton_decode import paged_decode_attention

        virtual = (blocks * (block_size * hkv) + heads).view(b * hkv, k).to(torch.int32)
        out = paged_decode_attention(qs.contiguous(), _one_head_blocks(k_cache, block_size),
                                     _one_head_blocks(v_cache, block_size), virtual, lens, scale, block_size)
        return out.view(b, hq, d)
    blocks, heads = blocks.long(), heads.long()
    slots = (blocks[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(2)  # [B, Hkv, K * bs]
    kg = k_cache[slots, heads].view(b * hkv, -1, 1, d)
    vg = v_cache[slots, heads].view(b * hkv, -1, 1, d)
    return attend_decode(qs, kg, vg, lens, scale).view(b, hq, d)


class QuestAttention:
    """AttentionBackend of one ``quest`` step.

    Args:
        cache, bounds: the strategy's KV and page bounds.
        block_tables: per request, its block ids (enough for its tokens after the step).
        num_computed: per request, tokens cached before the step.
        query_start: ``[B + 1]`` row offsets of each request's new tokens.
        keep_pages: pages a decode row of a given context (tokens, the new one included) reads per
            KV head.
        backend: ``"torch"`` or ``"triton"``.
    """

    def __init__(self, cache: SlotKVCache, bounds: PageBounds, block_tables: list[list[int]], block_size: int,
                 num_computed: list[int], query_start: list[int], scale: float,
                 keep_pages: Callable[[int], int], backend: str) -> None:
        self.cache, self.bounds, self.bs, self.scale = cache, bounds, block_size, scale
        self.triton = backend == "triton"
        device = cache.kv.device
        n = len(block_tables)
        q_lens = [query_start[i + 1] - query_start[i] for i in range(n)]
        # Slots of the new tokens, built on the host and copied once.
        slots: list[torch.Tensor] = []
        for table, done, m in zip(block_tables, num_computed, q_lens):
            pos = torch.arange(done, done + m)
            slots.append(torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size)
        slot_mapping = torch.cat(slots)
        first = (slot_mapping % block_size == 0).nonzero().flatten()
        self.first = to_device(first, device) if first.numel() else None  # rows that start a block
        self.slot_mapping = to_device(slot_mapping, device)

        prefill = [i for i in range(n) if q_lens[i] > 1]
        self.prefill_q = None
        if prefill:
            starts = [0]
            for i in prefill:
                starts.append(starts[-1] + q_lens[i])
            self.prefill_q = to_device(torch.cat([torch.arange(query_start[i], query_start[i + 1]) for i in prefill]),
                                       device)
            self.prefill = block_table_attention(cache, [block_tables[i] for i in prefill], block_size,
                                                 [num_computed[i] for i in prefill], starts, scale, backend)
        decode = [i for i in range(n) if q_lens[i] == 1]
        self.decode_q = None
        self.pages_read = self.pages_held = 0
        if decode:
            ctx = [num_computed[i] + 1 for i in decode]
            held = [-(-c // block_size) for c in ctx]
            keep = [keep_pages(c) for c in ctx]
            width = max(held)
            self.page_tables = to_device([(block_tables[i][:h] + [0] * width)[:width]
                                          for i, h in zip(decode, held)], device, torch.long)
            self.num_pages = to_device(held, device)
            # The scores' kernel takes int32 (score_pages).
            self.score_tables = self.page_tables.int() if self.triton else self.page_tables
            self.score_pages = self.num_pages.int() if self.triton else self.num_pages
            keep_t = to_device(keep, device)
            last_len = to_device([c - (h - 1) * block_size for c, h in zip(ctx, held)], device)
            self.lens = selected_lens(keep_t, last_len, block_size, cache.kv.shape[3])
            self.selection = PageSelection(self.num_pages, keep_t, width, max(keep))
            self.decode_q = to_device([query_start[i] for i in decode], device)
            self.pages_read, self.pages_held = sum(keep), sum(held)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[N, Hq, D]``, ``k``/``v`` ``[N, Hkv, D]`` -> ``[N, Hq, D]``."""
        k_cache, v_cache = self.cache.kv[layer_idx, 0], self.cache.kv[layer_idx, 1]
        k_cache.index_copy_(0, self.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, self.slot_mapping, v.to(v_cache.dtype))
        self.bounds.update(layer_idx, self.slot_mapping, k, self.first)
        out = torch.empty_like(q)
        if self.prefill_q is not None:
            out[self.prefill_q] = self.prefill.attend_cached(layer_idx, q[self.prefill_q])
        if self.decode_q is not None:
            qd = q[self.decode_q]
            scores = score_pages(qd, self.bounds.kmin[layer_idx], self.bounds.kmax[layer_idx], self.score_tables,
                                 self.score_pages, self.triton)
            out[self.decode_q] = attend_selected(qd, k_cache, v_cache, self.page_tables, self.selection.select(scores),
                                                 self.lens, self.scale, self.bs, self.triton)
        return out
