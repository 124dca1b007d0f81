"""The report's verdict and decision table on hand-made rows, display names, intervals and the
outlier-clipping rule, each against values computed by hand."""
from __future__ import annotations

import json
import math

import pytest
from results_rows import regime_row

from kvscope.report import decision_table, display_name, display_names, kept_fraction, robust_limits, write_report
from kvscope.report.axes import fit_axis
from kvscope.report.uncertainty import goodput_interval, wilson
from kvscope.report.verdict import sentence, verdict

H2O_10, H2O_20, H2O_60 = ("h2o:heavy_ratio=0.05,recent_ratio=0.05", "h2o:heavy_ratio=0.1,recent_ratio=0.1",
                          "h2o:heavy_ratio=0.3,recent_ratio=0.3")
SNAPKV = "snapkv:budget_ratio=0.2"
SLOS = "TTFT ≤ 2000 ms, TPOT ≤ 200 ms"


def _only(rows):
    (d,) = decision_table(rows)
    return d


def test_wilson_interval_by_hand():
    # z = 1.959964, z^2 = 3.841459. 16 of 16: centre = (1 + z^2/32) / (1 + z^2/16), half-width the same
    # less 16/(16 + z^2): lower = 16 / 19.841459 = 0.80639.
    assert wilson(16, 16) == pytest.approx((0.80639, 1.0), abs=1e-5)
    # 8 of 16: centre 0.5; half = z * sqrt(0.25/16 + z^2/1024) / (1 + z^2/16) = 1.959964 * 0.139199 / 1.240091.
    lo, hi = wilson(8, 16)
    assert (lo, hi) == pytest.approx((0.5 - 0.220005, 0.5 + 0.220005), abs=1e-5)
    with pytest.raises(ValueError):
        wilson(0, 0)


def test_goodput_interval_scales_the_share_of_good_requests():
    # 12 of 16 requests good over 8 s: goodput 1.5 req/s. p = 0.75: centre (0.75 + 0.120046) / 1.240091
    # = 0.701598, half 1.959964 * sqrt(0.75 * 0.25 / 16 + 0.003751) / 1.240091 = 0.196581; x 16 / 8.
    row = regime_row("paged", 1.5, duration=8.0)
    lo, hi = goodput_interval([row])
    assert (lo, hi) == pytest.approx((2 * 0.505017, 2 * 0.898179), abs=1e-4)
    assert lo < 1.5 < hi


def test_clear_win_with_quality_paid():
    """h2o 20% serves 2.4x paged's goodput at perplexity x1.1 and RULER -0.125: above the floor."""
    rows = [regime_row("paged", 1.0, ppl=20.0, ruler=0.75), regime_row(H2O_20, 2.4, ppl=22.0, ruler=0.625),
            regime_row("offload", 0.5, ppl=20.0, ruler=0.75)]
    d = _only(rows)
    assert d.reason == "clear" and d.choice.name == "h2o 20%" and not d.tied and not d.below_floor
    assert d.full.name == "paged" and d.runner_up.name == "paged"
    assert d.margin == pytest.approx(2.4)
    q = d.choice.quality
    # score = min(full ppl / its ppl, its RULER / full's) = min(20/22, 0.625/0.75) = min(0.909, 0.833)
    assert q.score == pytest.approx(0.625 / 0.75) and q.ppl_ratio == pytest.approx(1.1)
    assert q.ruler_delta == pytest.approx(-0.125)
    text = sentence(d, SLOS)
    assert text.startswith("**h2o 20%** serves 2.40x paged's goodput (2.4 vs 1 req/s; 95% CI 1.94-2.4 over 16 "
                           "requests) at ")
    assert "RULER accuracy -0.12 (0.62 vs 0.75), perplexity x1.10" in text


