"""The prefill chunks of an evicting strategy's step on the Triton backend, when its statistic sums
every prefill row into the scores (H2O's accumulated attention, ``kernel_mode == "fold"``).

The chunks' output comes from the paged prefill kernel, which also keeps each row's log-sum-exp,
and the statistic from the column-sum kernel, which adds it to the layer's per-slot scores
(:mod:`kvscope.attention.triton_prefill_colsum`): no ``[heads, n, T]`` probabilities are
materialised. A request's context is an explicit slot list (its resident tokens, then the chunk's
own), so the kernels read it as a block table of one-token blocks.
"""
from __future__ import annotations

import itertools

import torch
from torch.nn.utils.rnn import pad_sequence

from kvscope.attention.triton_prefill_colsum import paged_prefill_with_column_sums
from kvscope.device_copy import to_device_views
from kvscope.kv.slot_cache import rows_index


class FoldedPrefill:
    """One step's prefill chunks, laid out for the kernels once and used by every layer.

    Args:
        tables: per request of the step, its context's slots ``[t]`` on the device (the chunk's
            own tokens last).
        query_start: ``[B + 1]`` row offsets of each request's new tokens in the flattened batch.
        rows: the requests that are prefill chunks (more than one new token).
    """

    def __init__(self, tables: list[torch.Tensor], query_start: list[int], rows: list[int],
                 device: torch.device) -> None:
        q_lens = [query_start[i + 1] - query_start[i] for i in rows]
        ctx = [tables[i].numel() for i in rows]
        self.q_rows = rows_index([(query_start[i], query_start[i + 1]) for i in rows], device)
        # Row offsets and context lengths in one copy; the host knows them all (no sync). Each view
        # aligned, whatever the number of chunks: its alignment is part of the kernels' compile key.
        self.cu, self.lens = to_device_views([list(itertools.accumulate(q_lens, initial=0)), ctx], device,
                                             torch.int32)
        # [P, max t] int32, padding slot 0 (never read: past each context).
        self.slots = pad_sequence([tables[i] for i in rows], batch_first=True).to(torch.int32)
        self.max_q, self.max_ctx = max(q_lens), max(ctx)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scores: torch.Tensor,
               scale: float, out: torch.Tensor) -> None:
        """Write the chunks' rows of ``out`` ``[N, Hq, D]`` from ``q`` ``[N, Hq, D]`` over the layer's
        ``k_cache``/``v_cache`` ``[num_slots, Hkv, D]`` (the step's K/V written), and add every
        context token's column sum to its row of ``scores`` ``[num_slots, Hkv]`` float32."""
        args = (k_cache, v_cache, self.slots, self.cu, self.lens, scale, 1, self.max_q, self.max_ctx)
        if isinstance(self.q_rows, slice):  # written in place through a view of out
            paged_prefill_with_column_sums(q[self.q_rows], *args, out=out[self.q_rows], fold_scores=scores)
        else:
            out[self.q_rows] = paged_prefill_with_column_sums(q[self.q_rows], *args, fold_scores=scores)[0]
