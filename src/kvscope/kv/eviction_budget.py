"""The budget arguments every eviction policy shares (``budget_ratio``, ``recent_ratio``, ``budget``,
``recent``), checked once, and the budget a request gets."""
from __future__ import annotations

from dataclasses import dataclass

from kvscope.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    """Resident tokens a request may keep per layer and KV head: ``total`` = heavy + ``recent``."""

    total: int
    recent: int


def _ratio(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")


def _count(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_budget_args(name: str, budget_ratio: float | None, recent_ratio: float | None, budget: int | None,
                      recent: int | None, block_size: int) -> None:
    """Raise :class:`ConfigError` naming strategy ``name`` for budget arguments out of range or at odds."""
    _ratio(f"{name}: budget_ratio", budget_ratio)
    _ratio(f"{name}: recent_ratio", recent_ratio)
    _count(f"{name}: budget", budget, 1)
    _count(f"{name}: recent", recent, 1)
    _count(f"{name}: block_size", block_size, 1)
    if budget is not None and budget_ratio is not None:
        raise ConfigError(f"{name}: give either budget or budget_ratio, not both")
    if budget is not None and recent is not None and recent > budget:
        raise ConfigError(f"{name}: budget ({budget}) is smaller than the recent window ({recent})")
    if budget_ratio is not None and recent_ratio is not None and recent_ratio > budget_ratio:
        raise ConfigError(f"{name}: budget_ratio ({budget_ratio}) is smaller than recent_ratio ({recent_ratio})")


def resolve_budget(num_prompt_tokens: int, budget: int | None, recent: int | None, budget_ratio: float | None,
                   recent_ratio: float | None, default_recent_fraction: float) -> Budget:
    """The budget of a request with a ``num_prompt_tokens``-token prompt: ``budget`` tokens and a
    ``recent`` window, else ``budget_ratio`` and ``recent_ratio`` of the prompt; a window not given
    is ``default_recent_fraction`` of the total, and it holds at least the newest token."""
    if budget is not None:
        total = budget
        window = recent if recent is not None else int(total * default_recent_fraction)
    else:
        total = max(1, int(budget_ratio * num_prompt_tokens))
        window = int(recent_ratio * num_prompt_tokens) if recent_ratio is not None else int(total * default_recent_fraction)
    return Budget(total, max(1, min(window, total)))
