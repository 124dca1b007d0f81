"""Analytical cost model: per-strategy memory, step time, latency and throughput predictions.

Units: bytes, seconds, tokens, FLOPs unless a name says otherwise (``_ms`` = milliseconds,
``throughput`` = output tokens/s).

- KV bytes per token: :meth:`ModelConfig.kv_bytes_per_token` in the serving dtype, scaled by
  ``facts.kv_bits / dtype bits`` for a strategy that stores its KV quantized (:meth:`CostModel.token_bytes`).
- Weights: :meth:`ModelConfig.num_params` x dtype size, all read once per step.
- One engine step (:meth:`CostModel.step_seconds`) lasts
  ``layers x overhead + max(HBM bytes / HBM rate, FLOPs / matmul rate) + PCIe bytes / host rate``:
  a roofline over the device's memory and matmul units, plus the engine's fixed per-layer cost
  (the hardware's calibration knob for decode steps replayed from CUDA graphs; the measured eager
  cost for steps with a prefill chunk and every step of a strategy without ``graph_decode``), plus
  the host fetches in full: although the engine fetches one layer ahead,
  ``benchmarks/results/offload_decode.json`` showed ``offload``'s eager step taking paged's step
  plus its whole fetch time, not the larger of the two. ``infinigen`` adds
  ``hardware.speculation_s_per_layer`` per sparse layer.
  HBM bytes = weights + the KV the step's attention reads + the new K/V written; FLOPs =
  2 x matmul parameters x new tokens + 2 x vocab x hidden per logits row + 4 x layers x heads x
  head_dim per (query token, attended token) pair.
- What each strategy reads and holds per request of prompt ``p`` and context ``c``:
  ``paged`` reads ``c`` tokens, holds ``p + output`` rounded up to a block; ``contiguous`` the
  same reads, holds a ``max_model_len`` slab; ``h2o`` at budget ``b`` holds the prompt until its
  first decode step, then ``b x p`` tokens (+1), and reads those; ``offload`` keeps the KV in the
  host pool and fetches all ``c`` tokens over PCIe every step; ``infinigen`` fetches ``b x c``
  tokens in the sparse layers and ``c`` in its dense layers, and reads its on-device partial keys
  (``d' = 0.2 x head_dim`` key columns) for every token. A strategy that selects per step
  (``selects_per_step``, ``quest``) holds what ``paged`` holds plus one page's key bounds per block
  (a min and a max key per block: the bytes of one token's K and V), and reads ``b x c`` tokens
  rounded up to whole blocks (the first and last always among them) plus every block's bounds.
- Tensor parallelism (``limits.tensor_parallel_size`` = N, :mod:`kvscope.advise.parallel`): every
  figure above is one rank's (layer weights, KV bytes per token, layer and attention FLOPs divided
  by N; embedding and LM head whole), and a step adds two ring all-reduces per layer of its hidden
  states. Steps replay CUDA graphs (or run eagerly) as on one device: every rank captures its own,
  the all-reduces inside them. ``kv_memory`` and the pool are per rank, so the pool holds N times
  the tokens.
- Capacity: the pool (device KV memory, or the host pool for the offloading strategies) divided by
  what a request holds; latencies come from replaying the scheduler with these step times
  (:mod:`kvscope.advise.simulate`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kvscope.advise.hardware import Hardware
from kvscope.advise.options import StrategyOption
from kvscope.advise.parallel import TensorParallelTerm
from kvscope.advise.quality import QualityEstimate, quality
from kvscope.advise.simulate import EngineLimits, SimRequest, StepWork, percentile, simulate
from kvscope.advise.workload import Workload
from kvscope.config import parse_dtype
from kvscope.errors import ConfigError
from kvscope.models.config import ModelConfig

BLOCK_SIZE = 16  # paged block size: pool space is handed out in blocks of this many tokens
# The engine's defaults: KV pool = this fraction of the memory left after the weights; host KV
# allowance of the offloading strategies (EngineConfig.swap_space_bytes).
KV_MEMORY_FRACTION = 0.9
DEFAULT_HOST_KV_BYTES = 4 << 30
# InfiniGen's defaults (kv/infinigen.py): dense layers fetched whole, partial key columns kept.
INFINIGEN_DENSE_LAYERS = 2
INFINIGEN_PARTIAL_RATIO = 0.2


def _blocks(tokens: int) -> int:
    """``tokens`` rounded up to whole blocks (tokens)."""
    return -(-tokens // BLOCK_SIZE) * BLOCK_SIZE


@dataclass(frozen=True)
class Prediction:
    """The cost model's prediction for one strategy on one workload.

    ``feasible`` is False when the strategy cannot serve the workload at all (``problem`` says
    why); latencies are milliseconds, throughputs per second, memory in bytes.
    """

    strategy: str
    family: str
    budget_ratio: float | None
    feasible: bool
    problem: str | None
    output_throughput: float
    request_throughput: float
    mean_ttft_ms: float
    p90_ttft_ms: float
    mean_tpot_ms: float
    p90_tpot_ms: float
    mean_e2el_ms: float
    kv_pool_bytes: int
    host_kv_bytes: int
    peak_kv_bytes: int
    max_concurrent: int
    quality: QualityEstimate

    def metrics(self) -> dict[str, float | int | None]:
        """The numeric fields, quality flattened (``quality_score``, ``ruler_accuracy``)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("strategy", "family", "budget_ratio",
                                                                   "feasible", "problem", "quality")}
        out["quality_score"] = self.quality.score
        out["ruler_accuracy"] = self.quality.ruler_accuracy
        return out


