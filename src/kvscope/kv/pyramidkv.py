"""``pyramidkv``: PyramidKV (Cai et al., 2024): SnapKV's prompt compression, budgets by layer.

Attention spreads widely in the lower layers and funnels onto a few tokens in the upper ones, so
PyramidKV keeps more of the prompt low and less high, with the same total as SnapKV at the same
budget. Selection in every layer and KV head is SnapKV's (:mod:`kvscope.kv.snapkv`): the last
``window`` prompt queries vote, the votes are pooled along the sequence, the window is always kept.

Budgets (:func:`pyramid_budgets`), for ``L`` layers, SnapKV's per-layer budget ``total`` (of which
``window`` is the observation window, kept in every layer) and ``h = total - window`` the average
of the rest, as the paper's reference code allots them: the top layer keeps ``h / beta`` beside
the window, the bottom layer ``2h - h / beta``, the layers between an arithmetic sequence, so they
sum to ``L * h``. When the bottom layer would keep more than the prompt holds beside the window
(``P - window``), it keeps exactly that and the top layer ``2h - (P - window)``. The reference code
rounds the step down (its layers then sum to up to ``L^2 / 2`` tokens more); here each layer's
exact share is rounded down, then the lowest layers whose share has a fraction round up instead,
one token each, until the sum is exactly ``L * total``. ``beta = 1`` is SnapKV (every layer keeps ``total``).

Memory is real: a request's blocks follow the sum of its layers' budgets (within one block per
layer of rounding, plus one block), through the per-layer tables of
:mod:`kvscope.kv.eviction_layered`. Decode runs the torch path, not captured in CUDA graphs.
"""
from __future__ import annotations

from fractions import Fraction

import torch

from kvscope.errors import ConfigError
from kvscope.kv.eviction_budget import Budget
from kvscope.kv.eviction_layered import LayeredEvictionStrategy
from kvscope.kv.registry import register
from kvscope.kv.snapkv import check_observation_args, pool_scores, window_budget
from kvscope.kv.statistics import OBSERVATION_WINDOW
from kvscope.request import Request


def pyramid_budgets(total: int, window: int, prompt: int, num_layers: int, beta: float) -> list[int]:
    """Tokens each layer keeps, bottom layer first (see the module docstring): non-increasing,
    each at least ``window``, summing to ``num_layers * total``. A ``total`` of the whole prompt
    or more keeps ``total`` everywhere (nothing is evicted)."""
    L = num_layers
    if total >= prompt or L == 1:
        return [total] * L
    h = total - window
    top = Fraction(h) / Fraction(beta)
    bottom = 2 * h - top
    if bottom > prompt - window:
        bottom = Fraction(prompt - window)
        top = 2 * h - bottom
    step = (bottom - top) / (L - 1)
    exact = [bottom - layer * step for layer in range(L)]
    heavy = [int(x) for x in exact]  # floors: every share is >= 0
    left = L * h - sum(heavy)  # the fractions add up to fewer than L tokens
    for layer, x in enumerate(exact):
        # Rounded up instead, lowest layers first; a whole share (a capped bottom layer) stays.
        if left and x != heavy[layer]:
            heavy[layer] += 1
            left -= 1
    return [window + x for x in heavy]


@register
class PyramidKVStrategy(LayeredEvictionStrategy):
    """SnapKV's selection under a pyramid of per-layer budgets (more below, less above)."""

    name = "pyramidkv"
    statistic = OBSERVATION_WINDOW

    def __init__(
        self,
        budget_ratio: float | None = None,
        budget: int | None = None,
        window: int = 32,
        kernel_size: int = 7,
        pooling: str = "max",
        beta: float = 20.0,
        block_size: int = 16,
    ) -> None:
        check_observation_args("pyramidkv", window, kernel_size, pooling)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 1.0 <= beta < float("inf"):
            raise ConfigError(f"pyramidkv: beta must be a finite number >= 1 (1: every layer alike), got {beta!r}")
        self.window = window
        self.kernel_size = kernel_size
        self.pooling = pooling
        self.beta = float(beta)
        super().__init__(budget_ratio=budget_ratio, budget=budget, block_size=block_size)

    def resolve_budget(self, num_prompt_tokens: int) -> Budget:
        return window_budget(super().resolve_budget(num_prompt_tokens).total, self.window)

    def layer_budgets(self, budget: Budget, num_tokens: int) -> list[int]:
        return pyramid_budgets(budget.total, budget.recent, num_tokens, self.setup.model.num_layers, self.beta)

    def selection_scores(self, scores: torch.Tensor, positions: torch.Tensor, request: Request) -> torch.Tensor:
        return pool_scores(scores, self.kernel_size, self.pooling)
