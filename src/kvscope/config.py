"""Validated engine configuration."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from kvscope import checks
from kvscope.constants import DEFAULT_STRATEGY
from kvscope.errors import ConfigError
from kvscope.units import parse_size

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREEMPTION_MODES = ("recompute", "swap")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
#: KV pool on a CPU device when no size is given (device memory has no "free" figure to take from).
DEFAULT_CPU_KV_BYTES = 1 << 30


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"unsupported dtype {dtype}; use one of {list(_DTYPES)}")
        return dtype
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {list(_DTYPES)}")
    return _DTYPES[dtype]


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` / ``"torch"`` / ``"triton"`` on ``device`` -> the backend that runs: torch or triton.

    ``auto`` is triton on CUDA when it imports, torch otherwise. Triton kernels run on a CPU only
    under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is first imported), which
    is for tests: far too slow to serve.
    """
    if not isinstance(backend, str) or backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention_backend {backend!r}; use one of {ATTENTION_BACKENDS}")
    if backend == "torch":
        return "torch"
    if device.type == "cuda" and _triton_importable():
        return "triton"
    if backend == "auto":
        return "torch"
    if device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable():
            return "triton"
        raise ConfigError(
            f"attention_backend='triton' needs a CUDA device (device is {str(device)!r}); on a CPU the "
            "kernels run only under Triton's interpreter (TRITON_INTERPRET=1), for tests"
        )
    raise ConfigError("attention_backend='triton' needs the triton package (pip install triton)")


def _buckets(sizes: Any, field: str, allow_empty: bool, limit: int, limit_name: str, unit: str) -> list[int]:
    """A list of graph buckets (integers >= 1, none above ``limit``: no step holds more ``unit``)."""
    if not isinstance(sizes, (list, tuple)) or not (sizes or allow_empty):
        raise ConfigError(f"{field} must be a {'' if allow_empty else 'non-empty '}list of integers >= 1"
                          f"{' (or [])' if allow_empty else ''}, got {sizes!r}")
    sizes = checks.int_list(sizes, field, minimum=1)
    if sizes and max(sizes) > limit:
        raise ConfigError(f"{field} {sizes} has a bucket above {limit_name}={limit}: no step has more {unit}")
    return sizes


def _check_world(world: int, device: torch.device) -> None:
    """Refuse a ``tensor_parallel_size`` this machine cannot run: one GPU per rank from ``device``'s
    index on CUDA; on a CPU, one core per rank process."""
    if world == 1:
        return
    if device.type == "cuda":
        first = device.index or 0
        if first + world > torch.cuda.device_count():
            raise ConfigError(f"tensor_parallel_size={world} needs GPUs {first}..{first + world - 1}, but "
                              f"{torch.cuda.device_count()} are visible")
    elif device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if world > cores:
            raise ConfigError(f"tensor_parallel_size={world} needs one CPU core per rank process, but this "
                              f"process may use {cores}")
    else:
        raise ConfigError(f"tensor_parallel_size={world} runs on 'cpu' or 'cuda' devices, not {device.type!r}")


