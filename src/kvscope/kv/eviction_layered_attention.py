"""Attention for eviction with per-layer tables (:mod:`kvscope.kv.eviction_layered`).

Each layer reads its own table of layer-slots: layer ``l``'s KV may live in any physical layer of
the pool tensor, so K/V are gathered through the tensor viewed as ``[L * 2 * num_slots, Hkv, D]``
(:func:`kv_rows`) and the scores through ``[L * num_slots, Hkv]``.
The arithmetic is the shared eviction attention's torch path (:mod:`kvscope.kv.eviction_attention`)
line for line, so equal per-layer budgets give its results bit for bit: prefill through the fused
causal attention plus the statistic's observed rows, decode through explicit probabilities when the
statistic reads attention. Decode rows are never observed (the layered base compresses once).
"""
from __future__ import annotations

import torch

from kvscope.device_copy import to_device
from kvscope.attention.torch_ref import attend_causal, attend_decode
from kvscope.kv.eviction_attention import ScoredSlots, _probs, _probs_and_out


def kv_rows(u: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Rows of the K of layer-slots ``u`` in the KV tensor viewed as ``[L * 2 * num_slots, Hkv, D]``
    (the V of each lies ``num_slots`` rows further)."""
    return u + (u // num_slots) * num_slots


class LayeredEvictionAttention:
    """One step's attention over per-layer tables.

    Args:
        new_slots: per layer, ``[N]`` layer-slots of the step's new tokens (batch order).
        tables: per layer, per request, ``[context_len]`` layer-slots of its tokens in order.
        query_start: ``[B + 1]`` row offsets of each request's new tokens.
        positions: ``[N]`` positions of the new tokens.
        window_first: per request, the first row of its chunk inside the observation window.
    """

    def __init__(
        self,
        strategy: ScoredSlots,
        new_slots: list[torch.Tensor],
        tables: list[list[torch.Tensor]],
        query_start: list[int],
        positions: torch.Tensor,
        window_first: list[int],
    ) -> None:
        self.s = strategy
        self.num_slots = S = strategy.cache.num_slots
        self.kvf = strategy.cache.kv.view(-1, *strategy.cache.kv.shape[-2:])  # [L * 2 * num_slots, Hkv, D]
        self.scores = strategy.scores.view(-1, strategy.scores.shape[-1])  # [L * num_slots, Hkv]
        self.new_rows = [kv_rows(u, S) for u in new_slots]
        self.tables = tables
        self.rows = [[kv_rows(t, S) for t in ts] for ts in tables]
        self.query_start = query_start
        self.window_first = window_first
        every = torch.cat(new_slots)
        flat_pos = strategy.positions.view(-1, strategy.positions.shape[-1])
        flat_pos[every] = positions.repeat(len(new_slots))[:, None]
        self.scores.index_fill_(0, every.long(), 0.0)  # no host sync, unlike item assignment of a number
        q_lens = [query_start[i + 1] - query_start[i] for i in range(len(query_start) - 1)]
        self.decode_rows = [i for i, n in enumerate(q_lens) if n == 1]
        self.prefill_rows = [i for i, n in enumerate(q_lens) if n > 1]
        device = every.device
        if self.decode_rows:
            self.decode_q_index = to_device([query_start[i] for i in self.decode_rows], device)

    def _decode_table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s decode rows: K rows ``[b, width]`` (padded with row 0) and lengths ``[b]``."""
        rows = [self.rows[layer][i] for i in self.decode_rows]
        lens = [r.numel() for r in rows]
        padded = torch.zeros(len(rows), max(lens), dtype=torch.long, device=rows[0].device)
        for j, r in enumerate(rows):
            padded[j, : lens[j]] = r
        return padded, to_device(lens, padded.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, stat, S, kvf = self.s, self.s.statistic, self.num_slots, self.kvf
        rows_new = self.new_rows[layer]
        kvf.index_copy_(0, rows_new, k.to(kvf.dtype))
        kvf.index_copy_(0, rows_new + S, v.to(kvf.dtype))
        hkv = k.shape[1]
        g = q.shape[1] // hkv
        out = torch.empty_like(q)
        if self.decode_rows:
            padded, lens = self._decode_table(layer)
            qd = q[self.decode_q_index]
            if stat.reads_attention:  # as the shared eviction attention computes it
                b = len(self.decode_rows)
                valid = torch.arange(padded.shape[1], device=q.device)[None, :] < lens[:, None]
                _, o = _probs_and_out(qd.view(b, hkv, g, 1, -1), kvf[padded], kvf[padded + S],
                                      valid[:, None, None, None, :], s.scale)
                out[self.decode_q_index] = o.reshape(b, hkv * g, -1)
            else:
                out[self.decode_q_index] = attend_decode(qd, kvf[padded], kvf[padded + S], lens, s.scale)
        for i in self.prefill_rows:
            st, en = self.query_start[i], self.query_start[i + 1]
            rows = self.rows[layer][i]
            ki, vi = kvf[rows], kvf[rows + S]
            out[st:en] = attend_causal(q[st:en], ki, vi, s.scale)
            n, t = en - st, rows.numel()
            first = stat.prefill_first_row(n, self.window_first[i]) if stat.reads_attention else None
            if first is None:
                continue
            obs = torch.arange(first, n, device=q.device)
            qi = q[st + first : en].view(obs.numel(), hkv, g, -1).permute(1, 2, 0, 3)[None]  # [1, Hkv, G, m, D]
            causal = torch.arange(t, device=q.device)[None, :] <= (obs + t - n)[:, None]
            probs = _probs(qi, ki[None], causal, s.scale)
            stat.fold(self.scores, self.tables[layer][i], stat.reduce(probs).transpose(1, 2)[0])
        return out