def test_tie_within_noise_goes_to_full_kv():
    # 2.06 vs 2.00: 2.9% apart, under the 5% threshold; paged scores 1, h2o 60% 20/21 = 0.952.
    rows = [regime_row("paged", 2.0, ppl=20.0), regime_row(H2O_60, 2.06, ppl=21.0), regime_row(H2O_20, 1.5, ppl=22.0)]
    d = _only(rows)
    assert d.reason == "tie" and d.choice.name == "paged" and [o.name for o in d.tied] == ["h2o 60%"]
    assert d.noise == 0.05 and d.runner_up.name == "h2o 20%" and d.margin == pytest.approx(2.0 / 1.5)
    assert "h2o 60% within noise (±5%), so dropping KV gains nothing here" in sentence(d, SLOS)


def test_seed_spread_widens_the_tie():
    # Leader h2o 20%: seeds 2.0 and 2.4, mean 2.2, stdev 0.28284: noise = 2 x 0.28284 / 2.2 = 0.25713.
    # paged at 1.7 is 22.7% below: a tie, where 5% would not have called it one.
    rows = [regime_row(H2O_20, 2.0, seed=0, ppl=21.0), regime_row(H2O_20, 2.4, seed=1, ppl=21.0),
            regime_row("paged", 1.7, seed=0, ppl=20.0), regime_row("paged", 1.7, seed=1, ppl=20.0)]
    d = _only(rows)
    assert d.noise == pytest.approx(2 * math.sqrt(0.08) / 2.2) and d.reason == "tie"
    assert d.choice.name == "paged" and d.choice.goodput == pytest.approx(1.7)


def test_quality_floor_failure_passes_the_decision_on_and_says_why():
    """The fastest (h2o 10%, perplexity x2: score 0.5) fails the 0.8 floor: snapkv 20% takes it."""
    rows = [regime_row("paged", 1.0, ppl=20.0), regime_row(H2O_10, 3.0, ppl=40.0), regime_row(SNAPKV, 2.0, ppl=23.0)]
    d = _only(rows)
    assert d.choice.name == "snapkv 20%" and d.reason == "clear" and [o.name for o in d.below_floor] == ["h2o 10%"]
    assert d.choice.quality.score == pytest.approx(20 / 23) and d.margin == pytest.approx(2.0)
    text = sentence(d, SLOS)
    assert "h2o 10% serves more (3 req/s) but fails the quality floor (0.50 < 0.8: perplexity x2.00)" in text


def test_everything_under_the_floor():
    rows = [regime_row("paged", 0.0, ppl=20.0), regime_row(H2O_10, 3.0, ppl=40.0)]
    d = _only(rows)
    assert d.choice is None and d.reason == "floor" and d.below_floor[0].name == "h2o 10%"
    assert sentence(d, SLOS) == ("no strategy both meets the SLOs and keeps quality: full KV (paged) serves no request "
                                 "within the SLOs, and every one that meets them fails the quality floor 0.8; the "
                                 "fastest, h2o 10%, serves 3 req/s at perplexity x2.00.")


def test_nothing_meets_the_slos():
    rows = [regime_row("paged", 0.0, p99_ttft_ms=9000.0), regime_row(H2O_20, 0.0, p99_ttft_ms=4000.0)]
    d = _only(rows)
    assert d.choice is None and d.reason == "no-slo"
    assert sentence(d, SLOS) == ("no strategy serves a request within the SLOs; the lowest p99 TTFT is h2o 20%'s "
                                 "4,000 ms.")


def test_verdict_leads_with_the_top_rate_and_states_uncertainty():
    rows = [regime_row("paged", 1.0, ppl=20.0), regime_row(H2O_20, 2.4, ppl=22.0),
            regime_row("paged", 2.0, rate=4.0, ppl=20.0), regime_row(H2O_20, 2.02, rate=4.0, ppl=22.0)]
    lines = verdict(decision_table(rows), rows)
    assert lines[:2] == ["Decision: **paged** in 1 of 2 regimes; **h2o 20%** in 1 of 2 regimes.",
                         "dummy:tiny-llama, mixed, 16 requests, 8 of them ruler niah_single_1 at length 512; SLOs "
                         "TTFT ≤ 2000 ms, TPOT ≤ 200 ms:"]
    # All 16 requests good in 16 / 2.4 s: Wilson(16, 16) x 2.4 = 0.80639 x 2.4 = 1.935 to 2.4.
    assert lines[2] == ("- 24MiB pool, all requests at once: **h2o 20%** serves 2.40x paged's goodput (2.4 vs 1 req/s; "
                        "95% CI 1.94-2.4 over 16 requests) at perplexity x1.10. (At 4 req/s: paged, tied within noise "
                        "with 1 other.)")
    # Wilson(16, 16) leaves 81% (see test_wilson_interval_by_hand).
    assert lines[-1] == ("Uncertainty: 1 seed; ties are differences within 5% (run-to-run noise, no seed spread to "
                         "measure); goodput intervals are 95% Wilson intervals over the 16 requests of a point (all 16 "
                         "within the SLOs still leaves 81%-100% of the value); perplexity over 512 scored tokens, "
                         "without an interval (the rows keep no per-token losses).")


