"""What a study run checks before its first point: the results path."""
from __future__ import annotations

import json

import pytest

from kvscope import cli
from kvscope.study import parse_spec, run_study
from kvscope.study.results_io import ResultsFolderError


def _spec(**over) -> dict:
    raw = {"name": "pre", "models": ["dummy:tiny-llama"], "strategies": ["paged"],
           "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 16, "output_len": 2}],
           "rates": ["inf"], "kv_memory": ["1MiB"]}
    raw.update(over)
    return raw


class Recorder:
    """A point runner that runs nothing and records which points it was asked to run."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def __call__(self, point, cache) -> dict:
        self.ran.append(point.id)
        return {"metrics": {"completed": 2, "failed": 0}}


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_a_results_path_that_is_a_file_fails_before_any_point(tmp_path, where):
    (tmp_path / "out").write_text("not a folder")
    target = tmp_path / "out" if where == "file" else tmp_path / "out" / "sub"
    rec = Recorder()
    with pytest.raises(ResultsFolderError, match=f"^{target}: not a folder"):
        run_study(parse_spec(_spec(), check_packages=False), target, progress=False, run_point_fn=rec)
    assert rec.ran == []


def test_cli_paths_are_checked_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps(_spec()))
    assert cli.main(["study", "run", str(spec), "--results", "out/my.jsonl", "--no-progress"]) == 2
    assert "kvscope: error: --results out/my.jsonl: names a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    assert cli.main(["study", "report", "no/such/dir"]) == 2
    assert capsys.readouterr().err == "kvscope: error: no/such/dir: no such results folder\n"
    (tmp_path / "empty").mkdir()
    assert cli.main(["study", "report", "empty"]) == 2
    assert "empty: holds no results.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.md").exists()
