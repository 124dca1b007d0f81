"""Reports of a study's results: one self-contained HTML file (plots as base64 PNG) and Markdown.

Plots: TTFT and TPOT (p50, p99) against request rate per strategy, peak KV memory against the
fraction of the KV a strategy keeps, and quality (perplexity, RULER accuracy) against that fraction.
The guidance table is computed from the rows: for each scenario (model, workload, KV pool, rate)
and metric, the winning strategy, its margin over the runner-up, and the strategies within noise
of it (see :data:`NOISE`).
"""
from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvscope.kv.registry import parse_spec
from kvscope.study.runner import RESULTS_FILE, read_results

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
    ("peak KV used", lambda r: _mib(r["engine_stats"].get("peak_kv_bytes_used")), True, "MiB"),
    ("perplexity", lambda r: r.get("quality", {}).get("perplexity", {}).get("perplexity"), True, ""),
    ("RULER accuracy", lambda r: r.get("quality", {}).get("ruler", {}).get("accuracy"), False, ""),
]


def _mib(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def kept_fraction(strategy: str) -> float:
    """Fraction of a prompt's KV the strategy keeps: 1 for lossless ones, else its ratio budget."""
    name, args = parse_spec(strategy)
    if "heavy_ratio" in args or "recent_ratio" in args:
        return float(args.get("heavy_ratio", 0.1)) + float(args.get("recent_ratio", 0.1))
    if name in ("paged", "contiguous"):
        return 1.0
    return float(args.get("budget_ratio", 0.2))


def _workload_label(w: dict[str, Any]) -> str:
    extra = ",".join(f"{k}={v}" for k, v in w.items() if k != "kind")
    return f"{w['kind']}({extra})"


def _kv_label(kv: int | float) -> str:
    return f"{kv:.0%} free" if isinstance(kv, float) else f"{kv / 2**20:g}MiB"


def _scenario(cfg: dict[str, Any]) -> tuple[str, str, str]:
    return cfg["model"], _workload_label(cfg["workload"]), _kv_label(cfg["kv_memory"])


def _rate_key(rate: float | str) -> float:
    return math.inf if rate == "inf" else float(rate)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


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


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _plots(rows: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    by_scenario: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_scenario[_scenario(r["config"])].append(r)
    latency = [m for m in METRICS if m[0] in ("TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99")]
    for scen, srows in by_scenario.items():
        rates = sorted({r["config"]["rate"] for r in srows}, key=_rate_key)
        x_of = {rate: i for i, rate in enumerate(rates)}  # categorical: 'inf' gets the last place
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        for ax, (name, get, _, unit) in zip(axes, latency):
            for strategy in sorted({r["config"]["strategy"] for r in srows}):
                pts = defaultdict(list)
                for r in srows:
                    v = get(r)
                    if r["config"]["strategy"] == strategy and v is not None:
                        pts[x_of[r["config"]["rate"]]].append(v)
                xs = sorted(pts)
                ax.plot(xs, [_mean(pts[x]) for x in xs], marker="o", label=strategy)
            ax.set_xticks(range(len(rates)), [str(r) for r in rates])
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(f"{name} ({unit})")
            ax.set_yscale("log")
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        fig.suptitle(" | ".join(scen))
        plots.append((f"Latency vs rate: {' | '.join(scen)}", _png(fig)))
        plt.close(fig)

    for title, (name, get, _, unit) in (("Peak KV memory vs kept fraction", METRICS[6]),
                                        ("Perplexity vs KV budget", METRICS[7]),
                                        ("RULER accuracy vs KV budget", METRICS[8])):
        series: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            v = get(r)
            if v is not None:
                cfg = r["config"]
                series[f"{cfg['model']} {_kv_label(cfg['kv_memory'])}"][cfg["strategy"]].append(
                    (kept_fraction(cfg["strategy"]), v))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        markers = "osD^vP*X"
        for i, (group, strategies) in enumerate(sorted(series.items())):
            for strategy, pts in sorted(strategies.items()):
                x = pts[0][0]
                ax.scatter([x], [_mean([p[1] for p in pts])], marker=markers[i % len(markers)],
                           label=f"{strategy} ({group})")
        ax.set_xlabel("fraction of the prompt's KV kept (1 = lossless)")
        ax.set_ylabel(f"{name}{f' ({unit})' if unit else ''}")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
        ax.set_title(title)
        plots.append((title, _png(fig)))
        plt.close(fig)
    return plots


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


def write_report(results_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (plus ``plots/*.png`` for the Markdown) into
    ``results_dir``; return the two report paths."""
    folder = Path(results_dir)
    all_rows = read_results(folder / RESULTS_FILE)
    rows = [r for r in all_rows if r.get("status") == "ok"]
    plots = _plots(rows) if rows else []
    head, body = _guidance_rows(rows)
    errors = _errors(all_rows)
    env = rows[0]["environment"] if rows else {}
    summary = (f"{len(all_rows)} points: {len(rows)} ok, {len(errors)} errors. Device: "
               f"{env.get('device')} ({env.get('device_name')}), commit {env.get('commit')}, "
               f"versions {env.get('versions')}. Ties: within {NOISE:.0%} of the winner (or twice its "
               f"relative std over seeds, when larger).")

    plot_dir = folder / "plots"
    plot_dir.mkdir(exist_ok=True)
    md = ["# Study report", "", summary, ""]
    parts = ["<!doctype html><meta charset='utf-8'><title>kvscope study report</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
             "<h1>Study report</h1>", f"<p>{html.escape(summary)}</p>"]
    for i, (title, png) in enumerate(plots):
        name = f"plot{i:02d}.png"
        (plot_dir / name).write_bytes(png)
        md += [f"## {title}", "", f"![{title}](plots/{name})", ""]
        parts += [f"<h2>{html.escape(title)}</h2>",
                  f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'>"]
    for title, h, b in (("Guidance", head, body),
                        ("Failed points", ["model", "strategy", "workload", "KV pool", "rate", "error"], errors)):
        if not b:
            continue
        md += [f"## {title}", "", "| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b]
        md.append("")
        parts += [f"<h2>{title}</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in h) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b]
        parts.append("</table>")
    html_path, md_path = folder / "report.html", folder / "report.md"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    md_path.write_text("\n".join(md), encoding="utf-8")
    return html_path, md_path
