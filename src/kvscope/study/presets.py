"""Named study specs: ``quick`` (CPU, minutes) and ``paper`` (GPU, the full characterisation)."""
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

PRESETS: dict[str, dict[str, Any]] = {"quick": QUICK, "paper": PAPER}


def preset(name: str, check_packages: bool = True) -> StudySpec:
    """The validated spec of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return parse_spec(PRESETS[name], check_packages=check_packages)
