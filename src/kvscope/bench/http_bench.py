"""``kvscope bench serve``: vLLM's serving benchmark against any OpenAI-compatible server.

Builds a workload with kvscope's own builders (ShareGPT, prompts of random lengths cut from prose,
RULER, a JSONL trace), gives it arrivals from :mod:`kvscope.workload.arrivals`, sends it with
:func:`kvscope.bench.http_driver.run_http_workload`, computes the metrics with the in-process
driver's :func:`kvscope.bench.metrics.serving_metrics`, and returns (and optionally writes) a
result dict whose fields carry the names of vLLM's ``bench serve --save-result`` file: the setup
(``date``, ``backend``, ``model_id``, ``tokenizer_id``, ``num_prompts``, ``request_rate``,
``burstiness``, ``max_concurrency``), the metrics (``completed``, ``request_throughput``,
``mean_ttft_ms``, ...) and the per-request lists (``input_lens``, ``output_lens``, ``ttfts``,
``itls``, ``latencies``, ``queue_times``, ``generated_texts``, ``errors``; seconds, and "" for no
error, as vLLM writes them). kvscope's own fields are listed in :data:`KVSCOPE_FIELDS`.

Prompt lengths (``input_lens``) are the workload's own token counts, by the tokenizer of
``tokenizer`` (a kvscope model name; it should be the model the server runs); a trace whose text
prompts give none, with no tokenizer available, falls back to the server's ``usage.prompt_tokens``.
"""
from __future__ import annotations

import asyncio
import json
import math
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvscope.bench.endpoints import CHAT, COMPLETIONS, check_base_url, check_endpoint
from kvscope.bench.metrics import DEFAULT_PERCENTILES, serving_metrics
from kvscope.errors import ConfigError, KVScopeError
from kvscope.models.registry import DEFAULT_MODEL
from kvscope.models.tokenizer import Tokenizer
from kvscope.workload.arrivals import gamma_arrivals
from kvscope.workload.requests import WorkloadRequest, read_trace, uniform_length_requests, with_arrivals

if TYPE_CHECKING:
    from kvscope.bench.http_driver import HttpRun

DATASETS = ("sharegpt", "random", "ruler", "trace")
DEFAULT_NUM_PROMPTS = {"sharegpt": 1000, "random": 1000, "ruler": 20}  # vLLM's 1000; RULER prompts are long
#: Fields of the result that vLLM's file does not have.
KVSCOPE_FIELDS = ("base_url", "endpoint", "dataset", "seed", "max_duration_s", "request_timeout_s",
                  "deadline_reached", "goodput", "server_input_lens", "ruler", "client_processes")


@dataclass
class BenchServeConfig:
    """Arguments of ``kvscope bench serve`` (vLLM's names where vLLM has the option).

    ``num_prompts`` None: :data:`DEFAULT_NUM_PROMPTS`, or every row of a trace. ``request_rate``
    None: all at once (``inf``), except for a trace, which then keeps its own arrival times.
    ``goodput``: SLOs in ms (``{"ttft": 500, "tpot": 50}``). ``client_processes``: send from this
    many processes (:mod:`kvscope.bench.client_processes`), so that one client's CPU does not spread
    the arrivals of a burst.
    """

    base_url: str
    model: str | None = None
    endpoint: str = COMPLETIONS
    dataset: str = "sharegpt"
    trace: str | None = None
    num_prompts: int | None = None
    request_rate: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    ruler_task: str = "niah_single_1"
    ruler_length: int = 4096
    tokenizer: str = DEFAULT_MODEL
    goodput: dict[str, float] = field(default_factory=dict)
    metric_percentiles: list[float] = field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    result_file: str | None = None
    max_duration_s: float = 600.0
    request_timeout_s: float = 300.0
    seed: int = 0
    allow_remote: bool = False
    disable_tqdm: bool = False
    client_processes: int = 1


