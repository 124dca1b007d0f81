"""The report's tables as (header, body) string cells: the decision table (its logic is in
:mod:`kvscope.report.decision`), the per-metric guidance of the appendix, the mixed-workload
table, the strategies' display names and the failed points."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from kvscope.constants import MIXED_WORKLOAD_SUBJECT
from kvscope.report.decision import Decision
from kvscope.report.names import display_names, family, is_full_kv
from kvscope.report.rows import (
    METRICS,
    QUALITY_FLOOR,
    Row,
    by,
    get,
    mean_of,
    noise_threshold,
    num,
    rate_key,
    rate_text,
    scenario,
    workload_text,
)
from kvscope.report.verdict import interval, quality_text

Table = tuple[list[str], list[list[str]]]


def decision_rows(decisions: list[Decision]) -> Table:
    """One line per regime: the decision, its goodput and interval, its margin, what it pays in
    quality against full KV, and why (ties, a faster strategy under the floor, no SLO met)."""
    head = ["workload", "KV pool", "rate", "decision", "goodput req/s (95% CI)", "margin", "vs full KV",
            f"quality vs full KV (floor {QUALITY_FLOOR:g})", "why"]
    body = []
    for d in decisions:
        c = d.choice
        cells = [workload_text(d.workload_config), d.kv_memory, rate_text(d.rate)]
        if c is None:
            why = ("no request meets the SLOs" if d.reason == "no-slo" else
                   f"all under the floor; fastest {d.below_floor[0].name} at {d.below_floor[0].quality.score:.2f}")
            body.append(cells + ["none", "-", "-", "-", "-", why])
            continue
        if d.tied:
            margin = f"tie (±{d.noise:.0%}) with {', '.join(o.name for o in d.tied)}"
        elif d.margin is not None:
            margin = f"{d.margin:.2f}x {d.runner_up.name}"
        else:
            margin = "no other at the floor meets the SLOs"
        if c.full_kv:
            vs_full = "is full KV"
        elif d.full is None:
            vs_full = "-"
        else:
            vs_full = f"{c.goodput / d.full.goodput:.2f}x {d.full.name}" if d.full.goodput else f"{d.full.name}: 0"
        score = "" if c.full_kv or c.quality.score is None else f" (score {c.quality.score:.2f})"
        why = []
        if d.tied:
            why.append("best quality, then full KV, then TPOT among the tied")
        for o in d.below_floor[:2]:
            why.append(f"{o.name} serves {num(o.goodput)} but scores {o.quality.score:.2f}")
        if len(d.below_floor) > 2:
            why.append(f"{len(d.below_floor) - 2} more faster ones under the floor")
        goodput = num(c.goodput) + (f" ({interval(c.goodput_ci)})" if c.goodput_ci else "")
        body.append(cells + [c.name, goodput, margin, vs_full, quality_text(c) + score,
                             "; ".join(why) or "highest goodput"])
    return head, body


def guidance(rows: list[Row]) -> list[dict[str, Any]]:
    """Per scenario, rate and metric: ``winner``, ``value``, ``runner_up``, ``margin`` (relative to
    the winner) and ``tied`` (strategies within noise of the winner)."""
    # (scenario, rate) -> strategy -> metric -> values over seeds
    table: dict[tuple[Any, ...], dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(
        lambda: defaultdict(list)))
    for r in rows:
        cfg = r["config"]
        key = (*scenario(cfg), cfg["rate"])
        for name, value, _, _ in METRICS:
            v = value(r)
            if v is not None and math.isfinite(v):
                table[key][cfg["strategy"]][name].append(v)
    out = []
    for key in sorted(table, key=lambda k: (k[:3], rate_key(k[3]))):
        for name, _, lower, unit in METRICS:
            vals = {s: v[name] for s, v in table[key].items() if v.get(name)}
            if len(vals) < 2:
                continue
            ranked = sorted(vals, key=lambda s: statistics.fmean(vals[s]), reverse=not lower)
            best, second = ranked[0], ranked[1]
            b = statistics.fmean(vals[best])
            noise = noise_threshold(vals[best])

            def rel(s: str) -> float:
                return abs(statistics.fmean(vals[s]) - b) / abs(b) if b else abs(statistics.fmean(vals[s]) - b)

            out.append({
                "model": key[0], "workload": key[1], "kv_memory": key[2], "rate": key[3], "metric": name,
                "unit": unit, "winner": best, "value": b, "runner_up": second, "margin": rel(second),
                "tied": [s for s in ranked[1:] if rel(s) <= noise], "noise": noise,
            })
    return out


def guidance_rows(rows: list[Row]) -> Table:
    head = ["model", "workload", "KV pool", "rate", "metric", "winner", "value", "runner-up", "margin",
            "within noise"]
    names = display_names(r["config"]["strategy"] for r in rows)
    body = [[g["model"], g["workload"], g["kv_memory"], str(g["rate"]), g["metric"], names[g["winner"]],
             f"{g['value']:.3g} {g['unit']}".strip(), names[g["runner_up"]], f"{g['margin']:.1%}",
             ", ".join(names[s] for s in g["tied"]) or "-"] for g in guidance(rows)]
    return head, body


def strategy_rows(rows: list[Row]) -> Table:
    """Display name -> the spec string it stands for."""
    names = display_names(r["config"]["strategy"] for r in rows)
    return ["name in this report", "strategy spec"], [[n, f"`{s}`"] for s, n in names.items()]


def error_rows(rows: list[Row]) -> Table:
    head = ["model", "strategy", "workload", "KV pool", "rate", "error"]
    return head, [[*scenario(r["config"])[:1], r["config"]["strategy"], *scenario(r["config"])[1:],
                   str(r["config"]["rate"]), r.get("error", "")[:200]] for r in rows if r.get("status") != "ok"]


def mixed_table(rows: list[Row], floor: float = QUALITY_FLOOR,
                subject: str = MIXED_WORKLOAD_SUBJECT) -> list[dict[str, Any]]:
    """Per mixed-workload scenario (model, workload, KV pool, rate) and strategy: goodput, p99 TTFT,
    p99 TPOT and quality, means over seeds, and how the ``subject`` strategy (the one the mixed
    workload was built to judge; its keys keep the name ``adaptive``) compares.

    ``quality`` = the lower of the long requests' RULER accuracy relative to full KV's in the
    scenario (1 when full KV's is 0, or absolute without a full-KV row) and the short requests' token
    agreement with full KV; ``meets_floor`` when it is >= ``floor``. ``adaptive_goodput_ratio``:
    the scenario's best ``adaptive`` goodput over this strategy's. ``adaptive_wins`` (on the adaptive
    rows): its goodput is above that of every other strategy of the scenario that meets the floor.
    """
    mixed = [r for r in rows if r["config"]["workload"].get("kind") == "mixed"]
    out = []
    for (scen, rate), srows in by(mixed, lambda r: (scenario(r["config"]), r["config"]["rate"])).items():
        by_strategy = by(srows, lambda r: r["config"]["strategy"])

        def mean(rs: list[Row], *keys: str) -> float | None:
            return mean_of(rs, lambda r: get(r, *keys))

        full_acc = mean([r for s, rs in by_strategy.items() if is_full_kv(s) for r in rs],
                        "quality", "ruler", "accuracy")
        entries = []
        for strategy, rs in by_strategy.items():
            acc = mean(rs, "quality", "ruler", "accuracy")
            agree = mean(rs, "quality", "agreement", "match_fraction")
            rel = None if acc is None else (acc if full_acc is None else acc / full_acc if full_acc > 0 else 1.0)
            parts = [v for v in (rel, agree) if v is not None]
            q = min(parts) if parts else None
            entries.append({
                "model": scen[0], "workload": scen[1], "kv_memory": scen[2], "rate": rate, "strategy": strategy,
                "goodput": mean(rs, "metrics", "request_goodput"), "p99_ttft_ms": mean(rs, "metrics", "p99_ttft_ms"),
                "p99_tpot_ms": mean(rs, "metrics", "p99_tpot_ms"), "long_accuracy": acc, "short_agreement": agree,
                "quality": q, "meets_floor": q is not None and q >= floor,
                "completed": mean(rs, "metrics", "completed"), "failed": mean(rs, "metrics", "failed"),
            })
        adaptive = [e for e in entries if family(e["strategy"]) == subject and e["goodput"] is not None]
        best = max(adaptive, key=lambda e: e["goodput"], default=None)
        for e in entries:
            e["adaptive_goodput_ratio"] = (best["goodput"] / e["goodput"] if best and e["goodput"]
                                           else None)
            if e in adaptive:
                rivals = [o["goodput"] or 0.0 for o in entries
                          if family(o["strategy"]) != subject and o["meets_floor"]]
                e["adaptive_wins"] = e["meets_floor"] and all(e["goodput"] > g for g in rivals)
        out.extend(entries)
    return out


MIXED_NOTE = (
    "Goodput is vLLM's: completed requests meeting every SLO of the spec, per second. Long RULER acc: the long "
    "requests' answers as served, scored by RULER's string match (a failed request scores 0). Short agreement: "
    "the short requests' greedy tokens against full paged KV. Quality = the lower of the long accuracy relative "
    f"to full KV's (paged's) and the short agreement; the floor is {QUALITY_FLOOR:g}. On adaptive rows, 'wins' "
    "means its goodput is above that of every other strategy meeting the floor.")


def mixed_rows(rows: list[Row]) -> Table:
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
