"""Kernel-level profile of the decode step replayed from a CUDA graph: of the step's time, how much
is weight GEMMs (at what fraction of the copy bandwidth), other kernels, and gaps between kernels.

Method. A graph engine built as ``decode_step.py`` builds it (Llama-3.1-8B shapes, random bf16
weights, ``paged``, ``enforce_eager=False``; graphs for the points' batch sizes only, no piecewise
graphs: they never serve pure-decode steps), KV filled by ``fill_random``. Per point BxT,
``decode_step.inject`` gives B requests T tokens of context; the *model step* (``runner.run`` +
``kv.end_step``) is (1) checked: logits against the same engine's eager path (graph runner off, as
``enforce_eager=True`` runs) within ``REL_TOL`` relative L2 (the paths split decode attention
differently, moving bf16 logits by a few percent; a wrong step moves them by ~100%); (2) timed with
no profiler (CUDA events, median of ``--steps`` after ``--warmup``: the *wall*); (3) run ``--steps``
more times under torch.profiler (CUDA activity, one sync at the end).

Device events by name: *gemm* (gemm, gemv, nvjet, cutlass, cublas, xmma, splitKreduce...),
*attention* (the Triton kernels of ``kvscope.attention.triton_decode`` and ``decode_splits``), *copy*
(memcpy/memset), *other* (norms, RoPE, KV write, SiLU, logits copies...). GEMM bytes: each GEMM is
one ``nn.Linear`` (per layer fused ``qkv_proj``, ``o_proj``, fused ``gate_up_proj``, ``down_proj``;
then ``lm_head``) reading its weight once; activations are left out (0.5 MB at batch 64). Always
reported: all linear weight bytes / all GEMM time, as GB/s and as a fraction of the copy bandwidth
measured in the run (``ceilings.device_copy_bandwidth``, read + written: decode_step's roofline).
Per linear only where unambiguous: the events sorted by start are cut into ``--steps`` chunks that
must repeat the same names; in each, maximal runs of consecutive GEMM kernels (a split-K reduce
stays with its GEMM) are matched in launch order to the linears in call order if the counts agree,
else the output says why not. Gaps = wall - summed device event time per step; *between kernels* =
idle time inside the step's device span (under the profiler), the rest mostly the host preparing
the step. If CUPTI reports fewer events per step than linears (the graph's kernels missing), the
output says so and profiles the eager path instead (labelled *eager*). ``--tiny``: 2-layer dummy
model on the CPU (no graphs, no device events: the files say so). Writes ``decode_kernels.json`` and
``.md`` to ``--out`` (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import (bench_environment, copy_ceiling, engine_config, graph_replays, sync,  # noqa: E402
                          timed_ms, weight_bytes_per_step)
from ceilings import RESULTS, env_line  # noqa: E402
from decode_step import MODEL, TINY_MODEL, fill_random, inject, release  # noqa: E402

from kvscope.engine.engine import LLMEngine  # noqa: E402
from kvscope.kv.registry import create  # noqa: E402
from kvscope.models.loader import load_model  # noqa: E402

REL_TOL = 0.1  # relative L2 difference of graph and eager logits
# decode_step's grid reaches 8192 tokens and its graphs fix the attention split count from 8192 + 256:
# the same by default, so that the batch-1 step profiled is the one it timed (5.04 ms on an H200).
DECODE_STEP_MAX_LEN = 8192 + 256
GEMM_WORDS = ("gemm", "gemv", "nvjet", "cutlass", "cublas", "matmul", "xmma", "splitkreduce", "sm90_", "sm80_")
Event = tuple[str, float, float]  # name, start µs, end µs (device clock)
Roles = list[tuple[str, int]]  # (linear, weight bytes) in call order


def attention_kernels() -> tuple[str, ...]:
    """Names of the Triton decode-attention kernels, read from their modules so that a rename follows."""
    from kvscope.attention import decode_splits, triton_decode
    return tuple(n for m in (triton_decode, decode_splits) for n, v in vars(m).items()
                 if type(v).__name__ == "JITFunction")


def category(name: str, attention: tuple[str, ...]) -> str:
    if name.startswith(("Memcpy", "Memset")):
        return "copy"
    if any(name == a or name.startswith(a + "_") for a in attention):  # older Triton appends a signature
        return "attention"
    return "gemm" if any(w in name.lower() for w in GEMM_WORDS) else "other"


def linears(model: nn.Module) -> Roles:
    """Every linear in registration order, which for the Llama modules is the order a forward pass
    calls them; the layer index is dropped so that the 32 layers' ``o_proj`` share one role."""
    return [(re.sub(r"layers\.\d+\.", "layers.*.", name), sum(p.numel() * p.element_size() for p in m.parameters()))
            for name, m in model.named_modules() if isinstance(m, nn.Linear)]


