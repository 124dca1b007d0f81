"""Sizes in bytes as users write them (``512MiB``, ``2G``, ``1000000``): the one parser of the CLI and specs."""
from __future__ import annotations

import re
from fractions import Fraction

from kvscope.errors import ConfigError

# A number (with a decimal point: "1.5GiB"; with a minus sign, matched so that the error can say
# "at least 1 byte"), then an optional unit k/m/g/t, optionally followed by "i" (binary prefix
# spelt out), then an optional "b". Units are binary either way, as memory sizes are.
_SIZE = re.compile(r"^(-?\d+(?:\.\d+)?)\s*(?:([kmgt])(i)?)?(b)?$", re.IGNORECASE)
_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: Largest size accepted: what fits a signed 64-bit integer (torch and the allocators index bytes with it).
MAX_SIZE = (1 << 63) - 1
_MAX_DIGITS = 40


def _shown(value: object) -> str:
    """``value`` for a message: its repr, cut when long; a huge int by its size (Python refuses to
    print an int of over 4300 digits, inside a list too)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"{'a negative' if value < 0 else 'an'} integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except ValueError:
        return f"a {type(value).__name__} holding a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


def parse_size(text: str | int, field: str = "size") -> int:
    """Bytes from an int or a size string: ``"512MiB"``, ``"2G"``, ``"64kb"``, ``"1.5GiB"``, ``"1000000"``.

    Suffixes ``k``/``m``/``g``/``t`` (powers of 1024), each optionally followed by ``i`` and/or
    ``b``, in any case. A fractional size is rounded down to whole bytes. Raises
    :class:`~kvscope.errors.ConfigError` starting with ``field`` for a bool, a non-integer number,
    zero, a negative size, inf or nan, a size above :data:`MAX_SIZE`, or text that is not a size.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(f"{field}: must be a size in bytes (an integer, or text like 512MiB), got {_shown(text)}")
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text.strip())
        # No size needs more digits than MAX_SIZE's 19 and a few decimals; the cap also keeps
        # Python's limit on converting long digit strings (4300) out of reach.
        if not match or len(match[1]) > _MAX_DIGITS:
            too_long = f" (a number of {len(match[1])} characters)" if match else ""
            raise ConfigError(f"{field}: not a size{too_long}: {_shown(text)} (e.g. 512MiB, 2GiB, 64kb, 1000000)")
        number, unit, _, _ = match.groups()
        # Fraction, not float: exact for any length of digits, so no overflow and no rounding error.
        size = int(Fraction(number) * _UNITS[unit.lower() if unit else None])
    if size < 1:
        raise ConfigError(f"{field}: must be at least 1 byte, got {_shown(text)}")
    if size > MAX_SIZE:
        raise ConfigError(f"{field}: too large: {_shown(text)} (at most {MAX_SIZE} bytes)")
    return size
