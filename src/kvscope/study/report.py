"""Reports of a study's results: one self-contained HTML file (plots as base64 PNG) and Markdown.

Plots, each drawn from the rows that hold its data:

- latency: TTFT and TPOT (p50, p99) against request rate per strategy, per scenario (model,
  workload, KV pool);
- output throughput against model size (parameters), per workload and KV pool, at the highest rate;
- peak KV memory against sparsity (the share of the prompt's KV a strategy drops);
- quality (perplexity, RULER accuracy) against KV budget (the share it keeps);
- a throughput-quality Pareto view per KV pool: output tok/s at the highest rate against the
  workload's quality metric, with the Pareto frontier marked.

For mixed workloads, a table (:func:`mixed_table`): goodput, p99 TTFT/TPOT and quality as served
per strategy, whether quality meets :data:`QUALITY_FLOOR`, and ``adaptive``'s goodput against each.

A plot with nothing to draw is left out and the report says which and why; :func:`empty_panels`
checks every figure before it is written. The guidance table is computed from the rows: for each
scenario (model, workload, KV pool, rate) and metric, the winning strategy, its margin over the
runner-up, and the strategies within noise of it (see :data:`NOISE`).
"""
from __future__ import annotations

import base64
import html
import io
import math
import statistics
import textwrap
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvscope.kv.registry import available, parse_spec
from kvscope.study.external import PREFIX as SYSTEM_PREFIX
from kvscope.study.results_io import existing_results_file, read_results_file

#: Relative difference under which two strategies are reported as tied. With several seeds the
#: threshold grows to twice the winner's relative standard deviation over seeds when that is larger.
NOISE = 0.05

# name, where in a row, True when lower is better, unit
Metric = tuple[str, Callable[[dict[str, Any]], float | None], bool, str]
METRICS: list[Metric] = [
    ("TTFT p50", lambda r: r["metrics"].get("median_ttft_ms"), True, "ms"),
    ("TTFT p99", lambda r: r["metrics"].get("p99_ttft_ms"), True, "ms"),
    ("TPOT p50", lambda r: r["metrics"].get("median_tpot_ms"), True, "ms"),
    ("TPOT p99", lambda r: r["metrics"].get("p99_tpot_ms"), True, "ms"),
    ("output tok/s", lambda r: r["metrics"].get("output_throughput"), False, "tok/s"),
    ("goodput req/s", lambda r: r["metrics"].get("request_goodput"), False, "req/s"),
    ("peak KV used", lambda r: _mib(r.get("engine_stats", {}).get("peak_kv_bytes_used")), True, "MiB"),
    ("perplexity", lambda r: r.get("quality", {}).get("perplexity", {}).get("perplexity"), True, ""),
    ("RULER accuracy", lambda r: r.get("quality", {}).get("ruler", {}).get("accuracy"), False, ""),
    ("agreement with full KV", lambda r: r.get("quality", {}).get("agreement", {}).get("match_fraction"), False, ""),
]

#: Quality floor of the mixed-workload table: the advisor's default (``kvscope advise --quality-floor``).
QUALITY_FLOOR = 0.8


