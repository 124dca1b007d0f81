"""The report's figures, each drawn from the rows that hold its data:

- a throughput-quality Pareto view per KV pool: output tok/s at the highest rate against the
  workload's quality metric, with the Pareto frontier marked;
- quality (perplexity, RULER accuracy) against KV budget (the share of the prompt's KV kept), one
  curve per strategy family across its budgets;
- latency: TTFT and TPOT (p50, p99) against request rate per strategy, per scenario (model,
  workload, KV pool);
- peak KV memory against sparsity (the share of the prompt's KV a strategy drops);
- output throughput against model size (parameters), per workload and KV pool, at the highest rate.

Series carry display names (:mod:`kvscope.report.names`); values are means over seeds, with a
standard-deviation bar where there are several; axes are fitted by :func:`~kvscope.report.axes.fit_axis`.
A plot with nothing to draw is a :class:`Plot` with the reason instead of a figure.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvscope.report.axes import fit_axis, grid, legend, pareto_front, series, styles, title
from kvscope.report.names import family, held_fraction, kept_fraction
from kvscope.report.rows import (
    METRIC,
    METRICS,
    Row,
    by,
    finite,
    kv_label,
    rate_key,
    rate_text,
    scenario,
    top_rate,
    values,
    workload_text,
)


@dataclass
class Plot:
    """One figure of the report (a matplotlib ``Figure``), or the reason there is none."""

    title: str
    figure: Any = None
    missing: str | None = None


Style = dict[str, dict[str, Any]]
_LATENCY = ("TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99")
_THROUGHPUT, _KV_USED = METRIC["output tok/s"], METRIC["peak KV used"]
_PERPLEXITY, _RULER = METRIC["perplexity"], METRIC["RULER accuracy"]
_NO_QUALITY = "no quality metric in the rows (quality.perplexity and quality.ruler are off in the spec)"


def per_seed(rows: list[Row], get: Callable[[Row], float | None]) -> list[float]:
    """One value per seed: the mean of ``get`` over that seed's rows (rows that differ in what a
    metric does not depend on, e.g. rates for quality, count once per seed)."""
    out = []
    for seed_rows in by(rows, lambda r: r["config"].get("seed")).values():
        vs = values(seed_rows, get)
        if vs:
            out.append(sum(vs) / len(vs))
    return out


def _workload(row: Row) -> str:
    """A workload as panel titles name it (the short text: two workloads of a study differ in it)."""
    return workload_text(row["config"]["workload"])


def _at_top_rate(rows: list[Row]) -> tuple[float | str, list[Row]]:
    rate = top_rate(rows)
    return rate, [r for r in rows if r["config"]["rate"] == rate]


def _by_strategy(rows: list[Row]) -> dict[str, list[Row]]:
    return by(rows, lambda r: r["config"]["strategy"])


def _budget_curves(ax: Any, rows: list[Row], get: Callable[[Row], float | None], style: Style,
                   x_of: Callable[[float], float], share: Callable[[str], float | None] = kept_fraction) -> None:
    """One curve per strategy family through its budgets (``x_of(share(spec))``, the kept fraction
    unless told); a family with one budget is a marker under its display name, a longer one a line
    under the family's name."""
    known = {s: k for s in _by_strategy(rows) if (k := share(s)) is not None}
    families: dict[str, list[str]] = {}
    for s in sorted(known, key=lambda s: (family(s), known[s])):
        families.setdefault(family(s), []).append(s)
    for fam, specs in families.items():
        groups = [per_seed([r for r in rows if r["config"]["strategy"] == s], get) for s in specs]
        st = {**style[specs[0]], "label": style[specs[0]]["label"] if len(specs) == 1 else fam}
        series(ax, [x_of(known[s]) for s in specs], groups, st)


def _latency_plots(plt: Any, rows: list[Row], style: Style) -> list[Plot]:
    plots = []
    for scen, srows in by(rows, lambda r: scenario(r["config"])).items():
        plot_title = f"Latency vs rate: {' | '.join(scen)}"
        rates = sorted({r["config"]["rate"] for r in srows}, key=rate_key)
        metrics = [m for m in METRICS if m[0] in _LATENCY and any(finite(m[1](r)) for r in srows)]
        if not metrics:
            plots.append(Plot(plot_title, missing="no TTFT or TPOT value (no request finished)"))
            continue
        fig, axes = grid(plt, len(metrics), cols=4, width=3.6)
        for ax, (name, get, _, unit) in zip(axes, metrics):
            for strategy, st_rows in _by_strategy(srows).items():
                # Categorical x: "inf" gets the last place.
                groups = [per_seed([r for r in st_rows if r["config"]["rate"] == rate], get) for rate in rates]
                series(ax, range(len(rates)), groups, style[strategy])
            ax.set_xticks(range(len(rates)), [str(r) for r in rates])
            relative = any(isinstance(r, str) and r.endswith("x") for r in rates)
            ax.set_xlabel("request rate (x offline throughput)" if relative else "request rate (req/s)")
            ax.set_ylabel(f"{name} ({unit})")
            title(ax, name)
            fit_axis(ax)
        legend(fig, axes)
        fig.suptitle(f"{scen[0]} | {_workload(srows[0])} | {scen[2]} pool")
        plots.append(Plot(plot_title, fig))
    return plots


