"""``advise``: recommend a KV strategy for a workload, model, hardware, SLOs and quality floor.

Order of preference: options that serve every request, meet the SLOs (p90 TTFT and p90 TPOT) and
the quality floor, ranked by output throughput (within 2% counts as a tie, broken by higher quality,
then lower p90 TPOT (also within 2%), then no host memory, then less device KV). Measured study
rows are used when they cover the case (:mod:`measured`); otherwise the cost model. Impossible
requests return ``feasible=False`` with a message; malformed input raises ``ConfigError``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from kvscope.advise import measured as measured_rows
from kvscope.advise.cost_model import CostModel, Prediction
from kvscope.advise.hardware import Hardware
from kvscope.advise.options import StrategyOption, candidates
from kvscope.advise.simulate import EngineLimits
from kvscope.advise.workload import Workload
from kvscope.constants import QUALITY_FLOOR
from kvscope.errors import ConfigError
from kvscope.models.config import ModelConfig

TIE = 0.02  # relative throughput difference treated as a tie


@dataclass(frozen=True)
class SLOs:
    """Latency targets (milliseconds), checked against p90 values; None = no target."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                  or math.isinf(v) or math.isnan(v)):
                raise ConfigError(f"slos.{name}: must be a positive number of milliseconds, got {v!r}")


@dataclass(frozen=True)
class Advice:
    """The advisor's answer.

    Attributes:
        feasible: False when nothing can serve the request as asked; ``message`` says why.
        recommended: strategy spec string for ``--strategy`` (None when infeasible).
        engine_args: engine settings the expected metrics assume (``kv_memory_bytes``, ...).
        expected: the recommended option's metrics (ms, tokens/s, bytes, quality score).
        runner_up / runner_up_expected: the next option and its metrics.
        reasons: why the recommendation, and why the others were not chosen.
        source: ``measured`` (study rows) or ``cost_model``.
        options: every option weighed, with its metrics and verdict.
    """

    feasible: bool
    message: str
    recommended: str | None
    engine_args: dict[str, Any]
    expected: dict[str, Any]
    runner_up: str | None
    runner_up_expected: dict[str, Any]
    reasons: list[str]
    source: str
    options: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _verdict(p: Prediction, slos: SLOs, quality_floor: float) -> str | None:
    """Why ``p`` is ruled out, or None."""
    if not p.feasible:
        return p.problem
    if slos.ttft_ms is not None and not p.p90_ttft_ms <= slos.ttft_ms:
        return f"p90 TTFT {p.p90_ttft_ms:.1f} ms > SLO {slos.ttft_ms:g} ms"
    if slos.tpot_ms is not None and not p.p90_tpot_ms <= slos.tpot_ms:
        return f"p90 TPOT {p.p90_tpot_ms:.2f} ms > SLO {slos.tpot_ms:g} ms"
    if quality_floor > 0:
        if p.quality.score is None:
            return "quality not measured at this budget"
        if p.quality.score < quality_floor:
            return f"quality {p.quality.score:.2f} < floor {quality_floor:g}"
    return None


def _ranked(preds: list[Prediction]) -> list[Prediction]:
    """Options best first: throughput within ``TIE`` of the best counts as a tie (e.g. every option
    keeping up with the arrival rate), broken by quality, then p90 TPOT (also within ``TIE``), then
    host memory (slower and shared), then device KV. Ties are judged against the best option, not
    on a fixed grid, so two near-equal values never land on opposite sides of a boundary."""
    out: list[Prediction] = []
    rest = list(preds)
    while rest:
        top = max(p.output_throughput for p in rest)
        tied = [p for p in rest if p.output_throughput >= top * (1 - TIE)]
        fastest = min(p.p90_tpot_ms for p in tied)
        tied.sort(key=lambda p: (-(p.quality.score or 0.0), p.p90_tpot_ms > fastest * (1 + TIE),
                                 p.host_kv_bytes, p.peak_kv_bytes))
        out.append(tied[0])
        rest.remove(tied[0])
    return out