def _mib(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def kept_fraction(strategy: str) -> float | None:
    """Fraction of a prompt's KV the strategy keeps: 1 for lossless ones, else its ratio budget
    (the eviction policies' default, 20%, when the spec gives none). None for an external system's
    row (``system:<name>``): what its server keeps is not known, so budget plots leave it out."""
    if strategy.startswith(SYSTEM_PREFIX):
        return None
    name, args = parse_spec(strategy)
    if "heavy_ratio" in args or "recent_ratio" in args:
        return float(args.get("heavy_ratio", 0.1)) + float(args.get("recent_ratio", 0.1))
    cls = available().get(name)
    if cls is not None and cls.lossless:
        return 1.0
    return float(args.get("budget_ratio", 0.2))


def _name(strategy: str) -> str:
    """The name part of a strategy spec (``parse_spec``'s), also of an external system's ``system:<name>``."""
    return strategy.partition(":")[0].strip()


def _workload_label(w: dict[str, Any]) -> str:
    extra = ",".join(f"{k}={v}" for k, v in w.items() if k != "kind")
    return f"{w['kind']}({extra})"


def _kv_label(kv: int | float) -> str:
    return f"{kv:.0%} free" if isinstance(kv, float) else f"{kv / 2**20:g}MiB"


def _scenario(cfg: dict[str, Any]) -> tuple[str, str, str]:
    return cfg["model"], _workload_label(cfg["workload"]), _kv_label(cfg["kv_memory"])


def _rate_key(rate: float | str) -> float:
    return math.inf if rate == "inf" else float(rate)


_mean = statistics.fmean


def guidance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario, rate and metric: ``winner``, ``value``, ``runner_up``, ``margin`` (relative to
    the winner) and ``tied`` (strategies within noise of the winner)."""
    # (scenario, rate) -> strategy -> metric -> values over seeds
    table: dict[tuple[Any, ...], dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(
        lambda: defaultdict(list)))
    for r in rows:
        cfg = r["config"]
        key = (*_scenario(cfg), cfg["rate"])
        for name, get, _, _ in METRICS:
            v = get(r)
            if v is not None and math.isfinite(v):
                table[key][cfg["strategy"]][name].append(v)
    out = []
    for key in sorted(table, key=lambda k: (k[:3], _rate_key(k[3]))):
        for name, _, lower, unit in METRICS:
            vals = {s: v[name] for s, v in table[key].items() if v.get(name)}
            if len(vals) < 2:
                continue
            ranked = sorted(vals, key=lambda s: _mean(vals[s]), reverse=not lower)
            best, second = ranked[0], ranked[1]
            b = _mean(vals[best])
            spread = statistics.stdev(vals[best]) / abs(b) if len(vals[best]) > 1 and b else 0.0
            noise = max(NOISE, 2 * spread)

            def rel(s: str) -> float:
                return abs(_mean(vals[s]) - b) / abs(b) if b else abs(_mean(vals[s]) - b)

            out.append({
                "model": key[0], "workload": key[1], "kv_memory": key[2], "rate": key[3], "metric": name,
                "unit": unit, "winner": best, "value": b, "runner_up": second, "margin": rel(second),
                "tied": [s for s in ranked[1:] if rel(s) <= noise], "noise": noise,
            })
    return out


@dataclass
class Plot:
    """One figure of the report (a matplotlib ``Figure``), or the reason there is none."""

    title: str
    figure: Any = None
    missing: str | None = None


def points_drawn(ax: Any) -> int:
    """Data points drawn on a matplotlib ``Axes``: finite vertices of its lines and finite offsets
    of its scatter collections."""
    n = 0
    arrays = [line.get_xydata() for line in ax.get_lines()] + [c.get_offsets() for c in ax.collections]
    for xy in arrays:
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        n += int(np.isfinite(xy).all(axis=1).sum())
    return n


def empty_panels(figure: Any) -> list[str]:
    """Titles (or y labels) of the panels of ``figure`` with no data point drawn; [] when every
    panel shows data. The report writer leaves out a figure with an empty panel."""
    return [ax.get_title() or ax.get_ylabel() or f"panel {i}" for i, ax in enumerate(figure.axes)
            if points_drawn(ax) == 0]


def pareto_front(points: Sequence[tuple[float, float]], lower_x_better: bool = False) -> list[int]:
    """Indices of the points no other point dominates, in ascending x.

    ``y`` is better higher; ``x`` higher too, or lower with ``lower_x_better`` (e.g. perplexity).
    A point dominates another when it is at least as good on both axes and better on one, so equal
    points are on the front together.
    """
    sign = -1.0 if lower_x_better else 1.0

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        ax, bx = sign * a[0], sign * b[0]
        return ax >= bx and a[1] >= b[1] and (ax > bx or a[1] > b[1])

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: points[i][0])


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # constrained layout already fits titles and the legend
    return buf.getvalue()


_MARKERS = "osD^vP*Xh<>"


def _styles(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One colour and marker per strategy, the same in every plot."""
    import matplotlib

    strategies = sorted({r["config"]["strategy"] for r in rows})
    cmap = matplotlib.colormaps["tab10" if len(strategies) <= 10 else "tab20"]
    return {s: {"color": cmap(i % cmap.N), "marker": _MARKERS[i % len(_MARKERS)]} for i, s in enumerate(strategies)}


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _top_rate(rows: list[dict[str, Any]]) -> float | str:
    """The highest request rate among ``rows`` ("inf", all at once, when present): where
    throughput shows a configuration's capacity."""
    return max((r["config"]["rate"] for r in rows), key=_rate_key)


def _by(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[dict[str, Any]]]:
    """Rows grouped by ``key``, the groups in a stable order (so plots come out the same every run)."""
    out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def _mean_of(rows: list[dict[str, Any]], get: Callable[[dict[str, Any]], float | None]) -> float | None:
    values = [v for v in map(get, rows) if _finite(v)]
    return _mean(values) if values else None


def _grid(plt: Any, n: int, cols: int = 3, width: float = 5.0, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels, at most ``cols`` per row; returns it and its ``n`` axes."""
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 3, height * rows), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        fig.delaxes(ax)  # unused cells of the grid
    return fig, flat[:n]


def _title(ax: Any, text: str) -> None:
    # Workload labels list every argument; wrapped, they stay inside their panel.
    ax.set_title(textwrap.fill(text, 60), fontsize=8)


def _legend(fig: Any, axes: list[Any]) -> None:
    """One legend for the figure, outside the panels (strategy names are long)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="outside right upper")


_LATENCY = ("TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99")
_THROUGHPUT = next(m for m in METRICS if m[0] == "output tok/s")[1]
_KV_USED = next(m for m in METRICS if m[0] == "peak KV used")[1]
_PERPLEXITY = next(m for m in METRICS if m[0] == "perplexity")[1]
_RULER = next(m for m in METRICS if m[0] == "RULER accuracy")[1]


def _latency_plots(plt: Any, rows: list[dict[str, Any]], style: dict[str, dict[str, Any]]) -> list[Plot]:
    plots = []
    for scen, srows in _by(rows, lambda r: _scenario(r["config"])).items():
        title = f"Latency vs rate: {' | '.join(scen)}"
        rates = sorted({r["config"]["rate"] for r in srows}, key=_rate_key)
        metrics = [m for m in METRICS if m[0] in _LATENCY and any(_finite(m[1](r)) for r in srows)]
        if not metrics:
            plots.append(Plot(title, missing="no TTFT or TPOT value (no request finished)"))
            continue
        fig, axes = _grid(plt, len(metrics), cols=4, width=4.0)
        for ax, (name, get, _, unit) in zip(axes, metrics):
            for strategy, st_rows in _by(srows, lambda r: r["config"]["strategy"]).items():
                # Categorical x: "inf" gets the last place.
                pts = [(i, _mean_of([r for r in st_rows if r["config"]["rate"] == rate], get))
                       for i, rate in enumerate(rates)]
                pts = [(x, y) for x, y in pts if y is not None]
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=strategy, **style[strategy])
            ax.set_xticks(range(len(rates)), [str(r) for r in rates])
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(f"{name} ({unit})")
            _title(ax, name)
            if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
                ax.set_yscale("log")
        _legend(fig, axes)
        fig.suptitle(" | ".join(scen))
        plots.append(Plot(title, fig))
    return plots


