"""``snapkv``: SnapKV (Li et al., 2024): compress the prompt once, from an observation window.

The last ``window`` prompt queries vote: their attention to each earlier prompt token is summed
over the window and over the query heads of each KV group, smoothed by 1-D pooling along the
sequence (so neighbours of a hit survive too), and each KV head keeps its top tokens plus the
window itself. Generated tokens are all kept: SnapKV does not evict during decode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvscope.errors import ConfigError
from kvscope.kv.eviction import EvictionStrategy
from kvscope.kv.eviction_budget import Budget
from kvscope.kv.registry import register
from kvscope.kv.statistics import OBSERVATION_WINDOW
from kvscope.request import Request


@register
class SnapKVStrategy(EvictionStrategy):
    """Prompt compression scored by an observation window at the prompt's end, pooled, per head."""

    name = "snapkv"
    statistic = OBSERVATION_WINDOW
    evict_in_decode = False

    def __init__(
        self,
        budget_ratio: float | None = None,
        budget: int | None = None,
        window: int = 32,
        kernel_size: int = 7,
        pooling: str = "max",
        block_size: int = 16,
    ) -> None:
        check_observation_args("snapkv", window, kernel_size, pooling)
        self.window = window
        self.kernel_size = kernel_size
        self.pooling = pooling
        super().__init__(
            budget_ratio=budget_ratio, budget=budget, block_size=block_size
        )

    def resolve_budget(self, num_prompt_tokens: int) -> Budget:
        return window_budget(super().resolve_budget(num_prompt_tokens).total, self.window)

    def selection_scores(self, scores: torch.Tensor, positions: torch.Tensor, request: Request) -> torch.Tensor:
        return pool_scores(scores, self.kernel_size, self.pooling)


def check_observation_args(name: str, window: int, kernel_size: int, pooling: str) -> None:
    """:class:`ConfigError` naming strategy ``name``'s observation-window argument that is out of range."""
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"{name}: window must be an integer >= 1, got {window!r}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"{name}: kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    if pooling not in ("max", "avg"):
        raise ConfigError(f"{name}: pooling must be 'max' or 'avg', got {pooling!r}")


def window_budget(total: int, window: int) -> Budget:
    """A budget of ``total`` tokens whose recent part is the observation window (SnapKV keeps it)."""
    return Budget(total, max(1, min(window, total)))


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """SnapKV's smoothing: ``scores`` ``[L, r, Hkv]`` pooled along the ``r`` slots (``"max"`` or
    ``"avg"``, window ``kernel_size``, same length). Slots are in position order until the first
    compression, which is when it is read."""
    x = scores.permute(0, 2, 1)  # [L, Hkv, r]
    pad = kernel_size // 2
    if pooling == "max":
        pooled = F.max_pool1d(x, kernel_size, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(x, kernel_size, stride=1, padding=pad, count_include_pad=False)
    return pooled.permute(0, 2, 1)
