"""Property-based fuzzing of the two inputs a study reads from users and from disk: the spec, and the
results file. A bad spec is a ConfigError naming the field; a damaged results file loses no intact row
and crashes no reader (resume, report, advise --results)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from results_rows import ADVISE_ARGS, SPEC, H2O, lines, rows, write_folder

from kvscope import cli
from kvscope.errors import ConfigError
from kvscope.study import expand, parse_spec, run_study
from kvscope.report import write_report
from kvscope.study.results_io import read_results_file
from kvscope.study.spec import StudySpec

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- the spec -------------------------------------------------------------------------------------
VALID: dict[str, Any] = {
    "name": "fuzz",
    "models": ["dummy:tiny-llama"],
    "strategies": ["paged", "h2o:heavy_ratio=0.1,recent_ratio=0.1"],
    "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 8, "output_len": 2},
                  {"type": "uniform", "num_requests": 2, "input_len": 8, "output_len": 2, "range_ratio": 0.5}],
    "rates": [4, "inf"],
    "burstiness": [1.0],
    "kv_memory": ["1MiB", 0.5],
    "seeds": [0],
    "device": "cpu",
    "dtype": "float32",
    "max_model_len": 64,
    "engine": {"max_num_seqs": 4, "max_num_batched_tokens": 64, "swap_space_bytes": 0,
               "preemption_mode": "recompute", "enforce_eager": True, "cuda_graph_sizes": [1, 2]},
    "slos": {"ttft_ms": 100.0, "tpot_ms": 10.0},
    "quality": {"perplexity": False, "perplexity_len": 32, "perplexity_prefix": 16, "ruler": False},
}
TOP_KEYS = sorted(VALID) + ["bogus"]

# What a YAML file can hold, with the values specs get wrong: wrong types, negatives, huge numbers, NaN.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.sampled_from(["inf", "-inf", "nan", "64MiB", "0", "-1", "1e9", "paged", "fixed", "h3o", "cpu", "float32",
                     "recompute", "niah_single_1", "ttft_ms"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(["type", "num_requests", "max_num_seqs"])),
                    inner, max_size=3)), max_leaves=8)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in ``node`` a value sits at (dict keys and list indices from the top)."""
    out = [prefix] if prefix else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out += _paths(v, (*prefix, k))
    return out


PATHS = _paths(VALID)


def _check_outcome(raw: Any, top: str | None) -> None:
    """``raw`` loads into a spec whose points can be expanded and hashed, or raises a ConfigError that
    names a field (``top``, the mutated top-level key, when given)."""
    try:
        spec = parse_spec(raw, check_packages=False)
    except ConfigError as e:
        msg = str(e)
        keys = {str(k) for k in raw} if isinstance(raw, dict) else set()
        named = set(TOP_KEYS) | {"spec"} | keys | {repr(k) for k in keys}  # an unknown key is named as written
        heads = [h for h in named if any(msg.startswith(h + sep) for sep in (": ", ".", "["))]
        assert heads, msg
        if top is not None:
            assert top in heads, (top, msg)
        return
    assert isinstance(spec, StudySpec)
    assert all(r > 0 for r in spec.rates) and spec.models and spec.strategies and spec.workloads
    assert all((isinstance(k, int) and k >= 1) or (isinstance(k, float) and 0 < k <= 1) for k in spec.kv_memory)
    for k, v in spec.engine.items():
        if k in ("max_num_seqs", "max_num_batched_tokens"):
            assert type(v) is int and v >= 1, (k, v)
    for point in expand(spec):
        assert len(point.id) == 16 and json.loads(json.dumps(point.config)) is not None


@FUZZ
@given(st.one_of(values, st.dictionaries(st.sampled_from(TOP_KEYS), values, max_size=8)))
def test_fuzz_random_specs(raw):
    _check_outcome(raw, None)


@FUZZ
@given(st.sampled_from(PATHS), st.one_of(values, st.just(KeyError)))
def test_fuzz_one_field_of_a_valid_spec(path, value):
    """One field of a valid spec replaced by a random value (KeyError: removed): the spec still loads,
    or the error names that field's part of the spec."""
    assert parse_spec(VALID, check_packages=False)
    raw = copy.deepcopy(VALID)
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    if value is KeyError:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    _check_outcome(raw, path[0])


