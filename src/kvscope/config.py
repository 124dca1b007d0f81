"""Validated engine configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvscope.errors import ConfigError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREEMPTION_MODES = ("recompute", "swap")
#: KV pool on a CPU device when no size is given (device memory has no "free" figure to take from).
DEFAULT_CPU_KV_BYTES = 1 << 30


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"unsupported dtype {dtype}; use one of {list(_DTYPES)}")
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {list(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class EngineConfig:
    """Engine knobs (vLLM's names where vLLM has one).

    ``kv_memory_bytes`` sizes the KV pool exactly; if None, the pool takes ``kv_memory_fraction``
    of the device memory left free after loading weights (CUDA) or ``DEFAULT_CPU_KV_BYTES`` (CPU).
    ``max_model_len`` defaults to the model's context length.
    """

    model: str = "smollm2-135m"
    strategy: Any = "paged"
    strategy_args: dict[str, Any] | None = None
    device: str = "cpu"
    dtype: str | torch.dtype = "float32"
    kv_memory_bytes: int | None = None
    kv_memory_fraction: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    preemption_mode: str = "recompute"
    swap_space_bytes: int = 4 << 30
    seed: int = 0

    def __post_init__(self) -> None:
        self.torch_dtype = parse_dtype(self.dtype)
        try:
            self.torch_device = torch.device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"invalid device {self.device!r}: {e}") from None
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        if self.kv_memory_bytes is not None and self.kv_memory_bytes <= 0:
            raise ConfigError(f"kv_memory_bytes must be positive, got {self.kv_memory_bytes}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ConfigError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ConfigError(
                f"unknown preemption_mode {self.preemption_mode!r}; use one of {PREEMPTION_MODES}"
            )
        if self.swap_space_bytes < 0:
            raise ConfigError(f"swap_space_bytes must be >= 0, got {self.swap_space_bytes}")
