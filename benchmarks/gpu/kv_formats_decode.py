"""Decode step of the engine with KV stored in reduced precision (``quant``) or read selectively
(``quest``), against ``paged`` and against each step's memory roofline (Llama-3.1-8B shapes, random
weights, bf16).

Grid: strategy specs (``--strategies``, ';'-separated; default ``paged``, ``quant:dtype=fp8``,
``quant:dtype=int4``, ``quest:budget_ratio=0.2``) x batch x context points (``--points``; default
1x4096, 1x16384, 1x32768, 8x16384). One set of weights is loaded once and shared by every engine.

Method, as in ``decode_step.py``: one engine per spec with ``enforce_eager=False`` (CUDA graphs where
the strategy allows them: ``quest`` replays from its first step; ``quant:dtype=fp8`` replays once
its first, eager, step has calibrated the scales; KIVI's ``int8``/``int4`` replay from the first
step, quantizing a block inside the graph when a row completes its group; each row records the
graph replays it counted, and a spec declaring ``graph_decode`` that replayed none on CUDA is
flagged in the output), and the specs of ``--eager`` (default ``paged``) once
more with ``enforce_eager=True``, so that a speed-up can be read with or without graphs. Every
storage tensor of the strategy is filled with random values (:func:`fill_storage`), requests are
given their context directly (``decode_step.inject``) and ``decode_step.time_point`` times the
*model* step (``runner.run`` + ``kv.end_step``) and the *engine* step (``engine.step()``), medians of
20 steps after 5 warm-up steps. A point whose KV does not fit the pool is skipped and says so.

Roofline of a row: (weight bytes, ``decode_step.weight_bytes_per_step``, + KV bytes, batch x the
strategy's ``decode_read_bytes(context + 1)``: its own count of the codes, scales, residual or page
bounds and selected pages its decode attention reads) / the device copy bandwidth measured in the
same run. Fraction of roofline = roofline time / step time.

Correctness first, in float32 on ``decode_step.CHECK_MODEL`` (eager engines, the same greedy
requests as ``decode_step``'s check): ``quest`` with a budget of every page must give ``paged``'s
tokens and logits (``decode_step.compare_runs``; the script stops otherwise); each lossy spec of the
grid has its agreement with ``paged`` recorded, not asserted.

``--tiny``: a 2-layer dummy model on the CPU, small points (graphs are CUDA-only: eager timings), a
smoke test. Writes ``kv_formats_decode.json`` and ``.md`` to ``--out`` (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from ceilings import RESULTS, env_line  # noqa: E402
from decode_step import (  # noqa: E402
    CHECK_MODEL, CHECK_PROMPTS, CHECK_TOKENS, HEADROOM, MODEL, REPEATS, TINY_CHECK_PROMPTS, TINY_MODEL, WARMUP,
    bench_environment, compare_runs, copy_ceiling, engine_config, sync, time_point,
    weight_bytes_per_step,
)

from kvscope.engine.engine import LLMEngine  # noqa: E402
from kvscope.engine.sampling_params import SamplingParams  # noqa: E402
from kvscope.kv.base import KVStrategy  # noqa: E402
from kvscope.kv.registry import create  # noqa: E402
from kvscope.models.loader import LoadedModel, load_model  # noqa: E402

SPECS = "paged;quant:dtype=fp8;quant:dtype=int4;quest:budget_ratio=0.2"
POINTS, TINY_POINTS = "1x4096,1x16384,1x32768,8x16384", "1x128,1x384,4x256"
REFERENCE = "paged"
LOSSLESS_CHECK = "quest:budget_ratio=1.0"  # every page selected: must equal the reference
#: The pool is sized for the reference's bf16 KV of the largest point times this, room for the
#: other strategies' metadata (page bounds: 1/16; residual slots; fp8 and int4 need less).
POOL_MARGIN = 1.25


def fill_host(t: torch.Tensor, chunk: int = 1 << 26) -> None:
    """N(0, 1) into a host tensor (an offloading strategy's pinned pool), drawn on the GPU and copied
    over: ``normal_`` on the host takes about a minute for 5 GB on one core."""
    flat = t.view(-1)
    buf = torch.empty(min(chunk, flat.numel()), dtype=t.dtype, device="cuda")
    for s in range(0, flat.numel(), buf.numel()):
        n = min(buf.numel(), flat.numel() - s)
        flat[s : s + n].copy_(buf[:n].normal_())


def fill_storage(kv: KVStrategy) -> int:
    """Random values in every storage tensor of ``kv``'s attributes (its cache, page bounds, ...):
    floating point N(0, 1), uint8 codes uniform over the bytes that are finite float8_e4m3fn values
    (0x7f and 0xff, its NaNs, become 0; any byte is a valid int4 pair or int8 code). Returns the bytes
    filled. Integer tensors (block tables) are left alone."""
    filled = 0
    holders = [kv] + [v for v in vars(kv).values() if hasattr(v, "__dict__") and not isinstance(v, torch.nn.Module)]
    seen: set[int] = set()
    for holder in holders:
        for t in vars(holder).values():
            if not isinstance(t, torch.Tensor) or id(t) in seen:
                continue
            seen.add(id(t))
            if t.is_floating_point() and t.device.type == "cpu" and torch.cuda.is_available():
                fill_host(t)
            elif t.is_floating_point():
                t.normal_()
            elif t.dtype == torch.uint8:
                t.random_(0, 256)
                t.masked_fill_((t & 0x7F) == 0x7F, 0)
            else:
                continue
            filled += t.nbytes
    return filled


# ---- correctness -------------------------------------------------------------------------------------
def check_specs(loaded: LoadedModel, base: dict, specs: list[str], tiny: bool) -> dict[str, Any]:
    """Greedy requests on eager engines of ``REFERENCE``, ``LOSSLESS_CHECK`` and every other spec;
    each compared to the reference (``compare_runs``)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, loaded.config.vocab_size, (n,), generator=gen).tolist()
               for n in (TINY_CHECK_PROMPTS if tiny else CHECK_PROMPTS)]
    outs = {}
    for spec in dict.fromkeys([REFERENCE, LOSSLESS_CHECK] + specs):
        engine = LLMEngine(loaded, create(spec), engine_config(tiny, **base, enforce_eager=True))
        ids = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True))
               for p, n in zip(prompts, CHECK_TOKENS)]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        outs[spec] = [done[i] for i in ids]
        del engine
    result: dict[str, Any] = {"prompt_lens": [len(p) for p in prompts], "max_tokens": CHECK_TOKENS, "specs": {}}
    for spec in outs:
        if spec == REFERENCE:
            continue
        c = compare_runs(outs[REFERENCE], outs[spec])
        c["agree_tokens"] = sum(r["agree"] for r in c["requests"])
        c["tokens"] = sum(r["tokens"] for r in c["requests"])
        c["asserted"] = spec == LOSSLESS_CHECK
        result["specs"][spec] = c
    return result


