"""Paged decode attention: the Triton kernel against the memory ceiling and torch SDPA.

Llama-3-8B attention shapes (Hq 32, Hkv 8, D 128, bf16), block size 16, each sequence's block
table a random permutation of the pool's blocks. For batch {1, 8, 64} x context {1k, 4k, 16k, 32k}
(all sequences of one row the same length) it reports the Triton kernel's time and achieved
KV-read bandwidth (K and V bytes read / time) as a fraction of the device-to-device copy bandwidth
measured in the same run, beside ``F.scaled_dot_product_attention(enable_gqa=True)`` on the same
KV stored contiguously ``[B, Hkv, T, D]`` (default dispatch and each backend that accepts it).

Correctness comes first: bf16 kernel output (and the H2O column sums) against a float32
reference on random data, several lengths and split counts; the script stops if that fails.
Times are device times: ``CALLS`` launches captured in one CUDA graph and replayed, CUDA events
around each replay, median per launch. Graphs because an engine captures its decode step the same
way, and because eager timing (``triton.testing.do_bench``) of these launches measured the host:
the Triton launcher's Python cost (about 0.1 ms for split + merge, see NOTES.md) exceeded the
device time of every small configuration. The launches cycle through enough copies of the inputs
(at least 2, and at least 4x the 50 MB L2 together) that each reads its K/V from device memory.
The host cost per call is reported separately. ``--tune`` adds a sweep over the kernel's tile,
warps, pipelining depth and split count.
Writes benchmarks/results/decode_attention.json and .md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from ceilings import RESULTS, device_copy_bandwidth, env_line, gpu_environment  # noqa: E402

from kvscope.attention.torch_ref import attend_decode  # noqa: E402
from kvscope.attention.triton_decode import paged_decode_attention  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = D**-0.5
BATCHES = (1, 8, 64)
CONTEXTS = (1024, 4096, 16384, 32768)
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def make_paged(lens: list[int], seed: int):
    """q ``[B, Hq, D]``, K/V pools ``[num_blocks, BS, Hkv, D]`` holding exactly the sequences'
    blocks, block tables ``[B, max_blocks]`` (a random permutation of the pool), lengths ``[B]``."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    max_blocks = -(-max(lens) // BS)
    num_blocks = len(lens) * max_blocks
    k = torch.randn(num_blocks, BS, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    v = torch.randn(num_blocks, BS, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    q = torch.randn(len(lens), HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).view(len(lens), max_blocks).int()
    return q, k, v, tables, torch.tensor(lens, device="cuda", dtype=torch.int32)


def gather(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, BS, Hkv, D]`` through ``tables`` -> ``[B, max_blocks * BS, Hkv, D]``."""
    return pool[tables.long()].flatten(1, 2)


def kv_bytes(batch: int, ctx: int) -> int:
    return 2 * batch * ctx * HKV * D * torch.finfo(DTYPE).bits // 8


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def check_correctness(configs: list[dict]) -> list[dict]:
    """Kernel (bf16) vs float32 reference on fresh random data for each config; raises on failure."""
    rows = []
    for i, (lens, splits) in enumerate(
        [([1, 700, 4096, 33, 2500], None), ([1, 700, 4096, 33, 2500], 1), ([5000, 17, 3001], 7), ([32768], None)]
    ):
        q, k, v, tables, ctx = make_paged(lens, seed=100 + i)
        kg, vg = gather(k, tables).float(), gather(v, tables).float()
        ref = attend_decode(q.float(), kg, vg, ctx.long(), SCALE)
        group = HQ // HKV
        scores = torch.einsum("bhd,bthd->bht", q.float(), kg.repeat_interleave(group, dim=2)) * SCALE
        valid = torch.arange(kg.shape[1], device="cuda")[None, :] < ctx[:, None]
        probs = scores.masked_fill(~valid[:, None], float("-inf")).softmax(-1)
        ref_colsum = probs.view(len(lens), HKV, group, -1).sum(2)
        for cfg in configs:
            out, colsum = paged_decode_attention(q, k, v, tables, ctx, SCALE, BS, splits, emit_colsum=True, **cfg)
            row = {"lens": lens, "num_splits": splits, "config": cfg,
                   "out_rel_err": rel_err(out, ref), "colsum_rel_err": rel_err(colsum, ref_colsum)}
            rows.append(row)
            if not (row["out_rel_err"] < 1e-2 and row["colsum_rel_err"] < 1e-3):
                raise SystemExit(f"kernel disagrees with the reference: {row}")
    return rows


CALLS = 20
L2_BYTES = 50 * 2**20


def num_copies(nbytes: int) -> int:
    """Input copies to rotate through so that no launch finds its K/V in L2."""
    return max(2, -(-4 * L2_BYTES // nbytes))


def graph_us(fns: list[Callable[[], object]], replays: int = 10) -> float:
    """Median device microseconds per launch of ``CALLS`` launches cycling through ``fns`` (one per
    input copy), captured in one CUDA graph and replayed ``replays`` times after warm-up."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fns[i % len(fns)]()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1e3 * statistics.median(times) / CALLS


def host_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Wall-clock microseconds per eager call, back to back: the host cost when it exceeds the
    device time (use on a tiny shape)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / calls


def paged_inputs(batch: int, ctx: int, seed: int) -> list[tuple]:
    nbytes = kv_bytes(batch, ctx)
    return [make_paged([ctx] * batch, seed=seed + i) for i in range(num_copies(nbytes))]


KERNEL_CONFIGS = [
    dict(block_n=n, num_warps=w, num_stages=st) for n, w, st in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))
]
TUNE_SHAPES = [(1, 32768), (8, 4096), (8, 16384), (64, 4096)]
SPLIT_SHAPES = [(1, 4096), (1, 32768), (8, 4096), (8, 16384), (64, 4096)]
SPLIT_COUNTS = (None, 1, 2, 4, 8, 16, 32, 64)
SPLIT_CONFIGS = 2  # best kernel configs whose split counts are swept


