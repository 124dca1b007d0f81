"""``streaming``: StreamingLLM (Xiao et al., 2024): the first ``sinks`` tokens plus a recent window."""
from __future__ import annotations

import torch

from kvscope.errors import ConfigError
from kvscope.kv.eviction import EvictionStrategy
from kvscope.kv.eviction_budget import Budget
from kvscope.kv.registry import register


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

    def reset_scores(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Sinks (``positions < sinks``) score +inf, every other token 0 (``slots``, ``positions``:
        ``[N]``). The recent window is ``budget - sinks`` tokens, so ranking by these raw scores
        with the window kept keeps exactly the sinks and the window; the ranking needs nothing at
        selection time, so decode steps replay CUDA graphs and a step one token over budget takes
        the fused one-token eviction (``kvscope.kv.evict_one``)."""
        fresh = torch.where(positions < self.sinks, float("inf"), 0.0).to(self.scores.dtype)  # [N]
        layers, _, heads = self.scores.shape
        self.scores.index_copy_(1, slots.long(), fresh[None, :, None].expand(layers, -1, heads))
