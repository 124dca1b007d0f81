"""The decision table: per regime (model, workload, KV pool, request rate), which strategy to run.

Rule, per regime:

1. Every strategy's goodput (requests/s meeting every SLO of the spec; mean over seeds) and its
   quality against full KV (:func:`quality_vs_full`): ``score`` is the lowest of full-KV
   perplexity / its perplexity, its RULER accuracy / full KV's, and its agreement with full KV,
   the measures the rows hold, at most 1. Full KV is every lossless strategy of the regime
   (:func:`~kvscope.report.names.is_full_kv`); a lossless strategy scores 1.
2. No goodput above 0: nothing meets the SLOs, no decision. Eligible: goodput above 0 and a score
   of at least :data:`QUALITY_FLOOR` (or no quality measured, which the table says).
3. The leader has the highest eligible goodput; strategies within the noise threshold of it
   (:func:`~kvscope.report.rows.noise_threshold`: 5%, or the leader's spread over seeds) tie, and
   among those the decision takes the best quality, then full KV, then the lowest median TPOT.
4. ``margin``: the decision's goodput over the best eligible strategy outside the tie. Faster
   strategies that fail the floor are named, with what they lose.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvscope.report.names import display_names, is_full_kv
from kvscope.report.rows import (
    METRIC,
    QUALITY_FLOOR,
    Row,
    by,
    mean_of,
    noise_threshold,
    kv_label,
    rate_key,
    values,
    workload_label,
)
from kvscope.report.uncertainty import accuracy_interval, goodput_interval, requests_per_point

_GOODPUT = METRIC["goodput req/s"]
_PPL, _RULER, _AGREE = METRIC["perplexity"], METRIC["RULER accuracy"], METRIC["agreement with full KV"]


@dataclass(frozen=True)
class Quality:
    """One strategy's quality against full KV in a regime. ``score`` (None: nothing measured) is
    the lowest of the ratios below; a ratio is None where either side was not measured."""

    score: float | None
    ppl_ratio: float | None = None  # its perplexity / full KV's (>1 is worse)
    ruler: float | None = None  # its RULER accuracy
    ruler_full: float | None = None  # full KV's
    ruler_ci: tuple[float, float] | None = None  # 95% Wilson interval of ``ruler``
    agreement: float | None = None  # share of greedy tokens equal to full KV's

    @property
    def ruler_delta(self) -> float | None:
        return None if self.ruler is None or self.ruler_full is None else self.ruler - self.ruler_full


@dataclass(frozen=True)
class Option:
    """One strategy in one regime (means over its seeds)."""

    strategy: str
    name: str  # display name
    goodput: float | None
    goodput_ci: tuple[float, float] | None
    goodput_seeds: list[float]
    requests: int | None
    tpot_ms: float | None  # median
    ttft_p99_ms: float | None
    full_kv: bool
    quality: Quality

    def meets_floor(self, floor: float) -> bool | None:
        """None when no quality was measured."""
        return None if self.quality.score is None else self.quality.score >= floor


@dataclass
class Decision:
    """What the table says for one regime. ``choice`` None: ``reason`` says why (``no-slo``:
    nothing meets the SLOs; ``floor``: everything that does fails the quality floor)."""

    model: str
    workload: str
    kv_memory: str
    rate: float | str
    workload_config: dict[str, object]
    options: list[Option]
    choice: Option | None
    reason: str  # "clear", "tie", "no-slo" or "floor"
    noise: float
    floor: float
    tied: list[Option] = field(default_factory=list)  # within noise of the leader, choice excluded
    runner_up: Option | None = None  # best eligible outside the tie
    full: Option | None = None  # the best full-KV option
    below_floor: list[Option] = field(default_factory=list)  # faster than the choice, under the floor

    @property
    def margin(self) -> float | None:
        """Choice's goodput / the runner-up's (None without a runner-up with goodput)."""
        if self.choice is None or self.runner_up is None or not self.runner_up.goodput:
            return None
        return self.choice.goodput / self.runner_up.goodput


def quality_vs_full(rows: list[Row], full_rows: list[Row], full_kv: bool) -> Quality:
    """Quality of one strategy's ``rows`` against the full-KV rows of the same regime."""
    if full_kv:
        return Quality(1.0, ppl_ratio=1.0 if mean_of(rows, _PPL) else None, ruler=mean_of(rows, _RULER),
                       ruler_full=mean_of(full_rows, _RULER), ruler_ci=accuracy_interval(rows),
                       agreement=mean_of(rows, _AGREE))
    ppl, ppl_full = mean_of(rows, _PPL), mean_of(full_rows, _PPL)
    acc, acc_full = mean_of(rows, _RULER), mean_of(full_rows, _RULER)
    agree = mean_of(rows, _AGREE)
    ratio = ppl / ppl_full if ppl and ppl_full else None
    parts = []
    if ratio is not None:
        parts.append(1 / ratio)
    if acc is not None:  # against full KV's, which may have missed too; absolute without one
        parts.append(acc if acc_full is None else acc / acc_full if acc_full > 0 else 1.0)
    if agree is not None:
        parts.append(agree)
    # Capped at 1: measuring better than full KV is noise (or a model without meaning, e.g. random
    # weights), and must not win a tie against full KV.
    return Quality(min(1.0, *parts) if parts else None, ratio, acc, acc_full, accuracy_interval(rows), agree)