def time_configs(batch: int, ctx: int, configs: list[dict], split_counts: list[int | None]) -> list[dict]:
    """Kernel device time (us) for each config x split count on one shape; compile errors recorded."""
    sets = paged_inputs(batch, ctx, seed=1)
    rows = []
    for cfg, splits in itertools.product(configs, split_counts):
        row = {"batch": batch, "ctx": ctx, "config": cfg, "num_splits": splits}
        fns = [lambda s=s: paged_decode_attention(*s, SCALE, BS, splits, **cfg) for s in sets]
        try:
            row["us"] = graph_us(fns)
        except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
            row["error"] = repr(e)[:200]
        rows.append(row)
    return rows


def tune() -> dict:
    """Time every kernel config on a few shapes (default splits), then the split count for the
    best configs. Best: smallest geometric mean over the shapes of time / best time there."""
    rows = []
    for batch, ctx in TUNE_SHAPES:
        rows += time_configs(batch, ctx, KERNEL_CONFIGS, [None])
        torch.cuda.empty_cache()
    best_us: dict[tuple, float] = {}
    for r in rows:
        if "us" in r:
            key = (r["batch"], r["ctx"])
            best_us[key] = min(best_us.get(key, float("inf")), r["us"])
    ratios: dict[str, list[float]] = {}
    for r in rows:
        if "us" in r:
            key = json.dumps(r["config"], sort_keys=True)
            ratios.setdefault(key, []).append(r["us"] / best_us[(r["batch"], r["ctx"])])
    complete = {c: statistics.geometric_mean(v) for c, v in ratios.items() if len(v) == len(TUNE_SHAPES)}
    ranked = sorted(complete.items(), key=lambda cv: cv[1])
    top = [json.loads(c) for c, _ in ranked[:SPLIT_CONFIGS]]
    split_rows = []
    for batch, ctx in SPLIT_SHAPES:
        split_rows += time_configs(batch, ctx, top, list(SPLIT_COUNTS))
        torch.cuda.empty_cache()
    return {
        "kernel_configs": rows,
        "ranking": [{"config": json.loads(c), "geomean_vs_best": g} for c, g in ranked],
        "best": top[0],
        "splits": split_rows,
    }