# ---- the results file -----------------------------------------------------------------------------
ROWS = rows()


def _bad_copy(row: dict[str, Any], **fields: Any) -> bytes:
    # Another id: garbage landing inside the line can never make it a second row of a real point.
    return lines([{**row, "id": "bad-" + row["id"], **fields}])[0]


NASTY = [b"\xff", b"\n", b"\r\n", b"42\n", b"{", b"}", b"null\n", b"[]\n", b'"text"\n', b"NaN\n", b"\x00", b" ",
         b"\xe2\x80\xa8", b"\xc3", b'{"id": 1}\n', b'{"id": "x", "status": "ok"}\n', b"\n\n\n",
         lines([{k: v for k, v in ROWS[0].items() if k not in ("config", "id")}])[0],
         _bad_copy(ROWS[1], metrics="fast"), _bad_copy(ROWS[2], config={**ROWS[2]["config"], "kv_memory": -1}),
         _bad_copy(ROWS[3], quality={"perplexity": 3.0})]
garbage = st.one_of(st.binary(min_size=1, max_size=24), st.sampled_from(NASTY))


def _json(line: bytes) -> Any:
    """What a line holds for a plain JSON reader (the oracle), or KeyError when it is no JSON."""
    try:
        return json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        return KeyError


def _damage(inserts: list[tuple[int, bytes]], cut: int | None) -> bytes:
    content = b"".join(lines(ROWS))
    for offset, junk in inserts:
        at = offset % (len(content) + 1)
        content = content[:at] + junk + content[at:]
    return content if cut is None else content[: cut % (len(content) + 1)]


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), garbage), max_size=5), st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_damaged_results(inserts, cut):
    """Garbage, non-UTF-8 bytes and cut lines anywhere: every row whose line still holds it is read,
    every line that is no JSON object is skipped and named, each non-blank line is counted once
    (a row, a superseded row or a skipped line), and no reader crashes."""
    content = _damage(inserts, cut)
    numbered = [(n, line) for n, line in enumerate(content.split(b"\n"), start=1) if line.strip()]
    intact = [(n, _json(line)) for n, line in numbered if _json(line) in ROWS]
    not_objects = {n for n, line in numbered if not isinstance(_json(line), dict)}

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        path = write_folder(Path(tmp) / "res", content)
        read = read_results_file(path, warn=False)
        skipped = {s.line for s in read.skipped}
        kept = iter(read.rows)
        assert all(any(row == r for r in kept) for _, row in intact)  # in order, none lost
        assert not_objects <= skipped and not skipped & {n for n, _ in intact}
        assert len(numbered) == len(read.skipped) + len(read.rows) + read.superseded
        assert {row["id"] for _, row in intact if row["status"] == "ok"} <= read.done_ids()

        mp.setattr("kvscope.report.render.build_plots", lambda rows: [])  # plots draw rows, which are checked above
        md = write_report(path.parent, warn=False)[1].read_text()
        assert md.count(f"{len(skipped)} unreadable line") == (1 if skipped else 0)
        assert f"{len(read.rows)} points: " in md

        with contextlib.redirect_stdout(io.StringIO()) as out:
            rc = cli.main([*ADVISE_ARGS, "--results", str(path)])
        assert rc in (0, 1)
        covered = {(row["config"]["strategy"], row["config"]["rate"]) for _, row in intact}
        if {("paged", "inf"), (H2O, "inf")} <= covered:
            assert json.loads(out.getvalue())["source"] == "measured"

        # Resume: the points without an ok row run; the file is appended to, never rewritten.
        ran: list[str] = []
        spec = parse_spec(SPEC, check_packages=False)
        run_study(spec, path.parent, progress=False,
                  run_point_fn=lambda p, c: ran.append(p.id) or {"metrics": {"completed": 2, "failed": 0}})
        assert sorted(ran) == sorted({p.id for p in expand(spec)} - read.done_ids())
        assert path.read_bytes().startswith(content)
        after = read_results_file(path, warn=False)
        assert {r["id"] for r in after.rows if r["status"] == "ok"} >= {p.id for p in expand(spec)}
        assert all(row in after.rows for _, row in intact if row["status"] == "ok")  # no finished run lost
