"""``parse_size``: the one size parser of the API, the command line and study specs."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope.errors import ConfigError
from kvscope.units import parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        (4096, 4096),
        ("1000000", 1_000_000),
        (" 42 ", 42),
        ("100B", 100),
        ("1k", 1024),
        ("512MiB", 512 << 20),
        ("512mib", 512 << 20),
        ("512 MB", 512 << 20),
        ("2G", 2 << 30),
        ("2gb", 2 << 30),
        ("1.5GiB", 3 << 29),
        (".5k", 512),
        ("1T", 1 << 40),
        ("9007199254740993", 9007199254740993),  # past float precision: exact
        ("8388607.9999999999999T", (1 << 63) - 1),  # rounded down, not up
    ],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text, match",
    [
        (True, "integer number of bytes"),
        (1e6, "integer number of bytes"),
        (None, "integer number of bytes"),
        (0, "positive"),
        (-5, "positive"),
        ("0", "positive"),
        ("0.0001k", "positive"),
        ("-1G", "positive"),
        ("inf", "not a size"),
        ("nan", "not a size"),
        ("1e6", "not a size"),
        ("12 apples", "not a size"),
        ("", "not a size"),
        ("GiB", "not a size"),
        ("5iB", "not a size"),
        ("1.5", "whole number"),
        ("8388608T", "2\\*\\*63"),
        (1 << 63, "2\\*\\*63"),
    ],
)
def test_rejections_name_the_field(text, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_size(text, field="kv_memory_bytes")
    assert "kv_memory_bytes" in str(err.value)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=12), st.integers(), st.floats(), st.booleans(), st.none()))
def test_anything_is_a_size_or_a_config_error(text):
    try:
        value = parse_size(text, field="f")
    except ConfigError as e:
        assert str(e).startswith("f")
    else:
        assert isinstance(value, int) and 0 < value < 1 << 63
