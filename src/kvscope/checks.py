"""Type and range checks shared by the configuration dataclasses: each returns the value or raises
:class:`ConfigError` naming the field, so a wrong type never surfaces later as a raw TypeError."""
from __future__ import annotations

import math
import numbers
from typing import Any

from kvscope.errors import ConfigError


def integer(value: Any, field: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within ``[minimum, maximum]``. Bools and floats (even ``2.0``) are refused:
    a float where a count is expected is almost always a unit mistake."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{field} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{field} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{field} must be <= {maximum}, got {value}")
    return value


def real(value: Any, field: str) -> float:
    """``value`` (an int or a float, not a bool) as a finite float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{field} must be a number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:
        raise ConfigError(f"{field} must be a finite number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{field} must be a finite number, got {value!r}")
    return out


def boolean(value: Any, field: str) -> bool:
    """``value`` if it is a bool: ``"false"`` or ``0`` are not, and would read as true or false by accident."""
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be True or False, got {value!r}")
    return value


def int_list(value: Any, field: str, minimum: int | None = None) -> list[int]:
    """``value`` (a list or tuple of integers) as a list of ints."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{field} must be a list of integers, got {value!r}")
    return [integer(v, f"{field}[{i}]", minimum) for i, v in enumerate(value)]
