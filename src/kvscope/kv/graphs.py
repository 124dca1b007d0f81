"""Graph support of the block-table strategies, on the optional graph protocol of
:mod:`kvscope.kv.backend` (:class:`~kvscope.kv.backend.GraphDecode`).

Strategies whose decode attention reads whole blocks through block tables (``paged``,
``contiguous``, evicting policies whose statistic allows it, ``adaptive``) get their steps from
:class:`BlockTableDecode` (:mod:`kvscope.kv.block_table_graphs` builds them); ``offload`` and
``infinigen`` build their own (:mod:`kvscope.kv.host_decode`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kvscope.kv.backend import GraphDecode, KVSetup, StepBatch
from kvscope.models.base import AttentionBackend


def bucket_for(sizes: list[int], n: int) -> int | None:
    """The smallest of the sorted ``sizes`` holding ``n`` rows; None when ``n`` exceeds them all."""
    return next((s for s in sizes if s >= n), None)


@dataclass(frozen=True)
class BlockTableLayout:
    """Where a strategy's decode attention reads KV when every request's tokens fill whole blocks
    of ``cache`` in order: what a captured block-table step needs. ``cache`` is what the strategy's
    :meth:`BlockTableDecode.static_attention` reads: a :class:`~kvscope.kv.slot_cache.SlotKVCache`
    for the default one (``paged``'s kernels), the strategy's own storage when it overrides it."""

    cache: Any
    block_size: int


class GraphStatistics(Protocol):
    """Per-token state of a captured decode step: positions of the new tokens, and H2O's
    accumulated column sums."""

    def begin(self, new_slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Before a replay, eagerly: register the step's new tokens (``[n]`` slots and positions)."""

    def layer_scores(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s per-slot scores ``[num_slots, Hkv]`` float32, into which the captured
        decode kernel adds each held token's column sum (``fold_scores``); None to fold nothing."""


class BlockTableDecode:
    """Mixin of the strategies whose decode steps are block-table steps: they say where their KV
    is (:meth:`block_table_layout`) and, per step, each request's blocks and held tokens."""

    setup: KVSetup | None

    def block_table_layout(self) -> BlockTableLayout | None:
        """The layout when decode steps may be captured; None keeps every step eager."""
        return None

    def block_tables(self, batch: StepBatch) -> list[list[int]]:
        """Per request of ``batch``, its block ids in token order."""
        raise NotImplementedError

    def graph_ready(self, batch: StepBatch) -> bool:
        """Whether this decode ``batch`` may replay the captured graphs (a strategy with rows its
        layout does not cover says no, and the step runs eagerly)."""
        return True

    def held_tokens(self, batch: StepBatch) -> list[int]:
        """Per request, the tokens it holds before the step's new one: the new token goes to
        that index of its block table."""
        return [req.num_computed_tokens for req in batch.requests]

    def graph_statistics(self) -> GraphStatistics | None:
        """For a policy that scores tokens by attention: the hooks a captured step calls."""
        return None

    def static_attention(self, layout: BlockTableLayout, slots: torch.Tensor, tables: torch.Tensor,
                         lens: torch.Tensor, scale: float, num_splits: int,
                         stats: GraphStatistics | None) -> AttentionBackend:
        """The attention of a captured step over one bucket's static buffers (``slots`` ``[b]``,
        -1 for padding rows; ``tables`` ``[b, W]``; ``lens`` ``[b]``, all int32) with the bucket's
        fixed split count and the graphs' ``stats`` (:meth:`graph_statistics`): by default
        ``paged``'s write and decode kernels over a :class:`~kvscope.kv.slot_cache.SlotKVCache`.
        A strategy storing its KV otherwise overrides it."""
        from kvscope.kv.block_table_graphs import StaticDecodeAttention

        return StaticDecodeAttention(layout, slots, tables, lens, scale, num_splits, stats)

    def decode_graphs(self) -> GraphDecode | None:
        setup = self.setup
        if setup is None or not setup.cuda_graph_sizes or self.block_table_layout() is None:
            return None
        from kvscope.kv.block_table_graphs import BlockTableGraphs

        return BlockTableGraphs(self, setup.cuda_graph_sizes, setup.max_model_len, setup.device)


def block_table_layout_of(strategy: object) -> BlockTableLayout | None:
    """``strategy``'s block-table layout, None when it has none (or no block-table steps at all)."""
    return strategy.block_table_layout() if isinstance(strategy, BlockTableDecode) else None