def _throughput_vs_size(plt: Any, rows: list[dict[str, Any]], style: dict[str, dict[str, Any]]) -> Plot:
    title = "Output throughput vs model size"
    rows = [r for r in rows if r.get("model_params") and _finite(_THROUGHPUT(r))]
    if not rows:
        return Plot(title, missing="no row holds both a parameter count and an output throughput")
    panels = _by(rows, lambda r: (_workload_label(r["config"]["workload"]), _kv_label(r["config"]["kv_memory"])))
    fig, axes = _grid(plt, len(panels))
    for ax, ((workload, kv), prows) in zip(axes, panels.items()):
        rate = _top_rate(prows)
        at_rate = [r for r in prows if r["config"]["rate"] == rate]
        for strategy, st_rows in _by(at_rate, lambda r: r["config"]["strategy"]).items():
            by_size = _by(st_rows, lambda r: r["model_params"])
            sizes = sorted(by_size)
            ax.plot(sizes, [_mean_of(by_size[n], _THROUGHPUT) for n in sizes], label=strategy, **style[strategy])
        ax.set_xscale("log")
        ax.set_xlabel("model parameters")
        ax.set_ylabel("output tok/s")
        _title(ax, f"{workload} | {kv} | rate {rate}")
    _legend(fig, axes)
    fig.suptitle(f"{title} (at each panel's highest request rate)")
    return Plot(title, fig)


