"""Run a study: every grid point not yet in the results file, one JSONL row per finished point.

The results file is append-only (:mod:`kvscope.study.results_io` reads and writes it). Each row is
written, flushed and fsynced as soon as its point ends, so a killed run loses at most the point in
progress; a rerun skips the points with an ``ok`` row and runs the others again, errored ones
included (their new row supersedes the error). A point that raises, or whose every request failed,
is recorded with ``status: "error"`` and the study goes on. The run holds a lock on the results
folder, and checks its models and the folder's spec before the first point.

Points share what does not depend on them (:class:`PointCache`): the loaded weights of their
model, and quality metrics, which do not depend on the arrival process (nor, for most strategies,
on the KV pool). Every point still builds a fresh engine and KV strategy.

A ``mixed`` workload's quality is the exception: it is scored on the serving run's own outputs
(:func:`_mixed_quality`), since what a strategy keeps there depends on the run's memory pressure.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import subprocess
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from kvscope.bench import quality
from kvscope.bench.metrics import serving_metrics
from kvscope.bench.serve import run_workload
from kvscope.config import EngineConfig
from kvscope.constants import FULL_KV_STRATEGY
from kvscope.errors import ConfigError, RequestError
from kvscope.kv import registry
from kvscope.llm import LLM
from kvscope.models.loader import DUMMY_PREFIX, LoadedModel, load_model
from kvscope.sampling_params import SamplingParams
from kvscope.study.preflight import check_models, claim_folder
from kvscope.study.results_io import (
    all_requests_failed,
    append_row,
    check_results_target,
    read_results_file,
    results_lock,
)
from kvscope.study.spec import Point, StudySpec, WorkloadSpec, expand
from kvscope.workload.arrivals import gamma_arrivals
from kvscope.workload.mixed import MixedWorkload, mix, num_long_requests
from kvscope.workload.requests import (
    WorkloadRequest,
    fixed_length_requests,
    read_trace,
    uniform_length_requests,
    with_arrivals,
)
from kvscope.workload.ruler import ruler_samples, score_prediction
from kvscope.workload.sharegpt import sharegpt_requests
from kvscope.workload.text import token_sequences

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


def _requests(llm: LLM, w: WorkloadSpec, seed: int) -> list[WorkloadRequest]:
    tok = llm.tokenizer
    if w.kind == "sharegpt":
        extra = {"max_prompt_len": w.max_prompt_len} if w.max_prompt_len else {}
        return sharegpt_requests(tok, w.num_requests, seed=seed, output_len=w.output_len, **extra)
    if w.kind == "fixed":
        return fixed_length_requests(tok, w.num_requests, w.input_len, w.output_len, source=w.source or "britannica")
    if w.kind == "uniform":
        return uniform_length_requests(tok, w.num_requests, w.input_len, w.output_len, w.range_ratio or 0.0,
                                       seed=seed, source=w.source or "britannica")
    if w.kind == "trace":
        return read_trace(w.path)
    if w.kind == "ruler":
        return [WorkloadRequest(s["input"], w.output_len or int(s["tokens_to_generate"]))
                for s in _ruler(llm, w, seed)]
    if w.kind == "mixed":
        return _mixed(llm, w, seed)[0].requests
    raise ConfigError(f"unknown workload kind {w.kind!r}")


def _ruler(llm: LLM, w: WorkloadSpec, seed: int) -> list[dict[str, Any]]:
    return ruler_samples(w.task, w.length, llm.tokenizer, num_samples=w.num_samples, seed=42 + seed)


def _mixed(llm: LLM, w: WorkloadSpec, seed: int) -> tuple[MixedWorkload, list[dict[str, Any]]]:
    """A mixed workload's requests and the RULER samples of its long ones (sample ``k`` is the
    ``k``-th long request), both seeded as the ``sharegpt`` and ``ruler`` kinds are."""
    n_long = num_long_requests(w.num_requests, w.long_fraction)
    extra = {"max_prompt_len": w.max_prompt_len} if w.max_prompt_len else {}
    short = sharegpt_requests(llm.tokenizer, w.num_requests - n_long, seed=seed, output_len=w.output_len, **extra)
    samples = ruler_samples(w.task, w.length, llm.tokenizer, num_samples=n_long, seed=42 + seed)
    long = [WorkloadRequest(s["input"], w.long_output_len or int(s["tokens_to_generate"])) for s in samples]
    return mix(short, long), samples


class _RecordingEngine:
    """The engine as the serving driver sees it, keeping the output token ids and text of every
    request that finishes (by request id, the request's index in the workload)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.outputs: dict[str, tuple[list[int], str]] = {}

    def step(self) -> list[Any]:
        outs = self._engine.step()
        for out in outs:
            if out.finished and not out.error:
                self.outputs[out.request_id] = (list(out.token_ids), out.text)
        return outs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _mixed_quality(point: Point, cache: PointCache, mixed: MixedWorkload, samples: list[dict[str, Any]],
                   outputs: dict[str, tuple[list[int], str]]) -> dict[str, Any]:
    """Quality of a mixed workload as served, from the serving run's own outputs.

    ``ruler``: RULER's string-match score of each long request's answer (a request that failed
    scores 0), so compression or eviction under the run's memory pressure counts. ``agreement``:
    the short requests' greedy tokens against those of full paged KV (the same requests, all
    submitted together to a fresh ``paged`` engine with the point's pool; computed once per run
    and reused, see ``reused_from``): pooled match fraction, exact matches, first divergence.
    """
    scores, by_task = [], defaultdict(list)
    for pos, k in sorted(mixed.long_index.items()):
        s = samples[k]
        text = outputs.get(str(pos), ([], ""))[1]
        score = score_prediction(s["task"], text, s["outputs"])
        scores.append(score)
        by_task[s["task"]].append(score)
    failed = sum(str(pos) not in outputs for pos in mixed.long_index)

    def summary(v: list[float]) -> dict[str, Any]:
        acc = sum(v) / len(v)
        return {"accuracy": acc, "score": round(100 * acc, 2), "num_samples": len(v)}

    out: dict[str, Any] = {"ruler": {**summary(scores), "per_task": {t: summary(v) for t, v in by_task.items()},
                                     "failed": failed, "measured_in": "serving run"}}
    shorts = mixed.short_positions
    out["agreement"] = _agreement(point, cache, [mixed.requests[i] for i in shorts],
                                  [outputs.get(str(i), ([], ""))[0] for i in shorts])
    return out


def _agreement(point: Point, cache: "PointCache", requests: list, served: list[list[int]],
               normalize: Callable[[list[int]], list[int]] | None = None) -> dict[str, Any]:
    """``served`` greedy tokens of ``requests`` against those of full paged KV: the same requests,
    all submitted together to a fresh ``paged`` engine with the point's pool (computed once per
    run and reused, see ``reused_from``). Pooled match fraction, exact matches, first divergence.
    ``normalize`` maps each reference sequence first (an external system's tokens come as text)."""
    cfg = point.config

    def reference() -> dict[str, Any]:
        llm = cache.llm({**cfg, "strategy": FULL_KV_STRATEGY})
        params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in requests]
        outs = llm.generate([r.prompt for r in requests], params, use_tqdm=False)
        return {"token_ids": [list(o.token_ids) for o in outs]}

    keys = ["model", "seed", "device", "dtype", "max_model_len", "engine", "kv_memory", "workload"]
    ref = _cached(cache.quality, {**{k: cfg[k] for k in keys}, "q": "served_reference"}, point, reference)
    agree = quality.agreement([normalize(t) for t in ref["token_ids"]] if normalize else ref["token_ids"], served)
    out = {k: agree[k] for k in ("match_fraction", "exact_match", "mean_first_divergence", "num_requests")}
    out["reference"] = "paged (full KV)"
    if "reused_from" in ref:
        out["reference_from"] = ref["reused_from"]
    return out