@contextmanager
def graphs_off(engine: LLMEngine) -> Iterator[None]:
    """The runner's eager path, the one an ``enforce_eager=True`` engine takes, on the same KV blocks."""
    runner = engine.runner
    saved, runner.graphs, runner.pieces = (runner.graphs, runner.pieces), None, None
    try:
        yield
    finally:
        runner.graphs, runner.pieces = saved


def profiled(step: Callable[[], object], steps: int, device: torch.device) -> tuple[list[Event], float]:
    """Device events of ``steps`` calls, sorted by start, and the host's ms per call under the profiler."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    events = [(e.name, float(e.time_range.start), float(e.time_range.end)) for e in prof.events()
              if e.device_type.name == "CUDA"]
    return sorted(events, key=lambda e: e[1]), wall


def busy_us(events: list[Event]) -> float:
    """Union of the events' intervals: their sum unless kernels overlap (programmatic dependent launch)."""
    total, end = 0.0, float("-inf")
    for _, s, e in events:
        if e > end:
            total, end = total + e - max(s, end), e
    return total


def attribute(chunks: list[list[Event]], roles: Roles, attention: tuple[str, ...], bw: float) -> dict[str, Any]:
    """Per-linear GEMM time and bandwidth by launch order (see the module docstring), or why not."""
    steps_runs = []
    for chunk in chunks:  # copies skipped: a memset before a split-K GEMM does not end its run
        kept = [(c == "gemm", ev) for ev in chunk if (c := category(ev[0], attention)) != "copy"]
        steps_runs.append([[ev for _, ev in grp] for gemm, grp in groupby(kept, key=lambda x: x[0]) if gemm])
    if any(len(runs) != len(roles) for runs in steps_runs):
        return {"method": "none, totals only", "reason": f"{len(steps_runs[0])} runs of GEMM kernels per step against "
                f"{len(roles)} linears: launches cannot be matched to weights one to one"}
    by: dict[str, dict[str, Any]] = {}
    for i, (role, nbytes) in enumerate(roles):
        r = by.setdefault(role, {"calls_per_step": 0, "bytes_per_step": 0, "us": [], "kernels": set()})
        r["calls_per_step"] += 1
        r["bytes_per_step"] += nbytes
        r["us"] += [sum(e - s for _, s, e in runs[i]) for runs in steps_runs]
        r["kernels"] |= {n for runs in steps_runs for n, _, _ in runs[i]}
    for r in by.values():
        calls = r.pop("us")
        us = sum(calls) / len(chunks)
        r.update(us_per_step=us, us_per_call=[min(calls), statistics.median(calls), max(calls)],
                 gb_per_s=r["bytes_per_step"] / us / 1e3, kernels=sorted(r["kernels"]))
        r["frac_copy_ceiling"] = r["gb_per_s"] * 1e9 / bw
    return {"method": "by launch order", "roles": by}


