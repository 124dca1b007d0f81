"""Writing a study's report: one self-contained HTML file (plots as base64 PNG) and Markdown with
``plots/*.png`` beside it.

Order: the verdict first (what to run, with its numbers and uncertainty), the decision table, the
figures, then the details (mixed-workload table, plots without data, failed points, the run's
environment, the strategies' display names) and, as an appendix, the per-metric guidance.
"""
from __future__ import annotations

import base64
import html
import re
from collections import Counter
from pathlib import Path
from typing import Any

from kvscope.report.axes import empty_panels, png
from kvscope.report.checks import COMPILE_NOTE, SPARSE_NOTE, compile_stall_rows, starved_selection_rows
from kvscope.report.decision import decision_table
from kvscope.report.plots import Plot, build_plots
from kvscope.report.rows import NOISE, QUALITY_FLOOR, Row, by_spec_rate
from kvscope.report.tables import (
    MIXED_NOTE,
    Table,
    decision_rows,
    error_rows,
    guidance_rows,
    mixed_rows,
    strategy_rows,
)
from kvscope.report.verdict import verdict
from kvscope.study.results_io import existing_results_file, read_results_file

DECISION_NOTE = (
    "Per regime, the decision is the strategy with the highest goodput (requests/s meeting every SLO) among "
    f"those whose quality against full KV is at least {QUALITY_FLOOR:g}: the lowest of full-KV perplexity / its "
    "perplexity, its RULER accuracy / full KV's and its token agreement with full KV, where measured. "
    f"Strategies within noise of the leader ({NOISE:.0%}, or twice its relative spread over seeds) tie, and the "
    "tie goes to the better quality, then to full KV, then to the lower median TPOT. Margin: its goodput over the "
    "best eligible strategy outside the tie. The goodput interval is a 95% Wilson interval over the point's requests.")
_CSS = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:auto;padding:0 12px;color:#222}"
        "h1{font-size:22px;margin:10px 0 2px}h2{font-size:18px;margin-top:28px}.context{color:#555;margin:0 0 8px}"
        ".verdict{background:#f3f7ff;border-left:4px solid #3367d6;padding:4px 14px;font-size:15px}"
        ".verdict li{margin:4px 0}.verdict p{margin:8px 0}.note{color:#555;font-size:12px}"
        "table{border-collapse:collapse;font-size:12px}.wide{overflow-x:auto}"
        "td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}th{background:#f4f4f4}img{max-width:100%}")


