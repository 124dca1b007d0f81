"""Decode steps as CUDA graphs: captured once per batch-size bucket, replayed every step.

A decode step of a small model, or of any model at small batch, is bound by the host: every layer
launches a dozen kernels, each costing microseconds of Python and driver time, so the GPU waits
between them (an 8B model at batch 1 ran 6x slower than its weight-read floor eagerly). A CUDA
graph records the whole step's launches once and replays them with one call.

A graph replays fixed addresses and shapes, so each bucket (batch size ``b``) is captured over
*static buffers*: token ids, positions, the new tokens' slots, context lengths and block tables,
all int32 views of one device buffer that each step refreshes with one host-to-device copy. A batch
of ``n`` requests runs the smallest bucket ``b >= n``; its ``b - n`` padding rows have slot -1 (the
KV write skips them) and one token of context, and their outputs are dropped. The decode kernel's
split count is fixed per bucket from the longest possible context (``max_model_len``); the splits a
shorter sequence does not reach exit at once (``attention/triton_decode.py``).

Only steps where every request decodes one token run as graphs, and only for strategies that expose
a :class:`~kvscope.kv.base.BlockTableLayout` (``paged``, ``contiguous``, ``h2o`` on the Triton
backend). A strategy that scores tokens by attention (``h2o``) also gives
:class:`~kvscope.kv.base.GraphStatistics`: the graph's decode kernel then emits its column sums and
folds them into the scores, and the eviction runs after the replay, in the strategy's ``end_step``;
prefill chunks, mixed steps, batches above the largest bucket and every other strategy run eagerly.
Buckets are captured when the engine starts, largest first, sharing one memory pool (as vLLM does),
so that no step pays a capture.
"""
from __future__ import annotations

import torch

from kvscope.kv.base import BlockTableLayout, GraphStatistics, KVStrategy, StepBatch
from kvscope.models.base import CausalLM


def default_graph_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's buckets: 1, 2, 4, then every multiple of 8, up to ``max_num_seqs`` (included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


def graph_bucket(sizes: list[int], num_new_tokens: list[int], sample_rows: list[int]) -> int | None:
    """The smallest of the sorted ``sizes`` that holds a step of ``num_new_tokens`` per request, if
    the step is pure decode (one new token per request, each sampled); else None (run eagerly)."""
    n = len(num_new_tokens)
    if n > sizes[-1] or any(k != 1 for k in num_new_tokens) or sample_rows != list(range(n)):
        return None
    return next(s for s in sizes if s >= n)


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


class DecodeGraphs:
    """Captured decode graphs of one engine, one per bucket in ``sizes``.

    Args:
        model: the served model.
        kv: the strategy; its :meth:`~KVStrategy.block_table_layout` must not be None.
        sizes: batch-size buckets to capture.
        max_model_len: the longest sequence; sizes the block tables and the decode splits.
    """

    def __init__(self, model: CausalLM, kv: KVStrategy, sizes: list[int], max_model_len: int,
                 device: torch.device) -> None:
        from kvscope.attention.triton_decode import default_num_splits

        layout = kv.block_table_layout()
        if layout is None:
            raise ValueError(f"strategy {kv.name!r} has no block-table layout to capture")
        self.model, self.kv, self.layout = model, kv, layout
        self.sizes = sorted(sizes)
        self.max_batch = self.sizes[-1]
        cfg = model.config
        self.width = -(-max_model_len // layout.block_size)
        b = self.max_batch
        # One int32 buffer (ids, positions, slots, lengths, tables) so that a step is one copy.
        n = 4 * b + b * self.width
        self._host = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        self._host_np = self._host.numpy()
        self._dev = torch.zeros(n, dtype=torch.int32, device=device)
        self._copied = torch.cuda.Event()
        views = lambda buf: (buf[:b], buf[b : 2 * b], buf[2 * b : 3 * b], buf[3 * b : 4 * b],  # noqa: E731
                             buf[4 * b :].reshape(b, self.width))
        self.ids, self.positions, self.slots, self.lens, self.tables = views(self._dev)
        self.h_ids, self.h_pos, self.h_slots, self.h_lens, self.h_tables = views(self._host_np)
        self.stats = kv.graph_statistics()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._out = torch.empty(b, cfg.vocab_size, dtype=torch.float32, device=device)
        scale = cfg.head_dim**-0.5
        pool = torch.cuda.graph_pool_handle()
        self._reset_padding(b)
        self._dev.copy_(self._host)
        for size in reversed(self.sizes):
            splits = default_num_splits(size, cfg.num_kv_heads, self.width * layout.block_size, device)
            attn = StaticDecodeAttention(layout, self.slots[:size], self.tables[:size], self.lens[:size],
                                         scale, splits, self.stats)
            self._capture(size, attn, pool)

    def _forward(self, size: int, attn: StaticDecodeAttention) -> None:
        hidden = self.model(self.ids[:size], self.positions[:size], attn)
        # Into one buffer shared by all buckets: per-bucket outputs would stay allocated (2 GB of
        # float32 logits over the buckets of 256 sequences at a 128k vocabulary).
        self._out[:size].copy_(self.model.compute_logits(hidden))

    @torch.inference_mode()
    def _capture(self, size: int, attn: StaticDecodeAttention, pool) -> None:
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels), as capture needs.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(size, attn)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._forward(size, attn)
        self._graphs[size] = graph

    def _reset_padding(self, start: int) -> None:
        """Rows ``start..`` of the host buffers become padding: slot -1, one token at block 0 (none
        with statistics, so that padding adds nothing to any score; its output is dropped)."""
        self.h_ids[start:] = 0
        self.h_pos[start:] = 0
        self.h_slots[start:] = -1
        self.h_lens[start:] = 0 if self.stats is not None else 1
        self.h_tables[start:, 0] = 0

    def bucket(self, batch: StepBatch, sample_rows: list[int]) -> int | None:
        """The bucket that runs ``batch``, or None when it must run eagerly."""
        size = graph_bucket(self.sizes, batch.num_new_tokens, sample_rows)
        return size if size is not None and self.kv.graph_ready(batch) else None

    @torch.inference_mode()
    def run(self, batch: StepBatch, size: int) -> torch.Tensor:
        """Replay bucket ``size`` for the decode-only ``batch``; float32 logits ``[B, vocab]``."""
        n = len(batch.requests)
        bs = self.layout.block_size
        # The previous step's copy must have read the pinned buffer before it is rewritten.
        self._copied.synchronize()
        held = self.kv.held_tokens(batch)
        for i, (req, table, h) in enumerate(zip(batch.requests, self.kv.block_tables(batch), held)):
            pos = req.num_computed_tokens
            self.h_ids[i] = req.token_at(pos)
            self.h_pos[i] = pos
            self.h_lens[i] = h + 1
            self.h_slots[i] = table[h // bs] * bs + h % bs
            self.h_tables[i, : len(table)] = table
        self._reset_padding(n)
        self._dev[: 4 * self.max_batch + size * self.width].copy_(
            self._host[: 4 * self.max_batch + size * self.width], non_blocking=True
        )
        self._copied.record()
        if self.stats is not None:
            self.stats.begin(self.slots[:n], self.positions[:n])
        self._graphs[size].replay()
        return self._out[:n].clone()