def measure_shape(batch: int, ctx: int, copy_gbps: float) -> dict:
    """Triton (plain and with column sums) and SDPA device times on one shape, with bandwidths."""
    nbytes = kv_bytes(batch, ctx)
    row = {"batch": batch, "ctx": ctx, "kv_bytes": nbytes, "floor_us": nbytes / copy_gbps / 1e3}
    sets = paged_inputs(batch, ctx, seed=batch * 7 + ctx)
    row["copies"] = len(sets)
    row["triton_us"] = graph_us([lambda s=s: paged_decode_attention(*s[:5], SCALE, BS) for s in sets])
    row["triton_colsum_us"] = graph_us(
        [lambda s=s: paged_decode_attention(*s[:5], SCALE, BS, emit_colsum=True) for s in sets]
    )
    # The same K/V, stored contiguously [B, Hkv, T, D] for SDPA; the paged copies are dropped first.
    contiguous = []
    while sets:
        q, k, v, tables, _ = sets.pop()
        contiguous.append((q[:, :, None, :], gather(k, tables).transpose(1, 2).contiguous(),
                           gather(v, tables).transpose(1, 2).contiguous()))
        del q, k, v, tables
    torch.cuda.empty_cache()

    def sdpa(q4, kc, vc, backend=None):
        if backend is None:
            return F.scaled_dot_product_attention(q4, kc, vc, scale=SCALE, enable_gqa=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q4, kc, vc, scale=SCALE, enable_gqa=True)

    for name, backend in [("sdpa", None)] + [(f"sdpa_{n}", b) for n, b in SDPA_BACKENDS.items()]:
        try:
            sdpa(*contiguous[0], backend)  # eagerly first: a backend refusing GQA raises here, not in a capture
        except RuntimeError:
            row[f"{name}_us"] = None
            continue
        row[f"{name}_us"] = graph_us([lambda c=c: sdpa(*c, backend) for c in contiguous])
    row["sdpa_best_us"] = min(t for n in ["sdpa"] + [f"sdpa_{b}" for b in SDPA_BACKENDS] if (t := row[f"{n}_us"]))
    for key in ("triton", "sdpa_best"):
        row[f"{key}_gbps"] = nbytes / row[f"{key}_us"] / 1e3
        row[f"{key}_frac_copy"] = row[f"{key}_gbps"] / copy_gbps
    return row


def host_overhead() -> dict:
    """Host microseconds per eager call at batch 1, context 1k (device time a few us)."""
    q, k, v, tables, lens = make_paged([1024], seed=5)
    kc, vc = (gather(x, tables).transpose(1, 2).contiguous() for x in (k, v))
    return {
        "triton_us": host_us(lambda: paged_decode_attention(q, k, v, tables, lens, SCALE, BS)),
        "triton_one_split_us": host_us(lambda: paged_decode_attention(q, k, v, tables, lens, SCALE, BS, 1)),
        "sdpa_us": host_us(
            lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, scale=SCALE, enable_gqa=True)
        ),
    }


