"""The one results reader (bad lines skipped and named, never a crash, no good row lost), its use by
every consumer, and the results-folder lock."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from results_rows import ADVISE_ARGS, SPEC, lines, rows, write_folder

from kvscope import cli
from kvscope.study.adaptive_derivation import derive_thresholds, read_rows
from kvscope.study import parse_spec, run_study
from kvscope.report import write_report
from kvscope.study.results_io import (
    ResultsFolderError,
    lock_path,
    read_results,
    read_results_file,
    results_lock,
)

# The damage the issue lists, each on a line of its own, and what the reader must say about it.
ROWS = rows()
NO_CONFIG = {k: v for k, v in ROWS[0].items() if k != "config"}
WRONG_TYPES = {**ROWS[1], "config": {**ROWS[1]["config"], "rate": "fast"}}
NOT_UTF8 = lines([ROWS[2]])[0].replace(b'"dummy:tiny-llama"', b'"dummy:tiny-\xffllama"')
BAD = [(b"42\n", "not a JSON object (a int)"),
       (lines([NO_CONFIG])[0], "config: missing"),
       (lines([WRONG_TYPES])[0], "config.rate: must be a number > 0, 'inf' or a relative rate ('0.5x'), got 'fast'"),
       (NOT_UTF8, "not UTF-8"),
       (b'{"id": "torn', "not JSON (a torn last line?)")]


def _damaged() -> tuple[bytes, list[int]]:
    """Every good row, a bad line after each of the first four, and a torn last line; the bad lines' numbers."""
    good = lines(ROWS)
    content = b"".join(good[i] + BAD[i][0] for i in range(4)) + good[4] + BAD[4][0]
    return content, [2, 4, 6, 8, 10]


def test_bad_lines_are_skipped_and_named(tmp_path, caplog):
    content, numbers = _damaged()
    path = write_folder(tmp_path / "res", content)
    with caplog.at_level(logging.WARNING, logger="kvscope.study"):
        read = read_results_file(path)
    assert read.rows == ROWS  # every good row, as written, in order
    assert [s.line for s in read.skipped] == numbers
    for skipped, (_, reason) in zip(read.skipped, BAD):
        assert skipped.reason.startswith(reason), skipped
    assert "5 unreadable lines skipped" in caplog.text and "(lines 2, 4, 6, 8, 10)" in caplog.text
    # Blank lines are no damage.
    assert read_results_file(write_folder(tmp_path / "blank", b"\n" + lines(ROWS)[0] + b"  \n\n")).skipped == []


def test_every_consumer_reads_past_bad_lines(tmp_path, capsys):
    """Resume, report, advise --results and adaptive's thresholds_from on a damaged file: no crash,
    the same answer as on the clean file, and the report names the skipped lines."""
    content, numbers = _damaged()
    clean = write_folder(tmp_path / "clean", b"".join(lines(ROWS)))
    damaged = write_folder(tmp_path / "res", content)

    html, md = write_report(damaged.parent)
    note = "5 unreadable lines skipped in " + str(damaged) + " (lines 2, 4, 6, 8, 10)"
    assert note in md.read_text() and note in html.read_text()
    assert "5 points: 4 ok, 1 errors" in md.read_text()
    write_report(clean.parent)
    assert "unreadable" not in (clean.parent / "report.md").read_text()

    def advice(path) -> dict:
        assert cli.main([*ADVISE_ARGS, "--results", str(path)]) == 0
        return json.loads(capsys.readouterr().out)

    got = advice(damaged)
    assert got["source"] == "measured" and got["recommended"].startswith("h2o")  # 1.5x paged's throughput
    assert got == advice(clean)

    assert read_rows(damaged) == read_results(damaged) == ROWS
    assert derive_thresholds(damaged).scenarios == derive_thresholds(clean).scenarios

    # Resume: the points with an intact ok row are done; the errored one is retried, the missing one run.
    ran = []

    def record(point, cache):
        ran.append((point.config["strategy"], point.config["rate"]))
        return {"metrics": {"completed": 2, "failed": 0}}

    run_study(parse_spec(SPEC, check_packages=False), damaged.parent, progress=False, run_point_fn=record)
    assert len(ran) == 2 and set(ran) == {("contiguous", "inf"), ("contiguous", 4.0)}
    assert damaged.read_bytes().startswith(content)  # appended after the damage, never rewritten


