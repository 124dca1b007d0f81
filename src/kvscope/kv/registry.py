"""Name -> strategy class registry, and parsing of ``name:key=value,...`` specs."""
from __future__ import annotations

import ast
import inspect
import math
import types
import typing
from typing import Any

from kvscope.constants import SYSTEM_PREFIX
from kvscope.errors import ConfigError
from kvscope.kv.base import KVStrategy, StrategyFacts

_REGISTRY: dict[str, type[KVStrategy]] = {}


def register(cls: type[KVStrategy]) -> type[KVStrategy]:
    """Class decorator: make a strategy constructible by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget a registered strategy (a test's own policy, once the test is done)."""
    _REGISTRY.pop(name, None)


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    from kvscope.kv import (  # noqa: F401
        adaptive, contiguous, h2o, infinigen, knorm, offload, paged, pyramidkv, quant, quest, random_policy,
        snapkv, streaming, tova,
    )


def available() -> dict[str, type[KVStrategy]]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def long_children() -> list[str]:
    """Names of the strategies that can serve as ``adaptive``'s long child: those implementing
    :meth:`KVStrategy.adopt` (the hand-over contract)."""
    return [n for n, c in available().items() if c.adopt is not KVStrategy.adopt]


def _init_params(cls: type[KVStrategy]) -> list[tuple[type, inspect.Parameter]]:
    """(defining class, parameter) of every keyword argument of ``cls``'s constructor, following
    ``**kwargs`` up to its bases; a name declared twice keeps the most derived declaration."""
    out: list[tuple[type, inspect.Parameter]] = []
    seen: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        for p in params:
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in seen:
                seen.add(p.name)
                out.append((klass, p))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def accepted_args(cls: type[KVStrategy]) -> dict[str, inspect.Parameter]:
    """Keyword arguments a strategy's constructor takes, following ``**kwargs`` up to its bases."""
    return {p.name: p for _, p in _init_params(cls)}


def arg_types(cls: type[KVStrategy]) -> dict[str, Any]:
    """The type each constructor argument takes: its annotation, else its default's type."""
    hints: dict[type, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for klass, p in _init_params(cls):
        if klass not in hints:
            hints[klass] = typing.get_type_hints(klass.__init__)
        if p.name in hints[klass]:
            out[p.name] = hints[klass][p.name]
        elif p.default is not p.empty and p.default is not None:
            out[p.name] = type(p.default)
    return out


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint``, strictly: a bool is not an int, an int is not a
    bool, a string is neither; an int must fit 64 bits, a float must be finite. Generics check
    their container only."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # it will meet int64 tensors
        return isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < 1 << 63
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    names = {bool: "true or false", int: "a 64-bit integer", float: "a finite number", str: "a string",
             type(None): "None"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_args(cls: type[KVStrategy], args: dict[str, Any], owner: str | None = None) -> None:
    """Raise :class:`ConfigError` naming the strategy (``owner``, default ``strategy '<name>'``) and
    the argument, for an argument ``cls``'s constructor does not take or one of the wrong type."""
    owner = owner or f"strategy {cls.name!r}"
    params = accepted_args(cls)
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise ConfigError(f"unknown argument(s) {unknown} for {owner}; it accepts {list(params) or 'none'}")
    expected = arg_types(cls)
    for key, value in args.items():
        if key in expected and not _matches(value, expected[key]):
            raise ConfigError(f"{owner}: {key} must be {_describe(expected[key])}, got {value!r}")


def _literal(raw: str) -> Any:
    """A spec value: ``true``/``false`` in any case are bools (so ``false`` is not the truthy
    string ``"false"``), Python literals are themselves, anything else is a string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return raw


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"h2o:heavy_ratio=0.1,recent_ratio=0.1"`` -> ``("h2o", {...})`` with literal values."""
    if not isinstance(spec, str):
        raise ConfigError(f"a strategy is a name or a 'name:key=value,...' spec, got {spec!r}")
    name, _, rest = spec.partition(":")
    args: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"strategy argument {item!r} in {spec!r} is not key=value")
        if key in args:
            raise ConfigError(f"strategy argument {key!r} is given twice in {spec!r}")
        args[key] = _literal(raw.strip())
    return name.strip(), args


def create(strategy: str | KVStrategy, strategy_args: dict[str, Any] | None = None) -> KVStrategy:
    """Build a strategy from an instance, a registered name, or a ``name:k=v`` spec. Arguments are
    checked against the constructor's signature (names and types) before it runs."""
    if isinstance(strategy, KVStrategy):
        if strategy_args:
            raise ConfigError("strategy_args cannot be combined with a strategy instance")
        return strategy
    if strategy_args is not None and not isinstance(strategy_args, dict):
        raise ConfigError(f"strategy_args must be a dict of keyword arguments, got {strategy_args!r}")
    name, args = parse_spec(strategy)
    args.update(strategy_args or {})
    registry = available()
    if name not in registry:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(registry)}")
    cls = registry[name]
    check_args(cls, args)
    return cls(**args)


def facts(strategy: str | KVStrategy, strategy_args: dict[str, Any] | None = None) -> StrategyFacts:
    """The :class:`StrategyFacts` of a spec (or name and arguments, or an instance): the strategy is
    built (nothing is allocated before ``bind``), so defaults and checks are the engine's own.
    Raises :class:`ConfigError` for a spec the engine would refuse."""
    return create(strategy, strategy_args).facts()


def kept_share(spec: str, prompt_tokens: int | None = None) -> float | None:
    """Share of a prompt's KV the strategy of ``spec`` keeps (or reads per step, on the host): 1.0
    for a lossless one, its budget share otherwise (the default budget when the spec gives none).
    None when it is unknown: an external system's row (``system:<name>``), a spec the engine would
    refuse, or a budget in tokens (``streaming:budget=64``: the share depends on the prompt, so it
    is ``budget / prompt_tokens`` only when ``prompt_tokens`` is given)."""
    if not isinstance(spec, str) or spec.startswith(SYSTEM_PREFIX):
        return None
    try:
        return create(spec).kept_share(prompt_tokens)
    except ConfigError:
        return None