def test_report_leads_with_the_verdict_and_keeps_guidance_as_appendix(tmp_path):
    rows = [regime_row("paged", 1.0, ppl=20.0), regime_row(H2O_20, 2.4, ppl=22.0)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = write_report(tmp_path)[1].read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## Verdict", "## Decision table"] and headings[-1].startswith("## Guidance")
    assert "| mixed, 16 requests, 8 of them ruler niah_single_1 at length 512 | 24MiB | all requests at once | " \
           "h2o 20% | 2.4 (1.94-2.4) | 2.40x paged | 2.40x paged | perplexity x1.10 (score 0.91) |" in md


@pytest.mark.parametrize("spec, name, kept", [
    ("paged", "paged", 1.0),
    ("paged:block_size=32", "paged", 1.0),
    (H2O_20, "h2o 20%", 0.2),
    (H2O_60, "h2o 60%", pytest.approx(0.6)),
    ("h2o", "h2o 20%", 0.2),  # the constructor's defaults, 0.1 + 0.1
    ("streaming", "streaming 20%", 0.2),  # the class's default budget
    ("knorm:budget_ratio=0.3,recent_ratio=0.1", "knorm 30%", 0.3),  # the recent window is inside the budget
    ("snapkv:budget=64", "snapkv 64 tok", None),
    ("infinigen:budget_ratio=0.2,calibration_len=512", "infinigen 20%", 0.2),
    ("adaptive:long_threshold=256", "adaptive", None),  # its share depends on each request
    ("offload", "offload", 1.0),
    ("system:vllm", "system:vllm", None),
])
def test_display_names_and_kept_fraction_from_the_spec(spec, name, kept):
    assert display_name(spec) == name and kept_fraction(spec) == kept


def test_display_names_tell_colliding_specs_apart():
    names = display_names(["adaptive:long=h2o", "adaptive:long=snapkv,long_threshold=256", "paged", H2O_20])
    assert names == {"adaptive:long=h2o": "adaptive (long=h2o)",
                     "adaptive:long=snapkv,long_threshold=256": "adaptive (long=snapkv,long_threshold=256)",
                     "paged": "paged", H2O_20: "h2o 20%"}
    # A spec that leaves the differing argument at its default is named by the default.
    names = display_names(["infinigen:budget_ratio=0.2", "infinigen:alpha=12,budget_ratio=0.2"])
    assert names == {"infinigen:budget_ratio=0.2": "infinigen 20% (alpha=4)",
                     "infinigen:alpha=12,budget_ratio=0.2": "infinigen 20% (alpha=12)"}


def test_outlier_is_clipped_to_the_bulk_and_marked():
    ppl = [20.0, 21.0, 22.0, 25.0, 30.0, 1700.0]
    # log10: 1.30103 1.32222 1.34242 1.39794 1.47712 3.23045; quartiles (linear interpolation)
    # q1 = 1.32727, q3 = 1.45733, IQR 0.13006 -> 0.25 (the minimum); upper fence 1.45733 + 0.75 = 2.20733.
    # 1700 lies beyond and the bulk spans 0.17609 of the 1.92942 decades: clip. Pad 5% of 0.17609.
    lo, hi = robust_limits(ppl, log=True)
    assert (math.log10(lo), math.log10(hi)) == pytest.approx((1.30103 - 0.0088046, 1.47712 + 0.0088046), abs=1e-5)
    assert robust_limits(ppl[:-1] + [60.0], log=True) is None  # 60 is inside the fences
    assert robust_limits([1.0, 1.0, 1.0, 1.0, 9.0], log=False) is None  # IQR 0: no bulk to tell apart
    assert robust_limits(ppl[:3], log=True) is None  # too few values

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        ax.plot(range(len(ppl)), ppl, marker="o")
        fit_axis(ax)
        assert ax.get_ylim() == pytest.approx((lo, hi)) and ax.get_yscale() == "linear"  # 20-30: no decade
        assert [t.get_text() for t in ax.texts] == ["1,700 (off scale)"]
    finally:
        plt.close(fig)


def test_budget_curve_error_bars_and_display_names_in_plots():
    """H2O at 4 budgets is one curve of 4 points named ``h2o``; two seeds give error bars (one
    standard deviation: perplexities 20 and 24 -> 2.83); other series carry display names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    from kvscope.report import build_plots

    budgets = {0.1: 60.0, 0.2: 40.0, 0.4: 30.0, 0.6: 25.0}
    rows = [regime_row(f"h2o:heavy_ratio={b / 2:g},recent_ratio={b / 2:g}", 1.0, ppl=p, seed=s)
            for b, p in budgets.items() for s in (0, 1)]
    rows += [regime_row("paged", 1.0, ppl=20.0 + 4 * s, seed=s) for s in (0, 1)]
    plots = {p.title: p.figure for p in build_plots(rows)}
    try:
        (ax,) = plots["Quality vs KV budget: dummy:tiny-llama"].axes
        lines = {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()}
        assert lines["h2o"] == [[0.1, 60.0], [0.2, 40.0], [0.4, 30.0], [0.6, 25.0]]
        assert lines["paged"] == [[1.0, 22.0]]
        (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        (segment,) = bars.get_segments()
        assert segment.ravel().tolist() == pytest.approx([1.0, 22.0 - math.sqrt(8), 1.0, 22.0 + math.sqrt(8)])
        latency = next(f for t, f in plots.items() if t.startswith("Latency vs rate"))
        assert {line.get_label() for line in latency.axes[0].get_lines()} == {"h2o 10%", "h2o 20%", "h2o 40%",
                                                                               "h2o 60%", "paged"}
    finally:
        plt.close("all")


def _relative(row, factor: str, absolute: float):
    """``row`` as a relative-rate point writes it: the absolute rate it ran at, the spec's factor."""
    return {**row, "config": {**row["config"], "rate": absolute, "rate_relative": factor}}


def test_relative_rate_points_are_compared_at_the_same_factor(tmp_path):
    # At "0.5x" each strategy ran at half its own offline throughput: 3 and 5 req/s. Compared by
    # absolute rate they would be two regimes of one strategy each; by factor, one regime of two.
    rows = [_relative(regime_row("paged", 1.0, ppl=20.0), "0.5x", 3.0),
            _relative(regime_row(H2O_20, 2.4, ppl=22.0), "0.5x", 5.0)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = write_report(tmp_path)[1].read_text()
    assert "| 24MiB | 0.5x of its offline throughput | h2o 20% | 2.4 (1.94-2.4) | 2.40x paged |" in md


def test_about_this_run_names_mixed_commits_and_scheduling():
    from kvscope.report.render import _engines

    def row(commit, stats):
        return {"environment": {"commit": commit}, "engine_stats": stats}

    one = [row("abc", {"async_scheduling": True})] * 2
    assert _engines(one) == ""  # one commit, one engine: nothing to say
    mixed = [row("abc", {"peak_kv_bytes_used": 1}), row("abc", {"async_scheduling": False}),
             row("def", {"async_scheduling": True}), {"environment": {"commit": "def"}}]  # the last: a server's row
    assert _engines(mixed) == (" Rows by commit: abc (2), def (2). kvscope rows by scheduling: async (1), "
                               "synchronous (2); compare strategies within one.")
