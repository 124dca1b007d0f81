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
        self.seed = checks.integer(seed, "random: seed", -(1 << 63), (1 << 63) - 1)
        self.generator: torch.Generator | None = None

    def initial_scores(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Uniform scores ``[N, Hkv]`` for the N new tokens of ``k`` ``[N, Hkv, D]``."""
        # Drawn on k's device: scores drawn on the host would be a blocking copy in every step's
        # launch (the sequence of draws, so the evictions, differ between a CPU and a GPU engine).
        if self.generator is None or self.generator.device != k.device:
            self.generator = torch.Generator(device=k.device).manual_seed(self.seed)
        return torch.rand(k.shape[:2], generator=self.generator, device=k.device)
