"""External systems in a study: OpenAI-compatible servers measured beside kvscope's strategies.

A spec may list servers under ``systems``::

    systems:
      - name: vllm                          # letters, digits, . _ -; unique
        base_url: http://127.0.0.1:8001/v1  # loopback only, unless allow_remote: true
        model: HuggingFaceTB/SmolLM2-135M-Instruct   # sent in requests; default: first id of GET /v1/models
        tokenizer: smollm2-135m             # which of the study's `models` the server runs; default: the first
        endpoint: /v1/completions           # or /v1/chat/completions
        max_concurrency: 64                 # optional cap on requests in flight
        request_timeout_s: 300              # per request
        max_duration_s: 600                 # per point; requests still running then count as failed

Points: each system gets a point for every kv_memory x workload x rate x burstiness x seed of the
grid, with ``model`` = its ``tokenizer`` model and ``strategy`` = ``"system:<name>"``, so its rows
sit on the same axes as that model's strategy rows. Its ``kv_memory`` names the kvscope pool it
is compared with, not the server's own memory, which the study does not set; a system is measured
once per pool. The requests are those the strategies get (the runner's own workload builders,
with the model's tokenizer, loaded without its weights), sent through
:func:`kvscope.bench.http_driver.run_http_workload` at the point's arrivals, and the metrics are
:func:`kvscope.bench.metrics.serving_metrics` of the records, under the same keys as a strategy
row's (``peak_device_memory_bytes`` / ``peak_host_rss_bytes`` None, ``engine_stats`` empty,
``triton_compiles.timed_run`` None:
the server's engine is not visible through the API).

Quality, from the serving run's completions (``measured_in: "serving run"``):

- ``ruler`` (``quality.ruler`` on a ``ruler`` or ``mixed`` workload): RULER's string-match score of
  each RULER request's text; a failed request scores 0.
- ``agreement`` (``quality.agreement``, or a ``mixed`` workload with ``quality.ruler``, as for a
  strategy; ``/v1/completions`` only, since chat prompts differ from the reference's): the tokens
  against full paged KV's greedy tokens on the same requests, the reference the strategy rows use.
  The API returns text, not token ids, so both sides go through text: the served text and the
  reference's decoded text (special tokens skipped, as servers do) are encoded with the model's
  tokenizer and compared. A server running the same model with full KV agrees exactly.
- ``perplexity`` is not measured: it needs the model's log-probabilities of given text.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

from kvscope.bench.endpoints import COMPLETIONS, check_base_url, check_endpoint
from kvscope.bench.http_bench import ruler_scores, with_prompt_lens
from kvscope.bench.metrics import serving_metrics
from kvscope.models.tokenizer import Tokenizer
from kvscope.study.spec import Point, StudySpec
from kvscope.constants import SYSTEM_PREFIX
from kvscope.study.spec_fields import check_keys, fail, integer, number
from kvscope.workload.arrivals import gamma_arrivals
from kvscope.workload.requests import with_arrivals

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_KEYS = {"name", "base_url", "model", "tokenizer", "endpoint", "max_concurrency", "request_timeout_s",
         "max_duration_s", "allow_remote"}


@dataclass(frozen=True)
class SystemSpec:
    """One external server of a study (see the module docstring for the fields)."""

    name: str
    base_url: str
    tokenizer: str
    model: str | None = None
    endpoint: str = COMPLETIONS
    max_concurrency: int | None = None
    request_timeout_s: float = 300.0
    max_duration_s: float = 600.0
    allow_remote: bool = False


def _positive(value: Any, path: str) -> float:
    if number(value, path) <= 0:
        raise fail(path, f"must be > 0 seconds, got {value!r}")
    return float(value)


def _system(raw: Any, path: str, models: list[str]) -> SystemSpec:
    check_keys(raw, _KEYS, path)
    for key in ("name", "base_url"):
        if key not in raw:
            raise fail(f"{path}.{key}", "is required")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail(f"{path}.name", f"must be letters, digits, '.', '_' or '-', got {name!r}")
    allow_remote = raw.get("allow_remote", False)
    if not isinstance(allow_remote, bool):
        raise fail(f"{path}.allow_remote", f"must be true or false, got {allow_remote!r}")
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise fail(f"{path}.model", f"must be the model name the server knows, got {model!r}")
    tokenizer = raw.get("tokenizer", models[0])
    if tokenizer not in models:
        raise fail(f"{path}.tokenizer", f"must be one of the study's models ({', '.join(models)}), got {tokenizer!r}")
    concurrency = raw.get("max_concurrency")
    return SystemSpec(
        name=name,
        base_url=check_base_url(raw["base_url"], allow_remote, f"{path}.base_url"),
        tokenizer=tokenizer,
        model=model,
        endpoint=check_endpoint(raw.get("endpoint", COMPLETIONS), f"{path}.endpoint"),
        max_concurrency=None if concurrency is None else integer(concurrency, f"{path}.max_concurrency"),
        request_timeout_s=_positive(raw.get("request_timeout_s", 300.0), f"{path}.request_timeout_s"),
        max_duration_s=_positive(raw.get("max_duration_s", 600.0), f"{path}.max_duration_s"),
        allow_remote=allow_remote,
    )


def parse_systems(raw: Any, models: list[str]) -> list[SystemSpec]:
    """Validate a spec's ``systems`` (None: none); :class:`ConfigError` names the field."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise fail("systems", f"must be a list of mappings with name and base_url, got {type(raw).__name__}")
    systems = [_system(s, f"systems[{i}]", models) for i, s in enumerate(raw)]
    names = [s.name for s in systems]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise fail(f"systems[{i}].name", f"{name!r} is listed twice")
    return systems