class CostModel:
    """Predictions for ``model`` served on ``hardware``.

    Args:
        model: the model's shapes.
        hardware: rates and memory.
        dtype: serving dtype (default: the hardware's).
        kv_memory: device KV pool: bytes (int), a fraction of the memory left after the weights
            (float in (0, 1]), or None for the engine's default (0.9 of it).
        limits: scheduler limits the engine runs with.
        max_model_len: ``contiguous``'s slab (tokens); None = the longest request of the workload.
    """

    def __init__(self, model: ModelConfig, hardware: Hardware, dtype: str | None = None,
                 kv_memory: int | float | None = None, limits: EngineLimits = EngineLimits(),
                 max_model_len: int | None = None) -> None:
        self.model = model
        self.hw = hardware
        self.dtype = parse_dtype(dtype or hardware.dtype)
        self.elem = self.dtype.itemsize
        self.limits = limits
        self.max_model_len = max_model_len
        self.tp = TensorParallelTerm(model, hardware, limits.tensor_parallel_size, self.elem)
        n = self.tp.size
        # One rank's share (all of it when n = 1): KV heads, layer weights and attention are split.
        self.kv_bytes_per_token = model.kv_bytes_per_token(self.dtype) // n
        self.params = model.num_params()
        # The input embedding is a lookup, not a matmul; the LM head runs only on logits rows.
        self.lm_head_params = model.vocab_size * (model.word_embed_proj_dim or model.hidden_size)
        replicated = self.lm_head_params * (1 if model.tie_word_embeddings else 2)
        self.weight_bytes = int(self.tp.rank_params(self.params, replicated) * self.elem)
        self.matmul_params = (self.params - replicated) / n
        self.attn_flops_per_pair = 4 * model.num_layers * model.num_heads * model.head_dim / n
        self.sparse_layers = max(model.num_layers - INFINIGEN_DENSE_LAYERS, 0)
        self.partial_key_fraction = max(1, int(INFINIGEN_PARTIAL_RATIO * model.head_dim)) / (2 * model.head_dim)
        if isinstance(kv_memory, bool) or (kv_memory is not None and not isinstance(kv_memory, (int, float))):
            raise ConfigError(f"kv_memory: must be bytes or a fraction in (0, 1], got {kv_memory!r}")
        if isinstance(kv_memory, float) and not 0 < kv_memory <= 1:
            raise ConfigError(f"kv_memory: a fraction must be in (0, 1], got {kv_memory!r}")
        if isinstance(kv_memory, int) and kv_memory < 1:
            raise ConfigError(f"kv_memory: must be >= 1 byte, got {kv_memory!r}")
        free = hardware.memory_bytes - self.weight_bytes
        if isinstance(kv_memory, int):
            self.kv_pool_bytes = kv_memory
        else:
            self.kv_pool_bytes = max(0, int((kv_memory or KV_MEMORY_FRACTION) * free))

    # ------------------------------------------------------------------ memory

    def weights_fit(self) -> bool:
        """Whether the weights plus the KV pool fit the device memory."""
        return self.weight_bytes + self.kv_pool_bytes <= self.hw.memory_bytes

    def h2o_budget_tokens(self, option: StrategyOption, prompt_len: int) -> int:
        """Tokens ``h2o`` keeps of a ``prompt_len`` prompt: heavy and recent parts each rounded
        down, as the H2O code does, plus the newest token."""
        half = (option.budget_ratio or 1.0) / 2
        return math.floor(half * prompt_len) * 2 + 1

    def token_bytes(self, option: StrategyOption) -> float:
        """Bytes one token's KV takes under ``option``: the serving dtype's, or ``facts.kv_bits``
        per element (scales amortised) for a quantized cache."""
        bits = option.facts.kv_bits
        return self.kv_bytes_per_token * (bits / (8 * self.elem) if bits is not None else 1.0)

    def pool_tokens(self, option: StrategyOption) -> int:
        """Capacity of the pool a request's KV occupies (tokens): the device pool, or for
        ``offload``/``infinigen`` the host pool, also limited by the device prefetch buffers."""
        if option.selects:  # each block also holds its key bounds, one token's worth
            return self.kv_pool_bytes * BLOCK_SIZE // (self.kv_bytes_per_token * (BLOCK_SIZE + 1))
        if not option.on_host:
            return int(self.kv_pool_bytes // self.token_bytes(option))
        m = self.model
        row = m.num_kv_heads // self.tp.size * m.head_dim * self.elem  # one layer's K (or V) of one token, one rank
        token = self.token_bytes(option)
        resident = token * self.partial_key_fraction if option.sparse_fetch else 0
        serve = int(self.kv_pool_bytes // (resident + 4 * row))
        host = option.host_kv_bytes or min(DEFAULT_HOST_KV_BYTES, self.hw.host_memory_bytes)
        return min(int(host // token), serve)

    def admit_tokens(self, option: StrategyOption, r: SimRequest, slab: int | None = None) -> int:
        """Pool tokens a request must find free to be admitted; ``slab``: ``contiguous``'s slot
        (tokens; default ``max_model_len``, else the request's own length)."""
        if option.facts.reserves_context:
            return _blocks(slab or self.max_model_len or r.prompt_len + r.output_len)
        if option.evicts:
            return _blocks(r.prompt_len)  # the prompt is kept whole until the first decode step
        return _blocks(r.prompt_len + r.output_len)

    def running_tokens(self, option: StrategyOption, r: SimRequest) -> int:
        """Pool tokens a running request holds after a step."""
        if option.evicts and r.generated >= 2:  # evicted down to its budget
            return min(_blocks(r.prompt_len), _blocks(self.h2o_budget_tokens(option, r.prompt_len)))
        return r.held

    # ------------------------------------------------------------------ time

    def decode_traffic(self, option: StrategyOption, context: int, prompt_len: int) -> tuple[float, float]:
        """(tokens read from device KV, tokens fetched over PCIe) for one decode step of a request
        whose cache holds ``context`` tokens including the new one."""
        if option.evicts:
            return min(context, self.h2o_budget_tokens(option, prompt_len)), 0.0
        if option.selects:
            pages = -(-context // BLOCK_SIZE)
            keep = min(pages, max(2, math.ceil((option.budget_ratio or 1.0) * context / BLOCK_SIZE)))
            return min(context, keep * BLOCK_SIZE) + self.metadata_tokens(option, context), 0.0
        if option.on_host and not option.sparse_fetch:
            return context, context
        if option.sparse_fetch:
            dense = min(INFINIGEN_DENSE_LAYERS, self.model.num_layers) / self.model.num_layers
            fetched = dense * context + (1 - dense) * math.ceil((option.budget_ratio or 1.0) * context)
            return fetched + self.metadata_tokens(option, context), fetched
        return context, 0.0

    def metadata_tokens(self, option: StrategyOption, context: int) -> float:
        """What a decode step reads to choose its tokens, in tokens' worth of K/V: InfiniGen's
        partial keys of every token, a selecting strategy's key bounds of every block; else 0."""
        if option.sparse_fetch:
            return self.partial_key_fraction * context
        if option.selects:
            return -(-context // BLOCK_SIZE)
        return 0.0

    def step_seconds(self, option: StrategyOption, work: StepWork) -> float:
        """Duration of one engine step (seconds) under ``option``."""
        new_tokens = len(work.decodes) + sum(n for _, n in work.prefills)
        logits_rows = len(work.decodes) + sum(r.computed + n >= r.prompt_len for r, n in work.prefills)
        device_read = pcie = pairs = 0.0
        for r in work.decodes:
            read, fetched = self.decode_traffic(option, r.context + 1, r.prompt_len)
            device_read += read
            pcie += fetched
            pairs += read - self.metadata_tokens(option, r.context + 1)
        for r, n in work.prefills:
            device_read += r.computed  # earlier chunks of the prompt, read by this chunk's attention
            if option.on_host:
                pcie += r.computed  # prefill chunks fetch everything
            pairs += n * (r.computed + (n + 1) / 2)
        token = self.token_bytes(option)
        hbm = self.weight_bytes + token * (device_read + new_tokens)
        flops = (2 * self.matmul_params * new_tokens + 2 * self.lm_head_params * logits_rows
                 + self.attn_flops_per_pair * pairs)
        device = max(hbm / self.hw.hbm_bytes_per_s, flops / self.hw.matmul_flops_per_s)
        fetch = pcie * token / self.hw.host_device_bytes_per_s
        # The engine replays decode-only steps from CUDA graphs; a step with a prefill chunk, and
        # every step of a strategy that captures none (graph_decode False), runs eagerly.
        # Under tensor parallelism each rank captures and replays the same steps (its all-reduces
        # inside the graphs), so the rule is the same at every N.
        eager = bool(work.prefills) or not option.facts.graph_decode
        per_layer = self.hw.eager_step_overhead_s_per_layer if eager else self.hw.step_overhead_s_per_layer
        fixed = self.model.num_layers * per_layer
        if option.sparse_fetch and work.decodes:
            fixed += self.sparse_layers * self.hw.speculation_s_per_layer
        return fixed + device + fetch + self.tp.step_comm_seconds(new_tokens)

    def decode_step_seconds(self, option: StrategyOption, batch: int, context: int) -> float:
        """One decode step of ``batch`` requests whose caches hold ``context`` tokens each
        (prompt = context for ``h2o``'s budget)."""
        # A request that has just sampled its first token after a prompt of context - 1 tokens.
        reqs = [SimRequest(0.0, context - 1, 2, computed=context - 1, generated=1) for _ in range(batch)]
        return self.step_seconds(option, StepWork(reqs, []))

    # ------------------------------------------------------------------ prediction

    def predict(self, option: StrategyOption, workload: Workload) -> Prediction:
        """Replay ``workload`` under ``option`` and summarise latencies, throughput and memory."""
        pool = self.pool_tokens(option)
        q = quality(option.family, option.budget_ratio, option.facts.lossless, self.model.name)
        problem = None
        if not self.weights_fit():
            problem = (f"weights ({self.weight_bytes / 2**30:.1f} GiB) + KV pool ({self.kv_pool_bytes / 2**30:.1f}"
                       f" GiB) exceed the device memory ({self.hw.memory_bytes / 2**30:.1f} GiB)")
        elif pool <= 0:
            problem = "no memory left for KV after the weights"
        mean_req = SimRequest(0.0, round(sum(workload.prompt_lens) / workload.num_requests),
                              round(sum(workload.output_lens) / workload.num_requests))
        host = round(pool * self.token_bytes(option)) if option.on_host else 0
        longest = max(p + o for p, o in zip(workload.prompt_lens, workload.output_lens))
        slab = self.max_model_len or longest
        if problem is None:
            sim = simulate(workload, pool, self.limits, lambda r: self.admit_tokens(option, r, slab),
                           lambda r: self.running_tokens(option, r), lambda w: self.step_seconds(option, w))
            if sim.failed:
                problem = (f"{sim.failed} of {workload.num_requests} requests do not fit the KV pool "
                           f"({pool} tokens; the longest request needs {longest})")
        if problem is not None:
            nan = math.nan
            return Prediction(option.spec, option.family, option.budget_ratio, False, problem, 0.0, 0.0, nan, nan,
                              nan, nan, nan, self.kv_pool_bytes, host, 0, 0, q)
        per_req = self.admit_tokens(option, mean_req, slab)
        if option.evicts:
            per_req = self.running_tokens(option, SimRequest(0.0, mean_req.prompt_len, 2, generated=2))
        capacity = min(self.limits.max_num_seqs, pool // max(per_req, 1))
        device_peak = 0 if option.on_host else round(sim.peak_held_tokens * self.token_bytes(option))
        if option.selects:
            device_peak += -(-sim.peak_held_tokens // BLOCK_SIZE) * self.kv_bytes_per_token  # the key bounds
        ms = 1e3
        return Prediction(
            option.spec, option.family, option.budget_ratio, True, None,
            output_throughput=sim.output_tokens / sim.duration,
            request_throughput=len(sim.ttft) / sim.duration,
            mean_ttft_ms=ms * sum(sim.ttft) / len(sim.ttft),
            p90_ttft_ms=ms * percentile(sim.ttft, 90),
            mean_tpot_ms=ms * sum(sim.tpot) / len(sim.tpot) if sim.tpot else math.nan,
            p90_tpot_ms=ms * percentile(sim.tpot, 90),
            mean_e2el_ms=ms * sum(sim.e2el) / len(sim.e2el),
            kv_pool_bytes=self.kv_pool_bytes,
            host_kv_bytes=host,
            peak_kv_bytes=device_peak,
            max_concurrent=capacity,
            quality=q,
        )
