"""``adaptive``'s thresholds derived from a study's results file (``adaptive:thresholds_from=...``).

The input is a ``results.jsonl`` written by ``kvscope study run`` (or the folder holding it): one
row per grid point, with its ``config`` (model, strategy, workload, KV pool, rate, seed), its
serving ``metrics`` and its ``quality``. :func:`derive_thresholds` turns the rows into the length at
which requests should leave full paged KV for a long-context child, and which child.

The rule, step by step:

1. **Rows.** Rows with ``status: ok`` whose strategy is ``paged`` (the full-KV reference, any
   arguments) or a strategy ``adaptive`` can use as its long child: an eviction policy, ``offload``
   or ``infinigen`` (restricted to one name when ``long`` is given). Other rows are ignored.
2. **Scenarios.** Rows sharing model, workload, KV pool and request rate form a scenario; seeds
   are averaged. A scenario is usable when it holds a ``paged`` row and at least one candidate.
3. **Metric.** ``request_goodput`` (vLLM's goodput: requests meeting every SLO, per second) when
   every usable row has one, i.e. the study set SLOs; else ``output_throughput``.
4. **Quality floor.** A candidate qualifies in a scenario when its quality is at least
   ``quality_floor`` of ``paged``'s there, on the measure closest to the served requests that both
   rows carry: the workload's own task score (RULER accuracy), else agreement with full KV
   (``quality.agreement``: the served requests' greedy tokens), else perplexity (paged's / the
   candidate's). Perplexity on prose does not see what compressing a short chat prompt does to its
   answer (``snapkv`` kept 0.95 of it on the H100 while agreeing with full KV on 6% of short
   requests' tokens); agreement over a RULER answer's continuation measures bf16 divergence, not the
   answer (lossless ``offload`` agreed on 79% of 128 answer tokens, at RULER accuracy 1.0). A
   candidate without a figure to compare does not qualify. When no candidate of any scenario has
   one, the floor cannot be checked and the derivation fails.
5. **Verdict.** A scenario says ``long`` when its best qualifying candidate's metric exceeds
   ``paged``'s by more than ``margin`` (5%, the study report's noise threshold), else ``full``.
6. **Length.** A scenario's length is the mean prompt + output tokens per completed request
   (from ``paged``'s rows; from the candidates' when ``paged`` completed none). ``adaptive``
   compares this quantity (prompt + ``max_tokens``) with its threshold.
7. **``long_threshold``.** A decision stump over lengths: of the rules "length >= T goes long",
   with T at each measured length or "never", the one that misclassifies the fewest scenarios;
   ties go to the larger T (full KV is lossless, so the rule routes no more requests long than the
   data asks for). T is then placed at the geometric mean of the measured lengths on either side of
   the cut, rounded up (lengths span orders of magnitude, so the cut is made on a log scale), or at
   the shortest measured length when every scenario says ``long``. "Never" is ``None``: no request
   goes long by length (a prompt the full child cannot hold, and pool pressure, still do).
8. **``long`` child.** The candidate that is best (qualifying, highest metric) in the most
   scenarios the threshold sends long (ties: the higher mean metric ratio over ``paged``), with its
   arguments as measured (less ``block_size``, which ``adaptive`` sets for both children) and its
   KV budget (the share of a prompt it keeps). When the threshold sends no scenario long, the same
   count runs over every scenario: the child then only serves requests admitted under pool
   pressure, and it still meets the floor where it was measured. None when no candidate qualifies
   anywhere.
9. **``pressure_min_length``.** Pool pressure may send a request to the long child only at lengths
   where the child met the floor: the cut above the longest measured scenario where it fails the
   floor (geometric mean with the next longer scenario where it qualifies, rounded up; one token
   above it when none is longer). None when it qualifies wherever it was measured. On the H100
   mixed workload, requests admitted to ``snapkv`` under pressure were short chat requests, the
   one length where it had failed the floor.

``pressure`` and ``relief`` are not derived: the rows hold peaks of pool use, not the pool use at
which admitting one more full request starts to cost the others, so they stay configured.
Problems with the file (missing, unreadable, no usable scenario, no quality figure) are
:class:`~kvscope.errors.ConfigError` s naming the file and what is missing.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvscope.constants import QUALITY_FLOOR
from kvscope.errors import ConfigError
from kvscope.kv.adaptive import FULL_CHILD
from kvscope.kv.registry import kept_share, long_children, parse_spec
from kvscope.study.results_io import ResultsFolderError, read_results_file

#: Relative margin a candidate's metric must exceed paged's by to count as a win (the study
#: report's noise threshold).
DEFAULT_MARGIN = 0.05
#: Default quality floor: the advisor's (``kvscope advise --quality-floor``).
DEFAULT_QUALITY_FLOOR = QUALITY_FLOOR  # kept for importers
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class Scenario:
    """One (model, workload, KV pool, rate) of the results, as the rule sees it."""

    model: str
    workload: str
    kv_memory: Any
    rate: Any
    length: float  # mean prompt + output tokens per completed request
    full_metric: float  # paged's metric
    best: str | None  # best qualifying candidate (strategy spec), None if none qualifies
    best_metric: float | None
    verdict: str  # "long" or "full"
    qualified: dict[str, bool] = field(default_factory=dict)  # candidate spec -> meets the floor

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DerivedThresholds:
    """What :func:`derive_thresholds` found; ``describe()`` is the one-line account in ``stats()``."""

    source: str
    metric: str
    quality_floor: float
    margin: float
    long_threshold: int | None  # None: no request goes long by length
    long: str | None  # the long child's strategy name, None if none was derived
    long_args: dict[str, Any] = field(default_factory=dict)
    long_budget_ratio: float | None = None  # share of a prompt's KV the child keeps (1 = lossless)
    scenarios: tuple[Scenario, ...] = ()
    misclassified: int = 0
    pressure_min_length: int | None = None  # shortest request pool pressure may send long; None: any

    def describe(self) -> str:
        n_long = sum(s.verdict == "long" for s in self.scenarios)
        return (f"{self.source}: {len(self.scenarios)} scenarios ({n_long} where a long child beats paged by "
                f">{self.margin:.0%} on {self.metric} at quality >= {self.quality_floor:g} of paged's), "
                f"{self.misclassified} misclassified by the threshold")


def _fail(source: str, problem: str) -> ConfigError:
    return ConfigError(f"adaptive: thresholds_from={source!r}: {problem}")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results file (a ``.jsonl`` file or a study folder holding ``results.jsonl``),
    read as every reader of results reads them (:mod:`kvscope.study.results_io`: lines that are not
    rows are skipped and logged)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.is_file():
        raise _fail(str(path), "no such results file (a study's results.jsonl, or the folder holding it)")
    try:
        return read_results_file(p).rows
    except ResultsFolderError as e:
        raise _fail(str(path), f"unreadable ({e})") from None


def long_candidates() -> set[str]:
    """Strategy names ``adaptive`` accepts as its long child (those implementing ``adopt``)."""
    return set(long_children())


def _get(row: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(row, dict):
            return None
        row = row.get(k)  # type: ignore[assignment]
    return row


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _quality(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean RULER accuracy, agreement with full KV and perplexity over ``rows`` (the keys present
    in all of them)."""
    out = {}
    for name, keys in (("ruler", ("quality", "ruler", "accuracy")),
                       ("agreement", ("quality", "agreement", "match_fraction")),
                       ("perplexity", ("quality", "perplexity", "perplexity"))):
        vals = [_get(r, *keys) for r in rows]
        if vals and all(_finite(v) for v in vals):
            out[name] = statistics.fmean(vals)
    return out


