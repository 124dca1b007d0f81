"""The report's check for selections far below their budget, on hand-made rows: which rows it
lists and what it says of them, against values computed by hand; and that the report shows it."""
from __future__ import annotations

import json

from results_rows import rows as base_rows

from kvscope.report import write_report
from kvscope.report.checks import starved_selection_rows

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
