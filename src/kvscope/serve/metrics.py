"""Prometheus metrics of one server, on a private :class:`CollectorRegistry` (several apps can live in
one process, as the tests build them).

Two sources, every series labelled ``model_name`` as vLLM labels its own:

- Per request, observed as outputs arrive (:class:`ServerMetrics` is the engine's step observer:
  on the engine thread, or on the event loop with an engine process): token counters,
  finished-request counts, latency histograms, with vLLM's names.
- The engine's own counters, read at scrape time from the newest ``engine.stats()`` snapshot
  (:class:`EngineStatsCollector`): running/waiting requests, KV usage, preemptions, and kvscope's
  strategy counters (evictions, host transfers, adaptive decisions) under ``kvscope:``. A key the
  strategy does not report is simply not exported.

With several front-end processes (``--api-server-count``), prometheus_client's multiprocess mode
writes each front end's per-request series to files in ``PROMETHEUS_MULTIPROC_DIR`` (which must be
set before prometheus_client is first imported), and any front end's ``/metrics`` sums them over
all front ends; the engine's series come from its own newest snapshot (every front end gets the
core's stats), so they appear once, not once per front end.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from kvscope.engine.outputs import RequestOutput
from kvscope.errors import ConfigError
from kvscope.serve.engine_api import TURN_BUCKETS

# vLLM's buckets (vllm/v1/metrics/buckets.py).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]

#: engine.stats() key -> (cumulative counter name without ``_total``, help, scale).
STAT_COUNTERS: dict[str, tuple[str, str, float]] = {
    "num_preemptions": ("vllm:num_preemptions", "Preemptions (recompute and swap)", 1.0),
    "prefix_cache_queried_tokens": ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", 1.0),
    "prefix_cache_hit_tokens": ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", 1.0),
    "num_swap_preemptions": ("kvscope:swap_preemptions", "Preemptions that swapped KV to the host", 1.0),
    "num_steps": ("kvscope:engine_steps", "Engine steps run", 1.0),
    "num_computed_tokens": ("kvscope:computed_tokens", "Tokens run through the model (recomputes included)", 1.0),
    "cuda_graph_replays": ("kvscope:cuda_graph_replays", "Decode steps replayed from CUDA graphs", 1.0),
    "piecewise_graph_replays": ("kvscope:piecewise_graph_replays", "Prefill and mixed steps replayed from piecewise CUDA graphs", 1.0),
    "num_evictions": ("kvscope:evictions", "Eviction events of an evicting strategy", 1.0),
    "evicted_tokens": ("kvscope:evicted_tokens", "KV entries evicted (token x layer x head)", 1.0),
    "freed_blocks": ("kvscope:freed_blocks", "KV blocks freed by eviction", 1.0),
    "host_evicted_tokens": ("kvscope:host_evicted_tokens", "KV entries evicted from the host pool", 1.0),
    "cow_copies": ("kvscope:cow_copies", "Copy-on-write block copies", 1.0),
    "swapped_out_bytes": ("kvscope:swapped_out_bytes", "KV bytes swapped device -> host", 1.0),
    "swapped_in_bytes": ("kvscope:swapped_in_bytes", "KV bytes swapped host -> device", 1.0),
    "transfer_bytes_h2d": ("kvscope:transfer_h2d_bytes", "KV bytes fetched host -> device (PCIe)", 1.0),
    "transfer_bytes_d2h": ("kvscope:transfer_d2h_bytes", "KV bytes written device -> host (PCIe)", 1.0),
    "transfer_wait_ms": ("kvscope:transfer_wait_seconds", "Time steps waited for host transfers", 1e-3),
    # The engine core's loop (engine process only: kvscope.serve.engine_core.LoopTimes).
    "core_admit_seconds": ("kvscope:engine_core_admit_seconds", "Engine core time taking and applying the front "
                           "ends' commands (adds, aborts)", 1.0),
    "core_step_seconds": ("kvscope:engine_core_step_seconds", "Engine core time in engine steps", 1.0),
    "core_output_seconds": ("kvscope:engine_core_output_seconds", "Engine core time building and queueing each "
                            "turn's messages to the front ends", 1.0),
}

#: engine.stats() key -> (gauge name, help).
STAT_GAUGES: dict[str, tuple[str, str]] = {
    "num_running": ("vllm:num_requests_running", "Requests in the running batch"),
    "num_waiting": ("vllm:num_requests_waiting", "Requests waiting to be scheduled"),
    "kv_bytes_reserved": ("kvscope:kv_bytes_reserved", "Device KV pool size, bytes"),
    "kv_bytes_allocated": ("kvscope:kv_bytes_allocated", "Device KV held by requests (whole blocks/slabs), bytes"),
    "kv_bytes_used": ("kvscope:kv_bytes_used", "Device KV holding tokens, bytes"),
    "internal_fragmentation": ("kvscope:kv_internal_fragmentation", "1 - used / allocated device KV"),
    "blocks_used": ("kvscope:kv_blocks_used", "Device KV blocks held"),
    "blocks_free": ("kvscope:kv_blocks_free", "Device KV blocks free"),
    "host_kv_bytes_reserved": ("kvscope:host_kv_bytes_reserved", "Host KV pool size, bytes"),
    "host_kv_bytes": ("kvscope:host_kv_bytes", "KV held in host memory, bytes"),
    "peak_kv_bytes_used": ("kvscope:peak_kv_bytes_used", "Peak device KV holding tokens, bytes"),
}

#: ``adaptive`` strategy decision counters: stats key ``adaptive_<decision>``.
ADAPTIVE_DECISIONS = ("admitted_full", "admitted_long_length", "admitted_long_pressure",
                      "compressed_under_pressure", "offloaded_under_pressure", "relieved")


def _token_buckets(max_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_len`` (vLLM's ``build_1_2_5_buckets``)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return out
            out.append(float(m * scale))
        scale *= 10


class EngineStatsCollector(Collector):
    """Exports the newest ``engine.stats()`` snapshot at scrape time (see the module docstring)."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]], in_flight: Callable[[], int]) -> None:
        self._model = model_name
        self._stats = stats
        self._in_flight = in_flight

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([self._model], value)
        return g

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        reserved = stats.get("kv_bytes_reserved", 0)
        # vLLM's name, as a fraction in [0, 1] like vLLM's. kvscope counts the device pool's bytes
        # that hold tokens: for strategies whose device KV is a staging area (offload, infinigen)
        # whole blocks would read as always full; kvscope:kv_bytes_allocated gives vLLM's block view.
        yield self._gauge("vllm:kv_cache_usage_perc", "Fraction of the device KV pool holding tokens",
                          stats.get("kv_bytes_used", 0) / reserved if reserved else 0.0)
        yield self._gauge("kvscope:num_requests_in_flight", "Requests admitted by the server and not yet finished",
                          self._in_flight())
        for key, (name, doc) in STAT_GAUGES.items():
            if key in stats:
                yield self._gauge(name, doc, stats[key])
        for key, (name, doc, scale) in STAT_COUNTERS.items():
            if key in stats:
                c = CounterMetricFamily(name, doc, labels=["model_name"])
                c.add_metric([self._model], stats[key] * scale)
                yield c
        if "core_turn_buckets" in stats:
            yield self._turns(stats["core_turn_buckets"], stats["core_turn_seconds_sum"])
        decisions = [d for d in ADAPTIVE_DECISIONS if f"adaptive_{d}" in stats]
        if decisions:
            c = CounterMetricFamily("kvscope:adaptive_decisions", "Admission and pressure decisions of `adaptive`",
                                    labels=["model_name", "decision"])
            for d in decisions:
                c.add_metric([self._model, d], stats[f"adaptive_{d}"])
            yield c


    def _turns(self, counts: list[int], total: float) -> HistogramMetricFamily:
        """The engine core's turn lengths (per-bucket counts, the last past every bound) as a
        Prometheus histogram: cumulative counts by upper bound."""
        h = HistogramMetricFamily("kvscope:engine_core_turn_seconds", "Length of the engine core's working turns "
                                  "(commands, step, messages)", labels=["model_name"])
        cumulative, running = [], 0
        for bound, n in zip([*map(str, TURN_BUCKETS), "+Inf"], counts):
            running += n
            cumulative.append((bound, running))
        h.add_metric([self._model], cumulative, total)
        return h