def _inline(text: str) -> str:
    """Markdown's ``**bold**`` and ```code``` as HTML, the rest escaped."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


class _Doc:
    """The report built once into Markdown and HTML side by side."""

    def __init__(self, title: str) -> None:
        self.md = [f"# {title}", ""]
        self.html = ["<!doctype html><meta charset='utf-8'><title>kvscope study report</title>",
                     f"<style>{_CSS}</style>", f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str) -> None:
        self.md += [f"## {text}", ""]
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def para(self, text: str, cls: str = "") -> None:
        self.md += [text, ""]
        self.html.append(f"<p class='{cls}'>{_inline(text)}</p>" if cls else f"<p>{_inline(text)}</p>")

    def block(self, lines: list[str], cls: str = "") -> None:
        """Markdown lines in a box: runs of ``- `` lines become lists, the others paragraphs."""
        previous = None
        for text in lines:  # a blank line around each paragraph, none inside a list
            if previous is not None and not (text.startswith("- ") and previous.startswith("- ")):
                self.md.append("")
            self.md.append(text)
            previous = text
        self.md.append("")
        body, items = [], []
        for text in [*lines, ""]:
            if text.startswith("- "):
                items.append(f"<li>{_inline(text[2:])}</li>")
                continue
            if items:
                body.append("<ul>" + "".join(items) + "</ul>")
                items = []
            if text:
                body.append(f"<p>{_inline(text)}</p>")
        self.html.append(f"<div class='{cls}'>" + "".join(body) + "</div>")

    def table(self, table: Table) -> None:
        head, body = table
        self.md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        self.md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        self.md.append("")
        self.html.append("<div class='wide'><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                         + "</tr>")
        self.html += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body]
        self.html.append("</table></div>")

    def image(self, title: str, name: str, data: bytes) -> None:
        self.md += [f"## {title}", "", f"![{title}](plots/{name})", ""]
        self.html += [f"<h2>{html.escape(title)}</h2>",
                      f"<img alt='{html.escape(title)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"]


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
            drawn.append((p.title, png(p.figure)))
        plt.close(p.figure)
    return drawn, missing


def _quality_reuse(rows: list[Row]) -> str:
    """One sentence on how many quality figures were computed and how many reused (rows' ``reused_from``)."""
    figures = [q for r in rows for q in r.get("quality", {}).values() if isinstance(q, dict)]
    if not figures:
        return ""
    reused = sum("reused_from" in q for q in figures)
    return (f" Quality: {len(figures) - reused} figures computed, {reused} reused by points that differ only in "
            f"what quality does not depend on (rate, burstiness, workload for perplexity, and the KV pool for "
            f"lossless and budget-driven strategies; see each row's `reused_from`).")


def _engines(rows: list[Row]) -> str:
    """Which commits and which kvscope scheduling measured ``rows``, when they differ (a study run in
    chunks): a row without ``engine_stats.async_scheduling`` predates async scheduling."""
    commits = Counter(str(r.get("environment", {}).get("commit")) for r in rows)
    modes = Counter("async" if r["engine_stats"].get("async_scheduling") else "synchronous"
                    for r in rows if isinstance(r.get("engine_stats"), dict))
    out = ""
    if len(commits) > 1:
        out += " Rows by commit: " + ", ".join(f"{c} ({n})" for c, n in commits.items()) + "."
    if len(modes) > 1:
        out += (" kvscope rows by scheduling: " + ", ".join(f"{m} ({n})" for m, n in sorted(modes.items()))
                + "; compare strategies within one.")
    return out


def _context(all_rows: list[Row], rows: list[Row], errors: int) -> tuple[str, str]:
    """(one line under the title, the run's details for "About this run")."""
    env: dict[str, Any] = rows[0].get("environment", {}) if rows else {}
    models = ", ".join(dict.fromkeys(r["config"]["model"] for r in rows)) or "no model"
    line = (f"{models} on {env.get('device')} ({env.get('device_name')}, {env.get('torch_threads')} threads). "
            f"{len(all_rows)} points: {len(rows)} ok, {errors} errors.")
    details = (f"Commit {env.get('commit')}, versions {env.get('versions')}, Python {env.get('python')}, "
               f"{env.get('platform')}.{_engines(rows)} Guidance ties: within {NOISE:.0%} of the winner (or twice "
               f"its relative std over seeds, when larger).{_quality_reuse(rows)}")
    return line, details


def write_report(results_dir: str | Path, warn: bool = True) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (plus ``plots/*.png`` for the Markdown) into ``results_dir``;
    return their paths. Lines of the results file that are not rows are named there (and logged, with ``warn``)."""
    folder = Path(results_dir)
    read = read_results_file(existing_results_file(folder), warn=warn)
    all_rows = [by_spec_rate(r) for r in read.rows]
    rows = [r for r in all_rows if r["status"] == "ok"]
    plots, missing = _render(build_plots(rows)) if rows else ([], [("all plots", "no point finished")])
    errors = error_rows(all_rows)
    line, details = _context(all_rows, rows, len(errors[1]))
    study = next((r.get("study") for r in all_rows if r.get("study")), None)

    doc = _Doc(f"Study report: {study}" if study else "Study report")
    doc.para(line, "context")
    if read.notes():  # lines of the file that were not read
        doc.para(read.notes())
    decisions = decision_table(rows)
    if decisions:
        doc.heading("Verdict")
        *lines, uncertainty = verdict(decisions, rows)
        doc.block(lines, "verdict")
        doc.para(uncertainty, "note")
        doc.heading("Decision table")
        doc.table(decision_rows(decisions))
        doc.para(DECISION_NOTE, "note")
    elif rows:
        doc.heading("Verdict")
        doc.para("No verdict: no row holds a goodput (the spec sets no `slos`), and the decisions rank strategies "
                 "by it. The plots and the guidance appendix below compare them metric by metric.")

    starved = starved_selection_rows(rows)
    if starved[1]:
        doc.heading("Check: selections far below their budget")
        doc.para(SPARSE_NOTE, "note")
        doc.table(starved)
    stalled = compile_stall_rows(rows)
    if stalled[1]:
        doc.heading("Check: kernels compiled during timed runs")
        doc.para(COMPILE_NOTE, "note")
        doc.table(stalled)

    plot_dir = folder / "plots"
    plot_dir.mkdir(exist_ok=True)
    for old in plot_dir.glob("plot*.png"):  # a rerun may draw fewer plots than the last one
        old.unlink()
    for i, (title, data) in enumerate(plots):
        name = f"plot{i:02d}.png"
        (plot_dir / name).write_bytes(data)
        doc.image(title, name, data)
    sections: list[tuple[str, Table | None, str]] = [  # a table without rows leaves its section out
        ("Mixed workload", mixed_rows(rows), MIXED_NOTE),
        ("Plots without data", (["plot", "why"], [list(m) for m in missing]), ""),
        ("Failed points", errors, ""),
        ("About this run", None, details),
        ("Strategies", strategy_rows(rows), ""),
        ("Guidance: every scenario and metric (appendix)", guidance_rows(rows), ""),
    ]
    for title, table, note in sections:
        if table is not None and not table[1]:
            continue
        doc.heading(title)
        if note:
            doc.para(note)
        if table is not None:
            doc.table(table)
    html_path, md_path = folder / "report.html", folder / "report.md"
    html_path.write_text("\n".join(doc.html), encoding="utf-8")
    md_path.write_text("\n".join(doc.md), encoding="utf-8")
    return html_path, md_path
