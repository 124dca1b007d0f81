"""Named study specs: ``quick`` (CPU, minutes) and ``paper`` (GPU, the full characterisation)."""
from __future__ import annotations

from typing import Any

from kvscope.errors import ConfigError
from kvscope.study.spec import StudySpec, parse_spec

# H2O's relatives, each at a 20% budget (H2O's own budgets differ per preset).
_EVICTION_AT_20 = [f"{name}:budget_ratio=0.2" for name in ("streaming", "tova", "snapkv", "knorm", "random")]

# Every registered strategy once, at about a 20% budget where it has one.
_STRATEGIES = [
    "paged",
    "contiguous",
    "h2o:heavy_ratio=0.1,recent_ratio=0.1",
    *_EVICTION_AT_20,
    "offload",
    # 512 calibration tokens instead of InfiniGen's 2048: the skew is computed once per model and
    # cached, but on 2 CPU cores the full calibration alone would take a minute of the budget.
    "infinigen:budget_ratio=0.2,calibration_len=512",
    # Full KV for the ShareGPT requests, H2O for the 512-token RULER prompts.
    "adaptive:long_threshold=256",
]

# Sized to finish in about 4 minutes on 2 CPU cores, report included (benchmarks/study_quick.py
# times it): 12 points per strategy at about 2 s each, so every strategy added costs about 25 s.
QUICK: dict[str, Any] = {
    "name": "quick",
    "models": ["smollm2-135m"],
    "strategies": _STRATEGIES,
    "workloads": [
        {"type": "sharegpt", "num_requests": 4, "output_len": 8, "max_prompt_len": 160},
        # The needle's answer is a 7-digit number: 16 tokens hold it.
        {"type": "ruler", "task": "niah_single_1", "length": 512, "num_samples": 1, "output_len": 16},
    ],
    "rates": [8, 32, "inf"],
    # Memory-rich holds every request at full length; constrained (24 MiB = 546 tokens at SmolLM2's
    # 45 KiB/token, one 512-token contiguous slab) forces queueing and preemption under
    # paged/contiguous and lets eviction show what it frees.
    "kv_memory": ["256MiB", "24MiB"],
    "seeds": [0],
    "device": "cpu",
    "dtype": "float32",
    "max_model_len": 512,
    "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 512},
    "slos": {"ttft_ms": 2000, "tpot_ms": 200},
    "quality": {"perplexity": True, "perplexity_sequences": 1, "perplexity_len": 96, "perplexity_prefix": 64,
                "ruler": True},
}

PAPER: dict[str, Any] = {
    "name": "paper",
    "models": ["dummy:opt-1.3b", "dummy:opt-6.7b", "dummy:opt-13b", "dummy:opt-30b", "smollm2-135m",
               "qwen2.5-0.5b"],
    "strategies": [
        "paged",
        "contiguous",
        *[f"h2o:heavy_ratio={r / 2},recent_ratio={r / 2}" for r in (0.1, 0.2, 0.3, 0.4, 0.5)],
        *_EVICTION_AT_20,
        "offload",
        *[f"infinigen:budget_ratio={r}" for r in (0.1, 0.2, 0.3, 0.4, 0.5)],
        "adaptive:long_threshold=2048",
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
