"""``tova``: Token Omission Via Attention (Oren et al., 2024): rank by the newest query's attention.

TOVA averages the newest query's attention over all heads of a layer, so every KV head of a layer
keeps the same tokens. Only the newest token is protected (a recent window of one).
"""
from __future__ import annotations

from kvscope.kv.eviction import EvictionStrategy
from kvscope.kv.registry import register
from kvscope.kv.statistics import LAST_ROW


@register
class TOVAStrategy(EvictionStrategy):
    """Keep the tokens the newest query attends to most (head-averaged, per layer)."""

    name = "tova"
    statistic = LAST_ROW
    default_recent_fraction = 0.0

