"""Validators of single fields of a study spec (:mod:`kvscope.study.spec`): each returns the
value as the spec keeps it, or raises a :class:`~kvscope.errors.ConfigError` whose message starts
with the field's path (``engine.max_num_seqs: ...``)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from kvscope.config import EngineConfig
from kvscope.errors import ConfigError
from kvscope.kv import registry
from kvscope.units import MAX_SIZE
from kvscope.units import parse_size as parse_bytes

# Engine fields the grid itself sets; `engine:` may set the others.
_GRID_ENGINE_FIELDS = {"model", "strategy", "strategy_args", "device", "dtype", "kv_memory_bytes",
                       "kv_memory_fraction", "max_model_len", "seed"}


def fail(path: str, problem: str) -> ConfigError:
    """The error for the field at ``path`` (raise it)."""
    return ConfigError(f"{path}: {problem}")


def integer(value: Any, path: str, minimum: int = 1) -> int:
    """An int (not a bool, not 2.5) in [``minimum``, 2**63 - 1]."""
    # The upper bound is torch's: counts and lengths end up in int64 tensors.
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_SIZE:
        raise fail(path, f"must be an integer >= {minimum}, got {value!r}")
    return value


def number(value: Any, path: str) -> float:
    """A finite int or float (not a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(path, f"must be a finite number, got {value!r}")
    return float(value)


def as_list(raw: dict[str, Any], key: str, default: list[Any] | None = None) -> list[Any]:
    """A grid axis: ``raw[key]`` (or ``default``) as a non-empty list; a single value is a list of one."""
    value = raw.get(key, default)
    if value is None:
        raise fail(key, "is required")
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise fail(key, "must not be empty")
    return value


def check_keys(raw: Any, allowed: set[str], path: str) -> dict[str, Any]:
    """``raw`` itself, once it is a mapping holding only ``allowed`` keys."""
    if not isinstance(raw, dict):
        raise fail(path or "spec", f"must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        key = unknown[0] if unknown[0].isidentifier() else repr(unknown[0])  # '' or ' x' would vanish
        where = f"{path}.{key}" if path else key
        raise fail(where, f"unknown key; allowed: {', '.join(sorted(allowed))}")
    return raw


def parse_size(value: Any, path: str) -> int | float:
    """KV memory: bytes (int), a size string (``"64MiB"``, ``"2G"``; :func:`kvscope.units.parse_size`)
    or a fraction in (0, 1] (float) of the free device memory. Returns an int for bytes, a float
    for a fraction."""
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise fail(path, f"a fraction of device memory must be in (0, 1], got {value!r}")
        return value
    return parse_bytes(value, path)


def parse_rate(value: Any, path: str) -> float | str:
    """Requests/s: a finite number > 0, ``"inf"`` (all at once), or a multiple of the point's own
    offline request throughput written ``"0.5x"`` (kept as the canonical string ``"0.5x"``; see
    :func:`relative_rate`)."""
    if value == "inf" or (isinstance(value, float) and value == math.inf):
        return math.inf
    if isinstance(value, str) and value.strip().endswith("x"):
        try:
            factor = float(value.strip()[:-1])
        except ValueError:
            raise fail(path, f"a relative rate is a number > 0 followed by 'x' (e.g. '0.5x'), got {value!r}") from None
        if not factor > 0 or not math.isfinite(factor):
            raise fail(path, f"a relative rate must be a finite multiple > 0 (e.g. '0.5x'), got {value!r}")
        return f"{factor:g}x"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise fail(path, f"must be > 0 or 'inf', got {value!r}")
    return float(value)


def relative_rate(rate: Any) -> float | None:
    """The factor of a relative rate (``"0.5x"`` -> 0.5), None for an absolute one (a number, "inf")."""
    return float(rate[:-1]) if isinstance(rate, str) and rate.endswith("x") else None


def parse_strategy(value: Any, path: str) -> str:
    """A strategy spec string whose name, arguments and values the registry accepts."""
    if not isinstance(value, str) or not value.strip():
        raise fail(path, f"must be a strategy spec string like 'h2o:heavy_ratio=0.1', got {value!r}")
    try:
        # Constructing the strategy checks its name, its arguments and their values; it allocates
        # nothing until the engine sets it up, so no model is loaded here.
        registry.create(value)
    except ConfigError as e:
        raise fail(path, str(e)) from None
    except (TypeError, ValueError) as e:
        raise fail(path, f"bad arguments in {value!r}: {e}") from None
    return value.strip()


def _typed(kind: type, what: str) -> Callable[[Any, str], Any]:
    def check(value: Any, path: str) -> Any:
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise fail(path, f"must be {what}, got {value!r}")
        return value
    return check


def _graph_sizes(value: Any, path: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise fail(path, f"must be a list of integers >= 1, got {value!r}")
    return [integer(v, f"{path}[{i}]") for i, v in enumerate(value)]


# Type of each engine field a spec may set, checked here so that the error names the field
# (EngineConfig compares values and would fail on a wrong type with a bare TypeError, or take 2.5).
_ENGINE_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "max_num_seqs": integer,
    "max_num_batched_tokens": integer,
    "swap_space_bytes": lambda v, path: 0 if type(v) is int and v == 0 else parse_bytes(v, path),  # 0: no swap
    "preemption_mode": _typed(str, "a string"),
    "attention_backend": _typed(str, "a string"),
    "enforce_eager": _typed(bool, "true or false"),
    "cuda_graph_sizes": _graph_sizes,
    "piecewise_graph_sizes": _graph_sizes,
}


def parse_engine(raw: Any) -> dict[str, Any]:
    """The ``engine:`` mapping: EngineConfig fields the grid does not set, typed, and accepted by EngineConfig."""
    if raw is None:
        return {}
    allowed = {f.name for f in fields(EngineConfig)} - _GRID_ENGINE_FIELDS
    check_keys(raw, allowed, "engine")
    # A field EngineConfig gains later is left to EngineConfig's own checks.
    out = {k: _ENGINE_FIELDS[k](v, f"engine.{k}") if k in _ENGINE_FIELDS else v for k, v in raw.items()}
    try:
        EngineConfig(**out)
    except (ConfigError, TypeError, ValueError) as e:
        raise fail("engine", str(e)) from None
    return out


def parse_slos(raw: Any) -> dict[str, float]:
    """The ``slos:`` mapping: milliseconds >= 0 per metric (``ttft_ms``, ``tpot_ms``, ``e2el_ms``)."""
    if raw is None:
        return {}
    check_keys(raw, {"ttft_ms", "tpot_ms", "e2el_ms"}, "slos")
    out = {}
    for key, value in raw.items():
        ms = number(value, f"slos.{key}")
        if ms < 0:
            raise fail(f"slos.{key}", f"must be >= 0 ms, got {value!r}")
        out[key] = ms
    return out