def test_a_rerun_row_supersedes_only_an_error():
    ok, error = ROWS[0], {**ROWS[0], "status": "error", "error": "RuntimeError: boom"}
    del error["metrics"]
    twin = {**ROWS[0], "config": {**ROWS[0]["config"], "seed": 7}}  # same id, another point: both kept

    def read(*rs):
        with tempfile.TemporaryDirectory() as d:
            return read_results_file(write_folder(Path(d), b"".join(lines(list(rs)))))

    retried = read(error, ok)
    assert retried.rows == [ok] and retried.superseded == 1 and retried.done_ids() == {ok["id"]}
    assert read(ok, error).rows == [ok]  # an error never hides a finished run of the same point
    assert read(error).done_ids() == set() and read(error).done_ids(retry_errors=False) == {ok["id"]}
    assert read(ok, twin).rows == [ok, twin]


_HOLDER = textwrap.dedent("""
    import fcntl, sys
    f = open(sys.argv[1], "a+")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    sys.stdin.readline()
""")


def _hold(lock) -> subprocess.Popen:
    """Another process holding ``lock`` (plain flock, the protocol the lock file promises) until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_locked_folder_fails_at_once(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps({"name": "lock", "models": ["dummy:tiny-llama"], "strategies": ["paged"],
                                "workloads": [{"type": "fixed", "num_requests": 1, "input_len": 8, "output_len": 2}],
                                "kv_memory": ["1MiB"]}))
    folder = tmp_path / "res"
    folder.mkdir()
    holder = _hold(lock_path(folder / "results.jsonl"))
    try:
        assert cli.main(["study", "run", str(spec), "--results", str(folder), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"kvscope: error: {folder}: another kvscope study run is writing to this results folder" in err
        assert f"(pid {holder.pid})" not in err  # the plain-flock holder wrote no pid; none is made up
        assert not (folder / "results.jsonl").exists()
        with pytest.raises(ResultsFolderError, match="another kvscope study run"):
            with results_lock(folder / "results.jsonl"):
                pass
    finally:
        holder.communicate("")
    assert cli.main(["study", "run", str(spec), "--results", str(folder), "--no-progress"]) == 0
    assert len(read_results(folder / "results.jsonl")) == 1
    _hold(lock_path(folder / "results.jsonl")).communicate("")  # released when the run ended


def test_lock_is_reentrant_in_one_process_and_names_the_holder(tmp_path):
    target = tmp_path / "res" / "results.jsonl"
    with results_lock(target):
        with results_lock(target):  # the CLI holds it around run_study, which takes it too
            pass
        # Still held after the inner block: another process cannot take it.
        probe = subprocess.run([sys.executable, "-c", _HOLDER, str(lock_path(target))], input="", capture_output=True,
                               text=True, timeout=60)
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr
        assert lock_path(target).read_text() == str(os.getpid())
    _hold(lock_path(target)).communicate("")


def test_an_uncapped_budget_reads_back_and_a_word_for_a_ratio_does_not(tmp_path):
    # The engine runs ``budget_ratio=None`` (infinigen: uncapped), so its row must read back, or a
    # resumed study would run that point again forever and the report would leave it out.
    uncapped = {**ROWS[0], "config": {**ROWS[0]["config"], "strategy": "infinigen:alpha=1000,budget_ratio=None"}}
    worded = {**ROWS[1], "config": {**ROWS[1]["config"], "strategy": "h2o:heavy_ratio='half'"}}
    read = read_results_file(write_folder(tmp_path / "res", b"".join(lines([uncapped, worded]))), warn=False)
    assert read.rows == [uncapped]
    assert [s.line for s in read.skipped] == [2]
    assert "config.strategy: must be a strategy spec string" in read.skipped[0].reason
