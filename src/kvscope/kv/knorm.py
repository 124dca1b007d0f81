"""``knorm``: keep the keys with the lowest L2 norm (Devoto et al., 2024), per layer and KV head."""
from __future__ import annotations

import torch

from kvscope.kv.eviction import EvictionStrategy
from kvscope.kv.registry import register


@register
class KNormStrategy(EvictionStrategy):
    """Low key norm correlates with high attention; no attention statistics needed."""

    name = "knorm"
    default_recent_fraction = 0.0


    def initial_scores(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return -k.float().norm(dim=-1)
