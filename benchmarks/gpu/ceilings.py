"""Measured ceilings of the GPU this runs on: device memory copy bandwidth, pinned host<->device
bandwidth and bf16 matrix-product rate. Kernels are judged against these, not datasheet figures.

Each figure is the median of several timed runs (CUDA events) after warm-up, on random data (never
zeros, which can run faster). The copy counts bytes read plus bytes written.
Writes benchmarks/results/gpu_ceilings.json and .md; `decode_attention.py` imports
:func:`device_copy_bandwidth` to measure the copy ceiling in its own run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from envinfo import environment  # noqa: E402

RESULTS = Path(__file__).parents[1] / "results"


def time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def device_copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> dict:
    """Device-to-device copy of ``nbytes`` (far beyond L2); bandwidth counts read + written bytes."""
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), repeats=repeats))
    return {"bytes_moved": 2 * nbytes, "median_ms": ms, "gb_per_s": 2 * nbytes / ms / 1e6}


def host_bandwidth(direction: str, nbytes: int = 1 << 30, repeats: int = 10) -> dict:
    """Pinned host memory to device (``h2d``) or back (``d2h``); bytes moved counted once."""
    host = torch.randn(nbytes // 2, dtype=torch.bfloat16).pin_memory()
    dev = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    fn = (lambda: dev.copy_(host, non_blocking=True)) if direction == "h2d" else (
        lambda: host.copy_(dev, non_blocking=True)
    )
    ms = statistics.median(time_ms(fn, repeats=repeats))
    return {"bytes_moved": nbytes, "median_ms": ms, "gb_per_s": nbytes / ms / 1e6}


def matmul_rate(n: int = 8192, repeats: int = 10) -> dict:
    """bf16 ``[n, n] @ [n, n]`` through torch (cuBLAS), random inputs."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(time_ms(lambda: a @ b, warmup=5, repeats=repeats))
    return {"n": n, "flops": 2 * n**3, "median_ms": ms, "tflop_per_s": 2 * n**3 / ms / 1e9}


def gpu_environment() -> dict:
    """envinfo's machine record plus what a GPU figure needs: driver, CUDA, SMs, L2, memory."""
    env = environment()
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        driver = None
    env.update(
        driver=driver,
        cuda=torch.version.cuda,
        sm_count=props.multi_processor_count,
        l2_bytes=props.L2_cache_size,
        memory_bytes=props.total_memory,
    )
    return env


def env_line(env: dict) -> str:
    v = env["versions"]
    return (
        f"Measured {env['date']} on {env['gpu']} ({env['sm_count']} SMs, {env['l2_bytes'] / 1e6:.0f} MB L2, "
        f"{env['memory_bytes'] / 2**30:.0f} GiB), driver {env['driver']}, CUDA {env['cuda']}, "
        f"torch {v['torch']}, triton {v['triton']}, commit {env['commit']}."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    env = gpu_environment()
    rows = {
        "device_copy": device_copy_bandwidth(),
        "host_to_device_pinned": host_bandwidth("h2d"),
        "device_to_host_pinned": host_bandwidth("d2h"),
        "matmul_bf16_8192": matmul_rate(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_ceilings.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    lines = [
        "# GPU ceilings",
        "",
        env_line(env),
        "Median of 10 timed runs (CUDA events) after warm-up, random data.",
        "",
        "| what | size | median ms | rate |",
        "|---|---|---:|---:|",
        f"| device-to-device copy (read + write) | 1 GiB copied, 2 GiB moved | {rows['device_copy']['median_ms']:.3f} "
        f"| {rows['device_copy']['gb_per_s']:.0f} GB/s |",
        f"| pinned host -> device | 1 GiB | {rows['host_to_device_pinned']['median_ms']:.3f} "
        f"| {rows['host_to_device_pinned']['gb_per_s']:.1f} GB/s |",
        f"| device -> pinned host | 1 GiB | {rows['device_to_host_pinned']['median_ms']:.3f} "
        f"| {rows['device_to_host_pinned']['gb_per_s']:.1f} GB/s |",
        f"| bf16 matmul (cuBLAS via torch) | 8192^3 | {rows['matmul_bf16_8192']['median_ms']:.3f} "
        f"| {rows['matmul_bf16_8192']['tflop_per_s']:.0f} TFLOP/s |",
        "",
    ]
    (out / "gpu_ceilings.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