def _memory_vs_sparsity(plt: Any, rows: list[dict[str, Any]], style: dict[str, dict[str, Any]]) -> list[Plot]:
    rows = [r for r in rows if _finite(_KV_USED(r))]
    if not rows:
        return [Plot("Peak KV memory vs sparsity", missing="no row holds a peak KV memory figure")]
    plots = []
    for model, mrows in _by(rows, lambda r: r["config"]["model"]).items():
        panels = _by(mrows, lambda r: (_workload_label(r["config"]["workload"]), _kv_label(r["config"]["kv_memory"])))
        fig, axes = _grid(plt, len(panels))
        for ax, ((workload, kv), prows) in zip(axes, panels.items()):
            rate = _top_rate(prows)
            at_rate = [r for r in prows if r["config"]["rate"] == rate]
            for strategy, st_rows in _by(at_rate, lambda r: r["config"]["strategy"]).items():
                if (kept := kept_fraction(strategy)) is not None:
                    ax.scatter([1.0 - kept], [_mean_of(st_rows, _KV_USED)], label=strategy, **style[strategy])
            ax.set_xlabel("sparsity: share of the prompt's KV dropped (0 = lossless)")
            ax.set_ylabel("peak KV used (MiB)")
            _title(ax, f"{workload} | {kv} | rate {rate}")
        _legend(fig, axes)
        title = f"Peak KV memory vs sparsity: {model}"
        fig.suptitle(title)
        plots.append(Plot(title, fig))
    return plots


def _quality_panels(rows: list[dict[str, Any]]) -> dict[str, tuple[Callable[[dict[str, Any]], float | None], bool,
                                                                  list[dict[str, Any]]]]:
    """Quality panels of one model: name -> (value of a row, lower is better, rows). Perplexity
    does not depend on the workload; RULER accuracy is per RULER workload."""
    panels: dict[str, tuple[Callable[[dict[str, Any]], float | None], bool, list[dict[str, Any]]]] = {}
    ppl_rows = [r for r in rows if _finite(_PERPLEXITY(r))]
    if ppl_rows:
        panels["perplexity"] = (_PERPLEXITY, True, ppl_rows)
    for workload, wrows in _by([r for r in rows if _finite(_RULER(r))],
                               lambda r: _workload_label(r["config"]["workload"])).items():
        panels[f"RULER accuracy: {workload}"] = (_RULER, False, wrows)
    return panels


_NO_QUALITY = "no quality metric in the rows (quality.perplexity and quality.ruler are off in the spec)"


def _quality_vs_budget(plt: Any, rows: list[dict[str, Any]], style: dict[str, dict[str, Any]]) -> list[Plot]:
    plots = []
    for model, mrows in _by(rows, lambda r: r["config"]["model"]).items():
        title = f"Quality vs KV budget: {model}"
        panels = _quality_panels(mrows)
        if not panels:
            plots.append(Plot(title, missing=_NO_QUALITY))
            continue
        fig, axes = _grid(plt, len(panels))
        for ax, (name, (get, lower, prows)) in zip(axes, panels.items()):
            for strategy, st_rows in _by(prows, lambda r: r["config"]["strategy"]).items():
                if (kept := kept_fraction(strategy)) is not None:
                    ax.scatter([kept], [_mean_of(st_rows, get)], label=strategy, **style[strategy])
            ax.set_xlabel("KV budget: share of the prompt's KV kept (1 = lossless)")
            ax.set_ylabel(name.split(":")[0] + (" (lower is better)" if lower else " (higher is better)"))
            _title(ax, name)
        _legend(fig, axes)
        fig.suptitle(title)
        plots.append(Plot(title, fig))
    return plots


