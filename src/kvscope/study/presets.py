"""Named study specs: ``quick`` (CPU, minutes), ``h200`` (one H200, speed and memory, about 15 GPU
minutes in chunks), ``h200-quality`` (its quality runs on real weights) and ``paper`` (GPU, the full
grid, for those with days)."""
from __future__ import annotations

from typing import Any

from kvscope.errors import ConfigError
from kvscope.study.spec import StudySpec, parse_spec

# H2O's relatives, each at a 20% budget (H2O's own budgets differ per preset).
_EVICTION_AT_20 = [f"{name}:budget_ratio=0.2" for name in ("streaming", "tova", "snapkv", "knorm", "random")]


def _h2o(budget: float) -> str:
    """H2O at a total budget split evenly between heavy hitters and the recent window, as published."""
    return f"h2o:heavy_ratio={budget / 2:g},recent_ratio={budget / 2:g}"


# One strategy of each kind the study compares, and H2O at 4 budgets: full KV (paged), eviction
# (h2o; snapkv, its relative that compresses the prompt once), host memory (offload), speculative
# fetch (infinigen) and per-request choice (adaptive). contiguous, streaming, tova, knorm and random
# are in the paper preset: each costs the quick study about 30 s (4 points and its perplexity).
_QUICK_STRATEGIES = [
    "paged",
    *[_h2o(b) for b in (0.1, 0.2, 0.4, 0.6)],
    "snapkv:budget_ratio=0.2",
    "offload",
    # 512 calibration tokens instead of InfiniGen's 2048: the skew is computed once per model and
    # cached, but on 2 CPU cores the full calibration alone would take a minute of the budget.
    "infinigen:budget_ratio=0.2,calibration_len=512",
    # Full KV for the ShareGPT requests (prompt + output <= 168 tokens), H2O for the RULER ones (226).
    "adaptive:long_threshold=200",
]

# Sized by measurement with benchmarks/study_quick.py (cold cache, report included, 2 cores, other
# jobs on the machine too): these 36 points took 283 s and 514 s of CPU at a load
# average of 1.3-1.9 (benchmarks/results/study_quick.md); with streaming as well, 40 points took
# 301 s, so it was left out for a margin. A point takes about 6 s at 4 req/s (the arrivals span 4 s)
# and 3-5 s all at once; each strategy's perplexity about 4.5 s.
QUICK: dict[str, Any] = {
    "name": "quick",
    "models": ["smollm2-135m"],
    "strategies": _QUICK_STRATEGIES,
    # One workload that holds both regimes the strategies are for: 16 requests (a goodput interval
    # of about -20% when all meet the SLOs), half of them RULER needle prompts of 210 tokens (the
    # 8 samples RULER accuracy is scored on, as served; length 384, since 512's 332-token prompts
    # cost a third more prefill per point) among ShareGPT requests (whose tokens are compared with
    # full KV's). Separate ShareGPT and RULER workloads of these sizes would cost twice as much.
    # The needle's answer is a 7-digit number: 16 tokens hold it.
    "workloads": [{"type": "mixed", "num_requests": 16, "long_fraction": 0.5, "length": 384, "output_len": 8,
                   "long_output_len": 16, "max_prompt_len": 160}],
    # Near capacity (4 req/s) and a burst (all at once).
    "rates": [4, "inf"],
    # Memory-rich holds every request at full length; constrained (24 MiB = 546 tokens at SmolLM2's
    # 45 KiB/token) holds two RULER requests at full length of the eight, so paged queues them and
    # eviction shows what it frees.
    "kv_memory": ["256MiB", "24MiB"],
    "seeds": [0],
    "device": "cpu",
    "dtype": "float32",
    "max_model_len": 512,
    "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 512},
    "slos": {"ttft_ms": 2000, "tpot_ms": 200},
    # 16 sequences x 32 scored tokens = 512, decoded as one batch of 16 (32 steps).
    "quality": {"perplexity": True, "perplexity_sequences": 16, "perplexity_len": 96, "perplexity_prefix": 64,
                "ruler": True},
}

