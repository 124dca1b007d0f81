"""Run a study: every grid point not yet in the results file, one JSONL row per finished point.

The results file is append-only (:mod:`kvscope.study.results_io` reads and writes it). Each row is
written, flushed and fsynced as soon as its point ends, so a killed run loses at most the point in
progress; a rerun skips the points with an ``ok`` row and runs the others again, errored ones
included (their new row supersedes the error). A point that raises, or whose every request failed,
is recorded with ``status: "error"`` and the study goes on. The run holds a lock on the results
folder, and checks its models and the folder's spec before the first point.

Points share what does not depend on them (:class:`~kvscope.study.point_quality.PointCache`): the loaded weights of their
model, quality metrics, which do not depend on the arrival process (nor, for most strategies,
on the KV pool), and on a GPU the warm-up of their measurement group. Every point still builds a
fresh engine and KV strategy for its timed run.

A ``mixed`` workload's quality is the exception: it is scored on the serving run's own outputs
(:func:`_mixed_quality`), since what a strategy keeps there depends on the run's memory pressure.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from kvscope.bench.compiles import TritonCompiles
from kvscope.bench.metrics import serving_metrics
from kvscope.bench.serve import run_workload
from kvscope.errors import ConfigError
from kvscope.llm import LLM
from kvscope.study.point_quality import PointCache, RecordingEngine, agreement, mixed_quality, point_quality
from kvscope.study.point_workload import mixed_workload, workload_requests
from kvscope.study.grids import grid_models
from kvscope.study.preflight import check_models, claim_folder
from kvscope.study.results_io import (
    all_requests_failed,
    append_row,
    check_results_target,
    read_results_file,
    results_lock,
)
from kvscope.study.relative_rates import (
    absolute_rate,
    offline_metrics,
    rate_basis,
    relative_row_fields,
    seed_from_rows,
)
from kvscope.study.spec import Point, StudySpec, expand
from kvscope.study.time_limit import TimeLimit
from kvscope.workload.arrivals import gamma_arrivals
from kvscope.workload.requests import WorkloadRequest, with_arrivals

if TYPE_CHECKING:
    from kvscope.study.ray_runner import RayOptions


def environment(device: str) -> dict[str, Any]:
    """Device, library versions and commit recorded with every row."""
    commit = os.environ.get("KVSCOPE_COMMIT")
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    versions = {}
    for pkg in ("kvscope", "torch", "transformers", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if on_gpu else platform.processor()
        or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "commit": commit,
    }


def run_point(point: Point, cache: PointCache | None = None) -> dict[str, Any]:
    """Run one point and return its row (without ``id``/``status``/``environment``).

    ``phase_s`` splits the point's time into set-up (engine, requests, and a model load when the
    cache had to load one), serving and quality; a relative rate (``"0.5x"``) adds ``offline``, the
    offline throughput measurement when this point took it (:mod:`kvscope.study.relative_rates`).
    """
    cfg = point.config
    cache = cache if cache is not None else PointCache()
    if "system" in cfg:  # an external server, not a kvscope strategy
        from kvscope.study.external import run_system_point

        return run_system_point(point, cache)
    t_offline = time.perf_counter()
    basis = rate_basis(point, cache.offline, lambda p: _offline_throughput(p, cache)) \
        if point.relative_rate is not None else None
    rate = absolute_rate(point, basis) if basis is not None else point.rate
    t0 = time.perf_counter()
    llm = cache.llm(cfg)
    w = point.workload
    mixed = mixed_workload(llm, w, cfg["seed"]) if w.kind == "mixed" else None
    requests = mixed[0].requests if mixed else workload_requests(llm, w, cfg["seed"])
    offsets = gamma_arrivals(len(requests), rate, cfg["burstiness"], seed=cfg["seed"])
    if llm.engine.config.torch_device.type == "cuda" and cache.first_in_group(cfg):
        _warm_up(llm, requests)
        del llm  # a fresh engine for the timed run: its counters start at zero
        llm = cache.llm(cfg)
    t1 = time.perf_counter()
    # Quality scored on what the serving run produced (a mixed workload's, or agreement): keep its outputs.
    recorded = bool(mixed) or cfg["quality"].get("agreement", False)
    served = SimpleNamespace(engine=RecordingEngine(llm.engine), tokenizer=llm.tokenizer) if recorded else llm
    with TritonCompiles() as compiles:
        run = run_workload(served, with_arrivals(requests, offsets), mode="timed")  # type: ignore[arg-type]
    t2 = time.perf_counter()
    metrics = serving_metrics(run.records, goodput=cfg["slos"] or None)
    metrics["wall_time_s"] = run.wall_time_s
    metrics["peak_device_memory_bytes"] = run.peak_device_memory_bytes
    metrics["peak_host_rss_bytes"] = run.peak_host_rss_bytes
    errors = sorted({r.error for r in run.records if r.error})
    row = {
        # Shared tensors (tied embeddings) count once; the report plots throughput against this.
        "model_params": sum(p.numel() for p in llm.engine.model.parameters()),
        "metrics": metrics,
        "timeline_peaks": run.peaks(),
        "engine_stats": llm.engine.stats(),
        "request_errors": errors[:5],
        # None where Triton cannot tell (absent, or without the hook); the report flags counts > 0.
        "triton_compiles": {"timed_run": None if compiles.seen is None else len(compiles.seen),
                            "kernels": (compiles.seen or [])[:COMPILES_KEPT]},
    }
    outputs = served.engine.outputs if recorded else {}
    del llm, served  # quality runs on an engine of its own, which needs the pool memory back
    row["quality"] = point_quality(point, cache)
    if mixed and cfg["quality"]["ruler"]:
        row["quality"].update(mixed_quality(point, cache, *mixed, outputs))
    elif cfg["quality"].get("agreement", False) and not mixed:
        row["quality"]["agreement"] = agreement(point, cache, requests,
                                                 [outputs.get(str(i), ([], ""))[0] for i in range(len(requests))])
    row["phase_s"] = {"setup": t1 - t0, "serve": t2 - t1, "quality": time.perf_counter() - t2}
    if basis is not None:
        row.update(relative_row_fields(point, rate, basis))
        if basis["measured_by"] == point.id:
            row["phase_s"]["offline"] = t0 - t_offline
    return row


def _offline_throughput(point: Point, cache: PointCache) -> dict[str, Any]:
    """Throughput of ``point``'s configuration with every request of its workload submitted at
    once to a fresh engine (warmed up first on a GPU, as a timed point is): the basis of its
    relative rates."""
    cfg = point.config
    llm = cache.llm(cfg)
    requests = workload_requests(llm, point.workload, cfg["seed"])
    if llm.engine.config.torch_device.type == "cuda" and cache.first_in_group(cfg):
        _warm_up(llm, requests)
        del llm
        llm = cache.llm(cfg)
    run = run_workload(llm, with_arrivals(requests, [0.0] * len(requests)), mode="timed")
    del llm  # the caller's engine needs the pool memory back
    return offline_metrics(run)


#: The warm-up's staggered requests, and the gap between their arrivals (shorter than a few decode
#: steps, so that each arrives while the ones before it decode).
WARM_STAGGERED = 8
WARM_GAP_S = 0.005
#: Kernel specialisations named in a row's ``triton_compiles`` (all are counted).
COMPILES_KEPT = 8


def _warm_up(llm: LLM, requests: list[WorkloadRequest]) -> None:
    """Serve the workload's own requests through ``llm`` before a GPU point is timed: all at once,
    through the timed run's driver, each cut to 4 output tokens (a request the engine refuses fails
    here as it will there).

    On a GPU a strategy's first steps at new shapes compile Triton kernels and grow the allocator,
    seconds that would otherwise land in the first timed requests' latencies. Four of the requests
    were not enough: in the ``h200-quality`` grid's first point (``paged``, 50 RULER prompts of 4k
    that share a haystack) the timed run took 3.15 s against 1.06-1.32 s for the same strategy's
    later tasks, median TTFT 1.9 s against 0.45-0.66 s. Four prompts were prefilled together, so
    that warm-up never prefilled over a cached prefix, as most of the timed run's requests did, nor
    ran as many steps mixing prefill and decode rows; which kernels compiled during the timed run
    was not recorded. All the requests cost about the timed run's prefill. The caller then times a
    fresh engine. Once per measurement group and process (:meth:`PointCache.first_in_group`): the
    later points of a group (its other rates) run the same requests on kernels already compiled.

    Before that, the first :data:`WARM_STAGGERED` of them :data:`WARM_GAP_S` apart: a prompt
    prefilled alone, then prompts prefilled beside decoding rows, the steps a timed run's arrivals
    make and an all-at-once run does not. The ``h200`` study's OPT rows of ``h2o`` with ample
    memory (warmed all at once) took 3.0-4.7 s mean TTFT against `paged`'s 0.04-0.5 s, with 6-11
    steps outside the decode graphs for 100 requests: one stall early in the timed run, most likely
    kernels compiled again there (not recorded then; rows now record them, ``triton_compiles``).
    The kernels now launch with one specialisation whatever the step (see the Attention section
    of docs/architecture.md); this warm-up is for whatever else a new step shape first costs."""
    short = [replace(r, output_len=min(r.output_len, 4)) for r in requests]
    # Staggered first, on an empty prefix cache: run after the others, its prompts would be cached.
    few = short[:WARM_STAGGERED]
    run_workload(llm, with_arrivals(few, [i * WARM_GAP_S for i in range(len(few))]), mode="timed")
    run_workload(llm, short, mode="offline")


def point_row(point: Point, study: str, cache: PointCache,
              run_point_fn: Callable[[Point, PointCache], dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    """The results row of one point, as every runner records it: ``run_point_fn``'s fields and
    ``status: "ok"``, or ``status: "error"`` with the exception it raised (a point whose every
    request failed is an error too: metrics of nothing served are no result); then the time it
    took and ``env``. Never raises on the point's account, so the study goes on."""
    start = time.perf_counter()
    row: dict[str, Any] = {"id": point.id, "study": study, "config": point.config}
    try:
        row.update(run_point_fn(point, cache))
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a failing point is recorded and the study goes on
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=8)
    if row["status"] == "ok" and (refused := all_requests_failed(row)):
        row["status"], row["error"] = "error", refused
    row["elapsed_s"] = time.perf_counter() - start
    row["environment"] = env
    return row


