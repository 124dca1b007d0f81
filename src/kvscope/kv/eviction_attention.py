"""Attention for evicting strategies: the slot-cache attention plus the statistics scorers need.

Scores are float32 and live per slot (``strategy.scores[layer, slot, kv_head]``). Grouped-query
attention: a KV head's statistic is the *sum* over the query heads of its group (H2O's per-head
accumulated attention generalised to GQA). Decode computes one row of probabilities per query head,
so its column sums cost O(T); H2O's prefill chunks materialise ``[heads, n, T]`` once per chunk,
while SnapKV (its observation window) and TOVA (the newest row) compute probabilities only for the
rows they read and take the output from the fused attention. A step's chunks are attended in a few
padded groups, not one by one (:mod:`kvscope.kv.eviction_prefill`). On the Triton backend H2O's
chunks materialise nothing: the prefill kernel and a column-sum kernel fold the statistic into the
scores (:mod:`kvscope.kv.eviction_triton_prefill`).
"""
from __future__ import annotations

from typing import Protocol

import torch

from kvscope.device_copy import to_device
from kvscope.attention.torch_ref import attend_causal
from kvscope.kv.base import KVSetup
from kvscope.kv.eviction_prefill import PrefillGroup, build_group, plan_groups
from kvscope.kv.slot_cache import SlotAttention, SlotKVCache
from kvscope.kv.statistics import ScoreStatistic


