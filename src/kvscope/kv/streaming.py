"""``streaming``: StreamingLLM (Xiao et al., 2024): the first ``sinks`` tokens plus a recent window."""
from __future__ import annotations

import torch

from kvscope.errors import ConfigError
from kvscope.kv.eviction import EvictionStrategy
from kvscope.kv.eviction_budget import Budget
from kvscope.kv.registry import register
from kvscope.request import Request


@register
class StreamingStrategy(EvictionStrategy):
    """Attention sinks plus the most recent tokens; no attention statistics needed."""

    name = "streaming"

    def __init__(
        self,
        budget_ratio: float | None = None,
        budget: int | None = None,
        sinks: int = 4,
        compress_prompt: bool = False,
        block_size: int = 16,
    ) -> None:
        if not isinstance(sinks, int) or sinks < 0:
            raise ConfigError(f"streaming: sinks must be an integer >= 0, got {sinks!r}")
        if budget is not None and budget <= sinks:
            raise ConfigError(f"streaming: budget ({budget}) must exceed the {sinks} sink tokens")
        self.sinks = sinks
        super().__init__(
            budget_ratio=budget_ratio,
            budget=budget,
            compress_prompt=compress_prompt,
            block_size=block_size,
        )

    def resolve_budget(self, num_prompt_tokens: int) -> Budget:
        total = super().resolve_budget(num_prompt_tokens).total
        return Budget(total, max(1, total - self.sinks))

    def selection_scores(self, scores: torch.Tensor, positions: torch.Tensor, request: Request) -> torch.Tensor:
        # Sinks outrank everything; the rest rank by recency.
        return positions.float().masked_fill(positions < self.sinks, float("inf"))