@dataclass
class PointCache:
    """What the points of one run share: loaded weights and quality metrics, never an engine.

    Weights: the most recently loaded model is reused while the points name the same model,
    device and dtype (and seed, for dummy models, whose random weights depend on it). The grid
    varies the model slowest, so one slot serves every point of a model, and a study of large
    models never holds two of them at once. ``quality``: metrics by what they depend on, each with
    the id of the point that computed it (see :func:`_quality`).
    """

    quality: dict[str, dict[str, Any]] = field(default_factory=dict)
    _model_key: tuple[Any, ...] | None = field(default=None, init=False, repr=False)
    _model: LoadedModel | None = field(default=None, init=False, repr=False)

    def llm(self, cfg: dict[str, Any]) -> LLM:
        """A fresh engine and KV strategy for a point config, on the cached weights when they match.

        The caller must have dropped its previous engine: on a GPU, the cached blocks of its pool
        are released here, since a pool sized as a fraction of free memory would count them as used.
        """
        seed = cfg["seed"] if cfg["model"].startswith(DUMMY_PREFIX) else None
        key = (cfg["model"], cfg["device"], cfg["dtype"], seed)
        fresh = self._model is None or key != self._model_key
        if fresh:
            self._model = self._model_key = None  # two large models may not fit together
        if fresh or cfg["device"].startswith("cuda"):
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if fresh:
            # Validated as the engine would (e.g. a CUDA device on a machine without one) before loading.
            engine_cfg = EngineConfig(model=cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
            self._model = load_model(cfg["model"], engine_cfg.torch_device, engine_cfg.torch_dtype, cfg["seed"])
            self._model_key = key
        kv = cfg["kv_memory"]
        memory = {"kv_memory_fraction": kv} if isinstance(kv, float) else {"kv_memory_bytes": kv}
        llm = LLM(model=cfg["model"], strategy=cfg["strategy"], device=cfg["device"], dtype=cfg["dtype"],
                  max_model_len=cfg["max_model_len"], seed=cfg["seed"], loaded_model=self._model, **memory,
                  **cfg["engine"])
        if fresh:
            # A freshly loaded model's first steps pay one-time set-up (allocator, kernel selection);
            # keep it out of the measured latencies. The set-up belongs to the weights, not to the
            # engine: on CPU, a new engine's first step on warm weights takes as long as its second.
            llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=2), use_tqdm=False)
        return llm


