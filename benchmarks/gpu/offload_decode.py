"""Offloaded KV on a GPU: the device-side gather against the PCIe ceiling, and the decode step of
``infinigen`` against ``offload`` and GPU-resident ``paged`` (Llama-3-8B shapes, bf16).

One run, in order:

1. **Ceiling**: pinned host-to-device bulk copy bandwidth (``ceilings.host_bandwidth``).
2. **Gather correctness**: the Triton gather from pinned memory equals ``index_select`` on the CPU,
   for per-head rows (256 B) and per-token rows (2 KiB); the scatter back likewise.
3. **Gather bandwidth** on a 4 GiB pinned pool: random per-head rows (InfiniGen's pattern) and
   per-token rows (``offload``'s), as a fraction of the bulk copy; beside it the naive design,
   a CPU ``index_select`` into a pinned buffer followed by a bulk copy.
4. **Decode step**: for each strategy and (batch, context), requests are given their context
   directly (random KV written into the cache, no prefill) and one decode step is timed (median
   of 10 after 3 warm-up steps, ``torch.cuda.synchronize`` around each). For the offloading
   strategies the bytes fetched per step divided by the step time give the effective prefetch
   bandwidth. Engines run as configured by default: every strategy's decode steps replay CUDA
   graphs (the first warm-up step of a new shape captures it; ``offload`` and ``infinigen`` per
   ``(batch, context)`` bucket); each row records how many of its steps were replays, and a
   strategy declaring ``graph_decode`` that replayed none is reported.

Writes ``benchmarks/results/offload_decode.{json,md}``. ``--tiny``: a 2-layer dummy model on the
CPU (smoke test): no pinned memory, so steps 1-3 are skipped, and graphs are CUDA-only, so decode
steps run eagerly (the offloading strategies' pure-decode steps run the same static step at the
batch's exact shape).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import bench_environment, sync  # noqa: E402
from ceilings import env_line, host_bandwidth, time_ms  # noqa: E402

from kvscope.attention.triton_gather import gather_rows, scatter_rows  # noqa: E402
from kvscope.config import EngineConfig  # noqa: E402
from kvscope.engine.engine import LLMEngine  # noqa: E402
from kvscope.engine.request import Request  # noqa: E402
from kvscope.engine.sampling_params import SamplingParams  # noqa: E402
from kvscope.kv.registry import create  # noqa: E402
from kvscope.models.loader import load_model  # noqa: E402

RESULTS = Path(__file__).parents[1] / "results"
MODEL, TINY_MODEL = "dummy:llama-3.1-8b", "dummy:tiny-llama"  # Llama-3-8B shapes, 128k positions
GRID = [(1, 4096), (1, 16384), (1, 32768), (4, 4096), (4, 16384), (4, 32768), (16, 4096), (16, 16384)]
TINY_GRID = [(1, 100), (3, 300), (4, 200)]


def check_gather() -> dict:
    """Triton gather/scatter through UVA against the CPU reference; returns max abs errors."""
    host = torch.randn(2, 4096, 1024, dtype=torch.bfloat16).pin_memory()
    errs = {}
    for name, rows in (("per_token", host), ("per_head", host.view(2, -1, 128))):
        idx = torch.randint(0, rows.shape[1], (3000,))
        got = gather_rows(rows, idx.cuda()).cpu()
        errs[f"gather_{name}"] = float((got.float() - rows.index_select(1, idx).float()).abs().max())
    dst = torch.zeros(2, 4096, 1024, dtype=torch.bfloat16).pin_memory()
    idx = torch.randperm(4096)[:500]
    src = torch.randn(2, 500, 1024, dtype=torch.bfloat16, device="cuda")
    scatter_rows(dst, idx.cuda(), src)
    torch.cuda.synchronize()
    errs["scatter_per_token"] = float((dst[:, idx].float() - src.cpu().float()).abs().max())
    return errs


def gather_bandwidth(pool_bytes: int = 4 << 30) -> list[dict]:
    """GB/s of gathering rows from a pinned pool into device memory, for the access patterns the
    strategies produce, with and without sorting the rows by address first."""
    elems = pool_bytes // 2 // 2
    host = torch.empty(2, elems, dtype=torch.bfloat16).pin_memory()
    host.view(-1)[: 1 << 24].normal_()  # content does not matter for bandwidth; avoid all-zero pages
    region = 262144  # tokens of one layer at batch 16 x 16k: 512 MiB per plane
    gen = torch.Generator().manual_seed(0)
    patterns = [
        # (label, row width, rows)
        ("per_head_uniform_4GiB", 128, torch.randint(0, elems // 128, (400_000,), generator=gen)),
        # InfiniGen at 20%: each (token, head) row of one layer picked with probability 0.2.
        ("per_head_20pct_of_layer", 128, torch.nonzero(torch.rand(region * 8, generator=gen) < 0.2)[:, 0]),
        ("per_token_20pct_of_layer", 1024, torch.nonzero(torch.rand(region, generator=gen) < 0.2)[:, 0]),
        ("per_token_uniform_4GiB", 1024, torch.randint(0, elems // 1024, (100_000,), generator=gen)),
    ]
    out = []
    for label, width, idx in patterns:
        idx = idx[torch.randperm(idx.numel(), generator=gen)]  # selection order, not address order
        src = host.view(2, -1, width)
        rows = idx.numel()
        idx_dev = idx.cuda()
        dst = torch.empty(2, rows, width, dtype=torch.bfloat16, device="cuda")
        nbytes = dst.numel() * 2
        row = {"pattern": label, "row_bytes": width * 2, "rows": rows, "bytes": nbytes}
        for sort in (False, True):
            ms = statistics.median(time_ms(lambda: gather_rows(src, idx_dev, out=dst, sort=sort)))
            row["sorted_gb_s" if sort else "gb_s"] = nbytes / ms / 1e6
        staging = torch.empty(2, rows, width, dtype=torch.bfloat16).pin_memory()

        def cpu_then_copy() -> None:
            torch.index_select(src, 1, idx, out=staging)
            dst.copy_(staging, non_blocking=True)

        t0 = time.perf_counter()
        for _ in range(3):
            cpu_then_copy()
        torch.cuda.synchronize()
        row["cpu_gather_then_copy_gb_s"] = nbytes / ((time.perf_counter() - t0) / 3 * 1e3) / 1e6
        out.append(row)
    del host
    return out


def make_engine(loaded, strategy: str, max_tokens: int, tiny: bool = False) -> LLMEngine:
    dtype = torch.float32 if tiny else torch.bfloat16
    bpt = loaded.config.kv_bytes_per_token(dtype)
    device = "cpu" if tiny else "cuda"
    cfg = EngineConfig(model=TINY_MODEL if tiny else MODEL, device=device, dtype=str(dtype).split(".")[1],
                       max_model_len=480 if tiny else 40_000, max_num_seqs=16,
                       kv_memory_bytes=int(max_tokens * 1.05) * bpt if strategy == "paged" else
                       (64 << 20 if tiny else 12 << 30))
    kv = create(strategy)
    return LLMEngine(loaded, kv, cfg)


def fill_random(engine: LLMEngine) -> None:
    """Random KV everywhere (bandwidth and selection need realistic, non-zero data)."""
    kv = engine.kv
    if kv.name == "paged":
        kv.cache.kv.normal_()
        return
    flat = kv.pool.kv.view(-1)
    chunk = torch.empty(min(1 << 28, flat.numel()), dtype=flat.dtype, device=engine.config.torch_device)
    for s in range(0, flat.numel(), chunk.numel()):
        n = min(chunk.numel(), flat.numel() - s)
        flat[s : s + n].copy_(chunk[:n].normal_())
    if kv.name == "infinigen":
        kv.partial_keys.normal_()


def time_decode(engine: LLMEngine, label: str, batch: int, context: int) -> dict:
    kv = engine.kv
    reqs = []
    for i in range(batch):
        r = Request(f"b{i}", [1] * context, SamplingParams(max_tokens=8, ignore_eos=True))
        r.output_token_ids.append(1)
        if not kv.allocate(r, context):
            raise RuntimeError(f"{kv.name}: no room for {batch} x {context}")
        r.num_computed_tokens = context
        reqs.append(r)
    for r in reqs:
        assert kv.allocate(r, context + 1)
    batch_obj = engine.runner.build_batch(reqs, [1] * batch)
    rows = list(range(batch))
    before = dict(kv.stats()) if kv.name != "paged" else {}

    def step() -> None:
        engine.runner.run(batch_obj, rows)
        kv.end_step(batch_obj)

    device = engine.config.torch_device
    for _ in range(3):
        step()
    sync(device)
    h2d0 = kv.stats().get("transfer_bytes_h2d", 0)
    replays0 = engine.runner.graph_replays
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    after = kv.stats()
    ms = statistics.median(times)
    row = {"strategy": label, "batch": batch, "context": context, "step_ms": ms,
           "step_ms_min": min(times), "step_ms_max": max(times),
           "graph_replays": engine.runner.graph_replays - replays0}
    if device.type == "cuda" and kv.facts().graph_decode and not row["graph_replays"]:
        print(f"WARNING {label} declares graph_decode but replayed no graph at {batch}x{context}: timed eagerly",
              flush=True)
    if before:
        per_step = (after["transfer_bytes_h2d"] - h2d0) / 10
        row["h2d_bytes_per_step"] = per_step
        row["prefetch_gb_s"] = per_step / ms / 1e6
        if kv.name == "infinigen":
            row["selected_fraction_last_layer"] = after["selected_fraction_per_layer"][-1]
    for r in reqs:
        kv.free(r)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--strategies", default="paged;offload;infinigen:calibration=random;"
                    "infinigen:calibration=random,select=token", help="';'-separated strategy specs")
    ap.add_argument("--tiny", action="store_true", help="2-layer dummy model on the CPU (smoke test)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    env = bench_environment(device)
    print(env_line(env), flush=True)
    h2d, errs, gather = {}, {}, []
    if not args.tiny:  # pinned memory and the GPU-side gather exist only on CUDA
        h2d = host_bandwidth("h2d")
        print(f"pinned h2d: {h2d['gb_per_s']:.1f} GB/s", flush=True)
        errs = check_gather()
        print("gather/scatter max abs error:", errs, flush=True)
        assert all(e == 0.0 for e in errs.values()), errs
        gather = gather_bandwidth()
    for g in gather:
        g["fraction_of_h2d"] = g["gb_s"] / h2d["gb_per_s"]
        g["sorted_fraction_of_h2d"] = g["sorted_gb_s"] / h2d["gb_per_s"]
        print(f"gather {g['pattern']}: {g['gb_s']:.1f} GB/s, sorted {g['sorted_gb_s']:.1f} GB/s "
              f"({g['sorted_fraction_of_h2d']:.0%} of pinned h2d); CPU gather + copy "
              f"{g['cpu_gather_then_copy_gb_s']:.1f} GB/s", flush=True)

    model, grid = (TINY_MODEL, TINY_GRID) if args.tiny else (MODEL, GRID)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    loaded = load_model(model, device=device, dtype=dtype)
    bpt = loaded.config.kv_bytes_per_token(dtype)
    max_tokens = max(b * t for b, t in grid) + 16 * 64
    decode = []
    for spec in args.strategies.split(";"):
        name = spec.split(":")[0]
        label = name + ("-token" if "select=token" in spec else "")
        if name != "paged":
            spec += f"{',' if ':' in spec else ':'}host_kv_bytes={(max_tokens + 4096) * bpt}"
        t0 = time.perf_counter()
        engine = make_engine(loaded, spec, max_tokens, args.tiny)
        fill_random(engine)
        print(f"{spec}: set up in {time.perf_counter() - t0:.1f} s", flush=True)
        for b, t in grid:
            row = time_decode(engine, label, b, t)
            if "prefetch_gb_s" in row and h2d:
                row["prefetch_fraction_of_h2d"] = row["prefetch_gb_s"] / h2d["gb_per_s"]
            decode.append(row)
            print(json.dumps(row), flush=True)
        del engine
        gc.collect()  # captured graphs hold the strategy (and its pinned pool) in reference cycles
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {(r["strategy"], r["batch"], r["context"]): r for r in decode}
    for b, t in grid:
        for label in ("infinigen", "infinigen-token"):
            off, ig = by.get(("offload", b, t)), by.get((label, b, t))
            if off and ig:
                ig["speedup_vs_offload"] = off["step_ms"] / ig["step_ms"]
    result = {"env": env, "model": model, "dtype": str(dtype).split(".")[1], "h2d": h2d, "gather_errors": errs,
              "gather": gather, "decode": decode, "strategies": args.strategies}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "offload_decode.json").write_text(json.dumps(result, indent=1))
    (args.out / "offload_decode.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    env = r["env"]
    lines = [f"# Offloaded KV: device-side gather and decode step (`{r['model']}`, {r['dtype']})", "", env_line(env), ""]
    if r["h2d"]:
        lines += [
            f"Pinned host-to-device bulk copy, measured in the same run: **{r['h2d']['gb_per_s']:.1f} GB/s**.", "",
            "## Gather of scattered rows from pinned memory (4 GiB pinned pool)", "",
            "Rows in selection order, or sorted by address first (what the engine does); CPU gather + copy "
            "is the naive design (index_select into a pinned buffer, then one bulk copy).", "",
            "| pattern | row bytes | rows | MB | GPU gather GB/s | sorted GB/s | sorted, of pinned h2d | "
            "CPU gather + copy GB/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for g in r["gather"]:
        lines.append(f"| {g['pattern']} | {g['row_bytes']} | {g['rows']} | {g['bytes'] / 1e6:.0f} | {g['gb_s']:.1f} | "
                     f"{g['sorted_gb_s']:.1f} | {g['sorted_fraction_of_h2d']:.0%} | "
                     f"{g['cpu_gather_then_copy_gb_s']:.1f} |")
    lines += ["", "## Decode step (median of 10, ms)", "",
              "`infinigen`: alpha 4, partial ratio 0.2, budget 20% of the context, 2 dense layers, each KV "
              "head its own top-k (`select=head`, InfiniGen) or whole tokens (`select=token`). Prefetch GB/s = "
              "host-to-device bytes per step / step time (a floor on the copy's own speed: compute is included). "
              "Every strategy's steps replay CUDA graphs on a GPU, `offload`'s and `infinigen`'s per (batch, "
              "context) bucket (graph replays per 10 timed steps are in the JSON).",
              "",
              "| batch | context | paged | offload | infinigen | infinigen-token | vs offload (head / token) | "
              "prefetch GB/s offload / head / token | offload / token, of pinned h2d |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(d["strategy"], d["batch"], d["context"]): d for d in r["decode"]}
    pairs = sorted({(d["batch"], d["context"]) for d in r["decode"]})

    def f(d, key, fmt="{:.2f}"):
        return fmt.format(d[key]) if d and key in d else "-"

    for b, t in pairs:
        p, o = by.get(("paged", b, t)), by.get(("offload", b, t))
        i, k = by.get(("infinigen", b, t)), by.get(("infinigen-token", b, t))
        lines.append(f"| {b} | {t} | {f(p, 'step_ms')} | {f(o, 'step_ms')} | {f(i, 'step_ms')} | {f(k, 'step_ms')} | "
                     f"{f(i, 'speedup_vs_offload', '{:.2f}x')} / {f(k, 'speedup_vs_offload', '{:.2f}x')} | "
                     f"{f(o, 'prefetch_gb_s', '{:.1f}')} / {f(i, 'prefetch_gb_s', '{:.1f}')} / "
                     f"{f(k, 'prefetch_gb_s', '{:.1f}')} | {f(o, 'prefetch_fraction_of_h2d', '{:.0%}')} / "
                     f"{f(k, 'prefetch_fraction_of_h2d', '{:.0%}')} |")
    lines += ["", "## Against the targets", ""]
    g = {x["pattern"]: x for x in r["gather"]}
    if "per_head_20pct_of_layer" in g:
        frac = g["per_head_20pct_of_layer"]["sorted_fraction_of_h2d"]
        lines.append(f"- Prefetch >= 70% of the pinned host-to-device bandwidth: the gather of InfiniGen's rows "
                     f"(256 B, 20% of a layer, sorted) runs at {frac:.0%}: {'met' if frac >= 0.7 else 'missed'}. "
                     "Inside a decode step the effective rate is lower (table above): the step also waits on "
                     "compute, speculation and per-layer launch overhead, most visibly at small batch.")
    for b, t in pairs:
        o = by.get(("offload", b, t))
        if t >= 16384 and o and "prefetch_fraction_of_h2d" in o:
            x = o["prefetch_fraction_of_h2d"]
            lines.append(f"- `offload` fetches at >= 85% of the pinned copy at >= 16k, {b} x {t}: {x:.0%} "
                         f"({'met' if x >= 0.85 else 'missed'}; {o['graph_replays']} of 10 steps replayed).")
    for b, t in pairs:
        i = by.get(("infinigen", b, t))
        if t == 16384 and i and "speedup_vs_offload" in i:
            x = i["speedup_vs_offload"]
            lines.append(f"- `infinigen` >= 3x faster than `offload` at 16k, batch {b}: {x:.2f}x "
                         f"({'met' if x >= 3 else 'missed'}).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