def _pareto(plt: Any, rows: list[dict[str, Any]], style: dict[str, dict[str, Any]]) -> list[Plot]:
    """Per model and KV pool, one panel per workload: output tok/s at the highest rate against the
    workload's quality metric (RULER accuracy on RULER workloads, else perplexity)."""
    plots = []
    for (model, kv), krows in _by(rows, lambda r: (r["config"]["model"], _kv_label(r["config"]["kv_memory"]))).items():
        title = f"Throughput-quality Pareto: {model} | KV pool {kv}"
        panels = []
        for workload, wrows in _by(krows, lambda r: _workload_label(r["config"]["workload"])).items():
            rate = _top_rate(wrows)
            at_rate = [r for r in wrows if r["config"]["rate"] == rate]
            ruler = any(_finite(_RULER(r)) for r in at_rate)
            get, name, lower = (_RULER, "RULER accuracy", False) if ruler else (_PERPLEXITY, "perplexity", True)
            pts = []
            for strategy, st_rows in _by(at_rate, lambda r: r["config"]["strategy"]).items():
                q, tput = _mean_of(st_rows, get), _mean_of(st_rows, _THROUGHPUT)
                if q is not None and tput is not None:
                    pts.append((strategy, q, tput))
            if pts:
                panels.append((f"{workload} | rate {rate}", name, lower, pts))
        if not panels:
            plots.append(Plot(title, missing=_NO_QUALITY if not _quality_panels(krows)
                              else "no row holds both a quality metric and an output throughput"))
            continue
        fig, axes = _grid(plt, len(panels))
        for ax, (panel, name, lower, pts) in zip(axes, panels):
            for strategy, q, tput in pts:
                ax.scatter([q], [tput], label=strategy, **style[strategy])
            front = pareto_front([(q, tput) for _, q, tput in pts], lower_x_better=lower)
            ax.plot([pts[i][1] for i in front], [pts[i][2] for i in front], color="black", linestyle="--",
                    linewidth=1, marker="o", markersize=13, markerfacecolor="none", label="Pareto frontier")
            ax.set_xlabel(f"{name} ({'lower' if lower else 'higher'} is better)")
            ax.set_ylabel("output tok/s")
            _title(ax, panel)
        _legend(fig, axes)
        fig.suptitle(title)
        plots.append(Plot(title, fig))
    return plots