def colsum_breakdown(shapes=((8, 32768), (64, 4096))) -> list[dict]:
    """Device microseconds per kernel of one call, with and without the column sums (CUPTI through
    the torch profiler; 5 calls averaged, each reading 1 GB, far beyond L2)."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for batch, ctx in shapes:
        q, k, v, tables, lens = make_paged([ctx] * batch, seed=9)
        for emit in (False, True):
            def call():
                return paged_decode_attention(q, k, v, tables, lens, SCALE, BS, emit_colsum=emit)

            call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    call()
                torch.cuda.synchronize()
            kernels: dict[str, float] = {}
            for evt in prof.events():
                if evt.device_type == torch.autograd.DeviceType.CUDA:
                    kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.time_range.elapsed_us() / 5
            rows.append({"batch": batch, "ctx": ctx, "emit_colsum": emit, "kernel_us": kernels})
    return rows


def measure_table(copy_gbps: float) -> list[dict]:
    rows = []
    for batch, ctx in itertools.product(BATCHES, CONTEXTS):
        row = measure_shape(batch, ctx, copy_gbps)
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"B={batch:3d} T={ctx:6d}  triton {row['triton_us']:9.1f} us {row['triton_frac_copy']:6.1%}  "
              f"+colsum {row['triton_colsum_us']:9.1f} us  sdpa best {row['sdpa_best_us']:9.1f} us "
              f"{row['sdpa_best_frac_copy']:6.1%}", flush=True)
    return rows


def write_report(out: Path, result: dict) -> None:
    env, copy, rows = result["environment"], result["copy_ceiling"], result["results"]
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [
        "# Paged decode attention (Triton) vs the copy ceiling and torch SDPA",
        "",
        env_line(env),
        f"Llama-3-8B shapes: Hq {HQ}, Hkv {HKV}, D {D}, bf16, block size {BS}, block tables a random "
        "permutation of the pool; all sequences of a row have the same length.",
        f"Copy ceiling measured in this run: {copy['gb_per_s']:.0f} GB/s (1 GiB device-to-device, read + write).",
        f"Times: device time per launch, median over replays of a CUDA graph of {CALLS} launches cycling "
        "through input copies that together exceed 4x L2 (host launch cost excluded; it is given below). "
        "Bandwidth = K + V bytes read / time; floor = those bytes at the copy ceiling. SDPA runs on the same KV stored "
        "contiguously `[B, Hkv, T, D]`; `sdpa` is its default dispatch, `best` the fastest of that and "
        "each backend forced (flash / cudnn / efficient; n/a = rejected the inputs).",
        "",
        "| batch | context | KV MB | floor us | triton us | triton GB/s | % copy | +colsum us | sdpa us | "
        "flash us | cudnn us | efficient us | sdpa best GB/s | triton / best sdpa |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['ctx']} | {r['kv_bytes'] / 1e6:.0f} | {r['floor_us']:.1f} | {r['triton_us']:.1f} "
            f"| {r['triton_gbps']:.0f} | {100 * r['triton_frac_copy']:.0f}% | {r['triton_colsum_us']:.1f} "
            f"| {fmt(r['sdpa_us'])} | {fmt(r['sdpa_flash_us'])} | {fmt(r['sdpa_cudnn_us'])} "
            f"| {fmt(r['sdpa_efficient_us'])} | {r['sdpa_best_gbps']:.0f} | {r['triton_us'] / r['sdpa_best_us']:.2f} |"
        )
    errs, host = result["correctness"], result["host_overhead"]
    lines += [
        "",
        f"Host cost per eager call (batch 1, context 1k, wall clock of 200 back-to-back calls): Triton "
        f"{host['triton_us']:.0f} us (split + merge launches), {host['triton_one_split_us']:.0f} us with one "
        f"split (one launch), SDPA {host['sdpa_us']:.0f} us.",
        f"Correctness (bf16 vs float32 reference, {len(errs)} runs): output relative error at most "
        f"{max(e['out_rel_err'] for e in errs):.1e}, column sums at most {max(e['colsum_rel_err'] for e in errs):.1e}.",
    ]
    lines += ["", "Device time per kernel with and without `emit_colsum` (torch profiler, mean of 5 calls):", ""]
    for r in result["colsum_breakdown"]:
        if "error" in r:
            lines.append(f"- profiler failed: {r['error']}")
        else:
            kernels = ", ".join(f"`{name}` {us:.1f} us" for name, us in r["kernel_us"].items())
            lines.append(f"- batch {r['batch']}, context {r['ctx']}, emit_colsum={r['emit_colsum']}: {kernels}")
    if "tuning" in result:
        t = result["tuning"]
        lines += ["", "## Tuning", "", f"Best kernel config (geometric mean over {TUNE_SHAPES}): `{t['best']}`.",
                  "", "| config | geomean time / best |", "|---|---:|"]
        lines += [f"| `{r['config']}` | {r['geomean_vs_best']:.3f} |" for r in t["ranking"]]
        lines += ["", "Kernel configs (us, default splits):", "",
                  "| config | " + " | ".join(f"B{b} T{c}" for b, c in TUNE_SHAPES) + " |",
                  "|---|" + "---:|" * len(TUNE_SHAPES)]
        for cfg in KERNEL_CONFIGS:
            cells = [f"{r['us']:.1f}" if "us" in r else "err" for r in t["kernel_configs"] if r["config"] == cfg]
            lines.append(f"| `{cfg}` | " + " | ".join(cells) + " |")
        split_names = ["auto" if n is None else str(n) for n in SPLIT_COUNTS]
        lines += ["", f"Split count with the best {SPLIT_CONFIGS} configs (us):", "",
                  "| config | batch | context | " + " | ".join(split_names) + " |",
                  "|---|---:|---:|" + "---:|" * len(SPLIT_COUNTS)]
        for cfg in t["ranking"][:SPLIT_CONFIGS]:
            for batch, ctx in SPLIT_SHAPES:
                cells = [f"{r['us']:.1f}" if "us" in r else "err" for r in t["splits"]
                         if (r["batch"], r["ctx"]) == (batch, ctx) and r["config"] == cfg["config"]]
                lines.append(f"| `{cfg['config']}` | {batch} | {ctx} | " + " | ".join(cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_attention.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "decode_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tune", action="store_true", help="also sweep kernel configs and split counts")
    args = ap.parse_args()
    env = gpu_environment()
    copy = device_copy_bandwidth()
    print(f"copy ceiling {copy['gb_per_s']:.0f} GB/s", flush=True)
    result = {"benchmark": "decode_attention", "environment": env, "copy_ceiling": copy,
              "correctness": check_correctness([{}])}
    print("default config correct", flush=True)
    if args.tune:
        result["tuning"] = tune()
        print("best config", result["tuning"]["best"], flush=True)
        result["correctness"] += check_correctness([result["tuning"]["best"]])
    result["host_overhead"] = host_overhead()
    print("host us per call", result["host_overhead"], flush=True)
    result["results"] = measure_table(copy["gb_per_s"])
    try:
        result["colsum_breakdown"] = colsum_breakdown()
    except Exception as e:  # the profiler is a diagnostic; its failure must not cost the table
        result["colsum_breakdown"] = [{"error": repr(e)[:300]}]
    print("colsum breakdown", result["colsum_breakdown"], flush=True)
    write_report(Path(args.out), result)


if __name__ == "__main__":
    main()
