"""The report's checks on hand-made rows (selections far below their budget; kernels compiled during
a timed run): which rows each lists and what it says of them, against values computed by hand; and
that the report shows a check only when a row trips it."""
from __future__ import annotations

import json

from results_rows import rows as base_rows

from kvscope.report import write_report
from kvscope.report.checks import compile_stall_rows, starved_selection_rows

DENSE = [1.0, 1.0]  # the dense early layers fetch everything and are not counted


def _row(strategy: str, shares: list[float] | None, accuracy: float | None = None) -> dict:
    row = {**base_rows()[0]}
    row["config"] = {**row["config"], "strategy": strategy}
    row["engine_stats"] = {} if shares is None else {"selected_fraction_per_layer": shares}
    if accuracy is not None:
        row["quality"] = {"ruler": {"accuracy": accuracy, "num_samples": 50}}
    return row


def test_starved_layers_are_counted_against_the_budget():
    starved = _row("infinigen:budget_ratio=0.2", DENSE + [0.19, 0.0003, 0.12, 0.009], accuracy=0.0)
    healthy = _row("infinigen:budget_ratio=0.1", DENSE + [0.099, 0.0136, 0.05])  # least 1.36%: not starved
    small_budget = _row("infinigen:budget_ratio=0.04", DENSE + [0.001, 0.03])  # the budget itself is tiny
    no_stat = _row("h2o:heavy_ratio=0.1,recent_ratio=0.1", None)
    head, body = starved_selection_rows([starved, healthy, small_budget, no_stat])
    assert head[3:] == ["starved layers", "least share", "budget", "RULER accuracy"]
    assert len(body) == 1
    model, name, _, layers, least, budget, ruler = body[0]
    assert (model, name) == ("dummy:tiny-llama", "infinigen 20%")
    assert (layers, least, budget, ruler) == ("2 of 4", "0.03%", "20%", "0.00")


def test_the_report_shows_the_check_only_when_a_row_starves(tmp_path):
    ok = [r for r in base_rows() if r["status"] == "ok"]
    for name, extra, shown in (("starved", [_row("infinigen:budget_ratio=0.2", DENSE + [0.005])], True),
                               ("healthy", [_row("infinigen:budget_ratio=0.2", DENSE + [0.15])], False)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ok + extra))
        _, md = write_report(folder)
        text = md.read_text()
        assert ("## Check: selections far below their budget" in text) is shown
        assert ("| dummy:tiny-llama | infinigen 20% |" in text) is shown


def _compiled(strategy: str, count: int | None, kernels: list[str] | None = None) -> dict:
    row = {**base_rows()[0]}
    row["config"] = {**row["config"], "strategy": strategy, "kv_memory": 0.9, "rate": 109.6, "rate_relative": "1x"}
    row["metrics"] = {**row["metrics"], "mean_ttft_ms": 4490.1}
    if count is not False:
        row["triton_compiles"] = {"timed_run": count, "kernels": kernels or []}
    return row


def test_rows_that_compiled_kernels_in_their_timed_run_are_listed():
    stalled = _compiled("h2o:heavy_ratio=0.1,recent_ratio=0.1", 3,
                        ["_colsum_kernel[num_warps=8](q_ptr: *bf16, num_tokens: i32)", "_prefill_kernel[...]()"])
    clean = _compiled("paged", 0)
    unknown = _compiled("snapkv:budget_ratio=0.2", None)  # Triton could not tell
    older = _compiled("streaming:budget_ratio=0.2", False)  # a row written before the field
    head, body = compile_stall_rows([stalled, clean, unknown, older])
    assert head == ["model", "strategy", "workload", "KV pool", "rate", "kernels compiled", "first", "mean TTFT ms"]
    assert len(body) == 1
    assert body[0][:2] == ["dummy:tiny-llama", "h2o 20%"]
    assert body[0][3:] == ["90% free", "1x of its offline throughput", "3", "_colsum_kernel", "4490"]


def test_the_report_shows_the_compile_check_only_when_a_row_compiled(tmp_path):
    ok = [r for r in base_rows() if r["status"] == "ok"]
    for name, count, shown in (("stalled", 2, True), ("clean", 0, False)):
        folder = tmp_path / name
        folder.mkdir()
        extra = _compiled("h2o:heavy_ratio=0.1,recent_ratio=0.1", count, ["_fold_kernel[num_warps=4]()"])
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ok + [extra]))
        _, md = write_report(folder)
        assert ("## Check: kernels compiled during timed runs" in md.read_text()) is shown