def build_plots(rows: list[dict[str, Any]]) -> list[Plot]:
    """Every plot of the report for the ``ok`` rows, as matplotlib figures (close them when done)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = _styles(rows)
    return [*_latency_plots(plt, rows, style), _throughput_vs_size(plt, rows, style),
            *_memory_vs_sparsity(plt, rows, style), *_quality_vs_budget(plt, rows, style),
            *_pareto(plt, rows, style)]


def _render(plots: list[Plot]) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
    """PNG of every plot that shows data in every panel; (title, reason) of the others."""
    import matplotlib.pyplot as plt

    drawn, missing = [], []
    for p in plots:
        if p.figure is None:
            missing.append((p.title, p.missing or "no data"))
            continue
        empty = empty_panels(p.figure)
        if empty:
            missing.append((p.title, f"no data point in panel(s): {', '.join(empty)}"))
        else:
            drawn.append((p.title, _png(p.figure)))
        plt.close(p.figure)
    return drawn, missing


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _guidance_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "workload", "KV pool", "rate", "metric", "winner", "value", "runner-up", "margin",
            "within noise"]
    body = [[g["model"], g["workload"], g["kv_memory"], str(g["rate"]), g["metric"], g["winner"],
             f"{_fmt(g['value'])} {g['unit']}".strip(), g["runner_up"], f"{g['margin']:.1%}",
             ", ".join(g["tied"]) or "-"] for g in guidance(rows)]
    return head, body


def _errors(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["config"]["model"], r["config"]["strategy"], _workload_label(r["config"]["workload"]),
             _kv_label(r["config"]["kv_memory"]), str(r["config"]["rate"]), r.get("error", "")[:200]]
            for r in rows if r.get("status") != "ok"]


def _quality_reuse(rows: list[dict[str, Any]]) -> str:
    """One sentence on how many quality figures were computed and how many reused (rows' ``reused_from``)."""
    figures = [q for r in rows for q in r.get("quality", {}).values() if isinstance(q, dict)]
    if not figures:
        return ""
    reused = sum("reused_from" in q for q in figures)
    return (f" Quality: {len(figures) - reused} figures computed, {reused} reused by points that differ only in "
            f"what quality does not depend on (rate, burstiness, workload for perplexity, and the KV pool for "
            f"lossless and budget-driven strategies; see each row's `reused_from`).")


def _get(row: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        row = row.get(k) if isinstance(row, dict) else None  # type: ignore[assignment]
    return row


def mixed_table(rows: list[dict[str, Any]], floor: float = QUALITY_FLOOR) -> list[dict[str, Any]]:
    """Per mixed-workload scenario (model, workload, KV pool, rate) and strategy: goodput, p99 TTFT,
    p99 TPOT and quality, means over seeds, and how ``adaptive`` compares.

    ``quality`` = the lower of the long requests' RULER accuracy relative to ``paged``'s in the
    scenario (1 when paged's is 0, or absolute without a paged row) and the short requests' token
    agreement with full KV; ``meets_floor`` when it is >= ``floor``. ``adaptive_goodput_ratio``:
    the scenario's best ``adaptive`` goodput over this strategy's. ``adaptive_wins`` (on the adaptive
    rows): its goodput is above that of every other strategy of the scenario that meets the floor.
    """
    mixed = [r for r in rows if r["config"]["workload"].get("kind") == "mixed"]
    out = []
    for (scen, rate), srows in _by(mixed, lambda r: (_scenario(r["config"]), r["config"]["rate"])).items():
        by_strategy = _by(srows, lambda r: r["config"]["strategy"])

        def mean(rs: list[dict[str, Any]], *keys: str) -> float | None:
            return _mean_of(rs, lambda r: _get(r, *keys))

        paged_acc = mean([r for s, rs in by_strategy.items() if _name(s) == "paged" for r in rs],
                         "quality", "ruler", "accuracy")
        entries = []
        for strategy, rs in by_strategy.items():
            acc = mean(rs, "quality", "ruler", "accuracy")
            agree = mean(rs, "quality", "agreement", "match_fraction")
            rel = None if acc is None else (acc if paged_acc is None else acc / paged_acc if paged_acc > 0 else 1.0)
            parts = [v for v in (rel, agree) if v is not None]
            q = min(parts) if parts else None
            entries.append({
                "model": scen[0], "workload": scen[1], "kv_memory": scen[2], "rate": rate, "strategy": strategy,
                "goodput": mean(rs, "metrics", "request_goodput"), "p99_ttft_ms": mean(rs, "metrics", "p99_ttft_ms"),
                "p99_tpot_ms": mean(rs, "metrics", "p99_tpot_ms"), "long_accuracy": acc, "short_agreement": agree,
                "quality": q, "meets_floor": q is not None and q >= floor,
                "completed": mean(rs, "metrics", "completed"), "failed": mean(rs, "metrics", "failed"),
            })
        adaptive = [e for e in entries if _name(e["strategy"]) == "adaptive" and e["goodput"] is not None]
        best = max(adaptive, key=lambda e: e["goodput"], default=None)
        for e in entries:
            e["adaptive_goodput_ratio"] = (best["goodput"] / e["goodput"] if best and e["goodput"]
                                           else None)
            if e in adaptive:
                rivals = [o["goodput"] or 0.0 for o in entries
                          if _name(o["strategy"]) != "adaptive" and o["meets_floor"]]
                e["adaptive_wins"] = e["meets_floor"] and all(e["goodput"] > g for g in rivals)
        out.extend(entries)
    return out


_MIXED_NOTE = (
    "Goodput is vLLM's: completed requests meeting every SLO of the spec, per second. Long RULER acc: the long "
    "requests' answers as served, scored by RULER's string match (a failed request scores 0). Short agreement: "
    "the short requests' greedy tokens against full paged KV. Quality = the lower of the long accuracy relative "
    f"to paged's and the short agreement; the floor is {QUALITY_FLOOR:g}. On adaptive rows, 'wins' means its "
    "goodput is above that of every other strategy meeting the floor.")


def _mixed_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "workload", "KV pool", "rate", "strategy", "goodput req/s", "p99 TTFT ms", "p99 TPOT ms",
            "long RULER acc", "short agreement", f"quality >= {QUALITY_FLOOR:g}", "adaptive goodput / this",
            "completed / failed"]

    def f(v: float | None, fmt: str = "{:.3g}") -> str:
        return "-" if v is None else fmt.format(v)

    body = []
    for e in mixed_table(rows):
        verdict = "yes" if e["meets_floor"] else "no"
        if "adaptive_wins" in e:
            verdict += " (wins)" if e["adaptive_wins"] else " (does not win)"
        body.append([e["model"], e["workload"], e["kv_memory"], str(e["rate"]), e["strategy"], f(e["goodput"]),
                     f(e["p99_ttft_ms"], "{:.0f}"), f(e["p99_tpot_ms"], "{:.1f}"), f(e["long_accuracy"], "{:.2f}"),
                     f(e["short_agreement"], "{:.2f}"), verdict, f(e["adaptive_goodput_ratio"], "{:.2f}x"),
                     f"{f(e['completed'], '{:.0f}')} / {f(e['failed'], '{:.0f}')}"])
    return head, body


def write_report(results_dir: str | Path, warn: bool = True) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (plus ``plots/*.png`` for the Markdown) into ``results_dir``;
    return their paths. Lines of the results file that are not rows are named there (and logged, with ``warn``)."""
    folder = Path(results_dir)
    read = read_results_file(existing_results_file(folder), warn=warn)
    all_rows, rows = read.rows, [r for r in read.rows if r["status"] == "ok"]
    plots, missing = _render(build_plots(rows)) if rows else ([], [("all plots", "no point finished")])
    head, body = _guidance_rows(rows)
    errors = _errors(all_rows)
    env = rows[0].get("environment", {}) if rows else {}
    summary = (f"{len(all_rows)} points: {len(rows)} ok, {len(errors)} errors. Device: "
               f"{env.get('device')} ({env.get('device_name')}), commit {env.get('commit')}, "
               f"versions {env.get('versions')}. Ties: within {NOISE:.0%} of the winner (or twice its "
               f"relative std over seeds, when larger).{_quality_reuse(rows)}")
    paragraphs = [p for p in (summary, read.notes()) if p]  # the notes name lines of the file not read

    plot_dir = folder / "plots"
    plot_dir.mkdir(exist_ok=True)
    for old in plot_dir.glob("plot*.png"):  # a rerun may draw fewer plots than the last one
        old.unlink()
    md = ["# Study report", "", *(line for p in paragraphs for line in (p, ""))]
    parts = ["<!doctype html><meta charset='utf-8'><title>kvscope study report</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
             "<h1>Study report</h1>", *(f"<p>{html.escape(p)}</p>" for p in paragraphs)]
    for i, (title, png) in enumerate(plots):
        name = f"plot{i:02d}.png"
        (plot_dir / name).write_bytes(png)
        md += [f"## {title}", "", f"![{title}](plots/{name})", ""]
        parts += [f"<h2>{html.escape(title)}</h2>",
                  f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'>"]
    mixed_head, mixed_body = _mixed_rows(rows)
    for title, h, b in (("Mixed workload", mixed_head, mixed_body), ("Guidance", head, body),
                        ("Plots without data", ["plot", "why"], [list(m) for m in missing]),
                        ("Failed points", ["model", "strategy", "workload", "KV pool", "rate", "error"], errors)):
        if not b:
            continue
        md += [f"## {title}", ""]
        parts.append(f"<h2>{title}</h2>")
        if title == "Mixed workload":
            md += [_MIXED_NOTE, ""]
            parts.append(f"<p>{html.escape(_MIXED_NOTE)}</p>")
        md += ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b]
        md.append("")
        parts += ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in h) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b]
        parts.append("</table>")
    html_path, md_path = folder / "report.html", folder / "report.md"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    md_path.write_text("\n".join(md), encoding="utf-8")
    return html_path, md_path
