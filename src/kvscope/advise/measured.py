"""Measured study rows as predictions, where they cover the case asked about.

A row covers the case when it ran ``ok`` with the same model shapes, on the same kind of hardware
(the preset's GPU name in the row's device name, or the CPU for CPU advice), at a rate within
:data:`RATE_TOLERANCE` (or both all-at-once), with mean prompt and output lengths within
:data:`LENGTH_TOLERANCE`, and a KV pool within a factor :data:`POOL_FACTOR` of the one asked about
(the same pool class: memory-rich or constrained). The measured path is taken only when at least
two of the weighed strategies are covered, so that there is a comparison to make.

Rows come from :func:`kvscope.study.results_io.read_results_file`, which guarantees the types of
the fields read here when they are present; a row lacking a metric used here covers nothing.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from kvscope.advise.cost_model import CostModel, Prediction
from kvscope.advise.hardware import Hardware
from kvscope.advise.options import StrategyOption, option_from_spec
from kvscope.advise.quality import quality
from kvscope.advise.workload import Workload
from kvscope.errors import KVScopeError
from kvscope.models.config import ModelConfig

RATE_TOLERANCE = 0.25
LENGTH_TOLERANCE = 0.25
POOL_FACTOR = 1.5
_GPU_MODELS = ("h100", "h200", "a100", "l40", "b200")
_METRICS = ("output_throughput", "request_throughput", "mean_ttft_ms", "p90_ttft_ms", "mean_tpot_ms",
            "p90_tpot_ms", "mean_e2el_ms")


_NEEDED = (*_METRICS, "total_input_tokens", "total_output_tokens")


def _close(a: float, b: float, tol: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return math.isinf(a) and math.isinf(b)
    return abs(a - b) <= tol * max(abs(b), 1e-9)


def row_rate(row: dict[str, Any]) -> float:
    """A row's request rate (requests/s; inf for all at once)."""
    rate = row["config"]["rate"]
    return math.inf if rate == "inf" else float(rate)


def row_lengths(row: dict[str, Any]) -> tuple[float, float]:
    """Mean prompt and output tokens per completed request of a row."""
    m = row["metrics"]
    n = max(m.get("completed") or 0, 1)
    return m["total_input_tokens"] / n, m["total_output_tokens"] / n


def row_pool_bytes(row: dict[str, Any], cost: CostModel) -> int:
    """A row's device KV pool (bytes): its configured bytes, or its fraction of the memory after weights."""
    kv = row["config"]["kv_memory"]
    if isinstance(kv, float):
        return int(kv * (cost.hw.memory_bytes - cost.weight_bytes))
    return int(kv)


def same_hardware(row: dict[str, Any], hardware: Hardware) -> bool:
    """Whether a row ran on the kind of machine ``hardware`` describes."""
    device = str(row["config"].get("device", "cpu"))
    if not hardware.is_gpu:
        return device == "cpu"
    name = str(row.get("environment", {}).get("device_name", "")).lower()
    mine = hardware.name.lower()
    # A preset ("h100") or a detected name ("NVIDIA H100 80GB HBM3") matches rows of the same GPU model.
    key = next((k for k in _GPU_MODELS if k in mine), mine)
    return device.startswith("cuda") and key in name


def _same_model(row: dict[str, Any], model: ModelConfig) -> bool:
    from kvscope.advise.options import resolve_model

    try:
        other = resolve_model(row["config"]["model"])
    except KVScopeError:
        return False
    shape = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
             "head_dim")
    return all(getattr(other, f) == getattr(model, f) for f in shape)


def covering_rows(rows: list[dict[str, Any]], model: ModelConfig, hardware: Hardware, workload: Workload,
                  cost: CostModel) -> list[dict[str, Any]]:
    """The rows that cover the case (see the module docstring)."""
    summary = workload.summary()
    out = []
    for row in rows:
        if row.get("status") != "ok" or not isinstance(row.get("metrics"), dict):
            continue
        if not all(isinstance(row["metrics"].get(k), (int, float)) for k in _NEEDED):
            continue
        if not (same_hardware(row, hardware) and _same_model(row, model)):
            continue
        if not _close(row_rate(row), workload.rate, RATE_TOLERANCE):
            continue
        prompt, output = row_lengths(row)
        if not (_close(prompt, summary["mean_prompt_len"], LENGTH_TOLERANCE)
                and _close(output, summary["mean_output_len"], LENGTH_TOLERANCE)):
            continue
        pool = row_pool_bytes(row, cost)
        if not cost.kv_pool_bytes / POOL_FACTOR <= pool <= cost.kv_pool_bytes * POOL_FACTOR:
            continue
        out.append(row)
    return out


def _matches(a: StrategyOption, b: StrategyOption) -> bool:
    if a.family != b.family:
        return False
    return (a.budget_ratio is None) == (b.budget_ratio is None) and (
        a.budget_ratio is None or abs(a.budget_ratio - b.budget_ratio) < 1e-6)


def row_prediction(rows: list[dict[str, Any]], option: StrategyOption) -> Prediction:
    """The mean over ``rows`` (same strategy, e.g. several seeds) as a :class:`Prediction`."""
    metrics = {k: statistics.fmean(r["metrics"][k] for r in rows) for k in _METRICS}
    failed = sum(r["metrics"].get("failed") or 0 for r in rows)
    peaks = rows[0].get("timeline_peaks", {})
    stats = rows[0].get("engine_stats", {})
    return Prediction(
        rows[0]["config"]["strategy"], option.family, option.budget_ratio, failed == 0,
        f"{failed} requests failed in the measured run" if failed else None,
        kv_pool_bytes=int(stats.get("kv_bytes_reserved", 0)),
        host_kv_bytes=int(peaks.get("peak_host_kv_bytes", 0)),
        peak_kv_bytes=int(peaks.get("peak_kv_bytes_used", 0)),
        max_concurrent=int(peaks.get("peak_num_running", 0)),
        quality=quality(option.family, option.budget_ratio, option.facts.lossless, rows[0]["config"]["model"]),
        **metrics,
    )


def engine_settings(row: dict[str, Any]) -> dict[str, Any]:
    """The engine settings a row ran with (KV pool, max_model_len, dtype, scheduler limits)."""
    cfg = row["config"]
    return {"kv_memory": cfg["kv_memory"], "max_model_len": cfg.get("max_model_len"), "dtype": cfg.get("dtype"),
            **cfg.get("engine", {})}


def predictions(rows: list[dict[str, Any]], model: ModelConfig, hardware: Hardware, workload: Workload,
                cost: CostModel, options: list[StrategyOption]) -> dict[str, tuple[Prediction, dict[str, Any]]]:
    """Strategy spec -> (measured prediction, engine settings of its rows) for the options that
    covering rows exist for; empty when fewer than two are covered."""
    covered = covering_rows(rows, model, hardware, workload, cost)
    out = {}
    for opt in options:
        mine = [r for r in covered if (o := option_from_spec(r["config"]["strategy"])) is not None and _matches(o, opt)]
        if mine:
            pred = row_prediction(mine, opt)
            out[pred.strategy] = (pred, engine_settings(mine[0]))
    return out if len(out) >= 2 else {}
