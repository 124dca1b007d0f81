"""Byte sizes written by people: ``512MiB``, ``2G``, ``1.5GiB``, ``1000000``.

One parser for the command line, study specs and the Python API, so that a size means the same
everywhere. Suffixes are binary whatever their spelling (``k``, ``K``, ``kb``, ``KiB`` are all
1024 bytes), as the command line has always read them; a size is a whole, positive number of
bytes that fits in a signed 64-bit integer (what torch and the allocators take).
"""
from __future__ import annotations

import math
import numbers
import re
from fractions import Fraction

from kvscope.errors import ConfigError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# A decimal number, then optionally a unit letter with an optional "i", then an optional "b".
_SIZE = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?:(?P<unit>[kmgt])i?)?b?", re.IGNORECASE)
_MAX = (1 << 63) - 1
_EXAMPLES = "e.g. 512MiB, 2G, 1.5GiB or 1000000"


def parse_size(text: str | int, field: str = "size") -> int:
    """``text`` (an int, or a string such as ``"512MiB"``) -> bytes, a positive int.

    A fractional value with a unit is rounded down to whole bytes (``"1.5k"`` -> 1536); one without
    a unit must be whole. Raises :class:`ConfigError` naming ``field`` for a bool, a float, zero, a
    negative or non-finite value, a value past 2**63 - 1, or text that is not a size.
    """
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        value = int(text)
    elif isinstance(text, str):
        value = _parse_text(text, field)
    else:
        raise ConfigError(f"{field} must be an integer number of bytes or a size string ({_EXAMPLES}), got {text!r}")
    if value <= 0:
        raise ConfigError(f"{field} must be a positive number of bytes, got {text!r}")
    if value > _MAX:
        raise ConfigError(f"{field} must be at most 2**63 - 1 bytes, got {text!r}")
    return value


def _parse_text(text: str, field: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        stripped = text.strip().lstrip("+")
        if stripped.startswith("-"):
            raise ConfigError(f"{field} must be a positive number of bytes, got {text!r}")
        raise ConfigError(f"{field}: not a size: {text!r} ({_EXAMPLES})")
    num, unit = match["num"], (match["unit"] or "").lower()
    if not unit and "." in num and Fraction(num).denominator != 1:
        raise ConfigError(f"{field}: {text!r} is not a whole number of bytes")
    # Fraction, not float: "9007199254740993" and "1.1T" stay exact.
    return math.floor(Fraction(num) * _UNITS[unit])