# ---- timing --------------------------------------------------------------------------------------------
def time_spec(loaded: LoadedModel, spec: str, eager: bool, base: dict, points: list[tuple[int, int]],
              bw: float, device: torch.device, tiny: bool) -> list[dict]:
    """Rows of one engine (``spec``, eager or graphs) over ``points``."""
    mode = "eager" if eager else "graphs"
    t0 = time.perf_counter()
    engine = LLMEngine(loaded, create(spec), engine_config(tiny, **base, enforce_eager=eager))
    filled = fill_storage(engine.kv)
    sync(device)
    print(f"{spec} {mode}: engine ready in {time.perf_counter() - t0:.1f} s ({filled / 1e6:.1f} MB of storage filled)",
          flush=True)
    rows = []
    for b, t in points:
        head = {"spec": spec, "mode": mode, "batch": b, "context": t}
        try:
            row = time_point(engine, mode, b, t, device)
        except RuntimeError as e:  # inject found no room: this strategy's pool does not hold the point
            if "no room" not in str(e):
                raise
            rows.append(head | {"skipped": str(e)})
            print(f"{spec:28s} {mode:6s} {b}x{t}: skipped ({e})", flush=True)
            continue
        w = weight_bytes_per_step(loaded.model, b)
        per_row = engine.kv.decode_read_bytes(t + 1)
        kv = None if per_row is None else b * per_row
        row |= head | {"weight_bytes": w, "kv_bytes": kv}
        if kv is not None:
            row["roofline_ms"] = (w + kv) / bw * 1e3
            for name in ("model", "engine"):
                row[f"{name}_frac_roofline"] = row["roofline_ms"] / row[f"{name}_ms"]
        rows.append(row)
        if not eager and device.type == "cuda" and engine.kv.facts().graph_decode and not row["engine_graph_replays"]:
            print(f"WARNING {spec} declares graph_decode but replayed no graph at {b}x{t}: timed eagerly", flush=True)
        print(f"{spec:28s} {mode:6s} {b}x{t:<6d} model {row['model_ms']:8.2f} ms  engine {row['engine_ms']:8.2f} ms  "
              f"KV {(kv or 0) / 1e6:9.1f} MB/step  roofline {row.get('engine_frac_roofline', float('nan')):.0%}  "
              f"replays {row['engine_graph_replays']}", flush=True)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Per timed row: engine-step speed-up against the reference at the same point, graphs and eager
    (> 1: faster than the reference), and its KV bytes as a share of the reference's."""
    ref = {(r["mode"], r["batch"], r["context"]): r for r in rows if r["spec"] == REFERENCE and "skipped" not in r}
    for r in rows:
        if "skipped" in r:
            continue
        for mode in ("graphs", "eager"):
            x = ref.get((mode, r["batch"], r["context"]))
            r[f"speedup_vs_{mode}"] = x["engine_ms"] / r["engine_ms"] if x else None
        g = ref.get(("graphs", r["batch"], r["context"]))
        r["kv_share"] = r["kv_bytes"] / g["kv_bytes"] if g and r["kv_bytes"] and g["kv_bytes"] else None


