"""The report's first screen: the decision table's conclusions as sentences with their numbers,
and how uncertain they are.

One bullet per (model, workload, KV pool), about the highest request rate, where the strategies'
capacity shows; a clause sums up the pool's other rates. Per workload, one sentence on what the
lossy strategy that keeps the most quality costs in decode time, and one paragraph on uncertainty.
"""
from __future__ import annotations

from collections import defaultdict

from kvscope.report.decision import Decision, Option
from kvscope.report.rows import NOISE, Row, get, num, rate_key, rate_text, values, workload_text
from kvscope.report.uncertainty import wilson


def interval(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"{num(ci[0])}-{num(ci[1])}"


def quality_text(o: Option) -> str:
    """What ``o`` pays in quality against full KV, in the measures the rows hold."""
    if o.full_kv:
        return "full-KV quality"
    q = o.quality
    parts = []
    if q.ruler_delta is not None:
        parts.append(f"RULER accuracy {q.ruler_delta:+.2f} ({q.ruler:.2f} vs {q.ruler_full:.2f})")
    elif q.ruler is not None:
        parts.append(f"RULER accuracy {q.ruler:.2f}")
    if q.ppl_ratio is not None:
        parts.append(f"perplexity x{q.ppl_ratio:.2f}")
    if q.agreement is not None:
        parts.append(f"{q.agreement:.0%} of tokens as full KV")
    return ", ".join(parts) or "quality not measured"


def ci_text(o: Option, before: str = " (", after: str = ")") -> str:
    """``95% CI 1.94-2.4 over 16 requests`` for ``o``'s goodput between ``before`` and ``after``;
    "" without an interval."""
    if not o.goodput_ci:
        return ""
    over = f" over {o.requests} request{'s' * (o.requests != 1)}" if o.requests else ""
    return f"{before}95% CI {interval(o.goodput_ci)}{over}{after}"


def _others(opts: list[Option], limit: int = 3) -> str:
    names = [o.name for o in opts]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _firm(d: Decision, other: Option) -> str:
    """A note when ``other``'s goodput lies inside the decision's interval over requests."""
    ci = d.choice.goodput_ci if d.choice else None
    return " (inside its 95% interval over requests: not a firm gain)" if ci and other.goodput >= ci[0] else ""


def sentence(d: Decision, slos: str) -> str:
    """The decision for one regime, as a sentence that leads with it."""
    c = d.choice
    if d.reason == "no-slo":
        served = [o for o in d.options if o.ttft_p99_ms is not None]
        best = min(served, key=lambda o: o.ttft_p99_ms, default=None)
        low = f"; the lowest p99 TTFT is {best.name}'s {num(best.ttft_p99_ms)} ms" if best else ""
        return f"no strategy serves a request within the SLOs{low}."
    if c is None:
        f = d.below_floor[0]
        fulls = [o.name for o in d.options if o.full_kv]
        full = f"full KV ({', '.join(fulls)}) serves no request within the SLOs, and " if fulls else ""
        return (f"no strategy both meets the SLOs and keeps quality: {full}every one that meets them fails the "
                f"quality floor {d.floor:g}; the fastest, {f.name}, serves {num(f.goodput)} req/s at "
                f"{quality_text(f)}.")
    tie = (f"; {_others(d.tied)} {'ties' if len(d.tied) == 1 else 'tie'} with it within noise (±{d.noise:.0%})"
           if d.tied else "")
    if c.full_kv:
        text = f"**{c.name}** (full KV) serves {num(c.goodput)} req/s{ci_text(c)}"
        if any(not o.full_kv for o in d.tied):
            text += f"; {_others(d.tied)} within noise (±{d.noise:.0%}), so dropping KV gains nothing here"
        elif d.tied:
            text += f"; {_others(d.tied)} (full KV too) within noise (±{d.noise:.0%})"
        if d.runner_up is not None:
            text += f"; {d.margin:.2f}x the next, {d.runner_up.name}{_firm(d, d.runner_up)}"
    elif d.full is None:
        text = (f"**{c.name}** serves {num(c.goodput)} req/s{ci_text(c)} at {quality_text(c)} (no full-KV row "
                f"to compare){tie}")
    elif not d.full.goodput:
        text = (f"**{c.name}** serves {num(c.goodput)} req/s{ci_text(c)} where {d.full.name} serves none "
                f"within the SLOs, at {quality_text(c)}{tie}")
    else:
        text = (f"**{c.name}** serves {c.goodput / d.full.goodput:.2f}x {d.full.name}'s goodput "
                f"({num(c.goodput)} vs {num(d.full.goodput)} req/s{ci_text(c, '; ', '')}){_firm(d, d.full)} at "
                f"{quality_text(c)}{tie}")
    if d.below_floor:
        f = d.below_floor[0]
        text += (f". {f.name} serves more ({num(f.goodput)} req/s) but fails the quality floor "
                 f"({f.quality.score:.2f} < {d.floor:g}: {quality_text(f)})")
    return text + "."


def short(d: Decision) -> str:
    """A few words for a regime summed up beside another."""
    if d.choice is None:
        return "nothing meets the SLOs" if d.reason == "no-slo" else "nothing meets the quality floor"
    if d.tied:
        return f"{d.choice.name}, tied within noise with {len(d.tied)} other{'s' * (len(d.tied) > 1)}"
    if d.full is not None and d.full.goodput and not d.choice.full_kv:
        return f"{d.choice.name}, {d.choice.goodput / d.full.goodput:.2f}x {d.full.name}'s goodput"
    return f"{d.choice.name}"


def cost_sentence(decisions: list[Decision]) -> str | None:
    """Among the lossy strategies, the one that keeps the most quality, and its median
    TPOT against full KV's, at the first (largest) pool's lowest rate, where TPOT is least queued."""
    d = min(decisions, key=lambda x: rate_key(x.rate))
    lossy = [o for o in d.options if not o.full_kv and o.quality.score is not None and o.tpot_ms]
    full = [o for o in d.options if o.full_kv and o.tpot_ms]
    if not lossy or not full:
        return None
    keep = max(lossy, key=lambda o: (o.quality.score, -o.tpot_ms))
    ref = min(full, key=lambda o: o.tpot_ms)
    return (f"Of the lossy strategies, {keep.name} keeps the most quality ({quality_text(keep)}) "
            f"at {keep.tpot_ms / ref.tpot_ms:.2f}x {ref.name}'s median TPOT ({num(keep.tpot_ms)} vs "
            f"{num(ref.tpot_ms)} ms; {d.kv_memory} pool, {rate_text(d.rate)}).")


def slo_text(rows: list[Row]) -> str:
    slos = next((r["config"].get("slos") for r in rows if r["config"].get("slos")), {})
    return ", ".join(f"{k.removesuffix('_ms').upper()} ≤ {v:g} ms" for k, v in slos.items()) or "none"


def uncertainty_text(decisions: list[Decision], rows: list[Row]) -> str:
    """How far the verdict's numbers could move: seeds, requests, samples and tokens behind them."""
    seeds = len({r["config"].get("seed") for r in rows})
    requests = min((o.requests for d in decisions for o in d.options if o.requests), default=None)
    samples = min(values(rows, lambda r: get(r, "quality", "ruler", "num_samples")), default=None)
    tokens = min(values(rows, lambda r: get(r, "quality", "perplexity", "tokens_scored")), default=None)
    out = [f"Uncertainty: {seeds} seed{'s' * (seeds > 1)}; ties are differences within "
           + (f"{NOISE:.0%} (run-to-run noise, no seed spread to measure)" if seeds == 1 else
              f"{NOISE:.0%} or twice the leader's relative spread over seeds")]
    if requests:
        lo = wilson(requests, requests)[0]
        out.append(f"goodput intervals are 95% Wilson intervals over the {requests} requests of a point (all "
                   f"{requests} within the SLOs still leaves {lo:.0%}-100% of the value)")
    if samples:
        lo, hi = wilson(samples / 2, samples)
        out.append(f"RULER accuracy is over {samples:.0f} samples (±{(hi - lo) / 2:.2f} at 0.5)")
    if tokens:
        out.append(f"perplexity over {tokens:.0f} scored tokens, without an interval (the rows keep no per-token "
                   f"losses)")
    return "; ".join(out) + "."


def summary(decisions: list[Decision]) -> str:
    """One line over every regime: how often each strategy is the decision, and how many regimes
    have none."""
    counts: dict[str, int] = defaultdict(int)
    for d in decisions:
        counts[d.choice.name if d.choice else "no decision"] += 1
    parts = [f"**{n}** in {k} of {len(decisions)} regime{'s' * (len(decisions) > 1)}" if n != "no decision"
             else f"no decision in {k}" for n, k in sorted(counts.items(), key=lambda x: -x[1])]
    return "Decision: " + "; ".join(parts) + "."


def verdict(decisions: list[Decision], rows: list[Row]) -> list[str]:
    """The first screen as Markdown lines (``**`` marks the decisions, ``- `` starts a bullet): the
    summary; per (model, workload) a lead line, a bullet per KV pool and one on what keeping quality
    costs; the uncertainty paragraph. [] without decisions."""
    if not decisions:
        return []
    slos = slo_text(rows)
    groups: dict[tuple[str, str], dict[str, list[Decision]]] = defaultdict(lambda: defaultdict(list))
    for d in decisions:
        groups[(d.model, d.workload)][d.kv_memory].append(d)
    out = [summary(decisions)]
    for (model, _), pools in groups.items():
        first = next(iter(pools.values()))[0]
        out.append(f"{model}, {workload_text(first.workload_config)}; SLOs {slos}:")
        for kv, ds in pools.items():
            top = max(ds, key=lambda d: rate_key(d.rate))
            rest = "; ".join(f"at {rate_text(d.rate)}: {short(d)}" for d in ds if d is not top)
            line = f"- {kv} pool, {rate_text(top.rate)}: {sentence(top, slos)}"
            out.append(line + (f" ({rest[0].upper()}{rest[1:]}.)" if rest else ""))
        cost = cost_sentence(next(iter(pools.values())))
        if cost:
            out.append(f"- {cost}")
    out.append(uncertainty_text(decisions, rows))
    return out