@dataclass
class EngineConfig:
    """Engine knobs (vLLM's names where vLLM has one).

    ``kv_memory_bytes`` sizes the KV pool exactly (an int, or a size string such as ``"64MiB"``,
    see :func:`kvscope.units.parse_size`; so may ``swap_space_bytes``); if None, the pool takes
    ``kv_memory_fraction`` of the device memory left free after loading weights (CUDA) or
    ``DEFAULT_CPU_KV_BYTES`` (CPU). Integer fields refuse bools, floats and strings
    (:class:`ConfigError` naming the field).
    ``max_model_len`` defaults to the model's context length.
    ``attention_backend``: ``"torch"`` (reference path), ``"triton"`` (paged kernels; CUDA) or
    ``"auto"`` (triton on CUDA when it imports, else torch); see :func:`resolve_attention_backend`.
    It applies to the strategies whose slots are whole blocks (``paged``, ``contiguous``) and to the
    decode rows of evicting strategies whose statistic reads attention (the paged decode kernel
    also emits or folds the statistic); their other rows run torch attention.
    ``enforce_eager`` (vLLM's name): when False, on CUDA with the Triton backend, those strategies'
    decode steps replay CUDA graphs captured per batch-size bucket (``cuda_graph_sizes``; default
    1, 2, 4, 8, 16, 24, ... up to ``max_num_seqs``); see ``engine/cuda_graph.py``. The other steps
    (prefill chunks, mixed steps, decode steps a strategy does not capture) of up to the largest
    of ``piecewise_graph_sizes`` tokens (default 16, 32, ..., 512, 768, 1024, capped at
    ``max_num_batched_tokens``; ``[]``: none) replay graphs of the model split around attention,
    which runs eagerly in between; see ``engine/piecewise.py``. One process only.
    ``async_scheduling`` (vLLM's name): schedule and launch each step before the previous one's
    tokens reach the host, so that the host's work per step overlaps the device's (see
    ``engine/inflight.py``); outputs then come one :meth:`~kvscope.engine.engine.LLMEngine.step`
    later. None (default): on for CUDA when the strategy allows it (``KVStrategy.async_scheduling``)
    and on one process; True where it cannot apply is an error.
    ``tensor_parallel_size`` (vLLM's name): ranks the model's heads and MLP are split over, one
    process and one device each (``cuda:i+r`` from ``cuda:i``; CPU processes over gloo); it must
    divide the model's KV heads. ``kv_memory_bytes`` is then per rank. Every rank captures its own
    decode graphs (``enforce_eager``, ``cuda_graph_sizes`` as on one GPU; eager on CPU); see
    ``kvscope.distributed``.
    """

    model: str = "smollm2-135m"
    strategy: Any = DEFAULT_STRATEGY
    strategy_args: dict[str, Any] | None = None
    device: str = "cpu"
    dtype: str | torch.dtype = "float32"
    kv_memory_bytes: int | str | None = None
    kv_memory_fraction: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    preemption_mode: str = "recompute"
    swap_space_bytes: int | str = 4 << 30
    seed: int = 0
    attention_backend: str = "auto"
    enforce_eager: bool = False
    cuda_graph_sizes: list[int] | None = None
    piecewise_graph_sizes: list[int] | None = None
    tensor_parallel_size: int = 1
    async_scheduling: bool | None = None

    def kv_pool_bytes(self) -> int:
        """The KV pool an engine of this config allocates now: ``kv_memory_bytes``, else
        ``kv_memory_fraction`` of the device memory free at this moment (CUDA), else
        ``DEFAULT_CPU_KV_BYTES``."""
        if self.kv_memory_bytes is not None:
            return self.kv_memory_bytes
        if self.torch_device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.torch_device)
            return int(free * self.kv_memory_fraction)
        return DEFAULT_CPU_KV_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.model, str):
            raise ConfigError(f"model must be a name or a path (a string), got {self.model!r}")
        self.torch_dtype = parse_dtype(self.dtype)
        if not isinstance(self.device, (str, torch.device)):
            raise ConfigError(f"device must be a string such as 'cpu' or 'cuda:0', got {self.device!r}")
        try:
            self.torch_device = torch.device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"invalid device {self.device!r}: {e}") from None
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        if self.strategy_args is not None and not isinstance(self.strategy_args, dict):
            raise ConfigError(f"strategy_args must be a dict of keyword arguments, got {self.strategy_args!r}")
        if self.kv_memory_bytes is not None:
            self.kv_memory_bytes = parse_size(self.kv_memory_bytes, "kv_memory_bytes")
        self.kv_memory_fraction = checks.real(self.kv_memory_fraction, "kv_memory_fraction")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ConfigError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        self.max_num_seqs = checks.integer(self.max_num_seqs, "max_num_seqs", minimum=1)
        self.max_num_batched_tokens = checks.integer(self.max_num_batched_tokens, "max_num_batched_tokens", minimum=1)
        if self.max_model_len is not None:
            self.max_model_len = checks.integer(self.max_model_len, "max_model_len", minimum=1)
        if not isinstance(self.preemption_mode, str) or self.preemption_mode not in PREEMPTION_MODES:
            raise ConfigError(
                f"unknown preemption_mode {self.preemption_mode!r}; use one of {PREEMPTION_MODES}"
            )
        # 0 (no swap space) is a valid int; a string is a size such as "4GiB".
        if isinstance(self.swap_space_bytes, str):
            self.swap_space_bytes = parse_size(self.swap_space_bytes, "swap_space_bytes")
        self.swap_space_bytes = checks.integer(self.swap_space_bytes, "swap_space_bytes", minimum=0)
        self.seed = checks.integer(self.seed, "seed", -(1 << 63), (1 << 63) - 1)
        checks.boolean(self.enforce_eager, "enforce_eager")
        if self.async_scheduling is not None:
            checks.boolean(self.async_scheduling, "async_scheduling")
        self.tensor_parallel_size = checks.integer(self.tensor_parallel_size, "tensor_parallel_size", minimum=1)
        _check_world(self.tensor_parallel_size, self.torch_device)
        self.resolved_attention_backend = resolve_attention_backend(self.attention_backend, self.torch_device)
        if self.cuda_graph_sizes is not None:
            self.cuda_graph_sizes = _buckets(self.cuda_graph_sizes, "cuda_graph_sizes", False,
                                             self.max_num_seqs, "max_num_seqs", "rows")
        if self.piecewise_graph_sizes is not None:
            self.piecewise_graph_sizes = _buckets(self.piecewise_graph_sizes, "piecewise_graph_sizes", True,
                                                  self.max_num_batched_tokens, "max_num_batched_tokens", "tokens")