def _options(rows: list[Row], names: dict[str, str]) -> list[Option]:
    groups = by(rows, lambda r: r["config"]["strategy"])
    full_rows = [r for s, rs in groups.items() if is_full_kv(s) for r in rs]
    out = []
    for strategy, rs in groups.items():
        full = is_full_kv(strategy)
        out.append(Option(strategy, names[strategy], mean_of(rs, _GOODPUT), goodput_interval(rs),
                          values(rs, _GOODPUT), requests_per_point(rs), mean_of(rs, METRIC["TPOT p50"]),
                          mean_of(rs, METRIC["TTFT p99"]), full, quality_vs_full(rs, full_rows, full)))
    return out


def decide(regime: tuple[str, str, str, float | str, dict[str, object]], options: list[Option],
           floor: float = QUALITY_FLOOR) -> Decision:
    """The decision for one regime (model, workload label, KV pool label, rate, workload config) from its options
    (see the module docstring)."""
    served = [o for o in options if o.goodput]
    full = max((o for o in options if o.full_kv and o.goodput is not None), key=lambda o: o.goodput, default=None)
    base = {"options": options, "floor": floor, "full": full}
    if not served:
        return Decision(*regime, choice=None, reason="no-slo", noise=noise_threshold([]), **base)
    eligible = [o for o in served if o.meets_floor(floor) is not False]
    if not eligible:
        fastest = max(served, key=lambda o: o.goodput)
        return Decision(*regime, choice=None, reason="floor", noise=noise_threshold(fastest.goodput_seeds),
                        below_floor=sorted(served, key=lambda o: -o.goodput), **base)
    leader = max(eligible, key=lambda o: o.goodput)
    noise = noise_threshold(leader.goodput_seeds)
    tied = [o for o in eligible if leader.goodput - o.goodput <= noise * leader.goodput]
    # Same goodput within noise: the better quality is the better buy; at equal measured quality,
    # full KV (exact on any workload, not just the measured ones), then the faster decode.
    choice = max(tied, key=lambda o: (o.quality.score if o.quality.score is not None else 0.0, o.full_kv,
                                      -(o.tpot_ms if o.tpot_ms is not None else float("inf"))))
    rest = [o for o in eligible if o not in tied]
    below = [o for o in served if o.meets_floor(floor) is False and o.goodput > choice.goodput * (1 + noise)]
    return Decision(*regime, choice=choice, reason="tie" if len(tied) > 1 else "clear", noise=noise,
                    tied=[o for o in tied if o is not choice],
                    runner_up=max(rest, key=lambda o: o.goodput, default=None),
                    below_floor=sorted(below, key=lambda o: -o.goodput), **base)


def _kv_order(kv: int | float) -> tuple[bool, float]:
    return isinstance(kv, float), float(kv)  # pools in bytes, then fractions of free memory


def decision_table(rows: list[Row], floor: float = QUALITY_FLOOR) -> list[Decision]:
    """One :class:`Decision` per regime of the ``ok`` rows that hold a goodput (the spec set SLOs),
    ordered by model, workload, KV pool (largest first) and rate."""
    rows = [r for r in rows if values([r], _GOODPUT)]
    names = display_names(r["config"]["strategy"] for r in rows)
    regimes = by(rows, lambda r: (r["config"]["model"], workload_label(r["config"]["workload"]),
                                  r["config"]["kv_memory"], r["config"]["rate"]))
    order = sorted(regimes, key=lambda k: (k[0], k[1], _kv_order(k[2])[0], -_kv_order(k[2])[1], rate_key(k[3])))
    out = []
    for model, workload, kv, rate in order:
        rs = regimes[(model, workload, kv, rate)]
        out.append(decide((model, workload, kv_label(kv), rate, rs[0]["config"]["workload"]), _options(rs, names),
                          floor))
    return out