def _size_panels(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """The model-size plot's panels, ``(workload, pool) -> rows``. A pool in bytes holds different
    tokens for each model, so a study that gives every model one byte pool of its own (sized to one
    token count each, say) gets one panel for those pools, titled with each model's; fractions of
    free memory, and byte pools a model shares with others or holds several of, panel by label."""
    panels: dict[tuple[str, str], list[Row]] = {}
    for workload, wrows in by(rows, _workload).items():
        byte_rows = [r for r in wrows if not isinstance(r["config"]["kv_memory"], float)]
        pools = by(byte_rows, lambda r: r["config"]["model"])
        own = {m: {r["config"]["kv_memory"] for r in mrows} for m, mrows in pools.items()}
        if len(own) > 1 and all(len(k) == 1 for k in own.values()) and len({next(iter(k)) for k in own.values()}) > 1:
            label = "per model: " + ", ".join(f"{kv_label(next(iter(own[m])))} {m}" for m in sorted(own))
            panels[(workload, label)] = byte_rows
            wrows = [r for r in wrows if isinstance(r["config"]["kv_memory"], float)]
        for kv, krows in by(wrows, lambda r: kv_label(r["config"]["kv_memory"])).items():
            panels[(workload, kv)] = krows
    return panels


def _common_top_rate(rows: list[Row]) -> tuple[float | str, list[Row]]:
    """The highest rate every model of ``rows`` ran (else the highest of all), and its rows."""
    rates = [{r["config"]["rate"] for r in mrows} for mrows in by(rows, lambda r: r["config"]["model"]).values()]
    common = set.intersection(*rates)
    return _at_top_rate([r for r in rows if r["config"]["rate"] in common] if common else rows)


def _throughput_vs_size(plt: Any, rows: list[Row], style: Style) -> Plot:
    from matplotlib.ticker import NullFormatter

    plot_title = "Output throughput vs model size"
    rows = [r for r in rows if r.get("model_params") and finite(_THROUGHPUT(r))]
    if not rows:
        return Plot(plot_title, missing="no row holds both a parameter count and an output throughput")
    panels = _size_panels(rows)
    fig, axes = grid(plt, len(panels))
    for ax, ((workload, kv), prows) in zip(axes, panels.items()):
        rate, at_rate = _common_top_rate(prows)
        for strategy, st_rows in _by_strategy(at_rate).items():
            by_size = by(st_rows, lambda r: r["model_params"])
            sizes = sorted(by_size)
            series(ax, sizes, [per_seed(by_size[n], _THROUGHPUT) for n in sizes], style[strategy])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a span under a decade collide
        ax.set_xlabel("model parameters")
        ax.set_ylabel("output tok/s")
        title(ax, f"{workload} | {kv} pool | {rate_text(rate)}")
        fit_axis(ax)
    legend(fig, axes)
    fig.suptitle(f"{plot_title} (at each panel's highest request rate)")
    return Plot(plot_title, fig)


def _memory_vs_sparsity(plt: Any, rows: list[Row], style: Style) -> list[Plot]:
    rows = [r for r in rows if finite(_KV_USED(r))]
    if not rows:
        return [Plot("Peak KV memory vs sparsity", missing="no row holds a peak KV memory figure")]
    plots = []
    for model, mrows in by(rows, lambda r: r["config"]["model"]).items():
        panels = by(mrows, lambda r: (_workload(r), kv_label(r["config"]["kv_memory"])))
        fig, axes = grid(plt, len(panels))
        for ax, ((workload, kv), prows) in zip(axes, panels.items()):
            rate, at_rate = _at_top_rate(prows)
            # Memory follows what is held: a strategy that selects per step holds every token.
            _budget_curves(ax, at_rate, _KV_USED, style, lambda held: 1.0 - held, held_fraction)
            ax.set_xlabel("sparsity: share of the prompt's KV dropped from memory (0 = all held)")
            ax.set_ylabel("peak KV used (MiB)")
            title(ax, f"{workload} | {kv} pool | {rate_text(rate)}")
            fit_axis(ax)
        legend(fig, axes)
        plot_title = f"Peak KV memory vs sparsity: {model}"
        fig.suptitle(plot_title)
        plots.append(Plot(plot_title, fig))
    return plots


QualityPanel = tuple[Callable[[Row], float | None], bool, list[Row]]


def _quality_panels(rows: list[Row]) -> dict[str, QualityPanel]:
    """Quality panels of one model: name -> (value of a row, lower is better, rows). Perplexity
    does not depend on the workload; RULER accuracy is per RULER workload."""
    panels: dict[str, QualityPanel] = {}
    ppl_rows = [r for r in rows if finite(_PERPLEXITY(r))]
    if ppl_rows:
        panels["perplexity"] = (_PERPLEXITY, True, ppl_rows)
    for workload, wrows in by([r for r in rows if finite(_RULER(r))], _workload).items():
        panels[f"RULER accuracy: {workload}"] = (_RULER, False, wrows)
    return panels


def _quality_vs_budget(plt: Any, rows: list[Row], style: Style) -> list[Plot]:
    plots = []
    for model, mrows in by(rows, lambda r: r["config"]["model"]).items():
        plot_title = f"Quality vs KV budget: {model}"
        panels = _quality_panels(mrows)
        if not panels:
            plots.append(Plot(plot_title, missing=_NO_QUALITY))
            continue
        fig, axes = grid(plt, len(panels))
        for ax, (name, (get, lower, prows)) in zip(axes, panels.items()):
            _budget_curves(ax, prows, get, style, lambda kept: kept)
            ax.set_xlabel("KV budget: share of the prompt's KV kept (1 = lossless)")
            ax.set_ylabel(name.split(":")[0] + (" (lower is better)" if lower else " (higher is better)"))
            title(ax, name)
            fit_axis(ax, bounded=not lower)
        legend(fig, axes)
        fig.suptitle(plot_title)
        plots.append(Plot(plot_title, fig))
    return plots


def _pareto(plt: Any, rows: list[Row], style: Style) -> list[Plot]:
    """Per model and KV pool, one panel per workload: output tok/s at the highest rate against the
    workload's quality metric (RULER accuracy on RULER workloads, else perplexity)."""
    plots = []
    for (model, kv), krows in by(rows, lambda r: (r["config"]["model"], kv_label(r["config"]["kv_memory"]))).items():
        plot_title = f"Throughput-quality Pareto: {model} | KV pool {kv}"
        panels = []
        for workload, wrows in by(krows, _workload).items():
            rate, at_rate = _at_top_rate(wrows)
            ruler = any(finite(_RULER(r)) for r in at_rate)
            get, name, lower = (_RULER, "RULER accuracy", False) if ruler else (_PERPLEXITY, "perplexity", True)
            pts = []
            for strategy, st_rows in _by_strategy(at_rate).items():
                q, tput = per_seed(st_rows, get), per_seed(st_rows, _THROUGHPUT)
                if q and tput:
                    pts.append((strategy, sum(q) / len(q), sum(tput) / len(tput)))
            if pts:
                panels.append((f"{workload} | {rate_text(rate)}", name, lower, pts))
        if not panels:
            plots.append(Plot(plot_title, missing=_NO_QUALITY if not _quality_panels(krows)
                              else "no row holds both a quality metric and an output throughput"))
            continue
        fig, axes = grid(plt, len(panels))
        for ax, (panel, name, lower, pts) in zip(axes, panels):
            for strategy, q, tput in pts:
                ax.scatter([q], [tput], **{k: v for k, v in style[strategy].items() if k != "linestyle"})
            front = pareto_front([(q, tput) for _, q, tput in pts], lower_x_better=lower)
            ax.plot([pts[i][1] for i in front], [pts[i][2] for i in front], color="black", linestyle="--",
                    linewidth=1, marker="o", markersize=13, markerfacecolor="none", label="Pareto frontier")
            ax.set_xlabel(f"{name} ({'lower' if lower else 'higher'} is better)")
            ax.set_ylabel("output tok/s")
            title(ax, panel)
            fit_axis(ax, "x", bounded=not lower)
            fit_axis(ax)
        legend(fig, axes)
        fig.suptitle(plot_title)
        plots.append(Plot(plot_title, fig))
    return plots


def build_plots(rows: list[Row]) -> list[Plot]:
    """Every plot of the report for the ``ok`` rows, as matplotlib figures (close them when done),
    the most telling first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = styles(sorted({r["config"]["strategy"] for r in rows}))
    return [*_pareto(plt, rows, style), *_quality_vs_budget(plt, rows, style), *_latency_plots(plt, rows, style),
            *_memory_vs_sparsity(plt, rows, style), _throughput_vs_size(plt, rows, style)]
