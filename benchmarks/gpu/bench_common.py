"""Helpers the GPU benchmarks share: the environment line, ceilings measured in the run (with CPU
stand-ins for the ``--tiny`` smoke tests), timing, engine configuration, and the bytes one decode
step must read."""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from ceilings import device_copy_bandwidth, gpu_environment, matmul_rate, time_ms  # noqa: E402
from envinfo import environment  # noqa: E402

from kvscope.bench.compiles import TritonCompiles  # noqa: E402,F401 - re-exported for the scripts
from kvscope.config import EngineConfig  # noqa: E402
from kvscope.engine.engine import LLMEngine  # noqa: E402

GRAPH_FIELDS = ("enforce_eager", "cuda_graph_sizes")


def bench_environment(device: torch.device) -> dict:
    """``gpu_environment()`` on CUDA; on a CPU (smoke test) the same keys, so ``env_line`` works."""
    if device.type == "cuda":
        return gpu_environment()
    env = environment()
    env.update(gpu=f"CPU ({env['cpu']})", driver=None, cuda=None, sm_count=0, l2_bytes=0,
               memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return env


def copy_ceiling(device: torch.device) -> dict:
    """Device copy bandwidth (read + write) from ceilings.py; a 64 MiB memcpy on a CPU."""
    if device.type == "cuda":
        return device_copy_bandwidth()
    src = torch.randn(1 << 24)
    dst = torch.empty_like(src)
    ms = statistics.median(timed_ms(lambda: dst.copy_(src), device, 2, 5))
    return {"bytes_moved": 2 * src.nbytes, "median_ms": ms, "gb_per_s": 2 * src.nbytes / ms / 1e6}


def matmul_ceiling(device: torch.device) -> dict:
    """bf16 matmul rate from ceilings.py; a 512^3 product on a CPU."""
    if device.type == "cuda":
        return matmul_rate()
    a = torch.randn(512, 512, dtype=torch.bfloat16)
    ms = statistics.median(timed_ms(lambda: a @ a, device, 1, 5))
    return {"n": 512, "flops": 2 * 512**3, "median_ms": ms, "tflop_per_s": 2 * 512**3 / ms / 1e9}


def timed_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call: ``ceilings.time_ms`` (CUDA events) on CUDA, wall clock on a CPU."""
    if device.type == "cuda":
        return time_ms(fn, warmup=warmup, repeats=repeats)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def back_to_back_ms(fn: Callable[[], object], device: torch.device, warmup: int, steps: int,
                    blocks: int) -> list[float]:
    """Milliseconds per call of ``fn`` run ``steps`` times back to back (no sync between calls, one
    at each end: what a loop of engine steps gets when it overlaps host and device work), one figure
    per block of ``steps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(blocks):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3 / steps)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_config(allow_missing: bool, **kw: Any) -> EngineConfig:
    """``EngineConfig(**kw)``; the CUDA-graph fields are dropped with a warning only when
    ``allow_missing`` (CPU smoke test) and the engine predates them."""
    return EngineConfig(**checked_fields(allow_missing, **kw))


def checked_fields(allow_missing: bool, **kw: Any) -> dict[str, Any]:
    """``kw`` if every key is an EngineConfig field (see :func:`engine_config`)."""
    have = {f.name for f in dataclasses.fields(EngineConfig)}
    missing = [k for k in kw if k not in have]
    if missing:
        if not allow_missing or set(missing) - set(GRAPH_FIELDS):
            raise SystemExit(f"EngineConfig has no field(s) {missing}: this benchmark needs the CUDA-graph "
                             "decode path (enforce_eager, cuda_graph_sizes; issue 'GPU fast path').")
        print(f"warning: EngineConfig lacks {missing}; running without them (smoke test only)", flush=True)
        kw = {k: v for k, v in kw.items() if k in have}
    return kw


def graph_replays(engine: LLMEngine) -> int | None:
    return engine.stats().get("cuda_graph_replays")


def weight_bytes_per_step(model: nn.Module, batch: int) -> int:
    """Parameter bytes one decode step of ``batch`` tokens reads: each parameter once, except an
    embedding table not shared with a linear layer (the LM head), which is gathered: ``batch`` rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    for m in model.modules():
        if isinstance(m, nn.Embedding) and id(m.weight) not in linear:
            w = m.weight
            total -= w.numel() * w.element_size() - min(batch, w.shape[0]) * w.shape[1] * w.element_size()
    return total


def target_text(value: float, target: float, unit: str = "%") -> str:
    """E.g. '72% (target >= 75%: missed, short by 3.0 points)'; units '%', 'x' or e.g. 'tok/s'."""
    met, word = value >= target, "above" if value >= target else "short"
    if unit == "%":
        v, t, gap = f"{value:.0%}", f"{target:.0%}", f"{abs(value - target) * 100:.1f} points"
    elif unit == "x":
        v, t, gap = f"{value:.2f}x", f"{target:g}x", f"{abs(value / target - 1):.0%}"
    else:
        v, t = f"{value:.0f} {unit}", f"{target:g} {unit}"
        gap = f"{abs(value - target):.0f} {unit} ({abs(value / target - 1):.1%})"
    return f"{v} (target >= {t}: {'met' if met else 'missed'}, {word} by {gap})"