def analyse(events: list[Event], steps: int, roles: Roles, wall_ms: float, bw: float) -> dict[str, Any]:
    attention, out = attention_kernels(), {"events_recorded": len(events), "wall_ms": wall_ms}
    if not events:
        return out
    names: dict[str, list[Any]] = {}
    for n, s, e in events:
        k = names.setdefault(n, [category(n, attention), 0.0, 0])
        k[1], k[2] = k[1] + e - s, k[2] + 1
    total = sum(us for _, us, _ in names.values())
    cats: dict[str, dict[str, float]] = {c: {"ms_per_step": 0.0, "launches_per_step": 0.0}
                                         for c in ("gemm", "attention", "other", "copy")}
    for c, us, k in names.values():
        cats[c]["ms_per_step"] += us / steps / 1e3
        cats[c]["launches_per_step"] += k / steps
    nbytes, ms = sum(b for _, b in roles), cats["gemm"]["ms_per_step"]
    out |= {"categories": cats, "device_sum_ms": total / steps / 1e3, "gaps_ms": wall_ms - total / steps / 1e3,
            "kernels": sorted(({"name": n, "category": c, "us_per_step": us / steps, "calls_per_step": k / steps,
                                "share": us / total} for n, (c, us, k) in names.items()),
                              key=lambda x: -x["us_per_step"]),
            "gemm_total": {"weight_bytes_per_step": nbytes, "ms_per_step": ms, "ms_at_copy_ceiling": nbytes / bw * 1e3,
                           "gb_per_s": nbytes / ms / 1e6 if ms else None,
                           "frac_copy_ceiling": nbytes / ms * 1e3 / bw if ms else None}}
    k = len(events) // steps
    chunks = [events[i * k:(i + 1) * k] for i in range(steps)]
    out["steps_aligned"] = len(events) == k * steps and all([n for n, _, _ in c] == [n for n, _, _ in chunks[0]]
                                                            for c in chunks)
    if not out["steps_aligned"]:
        out["gemm_layers"] = {"method": "none, totals only", "reason": "the device events do not repeat step by step"}
        return out
    out["span_ms"] = statistics.median(max(e for _, _, e in c) - c[0][1] for c in chunks) / 1e3
    out["busy_ms"] = statistics.median(busy_us(c) for c in chunks) / 1e3
    out["gaps_inside_ms"] = out["span_ms"] - out["busy_ms"]
    out["gemm_layers"] = attribute(chunks, roles, attention, bw)
    return out


