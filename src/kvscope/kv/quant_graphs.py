"""Capturable decode steps of ``quant``'s KIVI dtypes (``int8``/``int4``): ``paged``'s block-table
steps (:mod:`kvscope.kv.block_table_graphs`) plus one more static column, each row's residual slot.

A KIVI block is one quantization group (``block_size == group_size``), so the block-table buffers
already say everything else a step needs: a row's new token goes to ``slot = block * G + offset``
of its block table, its context is ``lens`` tokens, the first ``lens // G`` blocks quantized and the
rest in its residual slot. The per-step difference between rows (whether the token completes its
group and so quantizes the block) is decided on the device by the captured write
(:mod:`kvscope.attention.triton_kivi_write`), so one graph per batch-size bucket serves every step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvscope.kv.backend import StepBatch
from kvscope.kv.block_table_graphs import BlockTableGraphs, BlockTableStep

if TYPE_CHECKING:
    from kvscope.kv.quant import QuantStrategy


class KiviStep(BlockTableStep):
    """Bucket ``size`` of :class:`KiviGraphs`: a block-table step whose attention is
    :class:`~kvscope.attention.triton_quant_decode.StaticKiviDecode` over the bucket's rows of the
    static buffers, the residual slots included."""

    def __init__(self, graphs: KiviGraphs, size: int) -> None:
        from kvscope.attention.decode_splits import default_num_splits
        from kvscope.attention.triton_quant_decode import StaticKiviDecode

        g = self.graphs = graphs
        m = g.source.setup.model
        self.batch_size = size
        self.input_ids, self.positions = g.ids[:size], g.positions[:size]
        splits = default_num_splits(size, m.num_kv_heads, g.width * g.layout.block_size, g.device)
        self.attention = StaticKiviDecode(g.layout.cache, g.slots[:size], g.res_slots[:size], g.tables[:size],
                                          g.lens[:size], m.head_dim**-0.5, splits)


class KiviGraphs(BlockTableGraphs):
    """The :class:`~kvscope.kv.backend.GraphDecode` of ``quant:dtype=int8|int4``.

    Args:
        source: the strategy (KIVI, Triton backend).
        sizes: batch-size buckets.
        max_model_len: the longest sequence; sizes the block tables and the decode splits.
    """

    source: QuantStrategy

    def __init__(self, source: QuantStrategy, sizes: list[int], max_model_len: int, device: torch.device) -> None:
        super().__init__(source, sizes, max_model_len, device)
        b = self.max_batch
        # Its own small pinned buffer and copy beside the block-table one: padding rows read slot 0
        # (their lengths of one token read its first residual row; their outputs are dropped).
        self._h_res = torch.zeros(b, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._h_res_np = self._h_res.numpy()
        self.res_slots = torch.zeros(b, dtype=torch.int32, device=device)
        self._res_copied = torch.cuda.Event() if device.type == "cuda" else None

    def step(self, key: int) -> KiviStep:
        return KiviStep(self, key)

    def load(self, batch: StepBatch, size: int) -> None:
        """Write ``batch``'s rows, their residual slots included, into the buffers of bucket ``size``."""
        super().load(batch, size)
        n = len(batch.requests)
        if self._res_copied is not None:  # the previous step's copy must have read the pinned buffer
            self._res_copied.synchronize()
        self._h_res_np[:n] = self.source.residual_slots(batch)
        self._h_res_np[n:] = 0
        self.res_slots[:size].copy_(self._h_res[:size], non_blocking=True)
        if self._res_copied is not None:
            self._res_copied.record()
