"""Decode step of the whole engine (Llama-3-8B shapes, random weights, bf16, ``paged``) against its
memory roofline, eager and through CUDA graphs.

Grid: batch {1, 16, 64} x context {1024, 8192}, plus batch 64 x 2048 (a target is stated there).
A point whose KV does not fit next to the weights is skipped and says so (64 x 8192 needs 69 GB of
KV: it fits an H200, not an 80 GB H100).

Method. Each point is timed on two engines sharing one set of weights: ``enforce_eager=True`` and
``enforce_eager=False`` (pure-decode steps replayed from CUDA graphs captured per batch-size
bucket, ``cuda_graph_sizes`` left at its default). The KV pool is filled with random values once
(never zeros); ``batch`` requests of distinct random token ids are then given their ``context``
directly, without prefill, as ``offload_decode.py`` does: their blocks are allocated, their
computed-token counter set to ``context`` and one output token appended, so that the next step
decodes one token per request at position ``context``. Two timings per point, each the median of
20 steps after 5 warm-up steps (CUDA events; every step ends in a host sync):

- **model step**: ``runner.run(batch, rows)`` + ``kv.end_step(batch)`` on a batch built once (the
  forward pass, attention backend set-up and LM head; the same token is decoded again each time);
- **engine step**: ``engine.step()`` with the requests injected into the scheduler's running list,
  i.e. scheduling, batch building, the forward pass, sampling and bookkeeping: what a user gets
  from ``LLM.generate`` (``FINAL_ONLY`` outputs: none built until a request finishes).
  The context grows by one token per step (about 150 tokens over a point, negligible).
- **back to back**: ``engine.step()`` called 20 times in a row with one sync at each end (as
  ``LLM.generate`` runs), per step, median of 3 such blocks, once with synchronous scheduling
  (each step's tokens read back before the next step is scheduled) and once with async scheduling
  (the next step launched first, so that scheduling, batch building and bookkeeping overlap the
  GPU's work; ``EngineConfig.async_scheduling``). The targets are read from the async figure.

``engine.stats()["cuda_graph_replays"]`` is read before and after each timing, so each row says
whether its steps ran through a graph.

Roofline of a step: bytes it must read from device memory / the device-to-device copy bandwidth
measured in the same run (``ceilings.device_copy_bandwidth``, read + written bytes per second, as
in ``decode_attention.py``). Bytes = every parameter once (all layers, final norm, LM head; the
input embedding only as the ``batch`` rows it gathers) + K and V of ``context + 1`` tokens per
request over all layers. The weight-bytes roofline leaves the KV out. Fraction of roofline =
roofline time / measured step time; tok/s = batch / step time.

Correctness first: the same requests (5 prompts of 17-1000 tokens, prefilled for real, 3-16 greedy
tokens each, so the decode batch shrinks from 5 to 1 through padded and exact buckets) run on an
eager and a graph engine; per request the greedy tokens must agree (a divergence is allowed only at
a near-tie, top-2 gap below twice the logits difference) and the float32 logits of every step up to
the first divergence must agree within 1e-3 of their largest magnitude. The check runs in float32 on
the Llama-3.2-1B shapes (see ``CHECK_MODEL``): in bf16 the two engines' different decode split counts
move random-weight logits by a few percent after 32 layers, which would hide a real error. The script
stops otherwise, and if the graph engine counted no replay on CUDA.

``--tiny`` runs a 2-layer dummy model on the CPU (graphs are CUDA-only: both engines run eagerly) as
a smoke test. Writes ``decode_step.json`` and ``.md`` to ``--out`` (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import generate_decode  # noqa: E402
import vllm_peer  # noqa: E402
from bench_common import (  # noqa: E402, F401 (re-exported for the other benchmarks)
    bench_environment,
    checked_fields,
    copy_ceiling,
    engine_config,
    graph_replays,
    matmul_ceiling,
    sync,
    target_text,
    timed_ms,
    back_to_back_ms,
    weight_bytes_per_step,
)
from ceilings import RESULTS, env_line  # noqa: E402

from kvscope.engine.engine import LLMEngine  # noqa: E402
from kvscope.engine.request import Request  # noqa: E402
from kvscope.engine.sampling_params import SamplingParams  # noqa: E402
from kvscope.sampling_params import RequestOutputKind  # noqa: E402
from kvscope.kv.registry import create  # noqa: E402
from kvscope.models.loader import LoadedModel, load_model  # noqa: E402

MODEL, TINY_MODEL = "dummy:llama-3.1-8b", "dummy:tiny-llama"
GRID = [(1, 1024), (1, 8192), (16, 1024), (16, 8192), (64, 1024), (64, 2048), (64, 8192)]
TINY_GRID = [(1, 64), (4, 64), (4, 256)]
WARMUP, REPEATS = 5, 20
BLOCKS = 3  # blocks of REPEATS back-to-back engine steps, per scheduling mode
HEADROOM = 6 << 30  # device bytes kept free beside weights and KV: activations, graph pools, workspaces
CHECK_PROMPTS, CHECK_TOKENS = [17, 100, 300, 513, 1000], [16, 12, 8, 16, 3]
TINY_CHECK_PROMPTS = [5, 17, 40, 100, 200]
# The check runs in float32, on a smaller model of the same family: graphs and eager steps split the
# decode attention differently (the graph's split count is fixed from max_model_len), which in bf16
# with random weights moves logits by a few percent after 32 layers; float32 isolates real errors.
CHECK_MODEL = "dummy:llama-3.2-1b"
LOGIT_TOL = 1e-3  # of the largest |logit|


# ---- correctness -------------------------------------------------------------------------------------
def compare_runs(eager: list, graph: list) -> dict:
    """Per-request greedy agreement and logits difference (up to and including the first divergence)."""
    rows, worst, scale, ok = [], 0.0, 0.0, True
    for e, g in zip(eager, graph):
        te, tg = e.outputs[0].token_ids, g.outputs[0].token_ids
        agree = next((i for i, (a, b) in enumerate(zip(te, tg)) if a != b), min(len(te), len(tg)))
        steps = min(agree + 1, len(te), len(tg))
        diffs = [float((e.outputs[0].logits[i] - g.outputs[0].logits[i]).abs().max()) for i in range(steps)]
        mags = [float(e.outputs[0].logits[i].abs().max()) for i in range(steps)]
        row = {"tokens": len(te), "agree": agree, "max_abs_diff": max(diffs), "max_abs_logit": max(mags)}
        if agree < len(te):
            top2 = e.outputs[0].logits[agree].topk(2).values
            row["gap_at_divergence"] = float(top2[0] - top2[1])
            row["near_tie"] = row["gap_at_divergence"] <= 2 * diffs[agree]
            ok &= row["near_tie"]
        ok &= row["max_abs_diff"] <= LOGIT_TOL * row["max_abs_logit"]
        worst, scale = max(worst, row["max_abs_diff"]), max(scale, row["max_abs_logit"])
        rows.append(row)
    return {"requests": rows, "max_abs_diff": worst, "max_abs_logit": scale, "passed": bool(ok)}


def check_graphs(loaded: LoadedModel, base: dict, tiny: bool) -> dict:
    """The same greedy requests on an eager and a graph engine (see the module docstring)."""
    gen = torch.Generator().manual_seed(1)
    vocab = loaded.config.vocab_size
    lens = TINY_CHECK_PROMPTS if tiny else CHECK_PROMPTS
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]
    outs, replays = {}, {}
    for eager in (True, False):
        # Eager and synchronous against graphs with the default scheduling (async on CUDA): both checked.
        engine = LLMEngine(loaded, create("paged"), engine_config(
            tiny, **base, enforce_eager=eager, **({"async_scheduling": False} if eager else {})))
        ids = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True))
               for p, n in zip(prompts, CHECK_TOKENS)]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        outs[eager], replays[eager] = [done[i] for i in ids], graph_replays(engine)
        del engine
    result = compare_runs(outs[True], outs[False]) | {"graph_replays": replays[False], "eager_replays": replays[True]}
    result["prompt_lens"], result["max_tokens"] = [len(p) for p in prompts], CHECK_TOKENS
    return result


# ---- timing --------------------------------------------------------------------------------------------
def inject(engine: LLMEngine, batch: int, context: int, tag: str) -> list[Request]:
    """``batch`` running requests whose first ``context`` tokens are computed (random KV), each with
    one output token pending: the next step decodes one token per request."""
    gen = torch.Generator().manual_seed(batch * 100_003 + context)
    reqs = []
    for i in range(batch):
        prompt = torch.randint(0, engine.model_config.vocab_size, (context,), generator=gen).tolist()
        # FINAL_ONLY, as LLM.generate (and vLLM's) runs: no per-step copy of every growing output.
        r = Request(f"{tag}-{i}", prompt, SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True,
                                                         output_kind=RequestOutputKind.FINAL_ONLY))
        r.output_token_ids.append(prompt[-1])
        if not (engine.kv.allocate(r, context) and engine.kv.allocate(r, context + 1)):
            raise RuntimeError(f"no room in the KV pool for {batch} x {context}")
        r.num_computed_tokens = context
        r.first_scheduled_time = time.perf_counter()
        engine.requests[r.request_id], engine._groups[r.request_id] = r, [r]
        engine.scheduler.add_running(r)
        reqs.append(r)
    return reqs


def release(engine: LLMEngine, reqs: list[Request]) -> None:
    """Undo :func:`inject`: abort the requests (freeing their KV) and forget them."""
    for r in reqs:
        engine.abort(r.request_id)
        engine.requests.pop(r.request_id, None)
        engine._groups.pop(r.request_id, None)


def time_point(engine: LLMEngine, mode: str, batch: int, context: int, device: torch.device) -> dict:
    reqs = inject(engine, batch, context, f"{mode}-{batch}x{context}")
    batch_obj = engine.runner.build_batch(reqs, [1] * batch)
    rows = list(range(batch))

    def model_step() -> None:
        engine.runner.run(batch_obj, rows)
        engine.kv.end_step(batch_obj)

    row: dict[str, Any] = {"mode": mode, "batch": batch, "context": context}
    default, engine.async_scheduling = engine.async_scheduling, False  # each timed step ends in a sync anyway
    for name, fn in (("model", model_step), ("engine", engine.step)):
        before = graph_replays(engine)
        times = timed_ms(fn, device, WARMUP, REPEATS)
        after = graph_replays(engine)
        row |= {f"{name}_ms": statistics.median(times), f"{name}_ms_min": min(times), f"{name}_ms_max": max(times),
                f"{name}_graph_replays": None if before is None else after - before}
    # Back to back, as LLM.generate steps: with async scheduling the host's work overlaps the GPU's.
    for name, overlap in (("sync", False), ("async", True)):
        engine.async_scheduling = overlap  # read per step; a step in flight is read back either way
        times = back_to_back_ms(engine.step, device, WARMUP, REPEATS, BLOCKS)
        row |= {f"{name}_pipe_ms": statistics.median(times), f"{name}_pipe_ms_all": times}
    engine.async_scheduling = default
    release(engine, reqs)
    sync(device)
    return row


def fill_random(engine: LLMEngine) -> None:
    cache = getattr(engine.kv, "cache", None)
    if cache is None or not hasattr(cache, "kv"):
        raise SystemExit("paged strategy has no kv.cache.kv tensor to fill; update fill_random")
    cache.kv.normal_()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="2-layer dummy model on the CPU (smoke test)")
    ap.add_argument("--points", help="comma-separated BxT points, e.g. 1x1024,64x2048 (default: the grid)")
    ap.add_argument("--vllm", action="store_true", help="also time vLLM's decode step (importable in this Python) "
                    "and kvscope's the same way, from whole generate calls (generate_decode.py)")
    ap.add_argument("--generate-points", default="1x1024,1x8192,16x1024,64x2048", help="BxT points of --vllm")
    args = ap.parse_args()
    side_points = [tuple(int(x) for x in p.split("x")) for p in args.generate_points.split(",")] if args.vllm else []
    # vLLM first, in its own process, before kvscope's weights take the GPU.
    vllm = vllm_peer.run_job({"preset": MODEL.split(":")[1], "decode_points": side_points}
                             | generate_decode.engine_limits(side_points)) if side_points and not args.tiny else {}
    device = torch.device("cpu" if args.tiny else "cuda")
    model_name = TINY_MODEL if args.tiny else MODEL
    grid = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")] if args.points else (
        TINY_GRID if args.tiny else GRID)
    env = bench_environment(device)
    print(env_line(env), flush=True)
    copy = copy_ceiling(device)
    bw = copy["gb_per_s"] * 1e9
    print(f"copy ceiling {copy['gb_per_s']:.0f} GB/s", flush=True)
    loaded = load_model(model_name, device=device, dtype=torch.bfloat16)
    kv_bpt = loaded.config.kv_bytes_per_token(torch.bfloat16)
    steps = 3 * WARMUP + REPEATS * (2 + 2 * BLOCKS) + 4
    need = {(b, t): b * math.ceil((t + steps + 16) / 16) * 16 * kv_bpt for b, t in grid}
    free = torch.cuda.mem_get_info(device)[0] - HEADROOM if device.type == "cuda" else 1 << 40
    fits = [p for p in grid if need[p] <= free]
    skipped = [{"batch": b, "context": t, "kv_bytes": need[(b, t)], "free_bytes": free}
               for b, t in grid if (b, t) not in fits]
    for s in skipped:
        print(f"skip {s['batch']}x{s['context']}: needs {s['kv_bytes'] / 1e9:.1f} GB of KV, "
              f"{s['free_bytes'] / 1e9:.1f} GB free beside the weights and headroom", flush=True)
    base = dict(model=model_name, device=str(device), dtype="bfloat16", max_num_seqs=max(b for b, _ in grid),
                max_model_len=max(t for _, t in grid) + 256)
    check_model = load_model(TINY_MODEL if args.tiny else CHECK_MODEL, device=device, dtype=torch.float32)
    check_bpt = check_model.config.kv_bytes_per_token(torch.float32)
    check = check_graphs(check_model, base | {"model": TINY_MODEL if args.tiny else CHECK_MODEL, "dtype": "float32",
                                              "kv_memory_bytes": (4096 + 256 * 8) * check_bpt}, args.tiny)
    check["model"], check["dtype"] = TINY_MODEL if args.tiny else CHECK_MODEL, "float32"
    del check_model
    print("graphs vs eager:", json.dumps({k: v for k, v in check.items() if k != "requests"}), flush=True)
    if not check["passed"]:
        raise SystemExit(f"graph and eager decode disagree: {json.dumps(check)}")
    if device.type == "cuda" and check["graph_replays"] == 0:
        raise SystemExit("enforce_eager=False ran no decode step through a CUDA graph (cuda_graph_replays == 0)")

    rows = []
    pool = max((need[p] for p in fits), default=kv_bpt * 16) + 16 * kv_bpt
    for mode, eager in (("eager", True), ("graphs", False)):
        t0 = time.perf_counter()
        cfg = engine_config(args.tiny, **base, kv_memory_bytes=pool, enforce_eager=eager)
        engine = LLMEngine(loaded, create("paged"), cfg)
        fill_random(engine)
        sync(device)
        print(f"{mode}: engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
        for b, t in fits:
            row = time_point(engine, mode, b, t, device)
            w = weight_bytes_per_step(loaded.model, b)
            kv = b * (t + 1) * kv_bpt
            row |= {"weight_bytes": w, "kv_bytes": kv, "roofline_ms": (w + kv) / bw * 1e3, "weight_roofline_ms": w / bw * 1e3}
            for name in ("model", "engine", "sync_pipe", "async_pipe"):
                row[f"{name}_tok_s"] = b / row[f"{name}_ms"] * 1e3
                row[f"{name}_frac_roofline"] = row["roofline_ms"] / row[f"{name}_ms"]
                row[f"{name}_frac_weight_roofline"] = row["weight_roofline_ms"] / row[f"{name}_ms"]
            rows.append(row)
            print(f"{mode:6s} B={b:3d} T={t:5d}  model {row['model_ms']:8.2f} ms  engine {row['engine_ms']:8.2f} ms  "
                  f"roofline {row['roofline_ms']:7.2f} ms ({row['engine_frac_roofline']:.0%})  "
                  f"{row['engine_tok_s']:8.0f} tok/s  replays {row['engine_graph_replays']}  back to back: sync "
                  f"{row['sync_pipe_ms']:.2f} ms, async {row['async_pipe_ms']:.2f} ms", flush=True)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    side = []
    if side_points:
        kw = base | generate_decode.engine_limits(side_points) | {
            "kv_memory_bytes": generate_decode.kv_pool_bytes(side_points, kv_bpt), "enforce_eager": device.type != "cuda"}
        engine = LLMEngine(loaded, create("paged:enable_prefix_caching=False"), engine_config(args.tiny, **kw))
        side = generate_decode.side_by_side(engine, side_points, vllm, lambda b, ctx: (
            weight_bytes_per_step(loaded.model, b) + b * ctx * kv_bpt) / bw * 1e3)
        del engine
    result = {"benchmark": "decode_step", "environment": env, "model": model_name, "dtype": "bfloat16",
              "strategy": "paged", "warmup": WARMUP, "repeats": REPEATS, "blocks": BLOCKS, "copy_ceiling": copy,
              "kv_bytes_per_token": kv_bpt, "correctness": check, "skipped": skipped, "results": rows,
              "vllm": {k: v for k, v in vllm.items() if k != "results"}, "side_by_side": side}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_step.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / "decode_step.md").write_text(md)
    print(md)


def markdown(r: dict) -> str:
    by = {(x["mode"], x["batch"], x["context"]): x for x in r["results"]}
    points = sorted({(x["batch"], x["context"]) for x in r["results"]})
    c = r["correctness"]
    lines = [
        "# Engine decode step vs its memory roofline, eager and CUDA graphs", "",
        env_line(r["environment"]), "",
        f"{r['model']} (random weights), {r['dtype']}, `{r['strategy']}` strategy, requests given their context "
        f"directly (random KV, no prefill). Median of {r['repeats']} steps after {r['warmup']} warm-up steps. "
        "*model* = `runner.run` + `kv.end_step`; *engine* = `engine.step()` (scheduling, sampling and bookkeeping "
        "included). Roofline = (weight bytes + KV bytes read per step) / device copy bandwidth measured in this run: "
        f"**{r['copy_ceiling']['gb_per_s']:.0f} GB/s**. % = roofline time / step time. Graph replays: decode steps "
        "run through a CUDA graph out of the engine steps timed (warm-up included).", "",
        "| batch | context | weights + KV GB | roofline ms | eager model ms | eager engine ms | graphs model ms | "
        "graphs engine ms | eager tok/s | graphs tok/s | eager % | graphs % | graphs speed-up | graph replays |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, t in points:
        e, g = by.get(("eager", b, t)), by.get(("graphs", b, t))
        ref = e or g

        def f(x: dict | None, key: str, fmt: str = "{:.2f}") -> str:
            return fmt.format(x[key]) if x and x.get(key) is not None else "-"

        lines.append(
            f"| {b} | {t} | {(ref['weight_bytes'] + ref['kv_bytes']) / 1e9:.1f} | {ref['roofline_ms']:.2f} | "
            f"{f(e, 'model_ms')} | {f(e, 'engine_ms')} | {f(g, 'model_ms')} | {f(g, 'engine_ms')} | "
            f"{f(e, 'engine_tok_s', '{:.0f}')} | {f(g, 'engine_tok_s', '{:.0f}')} | "
            f"{f(e, 'engine_frac_roofline', '{:.0%}')} | "
            f"{f(g, 'engine_frac_roofline', '{:.0%}')} | "
            f"{(e['engine_ms'] / g['engine_ms']) if e and g else float('nan'):.2f}x | {f(g, 'engine_graph_replays', '{}')} |")
    for s in r["skipped"]:
        lines.append(f"| {s['batch']} | {s['context']} | skipped: KV {s['kv_bytes'] / 1e9:.1f} GB > "
                     f"{s['free_bytes'] / 1e9:.1f} GB free beside weights and headroom |" + " |" * 11)
    lines += ["", "## Engine steps back to back: synchronous against async scheduling", "",
              f"`engine.step()` called {r['repeats']} times in a row with no sync in between (as `LLM.generate` "
              f"does), per step, median of {r.get('blocks', '?')} such blocks; *sync*: each step's tokens read back "
              "before the next is scheduled; *async*: the next step scheduled and launched first, so the host's "
              "work overlaps the GPU's.", "",
              "| mode | batch | context | sync ms | async ms | async speed-up | async % roofline | "
              "async % weight roofline | model step ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["results"]:
        if x.get("async_pipe_ms") is not None:
            lines.append(f"| {x['mode']} | {x['batch']} | {x['context']} | {x['sync_pipe_ms']:.2f} | "
                         f"{x['async_pipe_ms']:.2f} | {x['sync_pipe_ms'] / x['async_pipe_ms']:.2f}x | "
                         f"{x['async_pipe_frac_roofline']:.0%} | {x['async_pipe_frac_weight_roofline']:.0%} | "
                         f"{x['model_ms']:.2f} |")
    lines += ["", "## Against the targets (recorded, not asserted; CUDA graphs, async scheduling, back to back)", ""]
    g1, g64 = by.get(("graphs", 1, 1024)), by.get(("graphs", 64, 2048))
    if g1:
        lines.append(f"- Batch 1, context 1024: {target_text(g1['async_pipe_frac_weight_roofline'], 0.80)} of the "
                     f"weight-bytes roofline ({g1['weight_roofline_ms']:.2f} ms). "
                     f"Model step alone: {g1['model_frac_weight_roofline']:.0%}.")
    else:
        lines.append("- Batch 1, context 1024: not measured in this run.")
    if g64:
        lines.append(f"- Batch 64, context 2048: {target_text(g64['async_pipe_frac_roofline'], 0.75)} of the roofline "
                     f"({g64['roofline_ms']:.2f} ms, weights + KV); model step alone: {g64['model_frac_roofline']:.0%}.")
    else:
        lines.append("- Batch 64, context 2048: not measured in this run.")
    lines += ["", f"Correctness (before timing): {len(c['requests'])} greedy requests (prompts {c['prompt_lens']}, "
              f"{c['max_tokens']} tokens, {c.get('model', '?')} in {c.get('dtype', '?')}) on an eager and a graph engine: "
              f"max |logits difference| {c['max_abs_diff']:.3g} (largest |logit| {c['max_abs_logit']:.3g}; "
              f"tolerance {LOGIT_TOL:g} of it); "
              f"greedy tokens agree for {sum(x['agree'] for x in c['requests'])} of "
              f"{sum(x['tokens'] for x in c['requests'])} tokens"
              + ("" if all(x['agree'] == x['tokens'] for x in c['requests']) else " (divergences at near-ties only)")
              + f"; graph replays {c['graph_replays']}. Passed: {c['passed']}."]
    lines += generate_decode.markdown(r.get("side_by_side", []), r.get("vllm", {}))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
