"""Name -> strategy class registry, and parsing of ``name:key=value,...`` specs."""
from __future__ import annotations

import ast
import inspect
from typing import Any

from kvscope.errors import ConfigError
from kvscope.kv.base import KVStrategy

_REGISTRY: dict[str, type[KVStrategy]] = {}


def register(cls: type[KVStrategy]) -> type[KVStrategy]:
    """Class decorator: make a strategy constructible by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    from kvscope.kv import (  # noqa: F401
        adaptive, contiguous, h2o, infinigen, knorm, offload, paged, random_policy, snapkv, streaming, tova,
    )


def available() -> dict[str, type[KVStrategy]]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def accepted_args(cls: type[KVStrategy]) -> dict[str, inspect.Parameter]:
    """Keyword arguments a strategy's constructor takes, following ``**kwargs`` up to its bases."""
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        for p in params:
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                out.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"h2o:heavy_ratio=0.1,recent_ratio=0.1"`` -> ``("h2o", {...})`` with literal values."""
    name, _, rest = spec.partition(":")
    args: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"strategy argument {item!r} in {spec!r} is not key=value")
        try:
            args[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            args[key.strip()] = raw.strip()
    return name.strip(), args


def create(strategy: str | KVStrategy, strategy_args: dict[str, Any] | None = None) -> KVStrategy:
    """Build a strategy from an instance, a registered name, or a ``name:k=v`` spec."""
    if isinstance(strategy, KVStrategy):
        if strategy_args:
            raise ConfigError("strategy_args cannot be combined with a strategy instance")
        return strategy
    name, args = parse_spec(strategy)
    args.update(strategy_args or {})
    registry = available()
    if name not in registry:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(registry)}")
    cls = registry[name]
    params = accepted_args(cls)
    unknown = sorted(set(args) - set(params))
    if unknown:
        allowed = list(params)
        raise ConfigError(
            f"unknown argument(s) {unknown} for strategy {name!r}; it accepts {allowed or 'none'}"
        )
    return cls(**args)
