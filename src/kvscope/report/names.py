"""What the report knows about a strategy from its spec string: the share of the prompt's KV it
keeps (and the share it holds in memory), and a short display name (``h2o 20%``, ``infinigen 20%``,
``adaptive``).

Both come from the registry's class (``lossless``, constructor defaults) and the spec's budget
arguments, never from the strategy's name, so a new strategy needs no change here.
:func:`kept_fraction` is the report's one reader of budgets, and it asks the strategy's own facts.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from kvscope.constants import SYSTEM_PREFIX
from kvscope.errors import ConfigError
from kvscope.kv.registry import accepted_args, available, facts, kept_share, parse_spec


def _spec(strategy: str) -> tuple[type | None, dict[str, Any]]:
    """(registered class or None, arguments with the constructor's defaults filled in)."""
    try:
        name, args = parse_spec(strategy)
    except ConfigError:  # a results file may hold any string
        return None, {}
    cls = available().get(name)
    if cls is None:
        return None, args
    defaults = {k: p.default for k, p in accepted_args(cls).items() if p.default is not p.empty}
    return cls, {**defaults, **args}


def kept_fraction(strategy: str) -> float | None:
    """Share of a prompt's KV the strategy keeps, as the strategy itself declares it
    (:func:`kvscope.kv.registry.kept_share`): 1 for lossless strategies, its budget share otherwise;
    None where it is not a fixed share (an absolute ``budget`` in tokens, an unknown strategy, an
    external system's row)."""
    return kept_share(strategy)


def held_fraction(strategy: str) -> float | None:
    """Share of a prompt's KV the strategy holds in memory: :func:`kept_fraction`, except for a
    strategy that keeps every token and selects a share per decode step (its ``selects_per_step``
    fact, ``quest``), which holds all of it (1) and saves bandwidth instead."""
    try:
        selects = facts(strategy).selects_per_step
    except ConfigError:  # an external system's row, or a spec the engine refuses
        return kept_fraction(strategy)
    return 1.0 if selects else kept_fraction(strategy)


def family(strategy: str) -> str:
    """The name part of a spec (``h2o`` of ``h2o:heavy_ratio=0.1,...``); a system row keeps its
    ``system:<name>`` whole (its name is not a strategy's)."""
    return strategy if strategy.startswith(SYSTEM_PREFIX) else strategy.partition(":")[0].strip()


def is_full_kv(strategy: str) -> bool:
    """Whether the strategy keeps every token's KV at the model's precision (the report's reference
    for quality): a quantized cache keeps every token (``kept_share`` 1) but states ``kv_bits``."""
    return kept_fraction(strategy) == 1.0 and facts(strategy).kv_bits is None


def _budget_label(strategy: str) -> str:
    kept = kept_fraction(strategy)
    if kept is not None:
        return "" if kept == 1.0 else f"{round(100 * kept, 2):g}%"
    budget = _spec(strategy)[1].get("budget")
    return f"{budget} tok" if budget is not None else ""


def display_name(strategy: str) -> str:
    """Name and budget: ``h2o 20%`` for ``h2o:heavy_ratio=0.1,recent_ratio=0.1``, ``snapkv 64 tok``
    for ``snapkv:budget=64``, ``paged`` for ``paged:block_size=32``, a system row as written."""
    if strategy.startswith(SYSTEM_PREFIX):
        return strategy
    return " ".join(filter(None, (family(strategy), _budget_label(strategy))))


def display_names(strategies: Iterable[str]) -> dict[str, str]:
    """Spec -> display name for a set of specs, unique: specs that share a name get the arguments
    in which they differ, defaults included (``adaptive (long=h2o)``, ``adaptive (long=snapkv)``;
    ``infinigen 20% (alpha=4)`` for a spec that leaves alpha at its default beside one that sets
    ``alpha=12``), and specs that still collide (the same arguments written differently) are shown
    whole."""
    specs = list(dict.fromkeys(strategies))
    groups: dict[str, list[str]] = defaultdict(list)
    for s in specs:
        groups[display_name(s)].append(s)
    out: dict[str, str] = {}
    for label, members in groups.items():
        if len(members) == 1:
            out[members[0]] = label
            continue
        given = {s: parse_spec(s)[1] for s in members}  # rows passed the results reader: specs parse
        keys = sorted({k for a in given.values() for k in a})
        differ = [k for k in keys if len({repr(a.get(k)) for a in given.values()}) > 1]
        for s in members:
            # An argument left at its default is named by that default, where it has one.
            defaults = _spec(s)[1]
            values = {k: given[s].get(k, defaults.get(k)) for k in differ}
            extra = ",".join(f"{k}={_show(v)}" for k, v in values.items() if v is not None)
            out[s] = f"{label} ({extra})" if extra else s
        if len(set(out[s] for s in members)) < len(members):
            out.update({s: s for s in members})
    return out


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
