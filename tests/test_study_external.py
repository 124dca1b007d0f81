"""External systems in a study: spec validation, their points, their rows next to a strategy's
(same metric keys, agreement with full KV, RULER accuracy from completions) and the report."""
from __future__ import annotations

import json
import re

import pytest
from hf_ref import make_tiny_checkpoint
from openai_stub import openai_stub

from kvscope import LLM, SamplingParams
from kvscope.advise.options import option_from_spec
from kvscope.errors import ConfigError
from kvscope.study import expand, parse_spec, read_results, run_study
from kvscope.study import runner as runner_mod
from kvscope.report import build_plots, kept_fraction, mixed_table, write_report


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_checkpoint("llama", path)
    return str(path)


def _spec(model: str = "m", systems: list | None = None, **over) -> dict:
    spec = {
        "name": "ext",
        "models": [model],
        "strategies": ["paged"],
        "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 16, "output_len": 3}],
        "rates": ["inf"],
        "kv_memory": ["2MiB"],
        "slos": {"ttft_ms": 60000},
        "systems": systems if systems is not None else [{"name": "stub", "base_url": "http://127.0.0.1:9/v1"}],
    }
    spec.update(over)
    return spec


@pytest.mark.parametrize("systems, message", [
    ([{"name": "a", "base_url": "http://10.1.2.3:8000"}],
     r"^systems\[0\]\.base_url: host '10\.1\.2\.3' is not loopback .*allow_remote: true"),
    ([{"base_url": "http://127.0.0.1:1"}], r"^systems\[0\]\.name: is required"),
    ([{"name": "a b", "base_url": "http://127.0.0.1:1"}], r"^systems\[0\]\.name: must be letters"),
    ([{"name": "a", "base_url": "http://127.0.0.1:1"}, {"name": "a", "base_url": "http://127.0.0.1:2"}],
     r"^systems\[1\]\.name: 'a' is listed twice"),
    ([{"name": "a", "base_url": "http://127.0.0.1:1", "tokenizer": "other"}],
     r"^systems\[0\]\.tokenizer: must be one of the study's models \(m\)"),
    ([{"name": "a", "base_url": "http://127.0.0.1:1", "endpoint": "/v1/embeddings"}], r"^systems\[0\]\.endpoint: "),
    ([{"name": "a", "base_url": "ftp://127.0.0.1:1"}], r"^systems\[0\]\.base_url: must be an http"),
    ([{"name": "a", "base_url": "http://127.0.0.1:1", "port": 1}], r"^systems\[0\]\.port: unknown key"),
    ([{"name": "a", "base_url": "http://127.0.0.1:1", "max_duration_s": 0}], r"^systems\[0\]\.max_duration_s: must"),
    ({"name": "a"}, r"^systems: must be a list"),
])
def test_bad_systems_name_the_field(systems, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(_spec(systems=systems), check_packages=False)


def test_system_points_sit_on_the_grid_and_leave_strategy_ids_alone():
    remote = {"name": "far", "base_url": "http://10.1.2.3:8000", "allow_remote": True, "model": "x"}
    spec = parse_spec(_spec(systems=[{"name": "stub", "base_url": "http://127.0.0.1:9/v1"}, remote],
                            rates=[1, "inf"], kv_memory=["2MiB", "4MiB"]), check_packages=False)
    points = expand(spec)
    without = expand(parse_spec({**_spec(rates=[1, "inf"], kv_memory=["2MiB", "4MiB"]), "systems": []},
                                check_packages=False))
    assert [p.id for p in points[: len(without)]] == [p.id for p in without]
    systems = points[len(without):]
    assert len(systems) == 2 * 2 * 2  # systems x kv_memory x rates
    assert {p.config["strategy"] for p in systems} == {"system:stub", "system:far"}
    cfg = systems[0].config
    assert cfg["model"] == "m" and cfg["system"]["base_url"] == "http://127.0.0.1:9/v1"
    assert cfg["system"]["endpoint"] == "/v1/completions" and cfg["system"]["model"] is None
    assert {k for k in without[0].config} <= set(cfg)  # every key of a strategy point, plus `system`


def test_a_system_row_is_a_strategy_row_and_agrees_with_full_kv(tiny_model, tmp_path):
    """The stub serves paged's own greedy text for each prompt: the system's row has every metric key
    of the paged row, agreement 1.0 against the paged reference (computed once, for both rows), and
    the report places it beside paged."""
    llm = LLM(tiny_model, strategy="paged", kv_memory_bytes=2 << 20)

    def paged_text(prompt, n):
        return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                            use_tqdm=False)[0].text

    with openai_stub(generate=paged_text, first_token_s=0.02) as stub:
        raw = _spec(tiny_model, [{"name": "stub", "base_url": stub.base_url + "/v1"}], quality={"agreement": True})
        results = tmp_path / "res"
        rows = run_study(parse_spec(raw), results, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    paged, system = rows
    assert system["config"]["strategy"] == "system:stub" and system["served_model"] == "stub-model"
    assert set(system["metrics"]) == set(paged["metrics"])
    assert set(system) == set(paged) | {"served_model", "deadline_reached"}
    m = system["metrics"]
    assert m["completed"] == 2 and m["failed"] == 0 and m["total_output_tokens"] == 6
    assert m["total_input_tokens"] == paged["metrics"]["total_input_tokens"] == 32
    assert m["median_ttft_ms"] >= 18 and m["request_goodput"] == m["request_throughput"]
    agree = system["quality"]["agreement"]
    assert agree["match_fraction"] == 1.0 and agree["num_requests"] == 2
    assert agree["reference_from"] == paged["id"]
    assert all(isinstance(b["prompt"], list) for b in stub.bodies)  # the workload's token ids, as sent to paged

    write_report(results)
    md = (results / "report.md").read_text()
    guidance = md.split("## Guidance", 1)[1]
    assert "system:stub" in guidance and "paged" in guidance
    assert "## Failed points" not in md
    assert len(read_results(results / "results.jsonl")) == 2


def test_a_spec_of_systems_alone_runs_and_reports(tiny_model, tmp_path):
    """`strategies: []` beside `systems`: only the server's points run; an empty list without
    systems is still refused, naming the field."""
    with pytest.raises(ConfigError, match=r"^strategies: must not be empty"):
        parse_spec(_spec(tiny_model, [], strategies=[]), check_packages=False)
    with openai_stub(generate=lambda prompt, n: "ok " * n) as stub:
        raw = _spec(tiny_model, [{"name": "stub", "base_url": stub.base_url + "/v1"}], strategies=[])
        results = tmp_path / "res"
        rows = run_study(parse_spec(raw), results, progress=False)
    assert [(r["config"]["strategy"], r["status"]) for r in rows] == [("system:stub", "ok")]
    assert rows[0]["metrics"]["completed"] == 2
    write_report(results)
    assert "system:stub" in (results / "report.md").read_text()


def _needle_oracle(prompt, n):
    """Answers a RULER needle question by reading the needle out of the prompt."""
    values = re.findall(r"special magic \w+ for [\w-]+ is: (\S+?)\.", prompt)
    return " ".join(values) + " done"


def test_ruler_accuracy_from_the_endpoints_completions(tmp_path, monkeypatch):
    for module in ("long_context_eval", "wonderwords", "nltk"):
        pytest.importorskip(module)
    monkeypatch.setenv("KVSCOPE_CACHE_DIR", str(tmp_path / "cache"))  # RULER samples of the byte tokenizer
    with openai_stub(first_token_s=0.0, itl_s=0.0) as oracle, openai_stub(first_token_s=0.0, itl_s=0.0) as plain:
        oracle.generate = _needle_oracle
        raw = _spec("dummy:tiny-llama", [{"name": "oracle", "base_url": oracle.base_url},
                                         {"name": "plain", "base_url": plain.base_url, "model": "m1"}],
                    workloads=[{"type": "ruler", "task": "niah_single_1", "length": 1024, "num_samples": 2,
                                "output_len": 8}], quality={"ruler": True})
        points = [p for p in expand(parse_spec(raw)) if "system" in p.config]
        rows = [runner_mod.run_point(p, runner_mod.PointCache()) for p in points]
    oracle_row, plain_row = rows
    assert oracle_row["metrics"]["completed"] == 2 and oracle_row["metrics"]["total_output_tokens"] == 16
    assert oracle_row["quality"]["ruler"]["accuracy"] == 1.0 and oracle_row["quality"]["ruler"]["num_samples"] == 2
    assert oracle_row["quality"]["ruler"]["measured_in"] == "serving run"
    assert plain_row["quality"]["ruler"]["accuracy"] == 0.0 and "agreement" not in plain_row["quality"]
    assert plain.bodies[0]["model"] == "m1" and oracle.bodies[0]["model"] == "stub-model"
    assert all(b["max_tokens"] == 8 and isinstance(b["prompt"], str) for b in oracle.bodies)


def test_report_with_system_rows_beside_strategies(tmp_path):
    """Budget plots leave a system out (its KV policy is unknown); latency and Pareto plots and the
    mixed-workload table include it."""
    import matplotlib.pyplot as plt

    w = {"kind": "mixed", "num_requests": 8, "long_fraction": 0.25, "length": 1024}
    rows = []
    for i, strategy in enumerate(["paged", "h2o:heavy_ratio=0.1,recent_ratio=0.1", "system:vllm"]):
        for rate in (4.0, "inf"):
            rows.append({
                "id": f"{i}{rate}", "status": "ok", "environment": {},
                "config": {"model": "m", "strategy": strategy, "workload": w, "kv_memory": 1 << 20, "rate": rate},
                "metrics": {"median_ttft_ms": 10.0 + i, "p99_ttft_ms": 20.0, "median_tpot_ms": 1.0, "p99_tpot_ms": 2.0,
                            "output_throughput": 100.0 + i, "request_goodput": 1.0 + i, "completed": 8, "failed": 0},
                "engine_stats": {} if i == 2 else {"peak_kv_bytes_used": 1 << 20},
                "quality": {"ruler": {"accuracy": 1.0 - 0.2 * i}, "agreement": {"match_fraction": 1.0}},
            })
    assert kept_fraction("system:vllm") is None and kept_fraction("paged") == 1.0
    assert option_from_spec("system:vllm") is None  # `kvscope advise --results` skips system rows
    table = {e["strategy"]: e for e in mixed_table(rows)}
    assert table["system:vllm"]["long_accuracy"] == pytest.approx(0.6) and table["system:vllm"]["goodput"] == 3.0
    plots = {p.title: p for p in build_plots(rows)}
    try:
        latency = plots["Latency vs rate: m | mixed(num_requests=8,long_fraction=0.25,length=1024) | 1MiB"].figure
        assert {line.get_label() for line in latency.axes[0].get_lines()} >= {"paged", "system:vllm"}
        budget = plots["Quality vs KV budget: m"].figure
        assert "system:vllm" not in {c.get_label() for ax in budget.axes for c in ax.collections}
        pareto = plots["Throughput-quality Pareto: m | KV pool 1MiB"].figure
        assert "system:vllm" in {c.get_label() for ax in pareto.axes for c in ax.collections}
    finally:
        plt.close("all")
    folder = tmp_path / "res"
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(folder)
    assert "| system:vllm |" in (folder / "report.md").read_text().split("## Mixed workload", 1)[1]


def test_a_system_at_relative_rates_is_measured_offline_once(tiny_model, tmp_path):
    """A server's relative rates scale with its own offline throughput, measured once (every request
    at once) for all its points, as a strategy's are; its rows record factor, basis and absolute rate."""
    with openai_stub(first_token_s=0.02, itl_s=0.01) as stub:
        raw = _spec(tiny_model, [{"name": "stub", "base_url": stub.base_url + "/v1"}], rates=["0.5x", "1x"])
        points = [p for p in expand(parse_spec(raw)) if "system" in p.config]
        cache = runner_mod.PointCache()
        rows = [runner_mod.run_point(p, cache) for p in points]
        sent = len(stub.bodies)
    basis = rows[0]["rate_basis"]
    assert rows[1]["rate_basis"] == basis and basis["measured_by"] == points[0].id
    assert sent == 3 * 2  # the offline run and two points, 2 requests each
    offline = basis["offline_request_throughput"]
    assert offline > 0 and basis["offline_completed"] == 2
    for row, factor in zip(rows, (0.5, 1.0)):
        assert row["config"]["rate_relative"] == f"{factor:g}x"
        assert row["config"]["rate"] == pytest.approx(factor * offline)
        assert row["metrics"]["completed"] == 2