def advise(
    workload: Workload,
    model: ModelConfig,
    hardware: Hardware,
    slos: SLOs = SLOs(),
    quality_floor: float = QUALITY_FLOOR,
    results: list[dict[str, Any]] | None = None,
    kv_memory: int | float | None = None,
    limits: EngineLimits = EngineLimits(),
    options: list[StrategyOption] | None = None,
    max_model_len: int | None = None,
) -> Advice:
    """Recommend a strategy.

    Args:
        workload: requests and arrivals.
        model: the model's shapes.
        hardware: the machine.
        slos: p90 TTFT / TPOT targets.
        quality_floor: minimum quality score (full-cache perplexity / strategy perplexity, in
            [0, 1]; 0 = no floor). See :mod:`kvscope.advise.quality`.
        results: rows of a study's ``results.jsonl``; used where they cover the case.
        kv_memory: device KV pool (bytes or fraction of the memory after weights); None = engine default.
        limits: the engine's scheduler limits.
        options: the strategies to weigh (default :func:`candidates`).
        max_model_len: the engine's context limit (``contiguous``'s slab); None = the longest request.
    """
    if isinstance(quality_floor, bool) or not isinstance(quality_floor, (int, float)) \
            or not 0 <= quality_floor <= 1:
        raise ConfigError(f"quality_floor: must be a number in [0, 1] (full-cache perplexity / strategy "
                          f"perplexity), got {quality_floor!r}")
    cost = CostModel(model, hardware, kv_memory=kv_memory, limits=limits, max_model_len=max_model_len)
    host = max(1, int(hardware.host_memory_bytes // 2)) if hardware.is_gpu else None
    opts = options if options is not None else candidates(host)
    engine_args = {"kv_memory_bytes": cost.kv_pool_bytes, "dtype": str(cost.dtype).removeprefix("torch."),
                   "max_num_seqs": limits.max_num_seqs, "max_num_batched_tokens": limits.max_num_batched_tokens}
    if cost.weight_bytes > hardware.memory_bytes:
        msg = (f"{model.name or 'the model'} does not fit: its weights take {cost.weight_bytes / 2**30:.1f} GiB "
               f"in {engine_args['dtype']}, the device has {hardware.memory_bytes / 2**30:.1f} GiB "
               f"({hardware.name}). Use a smaller model, a larger device, or a lower-precision dtype.")
        return Advice(False, msg, None, engine_args, {}, None, {}, [msg], "cost_model")
    measured = measured_rows.predictions(results or [], model, hardware, workload, cost, opts)
    source = "measured" if measured else "cost_model"
    preds = [p for p, _ in measured.values()] if measured else [cost.predict(o, workload) for o in opts]
    ruled = {p.strategy: _verdict(p, slos, quality_floor) for p in preds}
    ok = _ranked([p for p in preds if ruled[p.strategy] is None])
    table = [{"strategy": p.strategy, "ruled_out": ruled[p.strategy], **p.metrics()} for p in preds]
    basis = ("measured study rows" if source == "measured"
             else f"the cost model ({hardware.name}, {engine_args['dtype']})")
    if not ok:
        why = "; ".join(f"{s}: {r}" for s, r in ruled.items())
        msg = f"no strategy meets the request (according to {basis}). {why}"
        return Advice(False, msg, None, engine_args, {}, None, {}, [f"{s}: {r}" for s, r in ruled.items()],
                      source, table)
    best = ok[0]
    second = ok[1] if len(ok) > 1 else None
    if measured:  # the expected metrics hold for the settings the rows ran with
        engine_args = measured[best.strategy][1]
    reasons = [f"{best.strategy}: highest output throughput ({best.output_throughput:.1f} tok/s) among the "
               f"options that meet the SLOs and the quality floor, according to {basis}"]
    if second is not None:
        gap = 1 - second.output_throughput / best.output_throughput
        reasons.append(f"runner-up {second.strategy}: {gap:.1%} less throughput"
                       + (f", quality {second.quality.score:.2f} vs {best.quality.score:.2f}"
                          if second.quality.score != best.quality.score and second.quality.score is not None
                          and best.quality.score is not None else ""))
    measured_on = best.quality.measured_on
    if measured_on is not None and model.name.removeprefix("dummy:") != measured_on:
        reasons.append(f"quality of {best.strategy} was measured on {measured_on}, not on this model")
    reasons += [f"{s}: {r}" for s, r in ruled.items() if r is not None]
    msg = f"{best.strategy} ({source})"
    return Advice(True, msg, best.strategy, engine_args, best.metrics(), second.strategy if second else None,
                  second.metrics() if second else {}, reasons, source, table)
