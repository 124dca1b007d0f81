"""Relative request rates ("0.5x" of a configuration's offline throughput), sub-grids, and
time-limited study runs resumed chunk by chunk; on a tiny random model on CPU."""
from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
from hf_ref import make_tiny_checkpoint

import kvscope.study
from kvscope import cli
from kvscope.errors import ConfigError
from kvscope.study import expand, parse_spec, run_study
from kvscope.study import runner as runner_mod
from kvscope.study import time_limit as time_limit_mod
from kvscope.study.presets import preset
from kvscope.study.results_io import read_results_file
from kvscope.study.time_limit import TimeLimit


def _spec(model: str = "m", **over) -> dict:
    spec = {
        "name": "tiny",
        "models": [model],
        "strategies": ["paged", "h2o:heavy_ratio=0.25,recent_ratio=0.25"],
        "workloads": [{"type": "fixed", "num_requests": 3, "input_len": 16, "output_len": 3}],
        "rates": ["0.5x", "2x"],
        "kv_memory": ["2MiB"],
    }
    spec.update(over)
    return spec


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_checkpoint("llama", path)
    return str(path)


# ---- spec ------------------------------------------------------------------------------------------
def test_relative_rates_parse_to_canonical_strings_and_keep_absolute_ones():
    spec = parse_spec(_spec(rates=["0.25x", "1.0x", 2, "inf", " 1.25x"]), check_packages=False)
    assert spec.rates == ["0.25x", "1x", 2.0, float("inf"), "1.25x"]
    points = expand(spec)
    assert [p.relative_rate for p in points[:5]] == [0.25, 1.0, None, None, 1.25]
    assert points[2].rate == 2.0
    with pytest.raises(ConfigError, match=r"^rate: '0.25x' is relative"):
        points[0].rate