class ScoredSlots(Protocol):
    """What the attention needs of an evicting strategy (``kv/eviction.py``), declared here so that
    this module does not import it: the KV, the per-slot scores and positions, the statistic."""

    setup: KVSetup
    cache: SlotKVCache
    scale: float
    block_size: int
    #: ``[L, num_slots, Hkv]`` float32 scores and int64 positions of every slot.
    scores: torch.Tensor
    positions: torch.Tensor
    statistic: ScoreStatistic

    @property
    def keyed_initial_scores(self) -> bool: ...

    def initial_scores(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def reset_scores(self, slots: torch.Tensor, positions: torch.Tensor) -> None: ...


def _probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``q`` ``[B, Hkv, G, n, D]``, ``k`` ``[B, T, Hkv, D]``, ``mask`` broadcastable to
    ``[B, Hkv, G, n, T]`` (True = visible). Returns float32 probabilities ``[B, Hkv, G, n, T]``,
    contiguous.

    One batched matmul over ``[B, Hkv, G * n, D] x [B, Hkv, D, T]`` with the scale applied to the
    queries, so that the logits come out contiguous: logits in the strides of the (permuted)
    queries make every elementwise pass over the ``n x T`` matrix (mask, softmax) walk it strided,
    which cost a quarter of an `h2o` prefill on the CPU."""
    b, h, g, n, d = q.shape
    queries = (q.float() * scale).reshape(b, h, g * n, d)
    logits = torch.matmul(queries, k.float().permute(0, 2, 3, 1)).view(b, h, g, n, -1)
    return logits.masked_fill_(~mask, float("-inf")).softmax(-1)


def _probs_and_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """:func:`_probs` and the output ``[B, Hkv, G, n, D]`` in ``q``'s dtype (``v`` ``[B, T, Hkv, D]``)."""
    probs = _probs(q, k, mask, scale)
    b, h, g, n, t = probs.shape
    out = torch.matmul(probs.view(b, h, g * n, t), v.float().permute(0, 2, 1, 3)).view(b, h, g, n, -1)
    return probs, out.to(q.dtype)


class EvictionAttention(SlotAttention):
    """The slot-cache attention of one step of an evicting strategy, plus the scores.

    Besides K/V it writes each new token's position and initial score; when the policy's statistic
    (:mod:`kvscope.kv.statistics`) reads attention it computes the probabilities explicitly and the
    statistic reduces and folds them into the scores.
    On the Triton backend, decode rows go through the paged decode kernel instead, which also
    emits the statistic (per token and KV head, the group's summed probabilities) in the same pass
    over K/V (``block_tables``: per request its blocks, whose first slots hold its tokens in order);
    so do prefill rows whose every row feeds a folded statistic
    (:class:`~kvscope.kv.eviction_triton_prefill.FoldedPrefill`).
    """

    def __init__(
        self,
        strategy: ScoredSlots,
        slot_mapping: torch.Tensor,
        tables: list[torch.Tensor],
        query_start: list[int],
        positions: torch.Tensor,
        window_first: list[int],
        block_tables: list[list[int]],
    ) -> None:
        super().__init__(strategy.cache, slot_mapping, tables, query_start, strategy.scale)
        self.s = strategy
        self.positions = positions
        self.window_first = window_first
        stat, device = strategy.statistic, slot_mapping.device
        self.folded_prefill = None
        if (self.prefill_rows and strategy.setup.attention_backend == "triton" and stat.observes_every_prefill_row
                and stat.kernel_mode == "fold"):
            from kvscope.kv.eviction_triton_prefill import FoldedPrefill

            self.folded_prefill = FoldedPrefill(tables, query_start, self.prefill_rows, device)
        self.prefill_groups = [] if self.folded_prefill is not None else self._prefill_groups(strategy, device)
        self.fused = False
        # Every layer's entry of the new tokens at once (one launch per step, not per layer), unless
        # the policy's initial score depends on the layer's keys.
        strategy.positions[:, slot_mapping] = positions[None, :, None]
        self.keyed_scores = strategy.keyed_initial_scores
        if not self.keyed_scores:
            strategy.reset_scores(slot_mapping, positions)
        if self.decode_rows:
            width = self.decode_slots.shape[1]
            device = slot_mapping.device
            self.decode_valid = torch.arange(width, device=device)[None, :] < self.decode_lens[:, None]
            # The valid entries' flat indices in [decode rows, width], by nonzero_static with the
            # count the host knows: indexing by the boolean mask would read the count back from the
            # device, a sync in every step's launch.
            held = sum(tables[i].numel() for i in self.decode_rows)
            self.decode_index = torch.nonzero_static(self.decode_valid.flatten(), size=held).squeeze(1)
            self.decode_valid_slots = self.decode_slots.flatten()[self.decode_index]
            if strategy.setup.attention_backend == "triton":
                from kvscope.attention.triton_decode import paged_decode_attention

                self._decode = paged_decode_attention
                self.fused = True
                rows = [block_tables[i] for i in self.decode_rows]
                blocks = max(len(t) for t in rows)
                self.block_tables = to_device([t + [0] * (blocks - len(t)) for t in rows], device, torch.int32)
                self.block_lens = self.decode_lens.to(torch.int32)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, stat = self.s, self.s.statistic
        self.write(layer, k, v)
        hkv = k.shape[1]
        if self.keyed_scores:
            s.scores[layer].index_copy_(0, self.slot_mapping, s.initial_scores(k, self.positions))
        if not stat.reads_attention:
            return self.attend_cached(layer, q)
        kc, vc = s.cache.kv[layer, 0], s.cache.kv[layer, 1]
        out = torch.empty_like(q)
        g = q.shape[1] // hkv
        if self.fused:
            args = (q[self.decode_q_index], kc, vc, self.block_tables, self.block_lens, s.scale, s.block_size)
            if stat.kernel_mode == "fold":  # the kernel adds the statistic to the scores itself
                out[self.decode_q_index] = self._decode(*args, fold_scores=s.scores[layer])
            elif stat.kernel_mode == "colsum":  # the kernel's column sums, reduced by the statistic
                o, colsum = self._decode(*args, emit_colsum=True)
                out[self.decode_q_index] = o
                colsum = stat.reduce_colsum(colsum, hkv, g, self.decode_valid.shape[1])
                self._fold(layer, self.decode_valid_slots, colsum, self.decode_index)
            else:  # decode rows are not observed
                out[self.decode_q_index] = self._decode(*args)
        elif self.decode_rows:
            b = len(self.decode_rows)
            qd = q[self.decode_q_index].view(b, hkv, g, 1, -1)
            mask = self.decode_valid[:, None, None, None, :]
            probs, o = _probs_and_out(qd, kc[self.decode_slots], vc[self.decode_slots], mask, s.scale)
            out[self.decode_q_index] = o.reshape(b, hkv * g, -1)
            if stat.observes_decode:
                self._update(layer, self.decode_valid_slots, probs, self.decode_index)
        if self.folded_prefill is not None:
            self.folded_prefill.attend(q, kc, vc, s.scores[layer], s.scale, out)
        if not stat.observes_every_prefill_row:
            # A statistic that reads only some rows (a window, the newest): the output goes through
            # the fused attention and the [heads, n, T] matrix is never materialised.
            for i in self.prefill_rows:
                st, en = self.query_start[i], self.query_start[i + 1]
                out[st:en] = attend_causal(q[st:en], kc[self.tables[i]], vc[self.tables[i]], s.scale)
        for grp in self.prefill_groups:
            b, m = grp.q_index.shape
            qg = q[grp.q_index].view(b, m, hkv, g, -1).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, M, D]
            kg, vg = kc[grp.slots], vc[grp.slots]  # [B, T, Hkv, D]
            if stat.observes_every_prefill_row:  # the output comes from the same probabilities
                probs, o = _probs_and_out(qg, kg, vg, grp.mask, s.scale)
                out[grp.out_q] = o.permute(0, 3, 1, 2, 4).reshape(b * m, hkv * g, -1)[grp.out_rows]
            else:
                probs = _probs(qg, kg, grp.mask, s.scale)
            probs.mul_(grp.row_valid[:, None, None, :, None])  # padded rows add nothing
            self._update(layer, grp.fold_slots, probs, grp.fold_index)
        return out

    def _prefill_groups(self, strategy: ScoredSlots, device: torch.device) -> list[PrefillGroup]:
        """The step's prefill chunks whose rows feed the statistic, batched
        (:mod:`kvscope.kv.eviction_prefill`)."""
        stat = strategy.statistic
        if not stat.reads_attention or not self.prefill_rows:
            return []
        chunks, tables = [], []
        for i in self.prefill_rows:
            st, en = self.query_start[i], self.query_start[i + 1]
            n = en - st
            first = 0 if stat.observes_every_prefill_row else stat.prefill_first_row(n, self.window_first[i])
            if first is None:
                continue
            chunks.append((st + first, n - first, self.tables[i].numel()))
            tables.append(self.tables[i])
        heads = strategy.setup.model.num_heads
        return [build_group(chunks, tables, members, device) for members in plan_groups(chunks, heads)]

    def _update(self, layer: int, slots: torch.Tensor, probs: torch.Tensor, index: torch.Tensor | None) -> None:
        """Fold ``probs`` ``[B, Hkv, G, n, T]`` into the scores of ``slots`` (see :meth:`_fold`)."""
        self._fold(layer, slots, self.s.statistic.reduce(probs), index)

    def _fold(self, layer: int, slots: torch.Tensor, stat: torch.Tensor, index: torch.Tensor | None) -> None:
        """Fold the statistic ``stat`` ``[B, Hkv, T]`` into the scores of ``slots`` ``[N]`` (the
        statistic adds or replaces). ``index`` ``[N]``: the flat indices of ``slots``' entries in
        ``[B, T]``; None when B is 1 and every column is a slot."""
        stat = stat.transpose(1, 2)  # [B, T, Hkv]
        stat = stat.flatten(0, 1)[index] if index is not None else stat[0]
        self.s.statistic.fold(self.s.scores[layer], slots, stat)


class CapturedColumnSums:
    """An eviction policy's per-token state inside a captured decode step (``engine/cuda_graph.py``).

    Before each replay the step's new tokens get their positions and their fresh score (zero, or
    the policy's own: ``reset_scores``), eagerly (a policy that evicts later reads both). With
    ``fold`` (H2O's statistic) the decode kernel then adds each held token's column sum to its
    slot's score (``fold_scores``); padding rows of the graph's batch hold no token (length 0), so
    they add nothing. Without it (plain decode: SnapKV, StreamingLLM) the kernel folds nothing."""

    def __init__(self, strategy: ScoredSlots, fold: bool = True) -> None:
        self.s = strategy
        self.fold = fold

    def begin(self, new_slots: torch.Tensor, positions: torch.Tensor) -> None:
        s = self.s
        s.positions[:, new_slots] = positions.long()[None, :, None]
        s.reset_scores(new_slots, positions)

    def layer_scores(self, layer: int) -> torch.Tensor | None:
        return self.s.scores[layer] if self.fold else None
