"""The form of the cost model's tensor-parallel communication term, checked on the CPU's gloo.

``kvscope advise`` prices one all-reduce of ``B`` bytes over ``N`` ranks as ``latency + 2 (N - 1) / N
x B / link rate`` (``advise/parallel.py``), two per decoder layer. This measures what kvscope's
tensor parallelism uses on a CPU (two processes, ``torch.distributed`` gloo, float32 hidden states
as a decode or prefill step all-reduces them), fits ``latency + B / rate`` by least squares over
message sizes from one token's hidden state to a prefill chunk's, and reports how well a line
explains the times (R^2, worst relative residual) beside the CPU preset's constants.

Timing: medians of ``--repeats`` calls after warm-up. Run it with nothing else on the machine.
Writes benchmarks/results/tp_allreduce_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from envinfo import environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Hidden sizes x tokens: one decode token of SmolLM2 (576) to a 2,048-token chunk of a 4,096-wide model.
ELEMENTS = [576, 2048, 4096, 576 * 16, 4096 * 8, 4096 * 64, 4096 * 256, 4096 * 1024, 4096 * 2048]


def _worker(rank: int, port: int, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = {}
    for n in ELEMENTS:
        x = torch.ones(n)
        for _ in range(3):
            dist.all_reduce(x)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        out[n] = statistics.median(times)
        if x[0].item() != 2 ** (3 + repeats):  # every call summed two ranks' values
            raise RuntimeError("all_reduce returned a wrong sum")
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """``t = a + B / rate`` over (bytes, seconds) by least squares on the relative residuals (weights
    ``1 / t^2``: sizes span four decades, and an unweighted fit would serve only the largest):
    (a, rate, weighted R^2)."""
    w = [1 / y**2 for _, y in points]
    sw = sum(w)
    mx = sum(wi * x for wi, (x, _) in zip(w, points)) / sw
    my = sum(wi * y for wi, (_, y) in zip(w, points)) / sw
    slope = (sum(wi * (x - mx) * (y - my) for wi, (x, y) in zip(w, points))
             / sum(wi * (x - mx) ** 2 for wi, (x, _) in zip(w, points)))
    a = my - slope * mx
    ss_res = sum(wi * (y - (a + slope * x)) ** 2 for wi, (x, y) in zip(w, points))
    ss_tot = sum(wi * (y - my) ** 2 for wi, (_, y) in zip(w, points))
    return a, 1 / slope, 1 - ss_res / ss_tot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    from kvscope.advise.hardware import cpu_hardware

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(port, args.repeats, queue), nprocs=2, join=True)
    times = queue.get()
    points = [(n * 4, t) for n, t in sorted(times.items())]
    latency, rate, r2 = fit(points)
    worst = max(abs(t - (latency + b / rate)) / t for b, t in points)
    hw = cpu_hardware()
    rows = [{"elements": b // 4, "bytes": b, "median_s": t, "fit_s": latency + b / rate} for b, t in points]
    result = {"benchmark": "tp_allreduce_cpu", "environment": environment(), "repeats": args.repeats,
              "fit": {"latency_s": latency, "bytes_per_s": rate, "r2": r2, "worst_relative_residual": worst},
              "cpu_preset": {"allreduce_latency_s": hw.allreduce_latency_s,
                             "interconnect_bytes_per_s": hw.interconnect_bytes_per_s},
              "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tp_allreduce_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    env = result["environment"]
    lines = [
        "# Tensor-parallel all-reduce on the CPU (gloo, 2 ranks): the cost model's form",
        "",
        f"**A line `latency + bytes / rate` fitted to the relative residuals gives latency {latency * 1e6:.0f} us "
        f"and rate {rate / 1e9:.2f} GB/s (weighted R^2 = {r2:.3f}, worst point {worst:.0%} off).** "
        f"The cost model's CPU preset holds {hw.allreduce_latency_s * 1e6:.0f} us and "
        f"{hw.interconnect_bytes_per_s / 1e9:.1f} GB/s, rounded from this fit (it held 50 us and 5 GB/s, rough "
        "guesses, before); for N = 2 the model's `2 (N - 1) / N` factor is 1.",
        "",
        f"Measured {env['date']} on {env['cpu']}, commit {env['commit']}, torch {env['versions']['torch']}; "
        f"two processes of one thread each, float32, median of {args.repeats} calls after 3 warm-up calls, "
        "with nothing else running on the machine.",
        "",
        "The line is the model's form; how far single points fall from it (small messages on a shared "
        "2-core machine jitter by tens of percent between runs) is the uncertainty of both constants.",
        "",
        "| elements | bytes | median us | fit us |",
        "|---:|---:|---:|---:|",
        *[f"| {r['elements']:,} | {r['bytes']:,} | {r['median_s'] * 1e6:.1f} | {r['fit_s'] * 1e6:.1f} |" for r in rows],
        "",
        "Produced by `python benchmarks/tp_allreduce_cpu.py`.",
    ]
    (args.out / "tp_allreduce_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