PAPER: dict[str, Any] = {
    "name": "paper",
    "models": ["dummy:opt-1.3b", "dummy:opt-6.7b", "dummy:opt-13b", "dummy:opt-30b", "smollm2-135m",
               "qwen2.5-0.5b"],
    "strategies": [
        "paged",
        "contiguous",
        *[_h2o(b) for b in (0.1, 0.2, 0.3, 0.4, 0.5)],
        *_EVICTION_AT_20,
        # SnapKV's selection under per-layer pyramid budgets, same total: compare with snapkv at 0.2.
        *[f"pyramidkv:budget_ratio={r}" for r in (0.1, 0.2, 0.3, 0.4, 0.5)],
        "offload",
        *[f"infinigen:budget_ratio={r}" for r in (0.1, 0.2, 0.3, 0.4, 0.5)],
        # InfiniGen's selection over a GPU-resident cache: the same budgets, nothing crosses PCIe.
        *[f"quest:budget_ratio={r}" for r in (0.1, 0.2, 0.3, 0.4, 0.5)],
        "adaptive:long_threshold=2048",
        # KV bit width: 8 (fp8, int8) and 4 bits (int4 at KIVI's two group sizes); nothing dropped.
        "quant:dtype=fp8",
        "quant:dtype=int8",
        "quant:dtype=int4,group_size=32",
        "quant:dtype=int4,group_size=64",
    ],
    "workloads": [
        {"type": "sharegpt", "num_requests": 500},
        {"type": "fixed", "num_requests": 200, "input_len": 1024, "output_len": 256},
        {"type": "ruler", "task": "niah_single_1", "length": 4096, "num_samples": 20},
    ],
    "rates": [1, 2, 4, 8, 16, 32],
    "burstiness": [1.0],
    # Memory-rich: 90% of the free GPU memory; constrained: a pool that holds a few long requests.
    "kv_memory": [0.9, "2GiB"],
    "seeds": [0],
    "device": "cuda",
    "dtype": "bfloat16",
    "max_model_len": 4096,
    "engine": {"max_num_seqs": 256, "max_num_batched_tokens": 8192},
    "slos": {"ttft_ms": 1000, "tpot_ms": 100},
    "quality": {"perplexity": True, "perplexity_sequences": 8, "perplexity_len": 1024, "perplexity_prefix": 512,
                "ruler": True},
}

# ---- h200: the characterisation on one H200 in about 25 minutes, as chunks of <= 10 minutes ----
# Sized in docs/results/h200/PLAN.md, which shows the arithmetic and the measurements it rests on.
# In short: T, a configuration's offline time for 100 ShareGPT requests (output <= 256 tokens), is
# about 3 s for Llama-3.1-8B shapes (kvscope `paged` served 256 ShareGPT length pairs at 7,937
# output tok/s on an H200) and 1.5 / 3 / 5 / 8 s for the OPT shapes; `h2o` costs 1.2 T, `paged` in
# the 16k-token pool 1.7 T, `infinigen` 4 T; each point about 2 s besides serving. A relative rate f
# spreads the arrivals over T / f, and its group's offline measurement costs one T: the sweep
# 0.25x-1.25x costs about 9 T + 10 s per configuration. Estimated 1,440 s of points in all. The grids
# run in priority order; a chunk's time limit leaves what does not fit to the next chunk.
_H200_SHAREGPT = {"type": "sharegpt", "num_requests": 100, "output_len": 256, "max_prompt_len": 1024}
_H200_LONG = {"type": "fixed", "num_requests": 32, "input_len": 3072, "output_len": 128}
_H200_BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5)
# A pool of 16,384 KV tokens per model (the vLLM side-by-side's 2 GiB at Llama-3.1-8B's 128 KiB per
# token; OPT: 2 x layers x hidden x 2 bytes per token). The 100 ShareGPT requests (about 42k tokens
# at full length) do not fit at once, so `paged` queues and preempts; a lone long prompt fits.
_H200_POOL_16K = {"dummy:llama-3.1-8b": "2GiB", "dummy:opt-1.3b": "3GiB", "dummy:opt-6.7b": "8GiB",
                  "dummy:opt-13b": "12800MiB", "dummy:opt-30b": "21GiB"}