def _qualifies(cand: dict[str, float], full: dict[str, float], floor: float) -> bool | None:
    """Whether ``cand``'s quality is at least ``floor`` of ``full``'s on the first measure both
    have of RULER accuracy, agreement (as ratios) and perplexity (inverted); None if none is
    comparable (module docstring, step 4)."""
    for m in ("ruler", "agreement"):
        if m in cand and m in full:
            return cand[m] >= floor * full[m]
    if "perplexity" in cand and "perplexity" in full and cand["perplexity"] > 0:
        return full["perplexity"] / cand["perplexity"] >= floor
    return None


def _length(rows: list[dict[str, Any]]) -> float | None:
    vals = []
    for r in rows:
        m = r.get("metrics") or {}
        done = m.get("completed")
        if _finite(done) and done > 0 and _finite(m.get("total_input_tokens")) and _finite(m.get("total_output_tokens")):
            vals.append((m["total_input_tokens"] + m["total_output_tokens"]) / done)
    return statistics.fmean(vals) if vals else None


def _label(workload: Any) -> str:
    if isinstance(workload, dict):
        extra = ",".join(f"{k}={v}" for k, v in sorted(workload.items()) if k != "kind")
        return f"{workload.get('kind')}({extra})"
    return str(workload)


def _stump(points: list[tuple[float, bool]]) -> tuple[int | None, int]:
    """(threshold, misclassified) of the rule "length >= threshold goes long" that fits
    ``points`` = (length, goes long) best; see the module docstring, step 7."""
    lengths = sorted({x for x, _ in points})
    best: tuple[int, int] | None = None  # (errors, cut index); cut == len(lengths) is "never"
    for cut in range(len(lengths) + 1):
        t = lengths[cut] if cut < len(lengths) else math.inf
        errors = sum((x >= t) != long for x, long in points)
        if best is None or errors <= best[0]:  # ties: the later (larger) cut
            best = (errors, cut)
    assert best is not None
    errors, cut = best
    if cut == len(lengths):
        return None, errors
    if cut == 0:
        return math.ceil(lengths[0]), errors
    return math.ceil(math.sqrt(lengths[cut - 1] * lengths[cut])), errors