def system_points(spec: StudySpec, shared: dict[str, Any]) -> list[Point]:
    """The points of ``spec.systems``, in grid order (systems, kv_memory, workloads, rates,
    burstiness, seeds); ``shared`` is the settings every point of the study carries."""
    points = []
    for system, kv, workload, rate, burst, seed in itertools.product(
        spec.systems, spec.kv_memory, spec.workloads, spec.rates, spec.burstiness, spec.seeds
    ):
        config = {k: v for k, v in asdict(system).items() if k not in ("name", "tokenizer")}
        points.append(Point({
            "model": system.tokenizer,
            "strategy": SYSTEM_PREFIX + system.name,
            "system": {"name": system.name, **config},
            "kv_memory": kv,
            "workload": workload.to_dict(),
            "rate": "inf" if isinstance(rate, float) and math.isinf(rate) else rate,  # or relative, "0.5x"
            "burstiness": burst,
            "seed": seed,
            **shared,
        }))
    return points


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str) -> Tokenizer:
    from kvscope.models.loader import load_tokenizer

    return load_tokenizer(model)


def _through_text(tok: Tokenizer) -> Callable[[list[int]], list[int]]:
    """Token ids -> their text (special tokens skipped, as a server detokenizes) -> ids again."""
    return lambda ids: tok.encode(tok.decode(ids), add_special_tokens=False)