_H200_FIXED = ["streaming:budget_ratio=0.2", "snapkv:budget_ratio=0.2"]
_H200_RULER = [{"type": "ruler", "task": t, "length": 4096, "num_samples": 50, "output_len": 32}
               for t in ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1")]


def _infinigen(budget: float) -> str:
    return f"infinigen:budget_ratio={budget:g}"


def _h200_grids() -> list[dict[str, Any]]:
    llama, opts = "dummy:llama-3.1-8b", ("dummy:opt-1.3b", "dummy:opt-6.7b", "dummy:opt-13b", "dummy:opt-30b")
    pool = _H200_POOL_16K[llama]
    speed = {"workloads": [_H200_SHAREGPT]}
    grids: list[dict[str, Any]] = [
        # Request rate around each configuration's own saturation, both memory regimes. 0.25x (4 T a
        # point, the longest) is left out: 0.5x already shows the lightly loaded latency.
        {**speed, "models": [llama], "strategies": ["paged", _h2o(0.2)], "kv_memory": [0.9, pool],
         "rates": ["0.5x", "1x", "1.25x"]},
        # Sparsity at capacity (all at once) in the pool: h2o and infinigen at 5 budgets, the fixed-budget
        # streaming and snapkv, fp8 KV and quest (about 125 s).
        {**speed, "models": [llama], "kv_memory": [pool], "rates": ["inf"],
         "strategies": ["paged", *[_h2o(b) for b in _H200_BUDGETS], *[_infinigen(b) for b in _H200_BUDGETS],
                        *_H200_FIXED, "quant:dtype=fp8", "quest:budget_ratio=0.2"]},
    ]
    # Model size in the pool: capacity and the latency at it ("1x"), `paged` and `h2o` (about 205 s with
    # the loads). The ample regime and `infinigen` per size come last, if the time allows.
    grids += [{**speed, "models": [m], "strategies": ["paged", _h2o(0.2)], "kv_memory": [_H200_POOL_16K[m]],
               "rates": ["1x"]} for m in opts]
    grids += [
        # Long prompts (32 x 3,072 -> 128), where InfiniGen and Quest are meant to pay off (about 85 s).
        {"models": [llama], "kv_memory": [0.9, pool], "workloads": [_H200_LONG], "rates": ["inf"],
         "strategies": ["paged", _h2o(0.2), "snapkv:budget_ratio=0.2", "quest:budget_ratio=0.2", _infinigen(0.2)]},
        # InfiniGen at 4 T: two rates, in the pool only (about 55 s; the full sweep in both pools: 236 s).
        {**speed, "models": [llama], "strategies": [_infinigen(0.2)], "kv_memory": [pool], "rates": ["0.5x", "1x"]},
    ]
    # OPT-30B's 60 GB of weights leave no ample regime worth a second pool.
    grids += [{**speed, "models": [m], "strategies": ["paged", _h2o(0.2)], "kv_memory": [0.9], "rates": ["1x"]}
              for m in opts if not m.endswith("30b")]
    grids += [{**speed, "models": [m], "strategies": [_infinigen(0.2)], "kv_memory": [_H200_POOL_16K[m]],
               "rates": ["1x"]} for m in opts]
    return grids


def _h200_quality_grids() -> list[dict[str, Any]]:
    """Quality on real weights (SmolLM2's 52 points took 850 s on an H100, Qwen2.5's first 36 633 s):
    RULER at 4k, 4 tasks x 50 samples, and perplexity on 16 x 512 = 8,192 scored tokens. SmolLM2 at
    every budget; Qwen2.5 (model size in quality) with infinigen at 0.2 only, at InfiniGen's alpha
    of 4 and at 12: alpha 4 starves 5-6 of Qwen2.5's layers and finds no needle
    (docs/results/h200-quality/README.md), so the tuned threshold is a point of its own. quant and
    quest quality: docs/results/quant_quality.md, quest_quality.md. A preset of its own: it needs the model and data packages installed, which
    the speed grids (random weights) do not."""
    quality = {"perplexity": True, "perplexity_sequences": 16, "perplexity_len": 1024, "perplexity_prefix": 512,
               "ruler": True}
    lossy = ["paged", *[_h2o(b) for b in _H200_BUDGETS], *_H200_FIXED]
    common = {"kv_memory": [0.9], "rates": ["inf"], "workloads": _H200_RULER, "quality": quality}
    return [
        {**common, "models": ["smollm2-135m"], "strategies": [*lossy, *[_infinigen(b) for b in _H200_BUDGETS]]},
        {**common, "models": ["qwen2.5-0.5b"],
         "strategies": [*lossy, _infinigen(0.2), "infinigen:alpha=12,budget_ratio=0.2"]},
    ]


H200: dict[str, Any] = {
    "name": "h200",
    # The top level holds the settings every grid shares; its axes are the grids' defaults.
    "models": ["dummy:llama-3.1-8b"],
    "strategies": ["paged"],
    "workloads": [_H200_SHAREGPT],
    "rates": ["1x"],
    "kv_memory": [0.9],
    "seeds": [0],
    "device": "cuda",
    "dtype": "bfloat16",
    # The long prompts (3,072 + 128 tokens) and, in h200-quality, RULER at 4k (about 3,968 + 32).
    "max_model_len": 4096,
    "engine": {"max_num_seqs": 256, "max_num_batched_tokens": 8192},
    "slos": {"ttft_ms": 1000, "tpot_ms": 100},
    # Random weights score no quality; h200-quality's grids set their own.
    "quality": {"perplexity": False, "ruler": False},
    "grids": _h200_grids(),
}

H200_QUALITY: dict[str, Any] = {**H200, "name": "h200-quality", "models": ["smollm2-135m"],
                                "workloads": _H200_RULER[:1], "grids": _h200_quality_grids()}

PRESETS: dict[str, dict[str, Any]] = {"quick": QUICK, "h200": H200, "h200-quality": H200_QUALITY, "paper": PAPER}


def preset(name: str, check_packages: bool = True) -> StudySpec:
    """The validated spec of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return parse_spec(PRESETS[name], check_packages=check_packages)
