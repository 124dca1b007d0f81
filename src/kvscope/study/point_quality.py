"""Quality of a study point, and what the points of one run share (:class:`PointCache`).

Quality metrics run on fresh engines, one sequence at a time, and are computed once per run for
what they depend on (:func:`point_quality`); a ``mixed`` workload's quality is scored on the serving
run's own outputs (:func:`mixed_quality`), and token agreement compares served tokens with full
paged KV's (:func:`agreement`). External systems (``study/external.py``) use the same functions.
"""
from __future__ import annotations

import gc
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvscope.bench import quality
from kvscope.config import EngineConfig
from kvscope.constants import FULL_KV_STRATEGY
from kvscope.kv import registry
from kvscope.llm import LLM
from kvscope.models.loader import DUMMY_PREFIX, LoadedModel, load_model
from kvscope.sampling_params import SamplingParams
from kvscope.study.point_workload import workload_ruler_samples
from kvscope.study.relative_rates import group_key
from kvscope.study.spec import Point
from kvscope.workload.mixed import MixedWorkload
from kvscope.workload.ruler_scoring import score_prediction
from kvscope.workload.text import token_sequences


class RecordingEngine:
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


def mixed_quality(point: Point, cache: PointCache, mixed: MixedWorkload, samples: list[dict[str, Any]],
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
    out["agreement"] = agreement(point, cache, [mixed.requests[i] for i in shorts],
                                  [outputs.get(str(i), ([], ""))[0] for i in shorts])
    return out


def agreement(point: Point, cache: PointCache, requests: list, served: list[list[int]],
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
    ref = cached(cache.quality, {**{k: cfg[k] for k in keys}, "q": "served_reference"}, point, reference)
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
    the id of the point that computed it (see :func:`point_quality`). ``warmed``: the measurement
    groups (:func:`~kvscope.study.relative_rates.group_key`) this process has warmed up (see
    :func:`first_in_group`).
    """

    quality: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Offline throughput per configuration group, the basis of relative rates (study.relative_rates).
    offline: dict[str, dict[str, Any]] = field(default_factory=dict)
    warmed: set[str] = field(default_factory=set)

    def first_in_group(self, cfg: dict[str, Any]) -> bool:
        """Whether ``cfg`` is the first point of its measurement group (everything but the arrival
        process) this process runs; it is recorded as warmed. What a warm-up leaves behind is
        process-wide (compiled and autotuned kernels, cuBLAS state: the engine and its allocator
        cache are rebuilt for the timed run anyway), and a group's points run the same requests,
        so only its first needs one."""
        key = group_key(cfg)
        if key in self.warmed:
            return False
        self.warmed.add(key)
        return True
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


def cached(cache: dict[str, dict[str, Any]], key: dict[str, Any], point: Point,
            compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` once per ``key``; later points get the same values plus ``reused_from``, the id
    of the point that computed them."""
    k = json.dumps(key, sort_keys=True, default=str)
    if k not in cache:
        cache[k] = {**compute(), "computed_by": point.id}
    values = dict(cache[k])
    computed_by = values.pop("computed_by")
    return values if computed_by == point.id else {**values, "reused_from": computed_by}


def pool_independent(strategy: str) -> bool:
    """Whether what a lone sequence sees under ``strategy`` cannot depend on the KV pool's size:
    true of lossless strategies and of the budget-driven eviction policies, which keep what their
    budget says whatever the pool holds. A strategy that drops tokens under memory pressure (a full
    pool) is not, and its quality is measured per pool."""
    return registry.facts(strategy).pool_independent


def point_quality(point: Point, cache: PointCache) -> dict[str, Any]:
    """Quality metrics of the point's strategy, computed once per run for what they depend on.

    Each metric runs on a fresh engine (no prefix cache or random state left by the serving run),
    one sequence at a time, so it depends neither on the arrival process (rate, burstiness) nor,
    for perplexity, on the workload; nor on the KV pool when :func:`pool_independent` (a lone
    sequence is never preempted, so the pool only decides whether it fits). Points that share the
    rest of the key get the values with ``reused_from`` naming the point that computed them.
    """
    cfg, q = point.config, point.config["quality"]
    keys = ["model", "strategy", "seed", "device", "dtype", "max_model_len", "engine"]
    if not pool_independent(cfg["strategy"]):
        keys.append("kv_memory")
    base = {k: cfg[k] for k in keys}
    out: dict[str, Any] = {}
    if q["perplexity"]:
        def ppl() -> dict[str, Any]:
            llm = cache.llm(cfg)
            seqs = token_sequences(llm.tokenizer, q["perplexity_sequences"], q["perplexity_len"])
            res = quality.perplexity(llm, seqs, prefix=q["perplexity_prefix"])
            return {k: res[k] for k in ("perplexity", "mean_nll", "tokens_scored", "num_sequences", "prefix")}

        out["perplexity"] = cached(cache.quality, {**base, "q": "ppl", "args": q}, point, ppl)
    w = point.workload
    if q["ruler"] and w.kind == "ruler":
        def ruler() -> dict[str, Any]:
            llm = cache.llm(cfg)
            res = quality.ruler_accuracy(llm, workload_ruler_samples(llm, w, cfg["seed"]), max_tokens=w.output_len)
            return {k: res[k] for k in ("accuracy", "score", "num_samples", "per_task")}

        out["ruler"] = cached(cache.quality, {**base, "q": "ruler", "w": w.to_dict()}, point, ruler)
    return out