def run_system_point(point: Point, cache: Any) -> dict[str, Any]:
    """Run one system point and return its row, with the keys of :func:`kvscope.study.runner.run_point`'s.

    ``cache`` is the run's :class:`~kvscope.study.point_quality.PointCache`: the agreement
    reference (full paged KV) is computed with it once and shared with the strategy rows.
    """
    # Imported here: the HTTP modules need aiohttp, which specs and reports do without; the runner
    # imports this module.
    from kvscope.bench.http_client import first_model_id
    from kvscope.bench.http_driver import run_http_workload
    from kvscope.study.point_workload import mixed_workload, workload_requests
    from kvscope.study.relative_rates import absolute_rate, offline_metrics, rate_basis, relative_row_fields

    cfg, system, w, seed = point.config, point.config["system"], point.workload, point.config["seed"]
    t0 = time.perf_counter()
    tok = _tokenizer(cfg["model"])
    host = SimpleNamespace(tokenizer=tok)  # all that the workload builders read from an LLM
    mixed = mixed_workload(host, w, seed) if w.kind == "mixed" else None
    requests = with_prompt_lens(mixed[0].requests if mixed else workload_requests(host, w, seed), tok,
                                system["endpoint"])
    base_url = check_base_url(system["base_url"], system["allow_remote"], "system.base_url")
    model = system["model"] or asyncio.run(first_model_id(base_url))

    def serve(offsets: list[float]) -> Any:
        return run_http_workload(base_url, with_arrivals(requests, offsets), model, endpoint=system["endpoint"],
                                 max_concurrency=system["max_concurrency"], max_duration_s=system["max_duration_s"],
                                 request_timeout_s=system["request_timeout_s"])

    basis = None
    if point.relative_rate is not None:  # the server's own saturation, measured as a strategy's is
        basis = rate_basis(point, cache.offline, lambda p: offline_metrics(serve([0.0] * len(requests))))
    rate = absolute_rate(point, basis) if basis is not None else point.rate
    offsets = gamma_arrivals(len(requests), rate, cfg["burstiness"], seed=seed)
    t1 = time.perf_counter()
    run = serve(offsets)
    t2 = time.perf_counter()
    metrics = serving_metrics(run.records, goodput=cfg["slos"] or None)
    metrics.update(wall_time_s=run.wall_time_s, peak_device_memory_bytes=None, peak_host_rss_bytes=None)
    errors = sorted({r.error for r in run.records if r.error})
    row = {
        "model_params": None,  # what the server runs is its own business; the report leaves it out of size plots
        "metrics": metrics,
        "timeline_peaks": {},
        "engine_stats": {},
        "request_errors": errors[:5],
        "triton_compiles": {"timed_run": None, "kernels": []},  # another process's kernels: not seen
        "served_model": model,
        "deadline_reached": run.deadline_reached,
    }
    ok = [r.success for r in run.records]
    texts = [t if good else "" for t, good in zip(run.texts, ok)]
    row["quality"] = _quality(point, cache, host, mixed, requests, texts, ok)
    row["phase_s"] = {"setup": t1 - t0, "serve": t2 - t1, "quality": time.perf_counter() - t2}
    if basis is not None:
        row.update(relative_row_fields(point, rate, basis))
    return row


def _quality(point: Point, cache: Any, host: SimpleNamespace, mixed: Any, requests: list, texts: list[str],
             ok: list[bool]) -> dict[str, Any]:
    """RULER accuracy and agreement of a system point from its served texts (module docstring)."""
    from kvscope.study.point_quality import agreement as served_agreement
    from kvscope.study.point_workload import workload_ruler_samples

    cfg, q, w, tok = point.config, point.config["quality"], point.workload, host.tokenizer
    out: dict[str, Any] = {}
    if q["ruler"] and mixed is not None:
        positions = sorted(mixed[0].long_index)
        samples = [mixed[1][mixed[0].long_index[p]] for p in positions]
        out["ruler"] = ruler_scores(samples, [texts[p] for p in positions], [not ok[p] for p in positions])
    elif q["ruler"] and w.kind == "ruler":
        out["ruler"] = ruler_scores(workload_ruler_samples(host, w, cfg["seed"]), texts, [not g for g in ok])
    if "ruler" in out:
        out["ruler"]["measured_in"] = "serving run"
    wants_agreement = q.get("agreement", False) or (mixed is not None and q["ruler"])
    if wants_agreement and cfg["system"]["endpoint"] == COMPLETIONS:
        shorts = mixed[0].short_positions if mixed is not None else list(range(len(requests)))
        served = [tok.encode(texts[i], add_special_tokens=False) for i in shorts]
        agreement = served_agreement(point, cache, [requests[i] for i in shorts], served,
                                      normalize=_through_text(tok))
        out["agreement"] = {**agreement, "method": "text: served text and the reference's decoded text, "
                                                   "both encoded with the model's tokenizer"}
    return out