def _cached(cache: dict[str, dict[str, Any]], key: dict[str, Any], point: Point,
            compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` once per ``key``; later points get the same values plus ``reused_from``, the id
    of the point that computed them."""
    k = json.dumps(key, sort_keys=True, default=str)
    if k not in cache:
        cache[k] = {**compute(), "computed_by": point.id}
    values = dict(cache[k])
    computed_by = values.pop("computed_by")
    return values if computed_by == point.id else {**values, "reused_from": computed_by}


def _pool_independent(strategy: str) -> bool:
    """Whether what a lone sequence sees under ``strategy`` cannot depend on the KV pool's size:
    true of lossless strategies and of the budget-driven eviction policies, which keep what their
    budget says whatever the pool holds. A strategy that drops tokens under memory pressure (a full
    pool) is not, and its quality is measured per pool."""
    return registry.facts(strategy).pool_independent


def _quality(point: Point, cache: PointCache) -> dict[str, Any]:
    """Quality metrics of the point's strategy, computed once per run for what they depend on.

    Each metric runs on a fresh engine (no prefix cache or random state left by the serving run),
    one sequence at a time, so it depends neither on the arrival process (rate, burstiness) nor,
    for perplexity, on the workload; nor on the KV pool when :func:`_pool_independent` (a lone
    sequence is never preempted, so the pool only decides whether it fits). Points that share the
    rest of the key get the values with ``reused_from`` naming the point that computed them.
    """
    cfg, q = point.config, point.config["quality"]
    keys = ["model", "strategy", "seed", "device", "dtype", "max_model_len", "engine"]
    if not _pool_independent(cfg["strategy"]):
        keys.append("kv_memory")
    base = {k: cfg[k] for k in keys}
    out: dict[str, Any] = {}
    if q["perplexity"]:
        def ppl() -> dict[str, Any]:
            llm = cache.llm(cfg)
            seqs = token_sequences(llm.tokenizer, q["perplexity_sequences"], q["perplexity_len"])
            res = quality.perplexity(llm, seqs, prefix=q["perplexity_prefix"])
            return {k: res[k] for k in ("perplexity", "mean_nll", "tokens_scored", "num_sequences", "prefix")}

        out["perplexity"] = _cached(cache.quality, {**base, "q": "ppl", "args": q}, point, ppl)
    w = point.workload
    if q["ruler"] and w.kind == "ruler":
        def ruler() -> dict[str, Any]:
            llm = cache.llm(cfg)
            res = quality.ruler_accuracy(llm, _ruler(llm, w, cfg["seed"]), max_tokens=w.output_len)
            return {k: res[k] for k in ("accuracy", "score", "num_samples", "per_task")}

        out["ruler"] = _cached(cache.quality, {**base, "q": "ruler", "w": w.to_dict()}, point, ruler)
    return out


def run_point(point: Point, cache: PointCache | None = None) -> dict[str, Any]:
    """Run one point and return its row (without ``id``/``status``/``environment``).

    ``phase_s`` splits the point's time into set-up (engine, requests, and a model load when the
    cache had to load one), serving and quality.
    """
    cfg = point.config
    cache = cache if cache is not None else PointCache()
    if "system" in cfg:  # an external server, not a kvscope strategy
        from kvscope.study.external import run_system_point

        return run_system_point(point, cache)
    t0 = time.perf_counter()
    llm = cache.llm(cfg)
    w = point.workload
    mixed = _mixed(llm, w, cfg["seed"]) if w.kind == "mixed" else None
    requests = mixed[0].requests if mixed else _requests(llm, w, cfg["seed"])
    offsets = gamma_arrivals(len(requests), point.rate, cfg["burstiness"], seed=cfg["seed"])
    if llm.engine.config.torch_device.type == "cuda":
        _warm_up(llm, requests, cfg["max_model_len"])
        del llm  # a fresh engine for the timed run: its counters start at zero
        llm = cache.llm(cfg)
    t1 = time.perf_counter()
    # Quality scored on what the serving run produced (a mixed workload's, or agreement): keep its outputs.
    recorded = bool(mixed) or cfg["quality"].get("agreement", False)
    served = SimpleNamespace(engine=_RecordingEngine(llm.engine), tokenizer=llm.tokenizer) if recorded else llm
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
    }
    outputs = served.engine.outputs if recorded else {}
    del llm, served  # quality runs on an engine of its own, which needs the pool memory back
    row["quality"] = _quality(point, cache)
    if mixed and cfg["quality"]["ruler"]:
        row["quality"].update(_mixed_quality(point, cache, *mixed, outputs))
    elif cfg["quality"].get("agreement", False) and not mixed:
        row["quality"]["agreement"] = _agreement(point, cache, requests,
                                                 [outputs.get(str(i), ([], ""))[0] for i in range(len(requests))])
    row["phase_s"] = {"setup": t1 - t0, "serve": t2 - t1, "quality": time.perf_counter() - t2}
    return row


def _warm_up(llm: LLM, requests: list, max_model_len: int, count: int = 4) -> None:
    """Run a few of the workload's own requests (the longest, then the first ones; cut to the
    context and to 4 output tokens) through ``llm`` before a GPU point is timed.

    On a GPU a strategy's first steps at new shapes compile Triton kernels and grow the allocator,
    seconds that would otherwise land in the first timed requests' latencies (a `paged` point that
    ran first once showed a 2.2 s median TTFT at 8 req/s). The caller then times a fresh engine."""
    def ids(r) -> list[int]:
        tokens = llm.tokenizer.encode(r.prompt) if isinstance(r.prompt, str) else list(r.prompt)
        return tokens[: max(1, max_model_len - 8)]

    prompts = [ids(r) for r in requests]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))[:1] + list(range(len(prompts)))
    batch = [prompts[i] for i in list(dict.fromkeys(order))[:count]]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    try:
        llm.generate(batch, params, use_tqdm=False)
    except RequestError:
        # A prompt the pool cannot hold is refused before anything runs; warm up on the others (the
        # timed run records the refusal against that request).
        for prompt in batch:
            try:
                llm.generate([prompt], params, use_tqdm=False)
            except RequestError:
                continue


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
) -> list[dict[str, Any]]:
    """Run every point of ``spec`` without an ``ok`` row in ``results_path`` (with
    ``retry_errors=False``, without any row); return the new rows.

    ``results_path`` is a JSONL file, or a directory (the file is ``results.jsonl`` inside it,
    and the spec is kept beside it as ``spec.json``). Before the first point: the path is checked,
    the folder locked, a folder's ``spec.json`` compared with ``spec``
    (:class:`~kvscope.study.results_io.ResultsFolderError` for each) and every model resolved
    (:class:`~kvscope.errors.ModelLoadError`). ``run_point_fn`` is the per-point runner (a seam
    for tests). With ``ray``, the points run on Ray workers (:mod:`kvscope.study.ray_runner`);
    this process still writes every row.
    """
    path = check_results_target(results_path)
    check_models(spec.models)
    with results_lock(path):
        if path != Path(results_path):  # a folder: results.jsonl and spec.json inside it
            claim_folder(path.parent, _spec_json(spec))
        done = read_results_file(path).done_ids(retry_errors)
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
            new_rows = []
            for point in todo:
                row = point_row(point, spec.name, cache, run_point_fn, env)
                append_row(path, row)
                new_rows.append(row)
                bar.set_postfix_str(f"{row['status']} {point.config['strategy']}")
                bar.update(1)
        bar.close()
    return new_rows


def _spec_json(spec: StudySpec) -> dict[str, Any]:
    out = asdict(spec)
    out["rates"] = ["inf" if math.isinf(r) else r for r in spec.rates]
    return out