def parse_points(text: str) -> list[tuple[int, int]]:
    return [(int(b), int(t)) for b, t in (p.split("x") for p in text.split(","))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="2-layer dummy model on the CPU (smoke test)")
    ap.add_argument("--strategies", default=SPECS, help=f"';'-separated specs (default {SPECS!r})")
    ap.add_argument("--points", help=f"comma-separated BxT points (default {POINTS}; --tiny: {TINY_POINTS})")
    ap.add_argument("--eager", default=REFERENCE, help="';'-separated specs also timed eagerly ('' for none)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    specs = [s.strip() for s in args.strategies.split(";") if s.strip()]
    if REFERENCE not in specs:
        specs.insert(0, REFERENCE)  # speed-ups need the reference at every point
    eager_specs = [s.strip() for s in args.eager.split(";") if s.strip()]
    points = parse_points(args.points or (TINY_POINTS if args.tiny else POINTS))
    model_name, check_name = (TINY_MODEL, TINY_MODEL) if args.tiny else (MODEL, CHECK_MODEL)
    env = bench_environment(device)
    print(env_line(env), flush=True)
    copy = copy_ceiling(device)
    bw = copy["gb_per_s"] * 1e9
    print(f"copy ceiling {copy['gb_per_s']:.0f} GB/s", flush=True)
    base = dict(device=str(device), max_num_seqs=max(b for b, _ in points),
                max_model_len=max(t for _, t in points) + 256)

    check_model = load_model(check_name, device=device, dtype=torch.float32)
    check_bpt = check_model.config.kv_bytes_per_token(torch.float32)
    check = check_specs(check_model, base | {"model": check_name, "dtype": "float32",
                                             "kv_memory_bytes": (4096 + 256 * 8) * check_bpt}, specs, args.tiny)
    check["model"], check["dtype"] = check_name, "float32"
    del check_model
    for spec, c in check["specs"].items():
        print(f"check {spec} vs {REFERENCE}: greedy tokens agree {c['agree_tokens']}/{c['tokens']}, max |logits diff| "
              f"{c['max_abs_diff']:.3g} (largest |logit| {c['max_abs_logit']:.3g}), passed {c['passed']}"
              + (" [asserted]" if c["asserted"] else " [recorded]"), flush=True)
    if not check["specs"][LOSSLESS_CHECK]["passed"]:
        raise SystemExit(f"{LOSSLESS_CHECK} (every page read) differs from {REFERENCE}: "
                         f"{json.dumps(check['specs'][LOSSLESS_CHECK])}")

    loaded = load_model(model_name, device=device, dtype=torch.bfloat16)
    kv_bpt = loaded.config.kv_bytes_per_token(torch.bfloat16)
    steps = WARMUP + REPEATS + 2
    need = {(b, t): b * math.ceil((t + 2 * steps + 64) / 64) * 64 * kv_bpt * POOL_MARGIN for b, t in points}
    free = torch.cuda.mem_get_info(device)[0] - HEADROOM if device.type == "cuda" else 1 << 40
    fits = [p for p in points if need[p] <= free]
    skipped = [{"batch": b, "context": t, "skipped": f"needs {need[(b, t)] / 1e9:.1f} GB of KV pool, "
                f"{free / 1e9:.1f} GB free beside weights and headroom"} for b, t in points if (b, t) not in fits]
    for s in skipped:
        print(f"skip {s['batch']}x{s['context']}: {s['skipped']}", flush=True)
    pool = int(max((need[p] for p in fits), default=64 * kv_bpt))
    base |= dict(model=model_name, dtype="bfloat16", kv_memory_bytes=pool)
    rows = [s | {"spec": spec, "mode": "graphs"} for s in skipped for spec in specs]
    for spec, eager in [(s, False) for s in specs] + [(s, True) for s in eager_specs]:
        rows += time_spec(loaded, spec, eager, base, fits, bw, device, args.tiny)
    add_speedups(rows)
    result = {"benchmark": "kv_formats_decode", "environment": env, "model": model_name, "dtype": "bfloat16",
              "reference": REFERENCE, "warmup": WARMUP, "repeats": REPEATS, "copy_ceiling": copy,
              "kv_memory_bytes": pool, "correctness": check, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_formats_decode.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / "kv_formats_decode.md").write_text(md)
    print(md)


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def markdown(r: dict) -> str:
    rows = r["results"]
    timed = [x for x in rows if "skipped" not in x]
    lines = ["# KV formats in the decode step: `quant` (fp8, int4) and `quest` against `paged`", "",
             "## Conclusion", ""]
    for spec in dict.fromkeys(x["spec"] for x in timed if x["spec"] != r["reference"]):
        mine = [x for x in timed if x["spec"] == spec and x["mode"] == "graphs"]
        parts = [f"{x['batch']}x{x['context']} {_f(x['speedup_vs_graphs'], '{:.2f}x')} "
                 f"({_f(x['speedup_vs_eager'], '{:.2f}x')} vs eager; KV {_f(x['kv_share'], '{:.0%}')} of "
                 f"{r['reference']}'s, {_f(x.get('engine_frac_roofline'), '{:.0%}')} of its roofline)" for x in mine]
        replays = sum(x["engine_graph_replays"] or 0 for x in mine)
        lines.append(f"- **`{spec}`** engine-step speed-up vs `{r['reference']}` with graphs: " + "; ".join(parts)
                     + f". Graph replays: {replays}" + (" (runs eagerly)." if not replays else "."))
    ref = [x for x in timed if x["spec"] == r["reference"] and x["mode"] == "graphs"]
    lines.append(f"- **`{r['reference']}`** (graphs) reaches " + ", ".join(
        f"{x['batch']}x{x['context']} {_f(x.get('engine_frac_roofline'), '{:.0%}')}" for x in ref)
        + " of its roofline.")
    lines += ["", env_line(r["environment"]), "",
              f"{r['model']} (random weights), {r['dtype']}, one KV pool of {r['kv_memory_bytes'] / 1e9:.1f} GB per "
              f"engine, requests given their context directly (random KV, no prefill). Median of {r['repeats']} steps "
              f"after {r['warmup']} warm-up. *model* = `runner.run` + `kv.end_step`; *engine* = `engine.step()`. "
              "KV/step = bytes the strategy's decode attention reads (`decode_read_bytes`, all layers, whole batch). "
              "Roofline = (weight + KV bytes) / device copy bandwidth measured in this run: "
              f"**{r['copy_ceiling']['gb_per_s']:.0f} GB/s**; % = roofline time / engine step time. Speed-up = "
              f"`{r['reference']}`'s engine step time (graphs / eager) / this row's.", "",
              "| strategy | mode | batch | context | KV MB/step | KV vs paged | roofline ms | model ms | engine ms | "
              "% roofline | speed-up vs graphs | vs eager | graph replays |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        if "skipped" in x:
            lines.append(f"| `{x['spec']}` | {x['mode']} | {x['batch']} | {x['context']} | skipped: {x['skipped']} |"
                         + " |" * 8)
            continue
        lines.append(
            f"| `{x['spec']}` | {x['mode']} | {x['batch']} | {x['context']} | {_f(x['kv_bytes'] and x['kv_bytes'] / 1e6, '{:.1f}')} | "
            f"{_f(x['kv_share'], '{:.0%}')} | {_f(x.get('roofline_ms'), '{:.2f}')} | {x['model_ms']:.2f} | "
            f"{x['engine_ms']:.2f} | {_f(x.get('engine_frac_roofline'), '{:.0%}')} | "
            f"{_f(x['speedup_vs_graphs'], '{:.2f}x')} | {_f(x['speedup_vs_eager'], '{:.2f}x')} | "
            f"{_f(x['engine_graph_replays'], '{}')} |")
    c = r["correctness"]
    lines += ["", f"Correctness (before timing; {c['model']} in {c['dtype']}, eager engines, {len(c['prompt_lens'])} "
              f"greedy requests, prompts {c['prompt_lens']}, {c['max_tokens']} tokens), each spec vs `{r['reference']}`:", ""]
    for spec, s in c["specs"].items():
        lines.append(f"- `{spec}`: greedy tokens agree {s['agree_tokens']}/{s['tokens']}, max |logits diff| "
                     f"{s['max_abs_diff']:.3g} (largest |logit| {s['max_abs_logit']:.3g}); "
                     + (f"asserted equal: passed {s['passed']}." if s["asserted"] else "lossy: recorded, not asserted."))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
