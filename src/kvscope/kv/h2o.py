"""``h2o``: Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023).

A token's score is the attention it has received, summed over query rows and accumulated over
steps: the prefill's column sums start it and every decode step adds its row. Each layer and KV
head keeps its recent window plus its highest-scoring older tokens. Under grouped-query attention
a KV head's score sums the query heads of its group.
"""
from __future__ import annotations

from typing import Any

from kvscope.errors import ConfigError
from kvscope.kv.eviction import EvictionStrategy
from kvscope.kv.eviction_budget import Budget, _ratio
from kvscope.kv.registry import register
from kvscope.kv.statistics import ACCUMULATED


@register
class H2OStrategy(EvictionStrategy):
    """Accumulated-attention heavy hitters plus a recent window; budget from ratios of the prompt."""

    name = "h2o"
    statistic = ACCUMULATED

    def __init__(
        self,
        heavy_ratio: float = 0.1,
        recent_ratio: float = 0.1,
        budget: int | None = None,
        recent: int | None = None,
        compress_prompt: bool = False,
        block_size: int = 16,
    ) -> None:
        _ratio("h2o: heavy_ratio", heavy_ratio)
        _ratio("h2o: recent_ratio", recent_ratio)
        if heavy_ratio + recent_ratio > 1.0 and budget is None:
            raise ConfigError(f"h2o: heavy_ratio + recent_ratio must be <= 1, got {heavy_ratio + recent_ratio}")
        self.heavy_ratio = heavy_ratio
        if budget is not None:
            super().__init__(budget=budget, recent=recent, compress_prompt=compress_prompt, block_size=block_size)
        else:
            super().__init__(
                budget_ratio=heavy_ratio + recent_ratio,
                recent_ratio=recent_ratio,
                compress_prompt=compress_prompt,
                block_size=block_size,
            )

    @classmethod
    def args_for_share(cls, share: float) -> dict[str, Any] | None:
        # Half heavy hitters, half recent window, as the H2O paper's default split.
        return {"heavy_ratio": share / 2, "recent_ratio": share / 2}

    def resolve_budget(self, num_prompt_tokens: int) -> Budget:
        if self.budget is not None:
            return super().resolve_budget(num_prompt_tokens)
        # As the H2O code does: each part is its own ratio of the prompt, rounded down.
        recent = max(1, int(self.recent_ratio * num_prompt_tokens))
        return Budget(int(self.heavy_ratio * num_prompt_tokens) + recent, recent)
