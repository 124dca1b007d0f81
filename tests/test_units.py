"""The one size parser (kvscope.units.parse_size) and the CLI's checks of numbers: errors that name
the field or option, never a raw Python error."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope.cli import main
from kvscope.errors import ConfigError
from kvscope.units import MAX_SIZE, parse_size


@pytest.mark.parametrize("text, size", [
    ("512MiB", 512 * 2**20), ("2G", 2 * 2**30), ("2g", 2 * 2**30), ("64kb", 64 * 1024), ("64KB", 64 * 1024),
    ("1ki", 1024), ("3 MiB", 3 * 2**20), (" 7 ", 7), ("1000000", 1_000_000), (1_000_000, 1_000_000), ("100b", 100),
    ("1.5GiB", 3 * 2**29), ("1t", 2**40), ("8T", 8 * 2**40), ("0001k", 1024), (str(MAX_SIZE), MAX_SIZE),
    ("9007199254740993", 9007199254740993),  # past float precision: exact
    ("8388607.9999999999999T", MAX_SIZE),  # rounded down, not up
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, problem", [
    (True, "must be a size in bytes"), (1.5, "must be a size in bytes"), (None, "must be a size in bytes"),
    (0, "must be at least 1 byte"), ("0", "must be at least 1 byte"), ("-1", "must be at least 1 byte"),
    (-5, "must be at least 1 byte"), ("0.1b", "must be at least 1 byte"),
    ("inf", "not a size"), ("infGiB", "not a size"), ("nan", "not a size"), ("1e3", "not a size"),
    ("", "not a size"), ("lots", "not a size"), ("5 GiBs", "not a size"), ("5ib", "not a size"),
    pytest.param("1" * 5000, "not a size \\(a number of 5000 characters\\)", id="5000-digits"),
    (MAX_SIZE + 1, "too large"), ("9999999T", "too large"),
    pytest.param(10**5000, "too large", id="int-of-5001-digits"),
])
def test_bad_sizes_name_the_field(text, problem):
    with pytest.raises(ConfigError, match=f"^kv_memory: {problem}"):
        parse_size(text, "kv_memory")


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=12), st.integers(), st.floats(), st.booleans(), st.none()))
def test_anything_is_a_size_or_a_config_error_naming_the_field(text):
    try:
        value = parse_size(text, "f")
    except ConfigError as e:
        assert str(e).startswith("f: ")
    else:
        assert isinstance(value, int) and 1 <= value <= MAX_SIZE


@pytest.mark.parametrize("argv, option, problem", [
    (["generate", "--kv-memory", "infGiB"], "--kv-memory", "not a size: 'infGiB'"),
    (["generate", "--kv-memory", "0"], "--kv-memory", "must be at least 1 byte"),
    (["generate", "--temperature", "nan"], "--temperature", "must be a finite number, got 'nan'"),
    (["generate", "--top-p", "inf"], "--top-p", "must be a finite number"),
    (["generate", "--max-num-seqs", "0"], "--max-num-seqs", "must be an integer >= 1, got '0'"),
    (["advise", "--max-num-seqs", "0"], "--max-num-seqs", "must be an integer >= 1, got '0'"),
    (["advise", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens", "must be an integer >= 1"),
    (["advise", "--max-num-seqs", "four"], "--max-num-seqs", "not an integer: 'four'"),
    (["advise", "--gpu-memory", "1e400"], "--gpu-memory", "not a size"),
    (["advise", "--hbm-gbps", "nan"], "--hbm-gbps", "must be a finite number"),
    (["advise", "--rate", "nan"], "--rate", "must be a finite number"),
    (["advise", "--quality-floor", "inf"], "--quality-floor", "must be a finite number"),
])
def test_cli_rejects_bad_numbers_by_option(argv, option, problem, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: {problem}" in err and "Traceback" not in err


def test_cli_rate_inf_is_all_at_once(capsys):
    assert main(["advise", "--model", "dummy:tiny-llama", "--hardware", "cpu", "--prompt-len", "16",
                 "--output-len", "4", "--rate", "inf", "--num-requests", "2", "--quality-floor", "0"]) == 0
    assert "workload 16 + 4 tokens at inf req/s" in capsys.readouterr().out
