"""End-to-end time of the quick study: ``kvscope study run --preset quick`` in a fresh folder,
as a user runs it on a fresh install (process start, every grid point, the report; with an empty
kvscope cache, so the one-time conversion of the packaged GGUF checkpoint counts, unless
``--warm-cache``). A benchmark, not a test.

Checks what a user gets: every point ``ok``, with the sample sizes the preset promises (at least
16 requests per serving point, 8 RULER samples, 512 scored perplexity tokens); the report written
with the verdict and the decision table first (one decision per regime), every plot showing data
(:func:`kvscope.report.empty_panels` on every figure, no "Plots without data" section) and the
guidance appendix filled. Per-point times come from the rows (``elapsed_s`` and its ``phase_s``
split into set-up, serving and quality). Writes benchmarks/results/study_quick.json and .md.

Other processes on the machine slow the run down; the load averages before and after and the
run's CPU time are recorded, and ``--note`` adds a sentence about them to the Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from envinfo import environment  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: Plot families the report must hold (titles start with these).
PLOT_FAMILIES = ("Latency vs rate", "Output throughput vs model size", "Peak KV memory vs sparsity",
                 "Quality vs KV budget", "Throughput-quality Pareto")
#: Smallest samples behind the quick preset's numbers: requests per serving point, RULER samples
#: per quality figure, scored perplexity tokens.
MIN_REQUESTS, MIN_RULER_SAMPLES, MIN_PPL_TOKENS = 16, 8, 512


def check_report(folder: Path, stdout: str) -> dict[str, Any]:
    """What a user of the quick preset should find in ``folder``; raises AssertionError if not."""
    import matplotlib.pyplot as plt

    from kvscope.report import build_plots, decision_table, empty_panels, guidance
    from kvscope.study import expand, preset, read_results

    rows = read_results(folder / "results.jsonl")
    expected = len(expand(preset("quick")))
    failed = [r.get("error") for r in rows if r.get("status") != "ok"]
    assert len(rows) == expected and not failed, f"{len(rows)} of {expected} rows, failed: {failed[:3]}"
    requests = min(r["metrics"]["completed"] + r["metrics"]["failed"] for r in rows)
    samples = min(r["quality"]["ruler"]["num_samples"] for r in rows)
    tokens = min(r["quality"]["perplexity"]["tokens_scored"] for r in rows)
    assert requests >= MIN_REQUESTS and samples >= MIN_RULER_SAMPLES and tokens >= MIN_PPL_TOKENS, \
        f"samples too small: {requests} requests, {samples} RULER samples, {tokens} perplexity tokens"
    printed = re.search(r"^report: (\S+)", stdout, re.MULTILINE)
    assert printed and Path(printed[1]) == folder / "report.html", "study run did not print the report path"
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert (folder / "report.html").stat().st_size > 0
    assert "## Plots without data" not in md, md.split("## Plots without data", 1)[1][:500]

    plots = build_plots(rows)
    empty = {p.title: p.missing or empty_panels(p.figure) for p in plots
             if p.figure is None or empty_panels(p.figure)}
    plt.close("all")
    assert not empty, f"plots without data: {empty}"
    titles = [p.title for p in plots]
    absent = [f for f in PLOT_FAMILIES if not any(t.startswith(f) for t in titles)]
    assert not absent, f"plot families missing: {absent}"
    assert md.count("](plots/") == len(plots), "report.md does not show every plot"

    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## Verdict", "## Decision table"], f"the report does not lead with its verdict: {headings}"
    decisions = decision_table(rows)
    regimes = {json.dumps([r["config"][k] for k in ("model", "workload", "kv_memory", "rate")]) for r in rows}
    assert len(decisions) == len(regimes), f"{len(decisions)} decisions for {len(regimes)} regimes"
    table = guidance(rows)
    assert table and "## Guidance" in md, "guidance table is empty"
    return {"rows": len(rows), "plots": titles, "decisions": len(decisions), "guidance_rows": len(table),
            "requests_per_point": requests, "ruler_samples": samples, "perplexity_tokens": tokens}


def per_point(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": r["id"], "strategy": r["config"]["strategy"], "kv_memory": r["config"]["kv_memory"],
             "workload": r["config"]["workload"]["kind"], "rate": r["config"]["rate"],
             "elapsed_s": r["elapsed_s"], "phase_s": r.get("phase_s", {})} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--note", default="", help="a sentence for the Markdown, e.g. on concurrent load")
    ap.add_argument("--warm-cache", action="store_true",
                    help="use the usual kvscope cache (converted weights, RULER samples) instead of an empty one")
    ap.add_argument("--keep", type=Path, default=None,
                    help="a new folder to write the study into and keep (rows, report, plots); default: a "
                         "temporary one")
    args = ap.parse_args()
    if args.keep is not None and args.keep.exists():
        sys.exit(f"--keep {args.keep}: exists; the timing needs a fresh folder")

    from kvscope.study import read_results

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep.resolve() if args.keep else Path(tmp) / "quick"
        env = dict(os.environ)
        if not args.warm_cache:
            env["KVSCOPE_CACHE_DIR"] = str(Path(tmp) / "cache")
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "kvscope.cli", "study", "run", "--preset", "quick",
                               "--results", str(folder), "--no-progress"], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            sys.exit(f"study run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        checks = check_report(folder, proc.stdout)
        points = per_point(read_results(folder / "results.jsonl"))

    result = {
        "benchmark": "study_quick",
        "command": "kvscope study run --preset quick --results <temporary folder> --no-progress",
        "kvscope_cache": "warm" if args.warm_cache else "empty",
        "environment": environment(),
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "note": args.note,
        "checks": checks,
        "points": points,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "study_quick.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "study_quick.md")
    print(f"quick study: {wall:.0f} s wall, {len(points)} points; wrote {RESULTS / 'study_quick.md'}")


def write_markdown(result: dict[str, Any], path: Path) -> None:
    env, points, wall = result["environment"], result["points"], result["wall_s"]
    in_points = sum(p["elapsed_s"] for p in points)
    phases: dict[str, float] = defaultdict(float)
    by_strategy: dict[str, list[float]] = defaultdict(list)
    for p in points:
        by_strategy[p["strategy"]].append(p["elapsed_s"])
        for k, v in p["phase_s"].items():
            phases[k] += v
    lines = [
        "# Quick study, end to end",
        "",
        f"Measured {env['date']} on {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads), "
        f"commit {env['commit']}, torch {env['versions']['torch']}.",
        f"Command: `{result['command']}` (process start, {len(points)} grid points, report), with "
        + ("the usual kvscope cache." if result["kvscope_cache"] == "warm" else
           "an empty kvscope cache, as on a fresh install: the first point includes the one-time GGUF conversion."),
        f"Load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in result['loadavg_before'])}, after "
        f"{'/'.join(f'{x:.2f}' for x in result['loadavg_after'])}; the run used {result['cpu_s']:.0f} s of CPU.",
    ]
    if result["note"]:
        lines.append(result["note"])
    lines += [
        "",
        f"**Wall clock: {wall:.0f} s ({wall / 60:.1f} min).** Points: {in_points:.0f} s (set-up "
        f"{phases['setup']:.0f} s, serving {phases['serve']:.0f} s, quality {phases['quality']:.0f} s); "
        f"the other {wall - in_points:.0f} s are process start, imports and the report.",
        "",
        f"Checks passed: {result['checks']['rows']} rows all `ok`, each point with at least "
        f"{result['checks']['requests_per_point']} requests, {result['checks']['ruler_samples']} RULER samples and "
        f"{result['checks']['perplexity_tokens']} scored perplexity tokens; the report leads with its verdict and a "
        f"decision table of {result['checks']['decisions']} regimes; {len(result['checks']['plots'])} plots, each "
        f"with data in every panel; guidance appendix of {result['checks']['guidance_rows']} rows.",
        "",
        "| strategy | points | seconds | mean s / point | slowest point s |",
        "|---|---:|---:|---:|---:|",
    ]
    for strategy, times in by_strategy.items():
        lines.append(f"| `{strategy}` | {len(times)} | {sum(times):.1f} | {sum(times) / len(times):.2f} | "
                     f"{max(times):.2f} |")
    lines += [
        "",
        "The first point of the run also loads the model (and, from an empty cache, converts it); a "
        "strategy's first point computes its perplexity, which its other points reuse (rows' `reused_from`), "
        "and a pool's first point the full-KV reference its points' agreement is measured against. Per-point "
        "times are in `study_quick.json`.",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