@pytest.mark.parametrize("over, message", [
    ({"rates": ["fastx"]}, r"^rates\[0\]: a relative rate is a number > 0 followed by 'x'"),
    ({"rates": [1, "0x"]}, r"^rates\[1\]: a relative rate must be a finite multiple > 0"),
    ({"rates": ["-1x"]}, r"^rates\[0\]: a relative rate must be a finite multiple > 0"),
    ({"rates": ["infx"]}, r"^rates\[0\]: a relative rate must be a finite multiple > 0"),
    ({"rates": ["fast"]}, r"^rates\[0\]: must be > 0 or 'inf'"),
    ({"grids": []}, r"^grids: must be a non-empty list"),
    ({"grids": [{"strategies": ["paged"]}, {"strategies": ["h3o"]}]}, r"^grids\[1\]\.strategies\[0\]: unknown strategy"),
    ({"grids": [{"rates": ["0.5x", "slowx"]}]}, r"^grids\[0\]\.rates\[1\]: a relative rate"),
    ({"grids": [{"device": "cuda"}]}, r"^grids\[0\]\.device: unknown key"),
    ({"grids": ["paged"]}, r"^grids\[0\]: must be a mapping"),
])
def test_bad_rates_and_grids_name_the_field(over, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(_spec(**over), check_packages=False)


def test_grids_are_the_union_of_their_points_sharing_the_top_level_settings():
    spec = parse_spec(_spec(device="cpu", max_model_len=64, grids=[
        {"strategies": ["paged"], "rates": ["0.5x", "1x"]},
        {"models": ["other"], "rates": [4], "kv_memory": ["1MiB", "2MiB"]},
        {"strategies": ["paged"], "rates": ["1x"]},  # already in the first grid: runs once
    ]), check_packages=False)
    points = expand(spec)
    coords = [(p.config["model"], p.config["strategy"], p.config["kv_memory"], p.config["rate"]) for p in points]
    h2o = "h2o:heavy_ratio=0.25,recent_ratio=0.25"
    assert coords == [("m", "paged", 2 << 20, "0.5x"), ("m", "paged", 2 << 20, "1x"),
                      ("other", "paged", 1 << 20, 4.0), ("other", "paged", 2 << 20, 4.0),
                      ("other", h2o, 1 << 20, 4.0), ("other", h2o, 2 << 20, 4.0)]
    assert all(p.config["max_model_len"] == 64 for p in points)
    assert len({p.id for p in points}) == len(points)
    # The top-level grid itself is not run; a spec without grids is unchanged.
    plain = parse_spec(_spec(), check_packages=False)
    assert plain.grids == [] and len(expand(plain)) == 4


# ---- relative rates, run -----------------------------------------------------------------------------
def test_offline_measurement_once_per_group_and_rates_scale_with_it(tiny_model, tmp_path, monkeypatch):
    real_offline = runner_mod._offline_throughput
    measured: list[tuple[str, float]] = []

    def counting(point, cache):
        out = real_offline(point, cache)
        measured.append((point.config["strategy"], out["request_throughput"]))
        return out

    arrival_rates = []
    real_arrivals = runner_mod.gamma_arrivals

    def recording_arrivals(n, rate, *args, **kwargs):
        arrival_rates.append(rate)
        return real_arrivals(n, rate, *args, **kwargs)

    monkeypatch.setattr(runner_mod, "_offline_throughput", counting)
    monkeypatch.setattr(runner_mod, "gamma_arrivals", recording_arrivals)
    spec = parse_spec(_spec(tiny_model, rates=["0.5x", "2x", 64]), check_packages=False)
    rows = run_study(spec, tmp_path / "res", progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 6
    # One measurement per (model, strategy, kv_memory, workload, ...) group, taken by its first relative point.
    assert [s for s, _ in measured] == ["paged", "h2o:heavy_ratio=0.25,recent_ratio=0.25"]
    for g, (strategy, throughput) in enumerate(measured):
        half, double, fixed = rows[3 * g: 3 * g + 3]
        assert throughput > 0
        for row, factor in ((half, 0.5), (double, 2.0)):
            assert row["config"]["rate_relative"] == f"{factor:g}x"
            assert row["config"]["rate"] == pytest.approx(factor * throughput)
            assert row["rate_basis"]["offline_request_throughput"] == throughput
            assert row["rate_basis"]["measured_by"] == half["id"]
        assert "offline" in half["phase_s"] and "offline" not in double["phase_s"]
        assert fixed["config"]["rate"] == 64.0 and "rate_relative" not in fixed["config"] and "rate_basis" not in fixed
    assert arrival_rates == [r["config"]["rate"] for r in rows]  # the arrivals used the absolute rates
    # The rows' ids are those of the spec's points (relative rates), so the run is complete.
    assert [r["id"] for r in rows] == [p.id for p in expand(spec)]
    assert run_study(spec, tmp_path / "res", progress=False) == []


def test_resumed_run_reuses_the_groups_measurement(tiny_model, tmp_path, monkeypatch):
    """A point of a group that failed is retried in a later run with the basis its group already used;
    its retried row supersedes the error (ids and spec configs match across the two rows)."""
    spec = parse_spec(_spec(tiny_model, strategies=["paged"], rates=["0.5x", "1x", "2x"]), check_packages=False)
    real = runner_mod.run_point
    fail_once = {"1x"}

    def flaky(point, cache):
        if point.config["rate"] in fail_once:
            raise RuntimeError("boom")
        return real(point, cache)

    first = run_study(spec, tmp_path / "res", progress=False, run_point_fn=flaky)
    assert [r["status"] for r in first] == ["ok", "error", "ok"]
    assert first[1]["config"]["rate"] == "1x"  # failed before any rate was known: the spec's rate stays
    fail_once.clear()
    calls = []
    monkeypatch.setattr(runner_mod, "_offline_throughput", lambda p, c: calls.append(p) or {"request_throughput": 1.0})
    (retried,) = run_study(spec, tmp_path / "res", progress=False, run_point_fn=flaky)
    assert calls == []  # measured in the first run, read back from its rows
    assert retried["status"] == "ok" and retried["rate_basis"] == first[0]["rate_basis"]
    assert retried["config"]["rate"] == pytest.approx(first[0]["rate_basis"]["offline_request_throughput"])
    read = read_results_file(tmp_path / "res" / "results.jsonl")
    assert [r["status"] for r in read.rows] == ["ok"] * 3 and read.superseded == 1


def test_an_offline_run_that_completes_nothing_is_the_points_error(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "_offline_throughput",
                        lambda p, c: {"request_throughput": 0.0, "errors": ["prompt too long"]})
    spec = parse_spec(_spec(tiny_model, strategies=["paged"], rates=["1x"]), check_packages=False)
    (row,) = run_study(spec, tmp_path / "res", progress=False)
    assert row["status"] == "error" and "completed no request" in row["error"] and "prompt too long" in row["error"]


# ---- time limit ------------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cfg(strategy: str, rate="1x", model="m", workload=None) -> dict:
    return {"model": model, "strategy": strategy, "rate": rate, "workload": workload or {"kind": "sharegpt"}}


def test_time_limit_estimates_from_the_most_similar_finished_points():
    clock = _Clock()
    limit = TimeLimit(100, clock=clock)
    assert limit.estimate(_cfg("paged")) is None and limit.allows(_cfg("paged"))  # nothing known: run it
    # An earlier chunk's rows: a relative point's row keys on its relative rate, not the absolute one.
    limit.seed([{"config": {**_cfg("paged"), "rate": 7.3, "rate_relative": "1x"}, "elapsed_s": 10.0},
                {"config": _cfg("paged", rate="0.25x"), "elapsed_s": 40.0},
                {"config": _cfg("h2o:heavy_ratio=0.1,recent_ratio=0.1"), "elapsed_s": 20.0},
                {"config": _cfg("paged"), "status": "error"}])  # no elapsed_s: not counted
    assert limit.estimate(_cfg("h2o:heavy_ratio=0.2,recent_ratio=0.2")) == 20.0  # same strategy name
    assert limit.estimate(_cfg("infinigen")) == 15.0  # same model, workload and rate: paged and h2o at 1x
    assert limit.estimate(_cfg("infinigen", rate="0.5x")) == pytest.approx(70 / 3)  # same model
    assert limit.estimate(_cfg("paged", model="other")) == pytest.approx(70 / 3)  # any point
    clock.now += 75  # 25 s left
    assert limit.allows(_cfg("h2o:heavy_ratio=0.1,recent_ratio=0.1"))  # 20 s
    assert not limit.allows(_cfg("paged", rate="0.25x"))  # 40 s
    clock.now += 30
    assert not limit.allows(_cfg("paged", model="new"))  # past the deadline, even with no estimate of its own
    for bad in (0, -5, float("inf"), True, "10"):
        with pytest.raises(ConfigError, match="^--time-limit: "):
            TimeLimit(bad)


def test_time_limited_cli_run_stops_says_what_remains_and_resumes(tiny_model, tmp_path, monkeypatch, capsys):
    """Chunks of a study: each ``study run --time-limit`` starts points while the next is likely to end
    in time, exits 0 naming the points left, and the next chunk runs them."""
    clock = _Clock()
    fake_time = SimpleNamespace(monotonic=clock, perf_counter=clock)
    monkeypatch.setattr(time_limit_mod, "time", fake_time)
    monkeypatch.setattr(runner_mod, "time", fake_time)  # the rows' elapsed_s
    cost = {"paged": 10.0, "h2o:heavy_ratio=0.25,recent_ratio=0.25": 30.0}

    def fake_point(point, cache):  # what a point costs, on the fake clock; a valid ok row
        clock.now += cost[point.config["strategy"]]
        return {"metrics": {"completed": 3, "failed": 0}, "quality": {}, "engine_stats": {}, "timeline_peaks": {}}

    monkeypatch.setattr(kvscope.study, "run_study", functools.partial(run_study, run_point_fn=fake_point))
    spec_path = tmp_path / "s.json"
    spec_path.write_text(json.dumps(_spec(tiny_model, rates=[1, 2])))
    results = tmp_path / "res"
    argv = ["study", "run", str(spec_path), "--results", str(results), "--no-progress", "--time-limit", "45"]
    monkeypatch.setattr("kvscope.report.write_report", lambda *a, **k: (results / "r.html", results / "r.md"))
    # paged@1 (nothing known) ends at 10 s; paged@2 (estimate 10 s) at 20; h2o@1 (estimate: paged@1's 10 s)
    # at 50, past the limit; h2o@2 does not start.
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "3 points run" in out and "1 points remain" in out
    assert len(read_results_file(results / "results.jsonl").rows) == 3
    # The next chunk: h2o@2's estimate is now h2o@1's 30 s; it fits in 45 s and completes the study.
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "1 points run" in out and "remain" not in out
    assert sorted(r["id"] for r in read_results_file(results / "results.jsonl").rows) == \
        sorted(p.id for p in expand(parse_spec(_spec(tiny_model, rates=[1, 2]), check_packages=False)))
    # A chunk shorter than a point runs the first one (no estimate yet) and stops, still exiting 0.
    spec_path.write_text(json.dumps(_spec(tiny_model, rates=[1, 2, 4])))
    results2 = tmp_path / "res2"
    argv2 = ["study", "run", str(spec_path), "--results", str(results2), "--no-progress", "--time-limit", "5"]
    assert cli.main(argv2) == 0
    assert "5 points remain" in capsys.readouterr().out  # the first point ran (no estimate), past 5 s
    assert cli.main([*argv2[:-1], "-3"]) == 2
    assert "--time-limit: must be seconds > 0" in capsys.readouterr().err


def test_h200_preset_covers_the_issues_axes():
    """The h200 preset holds the GPU study's speed and memory runs (docs/results/h200/PLAN.md)."""
    spec = preset("h200", check_packages=False)
    points = expand(spec)
    assert spec.device == "cuda" and spec.dtype == "bfloat16"
    speed = [p for p in points if p.config["model"].startswith("dummy:")]
    assert {p.config["model"] for p in speed} == {"dummy:opt-1.3b", "dummy:opt-6.7b", "dummy:opt-13b",
                                                  "dummy:opt-30b", "dummy:llama-3.1-8b"}
    for model in {p.config["model"] for p in speed}:
        mine = [p for p in speed if p.config["model"] == model]
        assert len({p.config["kv_memory"] for p in mine}) >= 1 + (not model.endswith("30b"))  # ample and a pool
        assert all(p.relative_rate is not None for p in mine if p.config["workload"]["kind"] == "sharegpt"
                   and p.config["rate"] != "inf")
    llama = [p for p in speed if p.config["model"] == "dummy:llama-3.1-8b"]
    for family in ("h2o", "infinigen"):
        assert len({p.config["strategy"] for p in llama if p.config["strategy"].startswith(family)}) == 5
    assert {"streaming:budget_ratio=0.2", "snapkv:budget_ratio=0.2"} <= {p.config["strategy"] for p in llama}
    assert sorted({p.config["rate"] for p in llama if p.config["strategy"] == "paged"}, key=str) == \
        ["0.5x", "1.25x", "1x", "inf"]
    assert all(p.config["workload"]["num_requests"] >= 100 for p in speed if p.config["workload"]["kind"] == "sharegpt")
    assert any(p.config["workload"]["kind"] == "fixed" and p.config["workload"]["input_len"] >= 3000 for p in llama)
    assert all(p.config["quality"] == {**p.config["quality"], "perplexity": False, "ruler": False} for p in speed)
    assert speed == points  # quality on real weights is the h200-quality preset's


def test_h200_quality_preset_covers_the_issues_quality_runs():
    """Both packaged models, RULER at 4k (4 tasks x >= 50 samples) and >= 8k scored perplexity tokens."""
    real = expand(preset("h200-quality", check_packages=False))
    assert {p.config["model"] for p in real} == {"smollm2-135m", "qwen2.5-0.5b"}
    for p in real:
        w, q = p.config["workload"], p.config["quality"]
        assert w["kind"] == "ruler" and w["length"] == 4096 and w["num_samples"] >= 50 and q["ruler"]
        assert q["perplexity"] and q["perplexity_sequences"] * (q["perplexity_len"] - q["perplexity_prefix"]) >= 8192
    for model in ("smollm2-135m", "qwen2.5-0.5b"):
        tasks = {p.config["workload"]["task"] for p in real if p.config["model"] == model}
        assert tasks == {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1"}
        assert len({p.config["strategy"] for p in real if p.config["model"] == model
                    and p.config["strategy"].startswith("h2o")}) == 5
    # Qwen2.5's infinigen at InfiniGen's alpha (which starves its layers) and at a raised one.
    assert {p.config["strategy"] for p in real if p.config["model"] == "qwen2.5-0.5b"
            and p.config["strategy"].startswith("infinigen")} == {"infinigen:budget_ratio=0.2",
                                                                  "infinigen:alpha=12,budget_ratio=0.2"}


# ---- warm-up once per measurement group -------------------------------------------------------------
def test_a_group_is_first_once_whatever_its_rates():
    from kvscope.study.point_quality import PointCache

    points = expand(parse_spec(_spec(rates=["0.5x", "2x", 64]), check_packages=False))
    cache = PointCache()
    firsts = [cache.first_in_group(p.config) for p in points]
    # paged at 0.5x, 2x, 64 req/s, then h2o at the same: the first of each strategy only.
    assert [p.config["strategy"].split(":")[0] for p in points] == ["paged"] * 3 + ["h2o"] * 3
    assert firsts == [True, False, False, True, False, False]
    assert PointCache().first_in_group(points[1].config)  # another run (process) warms up again


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_study_warms_each_group_up_once(tiny_model, tmp_path, monkeypatch):
    """On a GPU, the offline measurement of a group's relative rates warms it up, and none of its
    timed points warms up again."""
    warmed = []
    real = runner_mod._warm_up

    def counting(llm, requests):
        warmed.append(llm.engine.kv.name)
        return real(llm, requests)

    monkeypatch.setattr(runner_mod, "_warm_up", counting)
    spec = parse_spec(_spec(tiny_model, rates=["0.5x", "2x", 64], device="cuda"), check_packages=False)
    rows = run_study(spec, tmp_path / "res", progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 6 and warmed == ["paged", "h2o"]