def run_point(engine: LLMEngine, b: int, t: int, args: argparse.Namespace, device: torch.device,
              roles: Roles, bw: float) -> dict[str, Any]:
    reqs = inject(engine, b, t, f"k-{b}x{t}")
    batch_obj, rows, cuda = engine.runner.build_batch(reqs, [1] * b), list(range(b)), device.type == "cuda"

    def step() -> torch.Tensor:
        logits = engine.runner.run(batch_obj, rows)
        engine.kv.end_step(batch_obj)
        return logits

    graph = step().float()
    with graphs_off(engine):
        eager = step().float()
    diff = graph - eager
    check = {"rel_l2": float(diff.norm() / eager.norm()), "tolerance": REL_TOL,
             "max_abs_diff_of_max_logit": float(diff.abs().max() / eager.abs().max())}
    check["passed"] = check["rel_l2"] <= REL_TOL
    print(f"{b}x{t} graph vs eager logits: {json.dumps(check)}", flush=True)
    if not check["passed"]:
        raise SystemExit(f"graph and eager logits disagree at {b}x{t}: {json.dumps(check)}")
    row: dict[str, Any] = {"batch": b, "context": t, "check": check, "runs": []}
    # The eager profile is the fallback for a graph replay whose kernels CUPTI did not report (fewer
    # events per step than linears: only the copies around the replay); a CPU has neither.
    for mode, eager_mode in ([("graphs", False), ("eager", True)] if cuda else [("eager (CPU: no graphs)", True)]):
        with graphs_off(engine) if eager_mode else nullcontext():
            before = graph_replays(engine)
            times = timed_ms(step, device, args.warmup, args.steps)
            events, prof_wall = profiled(step, args.steps, device)
            replays = None if before is None else graph_replays(engine) - before
        if cuda and not eager_mode and not replays:
            raise SystemExit(f"{b}x{t}: the model step ran no CUDA graph (cuda_graph_replays unchanged)")
        res = analyse(events, args.steps, roles, statistics.median(times), bw) | {
            "mode": mode, "wall_ms_all": times, "profiled_wall_ms": prof_wall, "graph_replays": replays}
        if len(events) < args.steps * len(roles):
            res["missing_kernels"] = (f"CUPTI reported {len(events) / args.steps:.0f} device events per step, fewer "
                                      f"than the {len(roles)} linears" if cuda else
                                      "CPU run: the profiler records CPU ops only")
        row["runs"].append(res)
        print(f"{b}x{t} {mode}: wall {res['wall_ms']:.3f} ms, {len(events) / args.steps:.0f} device events per step, "
              f"device sum {res.get('device_sum_ms', 0.0):.3f} ms {res.get('missing_kernels', '')}", flush=True)
        if "missing_kernels" not in res:
            break
    release(engine, reqs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="2-layer dummy model on the CPU (smoke test)")
    ap.add_argument("--points", help="comma-separated BxT points (default 1x1024,64x2048; --tiny 1x64,4x256)")
    ap.add_argument("--steps", type=int, default=20, help="model steps timed, and as many profiled")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-model-len", type=int, help=f"default {DECODE_STEP_MAX_LEN}, as decode_step.py's graphs")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    spec = args.points or ("1x64,4x256" if args.tiny else "1x1024,64x2048")
    points = [(int(b), int(t)) for b, t in (p.split("x") for p in spec.split(","))]
    model_name = TINY_MODEL if args.tiny else MODEL
    env = bench_environment(device)
    print(env_line(env), flush=True)
    copy = copy_ceiling(device)
    bw = copy["gb_per_s"] * 1e9
    print(f"copy ceiling {copy['gb_per_s']:.0f} GB/s", flush=True)
    loaded = load_model(model_name, device=device, dtype=torch.bfloat16)
    # One pool for the largest point (the points run one after another); if it does not fit, LLMEngine says so.
    pool = max(b * -(-(t + 32) // 16) * 16 for b, t in points) * loaded.config.kv_bytes_per_token(torch.bfloat16)
    max_len = max([args.max_model_len or (256 if args.tiny else DECODE_STEP_MAX_LEN)] + [t + 256 for _, t in points])
    cfg = dict(model=model_name, device=str(device), dtype="bfloat16", max_num_seqs=max(b for b, _ in points),
               max_model_len=max_len, kv_memory_bytes=pool, enforce_eager=False,
               cuda_graph_sizes=sorted({b for b, _ in points}), piecewise_graph_sizes=[])
    t0 = time.perf_counter()
    engine = LLMEngine(loaded, create("paged"), engine_config(args.tiny, **cfg))
    fill_random(engine)
    sync(device)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    roles, rows = linears(loaded.model), []
    for b, t in points:
        w = weight_bytes_per_step(loaded.model, b)
        rows.append(run_point(engine, b, t, args, device, roles, bw)
                    | {"weight_bytes": w, "weight_roofline_ms": w / bw * 1e3})
    result = {"benchmark": "decode_kernels", "environment": env, "model": model_name, "dtype": "bfloat16",
              "strategy": "paged", "config": cfg | {"steps": args.steps, "warmup": args.warmup}, "copy_ceiling": copy,
              "linears_per_step": len(roles), "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / "decode_kernels.md").write_text(md)
    print(md)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def conclusion(row: dict) -> str:
    r, head = row["runs"][-1], f"At batch {row['batch']} x {row['context']}"
    if "missing_kernels" in r:
        return f"{head} no kernels were recorded ({r['missing_kernels']}): its {r['wall_ms']:.2f} ms are not split."
    mode = r["mode"] if len(row["runs"]) == 1 else f"eager: for the graph, {row['runs'][0]['missing_kernels']}"
    g, c = r["gemm_total"], r["categories"]
    inside = f", {r['gaps_inside_ms']:.2f} ms of them between kernels" if "gaps_inside_ms" in r else ""
    roof = row["weight_roofline_ms"]
    return (f"{head} ({mode}), of the {r['wall_ms']:.2f} ms step (weight roofline {roof:.2f} ms, "
            f"{roof / r['wall_ms']:.0%}) GEMMs take {g['ms_per_step']:.2f} ms over "
            f"{c['gemm']['launches_per_step']:.0f} launches ({pct(g['frac_copy_ceiling'])} of the copy ceiling: "
            f"{g['ms_per_step'] - g['ms_at_copy_ceiling']:.2f} ms more than reading their weights at it), attention "
            f"{c['attention']['ms_per_step']:.2f} ms, other kernels and copies "
            f"{c['other']['ms_per_step'] + c['copy']['ms_per_step']:.2f} ms over "
            f"{c['other']['launches_per_step'] + c['copy']['launches_per_step']:.0f} launches, "
            f"gaps {r['gaps_ms']:.2f} ms{inside}.")


def table(head: str, rows: list[list[Any]]) -> list[str]:
    """A markdown table under the header row ``head``; columns of numbers right-aligned."""
    cells = [[str(c) for c in x] for x in rows]
    num = [all(x[i][:1].isdigit() or not x[i] for x in cells) for i in range(head.count("|") - 1)]
    return [head, "|" + "".join("---:|" if n else "---|" for n in num)] + ["| " + " | ".join(x) + " |" for x in cells]


def markdown(r: dict) -> str:
    cfg = r["config"]
    lines = ["# Decode step kernel by kernel, CUDA graph replay", "",
             "**" + " ".join(conclusion(x) for x in r["results"]) + "**", "", env_line(r["environment"]), "",
             f"{r['model']} (random weights), {r['dtype']}, `{r['strategy']}`, requests given their context directly "
             f"(random KV). Model step = `runner.run` + `kv.end_step` replayed from a CUDA graph (buckets "
             f"{cfg['cuda_graph_sizes']}, max_model_len {cfg['max_model_len']}). Wall = median of {cfg['steps']} "
             f"steps (CUDA events, no profiler) after {cfg['warmup']} warm-up steps; device events from "
             f"torch.profiler (CUPTI) over {cfg['steps']} more. Copy ceiling {r['copy_ceiling']['gb_per_s']:.0f} "
             "GB/s (read + written, measured in this run). Gaps = wall - sum of device event time; *between "
             "kernels* = idle time inside the step's device span under the profiler. GEMM bytes = weights of the "
             f"{r['linears_per_step']} linears a step calls, each read once (attribution: the script's docstring)."]
    for row in r["results"]:
        for x in row["runs"]:
            lines += ["", f"## Batch {row['batch']} x context {row['context']}: {x['mode']}", ""]
            if "missing_kernels" in x:
                then = "; the eager path follows." if x["mode"] == "graphs" else "."
                lines.append(f"Wall {x['wall_ms']:.3f} ms per step; no kernels recorded ({x['missing_kernels']}){then}")
                continue
            g, lay, wall = x["gemm_total"], x["gemm_layers"], x["wall_ms"]
            parts = [(c, v["ms_per_step"], f"{v['launches_per_step']:.0f}") for c, v in x["categories"].items()]
            parts += [("gaps (wall - device sum)", x["gaps_ms"], "")] + (
                [("of which between kernels", x["gaps_inside_ms"], "")] if "gaps_inside_ms" in x else [])
            lines += table("| part | ms per step | launches per step | share of wall |", [
                [p, f"{ms:.3f}", n, f"{ms / wall:.1%}"] for p, ms, n in parts + [("wall (no profiler)", wall, "")]])
            lines += ["", f"Under the profiler {x['profiled_wall_ms']:.3f} ms per step (host clock); steps aligned: "
                      f"{x['steps_aligned']}; graph replays {x['graph_replays']}. GEMMs together: "
                      f"{g['weight_bytes_per_step'] / 1e9:.3f} GB of weights in {g['ms_per_step']:.3f} ms = "
                      f"{(g['gb_per_s'] or 0):.0f} GB/s, {pct(g['frac_copy_ceiling'])} of the copy ceiling. "
                      f"Per-linear attribution: {lay['method']}" + (f" ({lay['reason']})." if "reason" in lay else ".")]
            if "roles" in lay:
                role_rows = [[f"`{role}`", v["calls_per_step"], f"{v['us_per_step']:.1f}",
                              " / ".join(f"{u:.1f}" for u in v["us_per_call"]), f"{v['bytes_per_step'] / 1e6:.1f}",
                              f"{v['gb_per_s']:.0f}", pct(v["frac_copy_ceiling"]),
                              ", ".join(f"`{k[:60]}`" for k in v["kernels"])] for role, v in lay["roles"].items()]
                lines += [""] + table("| linear | calls/step | µs/step | µs/call min / median / max | MB/step | "
                                      "GB/s | % copy ceiling | kernels |", role_rows)
            lines += [""] + table("| kernel (top 15 by time) | category | calls/step | µs/step | share |", [
                [f"`{k['name'][:60]}`", k["category"], f"{k['calls_per_step']:.0f}", f"{k['us_per_step']:.1f}",
                 f"{k['share']:.1%}"] for k in x["kernels"][:15]])
        c = row["check"]
        lines += ["", f"Check before timing: graph against eager logits, relative L2 {c['rel_l2']:.2g} (tolerance "
                  f"{c['tolerance']:g}); max |difference| {c['max_abs_diff_of_max_logit']:.2g} of the largest |logit|."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
