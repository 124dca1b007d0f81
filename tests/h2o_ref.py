"""A dense, mask-based H2O, the way the original H2O repository simulates it: every token's K/V is
kept, and eviction is a boolean mask over them. Written independently of kvscope's mechanism; the
model code runs with this as its attention backend."""
from __future__ import annotations

import torch


class DenseMaskedH2O:
    """One sequence. ``budget``/``recent`` in tokens; evicts after every call once ``armed``."""

    def __init__(self, num_layers: int, budget: int, recent: int, scale: float):
        self.budget, self.recent, self.scale = budget, recent, scale
        self.k = [None] * num_layers
        self.v = [None] * num_layers
        self.kept = [None] * num_layers  # [Hkv, T] bool
        self.score = [None] * num_layers  # [Hkv, T] float64 accumulated attention

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, hq, d = q.shape
        hkv = k.shape[1]
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
            self.kept[layer] = torch.ones(hkv, n, dtype=torch.bool)
            self.score[layer] = torch.zeros(hkv, n, dtype=torch.float64)
        else:
            self.k[layer] = torch.cat([self.k[layer], k])
            self.v[layer] = torch.cat([self.v[layer], v])
            self.kept[layer] = torch.cat([self.kept[layer], torch.ones(hkv, n, dtype=torch.bool)], 1)
            self.score[layer] = torch.cat([self.score[layer], torch.zeros(hkv, n, dtype=torch.float64)], 1)
        K, V = self.k[layer], self.v[layer]
        t = K.shape[0]
        g = hq // hkv
        out = torch.empty_like(q)
        for h in range(hq):
            kv_h = h // g
            s = (q[:, h].double() @ K[:, kv_h].double().T) * self.scale  # [n, T]
            causal = torch.arange(t)[None, :] <= torch.arange(t - n, t)[:, None]
            visible = causal & self.kept[layer][kv_h][None, :]
            p = s.masked_fill(~visible, float("-inf")).softmax(-1)
            out[:, h] = (p @ V[:, kv_h].double()).to(q.dtype)
            self.score[layer][kv_h] += p.sum(0)
        return out

    def evict(self, length: int) -> None:
        """Mask all but the recent window and the top-scoring older tokens, per layer and head."""
        for layer in range(len(self.k)):
            kept, score = self.kept[layer], self.score[layer]
            for h in range(kept.shape[0]):
                if int(kept[h].sum()) <= self.budget:
                    continue
                rank = score[h].masked_fill(~kept[h], float("-inf"))
                recent = torch.arange(kept.shape[1]) >= length - self.recent
                rank = rank.masked_fill(recent & kept[h], float("inf"))
                top = rank.topk(self.budget).indices
                new = torch.zeros_like(kept[h])
                new[top] = True
                kept[h] = new

    def kept_positions(self) -> torch.Tensor:
        """``[L, Hkv, budget-or-fewer]`` positions of the unmasked tokens, sorted."""
        return torch.stack([torch.stack([row.nonzero()[:, 0] for row in kept]) for kept in self.kept])
