"""``random``: evict uniformly at random (beyond the newest token): the sanity baseline."""
from __future__ import annotations

import torch

from kvscope.kv.eviction import EvictionStrategy
from kvscope.kv.registry import register


@register
class RandomStrategy(EvictionStrategy):
    """Each token gets a seeded uniform score when written; the lowest are evicted."""

    name = "random"
    default_recent_fraction = 0.0

    def __init__(
        self,
        budget_ratio: float | None = 0.2,
        budget: int | None = None,
        compress_prompt: bool = False,
        seed: int = 0,
        block_size: int = 16,
    ) -> None:
        super().__init__(
            budget_ratio=None if budget is not None else budget_ratio,
            budget=budget,
            compress_prompt=compress_prompt,
            block_size=block_size,
        )
        self.generator = torch.Generator().manual_seed(seed)

    def initial_scores(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.rand(k.shape[:2], generator=self.generator).to(k.device)
