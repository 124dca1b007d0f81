"""Captured decode steps of ``quest`` (``kv/quest.py``), on the block-table steps of
:mod:`kvscope.kv.block_table_graphs`: the same static buffers per batch-size bucket (token ids,
positions, the new tokens' slots, context lengths ``lens`` and block tables ``[b, W]``, ``W`` the
blocks of ``max_model_len``), refreshed by one copy per step, with quest's attention over them
(:class:`StaticQuestAttention`). Nothing in it depends on a host value that changes per step:

* **Pages per row.** How many pages a row reads (``keep_pages(context)``) depends on its length,
  so it is computed on the device from ``lens`` (``QuestStrategy.keep_pages_tensor``: the host's
  formula in the same float64 operations), with the pages held and the last page's fill, once per
  step before the first layer (:meth:`StaticQuestAttention.plan`, the step's ``begin``).
* **Selection.** :class:`~kvscope.kv.quest_pages.PageSelection` with a fixed ``k``: the largest
  keep of any row the bucket can hold, ``keep_pages(max_model_len)``. Every row ranks its ``W``
  pages (past its own pages -inf, its first and last +inf) and keeps the top ``k``; the places past
  its own ``keep`` are masked, so it reads exactly the pages an eager step reads.
* **Scores** through :func:`~kvscope.attention.triton_quest_scores.quest_page_scores` (the eager
  Triton step scores with the same kernel, so both select alike bit for bit): it reads the bounds
  of a row's held pages only, where the torch reference would gather all ``W`` pages' bounds.
* **Attention:** :func:`~kvscope.kv.quest_attention.attend_selected`, the eager step's: the
  existing paged Triton decode kernel over ``b * Hkv`` one-head sequences, each with its own page
  list as its block table (the kernel takes any table per sequence, so no new kernel is needed);
  it reads ``lens`` tokens of each, so a short row in a wide bucket costs only its own pages. The
  split count follows from the fixed shapes. On the torch backend (CPU tests) the same function
  gathers and runs SDPA.
* **Writes.** The new tokens' K/V and page bounds are written by index with the padding rows (slot
  -1) repeating the first row's slot and values: duplicates store equal values, and no shape
  depends on how many rows are real.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvscope.kv.backend import StepBatch
from kvscope.kv.block_table_graphs import BlockTableGraphs, BlockTableStep
from kvscope.kv.quest_attention import attend_selected, score_pages, selected_lens
from kvscope.kv.quest_pages import PageSelection

if TYPE_CHECKING:
    from kvscope.kv.quest import QuestStrategy


class StaticQuestAttention:
    """AttentionBackend of a captured ``quest`` decode step over one bucket's static buffers.

    Args:
        strategy: the bound strategy (its cache, page bounds, budget and ``max_model_len``).
        slots: ``[b]`` int32 slot of each row's new token (-1: padding).
        tables: ``[b, W]`` int32 block tables.
        lens: ``[b]`` int32 tokens per row after this step (its new token included).
        scale: softmax scale.
    """

    def __init__(self, strategy: QuestStrategy, slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 scale: float) -> None:
        self.cache, self.bounds, self.bs = strategy.cache, strategy.bounds, strategy.block_size
        self.triton = strategy.setup.attention_backend == "triton"
        self.keep_pages = strategy.keep_pages_tensor
        self.k = strategy.keep_pages(strategy.setup.max_model_len)  # the most pages any row may keep
        self.slots, self.tables, self.lens, self.scale = slots, tables, lens, scale
        # The scores' tables: the kernel's int32 ones, or an int64 copy for the torch path's gather.
        self.score_tables = tables if self.triton else tables.long()
        self.plan()

    def plan(self) -> None:
        """Per-row metadata of the step from the static buffers, on the device, once per step
        (every layer shares it): pages held and kept, the selection's masks, tokens read per
        (row, KV head), and where the new tokens go."""
        lens = self.lens.long()
        num_pages = (lens + self.bs - 1) // self.bs
        keep = self.keep_pages(lens)
        self.selection = PageSelection(num_pages, keep, self.tables.shape[1], self.k)
        self.read_lens = selected_lens(keep, lens - (num_pages - 1) * self.bs, self.bs, self.cache.kv.shape[3])
        if self.triton:
            self.score_pages = num_pages.int()
        else:
            self.score_pages = num_pages
            self.score_tables.copy_(self.tables)
        real = self.slots >= 0
        # Padding rows repeat row 0's write (row 0 is always a request; at capture, with every row
        # padding, slot 0 of an empty pool).
        self.write_slots = torch.where(real, self.slots, self.slots[:1]).long().clamp(min=0)
        self.write_rows = torch.where(real, torch.arange(real.shape[0], device=real.device), 0)
        self.write_blocks = self.write_slots // self.bs
        self.write_first = (self.write_slots % self.bs == 0)[:, None, None]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[b, Hq, D]``, ``k``/``v`` ``[b, Hkv, D]`` -> ``[b, Hq, D]``."""
        k_cache, v_cache = self.cache.kv[layer_idx, 0], self.cache.kv[layer_idx, 1]
        k, v = k[self.write_rows], v[self.write_rows]
        k_cache.index_copy_(0, self.write_slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, self.write_slots, v.to(v_cache.dtype))
        self.bounds.update_rows(layer_idx, self.write_blocks, self.write_first, k)
        scores = score_pages(q, self.bounds.kmin[layer_idx], self.bounds.kmax[layer_idx], self.score_tables,
                             self.score_pages, self.triton)
        return attend_selected(q, k_cache, v_cache, self.tables, self.selection.select(scores), self.read_lens,
                               self.scale, self.bs, self.triton)


class QuestStep(BlockTableStep):
    """A bucket of :class:`QuestGraphs`: a block-table step whose ``begin`` plans the rows."""

    attention: StaticQuestAttention

    def begin(self) -> None:
        self.attention.plan()


class QuestGraphs(BlockTableGraphs):
    """``quest``'s :class:`~kvscope.kv.backend.GraphDecode`: :class:`BlockTableGraphs` whose steps
    are :class:`QuestStep` and whose loads count the pages read and held (the eager step's
    ``begin_step`` counts them; a replayed step has none)."""

    source: QuestStrategy

    def step(self, key: int) -> QuestStep:
        return QuestStep(self, key)

    def load(self, batch: StepBatch, size: int) -> None:
        super().load(batch, size)
        self.source.count_decode([held + 1 for held in self.source.held_tokens(batch)])