class ServerMetrics:
    """The server's registry; also the engine's step observer (called on one thread only).

    ``multiprocess_dir``: this is one front end of several, whose per-request series are summed
    from the files there (see the module docstring); ``in_flight`` then counts the whole server's.
    """

    def __init__(self, model_name: str, max_model_len: int, stats: Callable[[], dict[str, Any]],
                 in_flight: Callable[[], int], multiprocess_dir: str | None = None) -> None:
        if multiprocess_dir is not None and values.ValueClass is values.MutexValue:
            raise ConfigError("several front ends share their metrics through PROMETHEUS_MULTIPROC_DIR, "
                              "which must be set before prometheus_client is imported")
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: list[float]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Arrival -> first output token", TTFT_BUCKETS)
        # vLLM's older name for the inter-token latency (one observation per output token after the
        # first), kept because dashboards use it; the per-request mean is request_time_per_output_token.
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Time between consecutive output tokens",
                              TPOT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens",
                             TPOT_BUCKETS)
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "Mean time per output token after the first, per request", TPOT_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival -> last output token", LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Arrival -> first scheduled", LATENCY_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds", "First scheduled -> last output token",
                                   LATENCY_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds", "First scheduled -> first output token",
                                 LATENCY_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds", "First -> last output token", LATENCY_BUCKETS)
        token_buckets = _token_buckets(max_model_len)
        self.prompt_len = histogram("vllm:request_prompt_tokens", "Prompt tokens per request", token_buckets)
        self.output_len = histogram("vllm:request_generation_tokens", "Output tokens per request (all n samples)",
                                    token_buckets)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of requests that started generating")
        self.generation_tokens = counter("vllm:generation_tokens", "Output tokens generated")
        self.step_errors = counter("kvscope:engine_step_errors", "Engine steps that raised")
        self._finished = Counter("vllm:request_success", "Requests that ended, by finish reason",
                                 ["model_name", "finished_reason"], registry=self.registry)
        self._rejected = Counter("kvscope:requests_rejected", "Requests refused, by HTTP status",
                                 ["model_name", "status"], registry=self.registry)
        self._queue_full = Counter("vllm:admission_rejections", "Requests refused by a queue limit, by reason",
                                   ["model_name", "reason"], registry=self.registry).labels(
                                       model_name, "max_num_queued_reqs")
        self._model = model_name
        # What /metrics renders: this registry, or every front end's files and the engine's series.
        self._scraped = self.registry
        if multiprocess_dir is not None:
            self._scraped = CollectorRegistry()
            MultiProcessCollector(self._scraped, path=multiprocess_dir)
        self._scraped.register(EngineStatsCollector(model_name, stats, in_flight))
        self._tokens_seen: dict[str, int] = {}  # the observer's thread only

    def render(self) -> bytes:
        return generate_latest(self._scraped)

    def rejected(self, status: int, queue_full: bool) -> None:
        """A request refused with ``status``; ``queue_full``: by ``--max-queue``."""
        self._rejected.labels(self._model, str(status)).inc()
        if queue_full:
            self._queue_full.inc()

    # ---- StepObserver (the engine thread, or the event loop) -----------------------------------
    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        # One counter update per step, not per request: each inc takes a lock, and a step of a
        # large batch has hundreds of outputs.
        prompt = generated = 0
        for out in outputs:
            n = sum(len(c.token_ids) for c in out.outputs)
            seen = self._tokens_seen.get(out.request_id)
            if seen is None:
                prompt += len(out.prompt_token_ids)
                seen = 0
            generated += n - seen
            if out.finished:
                self._tokens_seen.pop(out.request_id, None)
                self._observe_finished(out, n)
            else:
                self._tokens_seen[out.request_id] = n
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generation_tokens.inc(generated)

    def on_removed(self, request_ids: list[str], reason: str) -> None:
        for rid in request_ids:
            self._tokens_seen.pop(rid, None)
            self._finished.labels(self._model, reason).inc()

    def on_step_error(self) -> None:
        self.step_errors.inc()

    def _observe_finished(self, out: RequestOutput, num_output_tokens: int) -> None:
        self._finished.labels(self._model, out.finish_reason or "unknown").inc()
        m = out.metrics
        self.prompt_len.observe(m.num_prompt_tokens)
        self.output_len.observe(num_output_tokens)
        times = m.token_times
        if m.first_scheduled_time is None or not times:
            return
        self.queue.observe(m.first_scheduled_time - m.arrival_time)
        self.ttft.observe(times[0] - m.arrival_time)
        self.e2e.observe(times[-1] - m.arrival_time)
        self.inference.observe(times[-1] - m.first_scheduled_time)
        self.prefill.observe(times[0] - m.first_scheduled_time)
        self.decode.observe(times[-1] - times[0])
        if len(times) > 1:
            self.request_tpot.observe((times[-1] - times[0]) / (len(times) - 1))
        for a, b in zip(times, times[1:]):
            self.tpot.observe(b - a)
            self.itl.observe(b - a)