def _check(cfg: BenchServeConfig) -> None:
    """:class:`ConfigError` naming the option of the first value out of range."""
    def number(flag: str, value: Any, low: float, inclusive: bool = False, finite: bool = True) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value >= low if inclusive else value > low) and (math.isfinite(value) or not finite)
        if not ok:
            raise ConfigError(f"{flag}: must be a number {'>=' if inclusive else '>'} {low:g}, got {value!r}")

    if cfg.dataset not in DATASETS:
        raise ConfigError(f"--dataset: must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    if isinstance(cfg.client_processes, bool) or not isinstance(cfg.client_processes, int) or cfg.client_processes < 1:
        raise ConfigError(f"--client-processes: must be an integer >= 1, got {cfg.client_processes!r}")
    for flag, value in (("--num-prompts", cfg.num_prompts), ("--max-concurrency", cfg.max_concurrency)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{flag}: must be an integer >= 1, got {value!r}")
    if cfg.request_rate is not None:
        number("--request-rate", cfg.request_rate, 0, finite=False)
    number("--burstiness", cfg.burstiness, 0)
    number("--max-duration-s", cfg.max_duration_s, 0)
    number("--request-timeout-s", cfg.request_timeout_s, 0)
    for flag, value in (("--random-input-len", cfg.random_input_len), ("--random-output-len", cfg.random_output_len)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag}: must be an integer >= 1, got {value!r}")
    if not 0 <= cfg.random_range_ratio < 1:
        raise ConfigError(f"--random-range-ratio: must be in [0, 1), got {cfg.random_range_ratio!r}")


def _tokenizer(cfg: BenchServeConfig) -> Tokenizer | None:
    from kvscope.models.loader import load_tokenizer

    try:
        return load_tokenizer(cfg.tokenizer)
    except KVScopeError as e:
        if cfg.dataset != "trace":
            raise ConfigError(f"--tokenizer: the {cfg.dataset} dataset needs a tokenizer: {e}") from None
        print(f"kvscope: no tokenizer ({e}); prompt lengths of text prompts come from the server's usage",
              file=sys.stderr)
        return None


def build_requests(cfg: BenchServeConfig, tok: Tokenizer | None) -> tuple[list[WorkloadRequest], list[dict] | None]:
    """The workload of ``cfg`` (arrivals not yet drawn) and, for RULER, its samples; ``tok`` may be
    None for a trace only."""
    if cfg.dataset == "trace":
        if not cfg.trace:
            raise ConfigError("--trace: the trace dataset needs a JSONL file (--trace FILE)")
        return read_trace(cfg.trace)[: cfg.num_prompts], None
    n = cfg.num_prompts or DEFAULT_NUM_PROMPTS[cfg.dataset]
    if tok is None:
        raise ConfigError(f"--tokenizer: the {cfg.dataset} dataset needs a tokenizer")
    if cfg.dataset == "sharegpt":
        from kvscope.workload.sharegpt import sharegpt_requests

        return sharegpt_requests(tok, n, seed=cfg.seed, output_len=cfg.sharegpt_output_len), None
    if cfg.dataset == "random":
        return uniform_length_requests(tok, n, cfg.random_input_len, cfg.random_output_len, cfg.random_range_ratio,
                                       seed=cfg.seed), None
    from kvscope.workload.ruler import ruler_samples

    # RULER's seed is 42; kvscope studies use 42 + seed, and so does this, so the samples are the same.
    samples = ruler_samples(cfg.ruler_task, cfg.ruler_length, tok, num_samples=n, seed=42 + cfg.seed)
    return [WorkloadRequest(s["input"], int(s["tokens_to_generate"]), prompt_len=s["length"]) for s in samples], samples


def _arrivals(cfg: BenchServeConfig, requests: list[WorkloadRequest]) -> list[WorkloadRequest]:
    if cfg.dataset == "trace" and cfg.request_rate is None:
        return requests
    rate = math.inf if cfg.request_rate is None else cfg.request_rate
    return with_arrivals(requests, gamma_arrivals(len(requests), rate, cfg.burstiness, seed=cfg.seed))


def with_prompt_lens(requests: list[WorkloadRequest], tok: Tokenizer | None, endpoint: str) -> list[WorkloadRequest]:
    """Known prompt lengths, and text for the chat endpoint (it takes no token ids)."""
    out = []
    for r in requests:
        if endpoint == CHAT and not isinstance(r.prompt, str):
            if tok is None:
                raise ConfigError("--endpoint: /v1/chat/completions needs text prompts; this workload has token ids "
                                  "and no tokenizer to decode them (--tokenizer)")
            r = replace(r, prompt=tok.decode(r.prompt))
        if r.prompt_len is None and tok is not None:
            r = replace(r, prompt_len=len(tok.encode(r.prompt)))
        out.append(r)
    return out


def ruler_scores(samples: list[dict[str, Any]], texts: list[str], failed: list[bool]) -> dict[str, Any]:
    """RULER accuracy of generated ``texts`` (one per sample; a failed request scores 0), as
    :func:`kvscope.bench.quality.ruler_accuracy` reports it."""
    from collections import defaultdict

    from kvscope.workload.ruler_scoring import score_prediction

    by_task: dict[str, list[float]] = defaultdict(list)
    for s, text, bad in zip(samples, texts, failed):
        by_task[s["task"]].append(0.0 if bad else score_prediction(s["task"], text, s["outputs"]))

    def summary(v: list[float]) -> dict[str, Any]:
        acc = sum(v) / len(v)
        return {"accuracy": acc, "score": round(100 * acc, 2), "num_samples": len(v)}

    scores = [x for v in by_task.values() for x in v]
    return {**summary(scores), "per_task": {t: summary(v) for t, v in by_task.items()}, "failed": sum(failed)}


def result_dict(cfg: BenchServeConfig, model: str, run: HttpRun, metrics: dict[str, Any]) -> dict[str, Any]:
    """vLLM's result file fields for ``run`` (see the module docstring), plus :data:`KVSCOPE_FIELDS`."""
    recs = run.records
    ok = [r.success for r in recs]
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if cfg.endpoint == CHAT else "openai",
        "backend": "openai-chat" if cfg.endpoint == CHAT else "openai",
        "label": None,
        "model_id": model,
        "tokenizer_id": cfg.tokenizer,
        "num_prompts": len(recs),
        "request_rate": "inf" if cfg.request_rate is None or math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        **metrics,
        "input_lens": [r.prompt_len for r in recs],
        "output_lens": [r.output_len if good else 0 for r, good in zip(recs, ok)],
        "ttfts": [r.token_times[0] - r.arrival_time if good else 0.0 for r, good in zip(recs, ok)],
        "itls": [[b - a for a, b in zip(r.token_times, r.token_times[1:])] if good else [] for r, good in zip(recs, ok)],
        "latencies": [r.token_times[-1] - r.arrival_time if good else 0.0 for r, good in zip(recs, ok)],
        "queue_times": run.queue_times,
        "generated_texts": run.texts,
        "errors": [r.error or "" for r in recs],
        "base_url": cfg.base_url,
        "endpoint": cfg.endpoint,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "max_duration_s": cfg.max_duration_s,
        "request_timeout_s": cfg.request_timeout_s,
        "deadline_reached": run.deadline_reached,
        "goodput": cfg.goodput or None,
        "server_input_lens": run.server_prompt_tokens,
        "client_processes": cfg.client_processes,
    }


def bench_serve(cfg: BenchServeConfig) -> dict[str, Any]:
    """Run the benchmark of ``cfg`` and return its result dict (written to ``result_file`` if set)."""
    # Imported here: they need aiohttp, an optional dependency the rest of this module does without.
    from kvscope.bench.http_client import first_model_id
    from kvscope.bench.http_driver import run_http_workload

    base_url = check_base_url(cfg.base_url, cfg.allow_remote)
    check_endpoint(cfg.endpoint)
    _check(cfg)
    tok = _tokenizer(cfg)
    requests, samples = build_requests(cfg, tok)
    requests = with_prompt_lens(_arrivals(cfg, requests), tok, cfg.endpoint)
    model = cfg.model or asyncio.run(first_model_id(base_url))
    kwargs = {"endpoint": cfg.endpoint, "max_concurrency": cfg.max_concurrency, "max_duration_s": cfg.max_duration_s,
              "request_timeout_s": cfg.request_timeout_s, "use_tqdm": not cfg.disable_tqdm}
    if cfg.client_processes > 1:
        from kvscope.bench.client_processes import ClientProcesses

        with ClientProcesses(cfg.client_processes) as clients:
            run = clients.run(base_url, requests, model, **kwargs)
    else:
        run = run_http_workload(base_url, requests, model, **kwargs)
    metrics = serving_metrics(run.records, goodput=cfg.goodput or None, percentiles=cfg.metric_percentiles)
    result = result_dict(cfg, model, run, metrics)
    if samples is not None:
        result["ruler"] = ruler_scores(samples, run.texts, [not r.success for r in run.records])
    if cfg.result_file:
        path = Path(cfg.result_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A short table of ``result`` in the layout of vLLM's printout."""
    def row(label: str, key: str, fmt: str = "{:.2f}") -> str:
        v = result.get(key)
        return f"{label:<40}{'-' if v is None else fmt.format(v)}"

    lines = ["{:=^60}".format(" Serving Benchmark Result "),
             row("Successful requests:", "completed", "{}"), row("Failed requests:", "failed", "{}"),
             row("Benchmark duration (s):", "duration"), row("Total input tokens:", "total_input_tokens", "{}"),
             row("Total generated tokens:", "total_output_tokens", "{}"),
             row("Request throughput (req/s):", "request_throughput"),
             row("Request goodput (req/s):", "request_goodput"),
             row("Output token throughput (tok/s):", "output_throughput"),
             row("Total token throughput (tok/s):", "total_token_throughput")]
    for metric, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                          ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{:-^60}".format(title))
        for key in [k for k in result if k.endswith(f"_{metric}_ms") and not k.startswith("std_")]:
            name = key.removesuffix(f"_{metric}_ms").replace("median", "Median").replace("mean", "Mean")
            lines.append(row(f"{name.upper() if name.startswith('p') else name} {metric.upper()} (ms):", key))
    if "ruler" in result:
        lines.append(f"{'RULER accuracy:':<40}{result['ruler']['accuracy']:.3f}")
    errors = sorted({e for e in result["errors"] if e})
    lines.append("=" * 60)
    lines += [f"error: {e}" for e in errors[:5]]
    return lines
