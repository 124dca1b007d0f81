"""Capturable decode steps of the block-table strategies (``paged``, ``contiguous``, ``h2o``, ...).

Each bucket (batch size ``b``) is a step over *static buffers*: token ids, positions, the new
tokens' slots, context lengths and block tables, all int32 views of one device buffer that each
step refreshes with one host-to-device copy; the buckets share that buffer. A batch of ``n``
requests runs the smallest bucket ``b >= n``; its ``b - n`` padding rows have slot -1 (the KV write
skips them) and one token of context, and their outputs are dropped. The decode kernel's split
count is fixed per bucket from the longest possible context (``max_model_len``); the splits a
shorter sequence does not reach exit at once (``attention/triton_decode.py``). The strategy builds
each bucket's attention over these buffers (:meth:`~kvscope.kv.graphs.BlockTableDecode.static_attention`:
:class:`StaticDecodeAttention` by default; ``quant``'s fp8 cache has its own).

A strategy that scores tokens by attention (``h2o``) also gives
:class:`~kvscope.kv.graphs.GraphStatistics`: the captured decode kernel then emits its column sums
and folds them into the scores, and the eviction runs after the replay, in the strategy's
``end_step``.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from kvscope.kv.backend import StepBatch
from kvscope.kv.graphs import BlockTableDecode, BlockTableLayout, GraphStatistics, bucket_for


class StaticDecodeAttention:
    """The attention backend captured in a graph: reads its metadata from static buffers.

    Args:
        layout: the strategy's KV tensor and block size.
        slots: ``[b]`` int32 slot of each row's new token (-1: padding, not written).
        tables: ``[b, max_blocks]`` int32 block tables.
        lens: ``[b]`` int32 tokens per row after this step (its new token included).
        num_splits: decode-kernel splits per (row, KV head), fixed at capture.
    """

    def __init__(self, layout: BlockTableLayout, slots: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, scale: float, num_splits: int, stats: GraphStatistics | None = None) -> None:
        from kvscope.attention.triton_decode import paged_decode_attention
        from kvscope.attention.triton_kv_write import write_kv

        self._decode, self._write = paged_decode_attention, write_kv
        self.kv = layout.cache.kv
        self.block_size = layout.block_size
        self.slots, self.tables, self.lens = slots, tables, lens
        self.scale = scale
        self.num_splits = num_splits
        self.stats = stats

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv[layer_idx, 0], self.kv[layer_idx, 1]
        self._write(k, v, k_cache, v_cache, self.slots)
        scores = self.stats.layer_scores(layer_idx) if self.stats is not None else None
        return self._decode(q, k_cache, v_cache, self.tables, self.lens, self.scale, self.block_size,
                            self.num_splits, fold_scores=scores)


class BlockTableStep:
    """Bucket ``size`` of :class:`BlockTableGraphs` (a :class:`~kvscope.kv.backend.GraphStep`)."""

    def __init__(self, graphs: "BlockTableGraphs", size: int) -> None:
        from kvscope.attention.decode_splits import default_num_splits

        g = self.graphs = graphs
        m = g.source.setup.model
        self.batch_size = size
        self.input_ids, self.positions = g.ids[:size], g.positions[:size]
        splits = default_num_splits(size, m.num_kv_heads, g.width * g.layout.block_size, g.device)
        self.attention = g.source.static_attention(g.layout, g.slots[:size], g.tables[:size], g.lens[:size],
                                                   m.head_dim**-0.5, splits, g.stats)

    def load(self, batch: StepBatch) -> None:
        self.graphs.load(batch, self.batch_size)

    def begin(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def replayed(self, batch: StepBatch) -> None:
        pass

    def captured(self) -> None:
        pass


class BlockTableGraphs:
    """The :class:`~kvscope.kv.backend.GraphDecode` of a block-table strategy.

    Args:
        source: the strategy; its :meth:`~BlockTableDecode.block_table_layout` is not None.
        sizes: batch-size buckets.
        max_model_len: the longest sequence; sizes the block tables and the decode splits.
    """

    def __init__(self, source: BlockTableDecode, sizes: list[int], max_model_len: int,
                 device: torch.device) -> None:
        layout = source.block_table_layout()
        if layout is None:
            raise ValueError(f"strategy {type(source).__name__} has no block-table layout to capture")
        self.source, self.layout, self.device = source, layout, device
        self.sizes = sorted(sizes)
        self.max_batch = b = self.sizes[-1]
        self.width = -(-max_model_len // layout.block_size)
        # One int32 buffer (ids, positions, slots, lengths, tables) so that a step is one copy.
        n = 4 * b + b * self.width
        self._host = torch.zeros(n, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._host_np = self._host.numpy()
        self._dev = torch.zeros(n, dtype=torch.int32, device=device)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        views = lambda buf: (buf[:b], buf[b : 2 * b], buf[2 * b : 3 * b], buf[3 * b : 4 * b],  # noqa: E731
                             buf[4 * b :].reshape(b, self.width))
        self.ids, self.positions, self.slots, self.lens, self.tables = views(self._dev)
        self.h_ids, self.h_pos, self.h_slots, self.h_lens, self.h_tables = views(self._host_np)
        self.stats = source.graph_statistics()
        self._reset_padding(0)
        self._dev.copy_(self._host)

    def key(self, batch: StepBatch) -> int | None:
        size = bucket_for(self.sizes, len(batch.requests))
        return size if size is not None and self.source.graph_ready(batch) else None

    def step(self, key: int) -> BlockTableStep:
        return BlockTableStep(self, key)

    def keys_at_start(self) -> list[int]:
        return sorted(self.sizes, reverse=True)

    def _reset_padding(self, start: int) -> None:
        """Rows ``start..`` of the host buffers become padding: slot -1, one token at block 0 (none
        with statistics, so that padding adds nothing to any score; its output is dropped)."""
        self.h_ids[start:] = 0
        self.h_pos[start:] = 0
        self.h_slots[start:] = -1
        self.h_lens[start:] = 0 if self.stats is not None else 1
        self.h_tables[start:, 0] = 0

    def load(self, batch: StepBatch, size: int) -> None:
        """Write ``batch``'s rows into the static buffers of bucket ``size``."""
        n = len(batch.requests)
        bs = self.layout.block_size
        if self._copied is not None:  # the previous step's copy must have read the pinned buffer
            self._copied.synchronize()
        reqs, tables = batch.requests, self.source.block_tables(batch)
        # Whole columns at once: per-element writes into the numpy views cost ~1 us each, and a step
        # of 256 requests writes thousands of table entries.
        held = np.fromiter(self.source.held_tokens(batch), dtype=np.int64, count=n)
        pos = [req.num_computed_tokens for req in reqs]
        self.h_ids[:n] = [req.token_at(p) for req, p in zip(reqs, pos)]
        self.h_pos[:n] = pos
        self.h_lens[:n] = held + 1
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=n)
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum()))
        starts = np.cumsum(lens) - lens
        block = held // bs  # where each new token goes
        bad = (block >= lens) | (lens > self.width)
        if bad.any():
            i = int(np.argmax(bad))
            raise IndexError(f"request {reqs[i].request_id}: {int(held[i])} held tokens and a block table of "
                             f"{int(lens[i])} blocks of {bs} (at most {self.width})")
        self.h_slots[:n] = flat[starts + block] * bs + held % bs
        # Entry j of row i's table goes to flat index i * width + j of the [b, width] tables.
        at = np.repeat(np.arange(n, dtype=np.int64) * self.width - starts, lens) + np.arange(flat.size)
        self.h_tables.reshape(-1)[at] = flat
        self._reset_padding(n)
        end = 4 * self.max_batch + size * self.width
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if self.stats is not None:
            self.stats.begin(self.slots[:n], self.positions[:n])