def run_study(
    spec: StudySpec,
    results_path: str | Path,
    progress: bool = True,
    run_point_fn: Callable[[Point, PointCache], dict[str, Any]] = run_point,
    retry_errors: bool = True,
    ray: RayOptions | None = None,
    time_limit: float | None = None,
) -> list[dict[str, Any]]:
    """Run every point of ``spec`` without an ``ok`` row in ``results_path`` (with
    ``retry_errors=False``, without any row); return the new rows.

    ``results_path`` is a JSONL file, or a directory (the file is ``results.jsonl`` inside it,
    and the spec is kept beside it as ``spec.json``). Before the first point: the path is checked,
    the folder locked, a folder's ``spec.json`` compared with ``spec``
    (:class:`~kvscope.study.results_io.ResultsFolderError` for each) and every model resolved
    (:class:`~kvscope.errors.ModelLoadError`). ``run_point_fn`` is the per-point runner (a seam
    for tests). With ``ray``, the points run on Ray workers (:mod:`kvscope.study.ray_runner`);
    this process still writes every row. With ``time_limit`` (seconds), no point starts that would
    likely end past it (:mod:`kvscope.study.time_limit`); the points left run on the next call.
    """
    path = check_results_target(results_path)
    if ray is not None and time_limit is not None:
        raise ConfigError("time_limit: applies to a run in this process, not on Ray")
    limit = TimeLimit(time_limit) if time_limit is not None else None  # before the models are checked
    check_models(grid_models(spec))
    with results_lock(path):
        if path != Path(results_path):  # a folder: results.jsonl and spec.json inside it
            claim_folder(path.parent, _spec_json(spec))
        earlier = read_results_file(path)
        done = earlier.done_ids(retry_errors)
        points = expand(spec)
        todo = [p for p in points if p.id not in done]
        bar = tqdm(total=len(points), initial=len(points) - len(todo), desc=f"study {spec.name}", unit="point",
                   disable=not progress)
        if ray is not None:
            from kvscope.study.ray_runner import run_points

            new_rows = run_points(spec, todo, path, bar, ray, run_point_fn)
        else:
            env = environment(spec.device)
            cache = PointCache()
            seed_from_rows(cache.offline, earlier.rows)  # one offline basis per group across chunks
            if limit is not None:
                limit.seed(earlier.rows)
            new_rows = []
            for point in todo:
                if limit is not None and not limit.allows(point.config):
                    break
                row = point_row(point, spec.name, cache, run_point_fn, env)
                if limit is not None:
                    limit.record(point.config, row["elapsed_s"])
                append_row(path, row)
                new_rows.append(row)
                bar.set_postfix_str(f"{row['status']} {point.config['strategy']}")
                bar.update(1)
        bar.close()
    return new_rows


def _spec_json(spec: StudySpec) -> dict[str, Any]:
    out = asdict(spec)
    out["rates"] = ["inf" if r == math.inf else r for r in spec.rates]
    if spec.grids:
        out["grids"] = [_spec_json(g) for g in spec.grids]
    else:  # left out, so that the spec.json of a folder written before grids existed still matches
        del out["grids"]
    return out
