"""``random``: evict uniformly at random (beyond the newest token): the sanity baseline."""
from __future__ import annotations

from typing import Any

import torch

from kvscope import checks
from kvscope.kv.eviction import EvictionStrategy
from kvscope.kv.registry import register


@register
class RandomStrategy(EvictionStrategy):
    """Each token gets a seeded uniform score when written; the lowest are evicted."""

    name = "random"
    default_recent_fraction = 0.0

    def __init__(self, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generator = torch.Generator().manual_seed(checks.integer(seed, "random: seed", -(1 << 63), (1 << 63) - 1))

    def initial_scores(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.rand(k.shape[:2], generator=self.generator).to(k.device)