def derive_thresholds(
    path: str | Path,
    quality_floor: float = QUALITY_FLOOR,
    long: str | None = None,
    margin: float = DEFAULT_MARGIN,
    rows: Iterable[dict[str, Any]] | None = None,
) -> DerivedThresholds:
    """Derive ``adaptive``'s ``long_threshold`` and long child from a study's results (module
    docstring). ``long`` restricts the candidates to one strategy name; ``rows`` replaces reading
    ``path`` (which is then only the name reported as the source)."""
    source = str(path)
    if not _finite(quality_floor) or not 0.0 <= quality_floor <= 1.0:
        raise ConfigError(f"adaptive: quality_floor must be in [0, 1], got {quality_floor!r}")
    all_rows = list(rows) if rows is not None else read_rows(path)
    names = long_candidates()
    if long is not None:
        names &= {long}
    full = FULL_CHILD.name  # the full-KV reference: adaptive's full child

    # scenario key -> strategy spec -> rows
    groups: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    seen: set[str] = set()
    for r in all_rows:
        cfg = r.get("config")
        if r.get("status") != "ok" or not isinstance(cfg, dict) or not isinstance(r.get("metrics"), dict):
            continue
        spec = cfg.get("strategy")
        if not isinstance(spec, str):
            continue
        seen.add(spec)
        try:
            name, _ = parse_spec(spec)
        except ConfigError:
            continue
        if name == full or name in names:
            key = (str(cfg.get("model")), _label(cfg.get("workload")), json.dumps(cfg.get("kv_memory")),
                   json.dumps(cfg.get("rate")))
            groups[key][spec].append(r)

    usable = {k: g for k, g in groups.items()
              if any(parse_spec(s)[0] == full for s in g) and any(parse_spec(s)[0] != full for s in g)}
    wanted = f"'{long}'" if long is not None else f"a long-child strategy ({', '.join(sorted(long_children()))})"
    if not usable:
        found = ", ".join(sorted(seen)) or "none"
        raise _fail(source, f"no scenario (model, workload, KV pool, rate) holds both an ok {full!r} row and an ok "
                            f"row of {wanted}; strategies with ok rows: {found}")
    usable_rows = [r for g in usable.values() for rs in g.values() for r in rs]
    metric = ("request_goodput" if all(_finite(r["metrics"].get("request_goodput")) for r in usable_rows)
              else "output_throughput")

    def value(rs: list[dict[str, Any]]) -> float | None:
        vals = [r["metrics"].get(metric) for r in rs]
        return statistics.fmean(vals) if vals and all(_finite(v) for v in vals) else None

    scenarios: list[Scenario] = []
    comparable = False
    for key in sorted(usable):
        g = usable[key]
        full_rows = [r for s, rs in g.items() if parse_spec(s)[0] == full for r in rs]
        full_metric, full_quality = value(full_rows), _quality(full_rows)
        cand_rows = [r for s, rs in g.items() if parse_spec(s)[0] != full for r in rs]
        length = _length(full_rows) or _length(cand_rows)
        if full_metric is None or length is None:
            continue
        best, best_metric = None, None
        qualified = {}
        for spec, rs in sorted(g.items()):
            if parse_spec(spec)[0] == full:
                continue
            ok = _qualifies(_quality(rs), full_quality, quality_floor)
            comparable |= ok is not None
            qualified[spec] = bool(ok)
            v = value(rs)
            if ok and v is not None and (best_metric is None or v > best_metric):
                best, best_metric = spec, v
        wins = best_metric is not None and best_metric > full_metric * (1.0 + margin)
        scenarios.append(Scenario(key[0], key[1], json.loads(key[2]), json.loads(key[3]), length, full_metric,
                                  best, best_metric, "long" if wins else "full", qualified))
    if not scenarios:
        raise _fail(source, f"no usable scenario has a {metric} figure and a completed request for {full!r}")
    if not comparable:
        raise _fail(source, "no candidate row has a quality figure comparable with paged's (quality.ruler or "
                            "quality.perplexity in both), so the quality floor cannot be checked; run the study "
                            "with quality: {ruler: true} or {perplexity: true}")
    threshold, misclassified = _stump([(s.length, s.verdict == "long") for s in scenarios])

    child, child_args, budget, min_length = None, {}, None, None
    sent_long = [s for s in scenarios if threshold is not None and s.verdict == "long" and s.length >= threshold]
    count: dict[str, int] = defaultdict(int)
    ratios: dict[str, list[float]] = defaultdict(list)
    for s in sent_long or scenarios:
        if s.best is not None and s.best_metric is not None:
            count[s.best] += 1
            ratios[s.best].append(s.best_metric / s.full_metric if s.full_metric else math.inf)
    if count:
        spec = max(sorted(count), key=lambda c: (count[c], statistics.fmean(ratios[c])))
        child, child_args = parse_spec(spec)
        child_args.pop("block_size", None)
        budget = kept_share(spec)
        min_length = _pressure_min_length([(s.length, s.qualified[spec]) for s in scenarios if spec in s.qualified])
    return DerivedThresholds(source, metric, float(quality_floor), margin, threshold, child, child_args, budget,
                             tuple(scenarios), misclassified, min_length)


def _pressure_min_length(points: list[tuple[float, bool]]) -> int | None:
    """The shortest length pool pressure may send to the child, from (length, child meets the
    floor) of the scenarios where it was measured; see the module docstring, step 9."""
    failing = [x for x, ok in points if not ok]
    if not failing:
        return None
    worst = max(failing)
    above = [x for x, ok in points if ok and x > worst]
    return math.ceil(math.sqrt(worst * min(above))) if above else math.floor(worst) + 1
