"""Fused q/k/v (``qkv_proj``) and gate/up (``gate_up_proj``) projections against the unfused ones:
the engine's decode step at Llama-3.1-8B shapes (random weights, bf16, ``paged``), eager and
through CUDA graphs.

The unfused path exists only here: :func:`unfuse` swaps every ``FusedLinear`` of the model for a
:class:`SplitLinear` that runs one GEMM per part on views of the fused weight's rows (each part's
rows are contiguous, so these are the separate ``[out, hidden]`` matrices the model had before
fusion, at no extra memory) and hands the model code the separate contiguous outputs, as the
unfused model produced them. So both paths share one set of weights and differ only in the number
of GEMM launches: per Llama layer 4 fused (qkv, o, gate_up, down) against 7 unfused. The number of
matmuls per forward is counted in each mode (``aten.linear``/``mm``/``addmm``) and must differ by
3 per Llama layer.

Correctness first, in float32 on smaller models of both families (``CHECK_MODELS``; OPT has no RoPE,
so its q/k/v views reach the attention kernels strided as they are): (1) a dense full-sequence
forward, fused vs unfused logits within ``LOGIT_TOL`` of their largest magnitude; (2) the same
greedy requests on a fused and an unfused engine (CUDA graphs on), tokens equal except at near-ties
and per-step logits within the same tolerance (``decode_step.compare_runs``). The same dense
comparison is recorded, not asserted, for the bf16 8B model (bf16 GEMMs of different widths may
pick different kernels; after 32 random layers that moves logits by more than float32 would).

Timing: for each mode (fused, unfused) x (eager, graphs) an engine is built on the shared weights,
its KV pool filled with random values, and each point (batch 1 and 64, context 1024 by default)
timed as in ``decode_step.py`` (``time_point``: requests given their context directly; *model* =
``runner.run`` + ``kv.end_step``, *engine* = ``engine.step()``; median of 20 steps after 5 warm-up
steps, CUDA events). The whole sweep runs ``--rounds`` times (default 2), the second in the opposite
mode order, so that drift shows as the spread between rounds; the table gives the median over rounds
and the spread.

``--tiny`` runs 2-layer dummy models on the CPU as a smoke test of the script (graphs are CUDA-only).
Writes ``fused_projections.json`` and ``.md`` to ``--out`` (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from ceilings import RESULTS, env_line  # noqa: E402
from decode_step import (  # noqa: E402
    bench_environment, compare_runs, engine_config, fill_random, graph_replays, sync, time_point,
)

from kvscope.attention.dense import run_dense  # noqa: E402
from kvscope.engine.engine import LLMEngine  # noqa: E402
from kvscope.engine.sampling_params import SamplingParams  # noqa: E402
from kvscope.kv.registry import create  # noqa: E402
from kvscope.models.fused import FusedLinear  # noqa: E402
from kvscope.models.loader import LoadedModel, load_model  # noqa: E402

MODEL, CHECK_MODELS = "dummy:llama-3.1-8b", ("dummy:llama-3.2-1b", "dummy:opt-125m")
TINY_MODEL, TINY_CHECK_MODELS = "dummy:tiny-llama", ("dummy:tiny-llama", "dummy:tiny-opt")
POINTS, TINY_POINTS = [(1, 1024), (64, 1024)], [(1, 64), (4, 64)]
CHECK_PROMPTS, CHECK_TOKENS = [17, 100, 300, 513], [16, 12, 8, 16]
TINY_CHECK_PROMPTS = [5, 17, 40, 100]
DENSE_TOKENS = 64
LOGIT_TOL = 1e-3  # of the largest |logit|
MODES = ("fused", "unfused")


class SplitLinear(nn.Module):
    """A :class:`FusedLinear` run the unfused way: one ``F.linear`` per part on views of its rows;
    ``forward`` returns the parts' separate contiguous outputs, which ``split`` passes through."""

    def __init__(self, fused: FusedLinear) -> None:
        super().__init__()
        self.part_names, self.part_sizes = fused.part_names, fused.part_sizes
        # Plain attributes, not parameters: the weights stay the fused module's (counted once).
        self.weights = [fused.part(n) for n in fused.part_names]
        self.biases = [fused.part(n, "bias") for n in fused.part_names]
        self._fused = [fused]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x`` ``[N, in]`` -> one ``[N, size]`` output per part."""
        return tuple(F.linear(x, w, b) for w, b in zip(self.weights, self.biases))

    def split(self, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return y

    def part(self, name: str, tensor: str = "weight") -> torch.Tensor | None:
        return self._fused[0].part(name, tensor)


def unfuse(model: nn.Module) -> Callable[[], None]:
    """Swap every FusedLinear of ``model`` for a :class:`SplitLinear`; returns the function that
    swaps them back."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedLinear):
                setattr(parent, name, SplitLinear(child))
                swaps.append((parent, name, child))
    if not swaps:
        raise SystemExit("the model has no FusedLinear: nothing to compare (is this the fused commit?)")

    def restore() -> None:
        for parent, name, child in swaps:
            setattr(parent, name, child)

    return restore


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # aten.linear has its own kernel in recent torch; older ones decompose it into (add)mm.
        if func in (torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def in_mode(model: nn.Module, mode: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` with ``model`` in ``mode`` (``"fused"`` or ``"unfused"``), then fused again."""
    restore = unfuse(model) if mode == "unfused" else (lambda: None)
    try:
        return fn()
    finally:
        restore()


# ---- correctness -------------------------------------------------------------------------------------
def dense_check(loaded: LoadedModel, device: torch.device) -> dict:
    """Dense full-sequence logits and matmul counts, fused vs unfused."""
    ids = torch.randint(0, loaded.config.vocab_size, (DENSE_TOKENS,), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    logits, matmuls = {}, {}
    for mode in MODES:
        def forward() -> torch.Tensor:
            with torch.inference_mode(), _CountMatmuls() as counter:
                out = run_dense(loaded.model, ids)
            matmuls[mode] = counter.count
            return out
        logits[mode] = in_mode(loaded.model, mode, forward)
    diff = float((logits["fused"] - logits["unfused"]).abs().max())
    scale = float(logits["unfused"].abs().max())
    agree = float((logits["fused"].argmax(-1) == logits["unfused"].argmax(-1)).float().mean())
    return {"tokens": DENSE_TOKENS, "max_abs_diff": diff, "max_abs_logit": scale, "argmax_agreement": agree,
            "matmuls": matmuls, "passed": diff <= LOGIT_TOL * scale}


def engine_check(loaded: LoadedModel, base: dict, tiny: bool) -> dict:
    """The same greedy requests on a fused and an unfused engine (CUDA graphs where available)."""
    gen = torch.Generator().manual_seed(1)
    lens = TINY_CHECK_PROMPTS if tiny else CHECK_PROMPTS
    prompts = [torch.randint(0, loaded.config.vocab_size, (n,), generator=gen).tolist() for n in lens]
    outs, replays = {}, {}

    def run() -> tuple[list, int | None]:
        engine = LLMEngine(loaded, create("paged"), engine_config(tiny, **base, enforce_eager=False))
        ids = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                    return_logits=True)) for p, n in zip(prompts, CHECK_TOKENS)]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        return [done[i] for i in ids], graph_replays(engine)

    for mode in MODES:
        outs[mode], replays[mode] = in_mode(loaded.model, mode, run)
    return compare_runs(outs["unfused"], outs["fused"]) | {"graph_replays": replays, "prompt_lens": lens}


def check_model(name: str, device: torch.device, tiny: bool) -> dict:
    loaded = load_model(name, device=device, dtype=torch.float32)
    bpt = loaded.config.kv_bytes_per_token(torch.float32)
    base = dict(model=name, device=str(device), dtype="float32", max_num_seqs=8, max_model_len=1024,
                kv_memory_bytes=(sum(TINY_CHECK_PROMPTS if tiny else CHECK_PROMPTS) + 512) * bpt)
    out = {"model": name, "dtype": "float32", "dense": dense_check(loaded, device),
           "engine": engine_check(loaded, base, tiny)}
    # Each fused linear of k parts saves k - 1 launches: 3 per Llama layer (qkv, gate_up), 2 per OPT layer.
    extra = sum(len(m.part_sizes) - 1 for m in loaded.model.modules() if isinstance(m, FusedLinear))
    m = out["dense"]["matmuls"]
    out["extra_matmuls_expected"] = extra
    out["passed"] = out["dense"]["passed"] and out["engine"]["passed"] and m["unfused"] - m["fused"] == extra
    return out


# ---- timing --------------------------------------------------------------------------------------------
def time_mode(loaded: LoadedModel, mode: str, eager: bool, base: dict, pool: int, points: list,
              device: torch.device, tiny: bool, round_idx: int) -> list[dict]:
    def run() -> list[dict]:
        t0 = time.perf_counter()
        engine = LLMEngine(loaded, create("paged"), engine_config(tiny, **base, kv_memory_bytes=pool,
                                                                  enforce_eager=eager))
        fill_random(engine)
        sync(device)
        ready = time.perf_counter() - t0
        rows = []
        for b, t in points:
            row = time_point(engine, f"{mode}-{'eager' if eager else 'graphs'}", b, t, device)
            row |= {"mode": mode, "graphs": not eager, "round": round_idx, "engine_ready_s": ready}
            rows.append(row)
            print(f"round {round_idx} {mode:8s} {'eager ' if eager else 'graphs'} B={b:3d} T={t:5d}  "
                  f"model {row['model_ms']:8.3f} ms  engine {row['engine_ms']:8.3f} ms  "
                  f"replays {row['engine_graph_replays']}", flush=True)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return rows

    return in_mode(loaded.model, mode, run)


def summarise(rows: list[dict], points: list) -> list[dict]:
    """Per point and graphs/eager: median over rounds of each mode's step times, the fused speed-up
    (unfused ms / fused ms) per round, its median and range."""
    out = []
    for b, t in points:
        for graphs in (False, True):
            sel = {m: [r for r in rows if (r["batch"], r["context"], r["graphs"], r["mode"]) == (b, t, graphs, m)]
                   for m in MODES}
            if not all(sel.values()):
                continue
            s: dict[str, Any] = {"batch": b, "context": t, "graphs": graphs, "rounds": len(sel["fused"])}
            for key in ("model_ms", "engine_ms"):
                for m in MODES:
                    s[f"{m}_{key}"] = statistics.median(r[key] for r in sel[m])
                by_round = {r["round"]: r[key] for r in sel["fused"]}
                ups = [u[key] / by_round[u["round"]] for u in sel["unfused"] if u["round"] in by_round]
                s[f"{key.split('_')[0]}_speedup"] = statistics.median(ups)
                s[f"{key.split('_')[0]}_speedup_range"] = [min(ups), max(ups)]
            s["fused_tok_s"] = b / s["fused_engine_ms"] * 1e3
            s["unfused_tok_s"] = b / s["unfused_engine_ms"] * 1e3
            s["graph_replays"] = sum(r["engine_graph_replays"] or 0 for m in MODES for r in sel[m])
            out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="2-layer dummy models on the CPU (smoke test)")
    ap.add_argument("--points", help="comma-separated BxT points (default 1x1024,64x1024)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")] if args.points else (
        TINY_POINTS if args.tiny else POINTS)
    env = bench_environment(device)
    print(env_line(env), flush=True)

    checks = [check_model(name, device, args.tiny) for name in (TINY_CHECK_MODELS if args.tiny else CHECK_MODELS)]
    for c in checks:
        print(f"check {c['model']}: dense diff {c['dense']['max_abs_diff']:.3g} of {c['dense']['max_abs_logit']:.3g}, "
              f"matmuls {c['dense']['matmuls']}, engine diff {c['engine']['max_abs_diff']:.3g}, "
              f"replays {c['engine']['graph_replays']}, passed {c['passed']}", flush=True)
    if not all(c["passed"] for c in checks):
        raise SystemExit(f"fused and unfused projections disagree: {json.dumps(checks, default=str)}")
    if device.type == "cuda" and not all(c["engine"]["graph_replays"]["fused"] for c in checks):
        raise SystemExit("the check engines ran no decode step through a CUDA graph")

    model_name = TINY_MODEL if args.tiny else MODEL
    loaded = load_model(model_name, device=device, dtype=torch.bfloat16)
    bf16 = dense_check(loaded, device)
    print(f"bf16 {model_name} dense: diff {bf16['max_abs_diff']:.3g} of {bf16['max_abs_logit']:.3g}, "
          f"argmax agreement {bf16['argmax_agreement']:.0%}, matmuls {bf16['matmuls']}", flush=True)
    kv_bpt = loaded.config.kv_bytes_per_token(torch.bfloat16)
    steps = 64  # margin for the warm-up and timed engine steps, each growing every context by a token
    pool = max(b * -(-(t + steps) // 16) * 16 * kv_bpt for b, t in points) + 16 * kv_bpt  # 16-token blocks
    base = dict(model=model_name, device=str(device), dtype="bfloat16", max_num_seqs=max(b for b, _ in points),
                max_model_len=max(t for _, t in points) + 256)
    rows = []
    for i in range(args.rounds):
        order = MODES if i % 2 == 0 else MODES[::-1]
        for eager in (True, False):
            for mode in order:
                rows += time_mode(loaded, mode, eager, base, pool, points, device, args.tiny, i)
    summary = summarise(rows, points)
    result = {"benchmark": "fused_projections", "environment": env, "model": model_name, "dtype": "bfloat16",
              "strategy": "paged", "points": points, "rounds": args.rounds, "checks": checks, "bf16_dense": bf16,
              "summary": summary, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fused_projections.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result)
    (args.out / "fused_projections.md").write_text(md)
    print(md)


def markdown(r: dict) -> str:
    rows = r["summary"]

    def line(s: dict) -> str:
        lo, hi = s["engine_speedup_range"]
        return (f"batch {s['batch']} ({'CUDA graphs' if s['graphs'] else 'eager'}): **{s['engine_speedup']:.3f}x** "
                f"(rounds {lo:.3f}-{hi:.3f}x)")

    lines = ["# Fused q/k/v and gate/up projections vs unfused: decode step", "",
             "Engine-step speed-up of the fused projections (unfused ms / fused ms, median over rounds; >1: "
             "fused faster): " + "; ".join(line(s) for s in rows) + ".", "",
             env_line(r["environment"]), "",
             f"{r['model']} (random weights), {r['dtype']}, `{r['strategy']}`, requests given their context directly "
             f"(random KV, no prefill); each mode on its own engine sharing the weights; {r['rounds']} round(s), "
             "the second in the opposite mode order. *model* = `runner.run` + `kv.end_step`, *engine* = "
             "`engine.step()`; each time is the median of 20 steps after 5 warm-up steps. The range is the "
             "speed-up's spread over rounds: a difference inside it is not a measured effect.", "",
             "| batch | context | path | fused model ms | unfused model ms | model speed-up | fused engine ms | "
             "unfused engine ms | engine speed-up (range) | fused tok/s | unfused tok/s | graph replays |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        lo, hi = s["engine_speedup_range"]
        lines.append(
            f"| {s['batch']} | {s['context']} | {'graphs' if s['graphs'] else 'eager'} | {s['fused_model_ms']:.3f} | "
            f"{s['unfused_model_ms']:.3f} | {s['model_speedup']:.3f}x | {s['fused_engine_ms']:.3f} | "
            f"{s['unfused_engine_ms']:.3f} | {s['engine_speedup']:.3f}x ({lo:.3f}-{hi:.3f}) | "
            f"{s['fused_tok_s']:.0f} | {s['unfused_tok_s']:.0f} | {s['graph_replays']} |")
    lines += ["", "## Correctness (before timing)", ""]
    for c in r["checks"]:
        d, e = c["dense"], c["engine"]
        lines.append(
            f"- {c['model']} (float32): dense forward of {d['tokens']} tokens, max |fused - unfused logits| "
            f"{d['max_abs_diff']:.3g} (largest |logit| {d['max_abs_logit']:.3g}, tolerance {LOGIT_TOL:g} of it); "
            f"matmuls per forward {d['matmuls']['fused']} fused vs {d['matmuls']['unfused']} unfused (expected "
            f"difference {c['extra_matmuls_expected']}); greedy engine requests (prompts {e['prompt_lens']}): max "
            f"|logits difference| {e['max_abs_diff']:.3g}, tokens agreeing {sum(x['agree'] for x in e['requests'])} of "
            f"{sum(x['tokens'] for x in e['requests'])}, graph replays {e['graph_replays']}. Passed: {c['passed']}.")
    b = r["bf16_dense"]
    lines.append(f"- {r['model']} (bf16, recorded, not asserted): dense forward of {b['tokens']} tokens, max |logits "
                 f"difference| {b['max_abs_diff']:.3g} (largest |logit| {b['max_abs_logit']:.3g}), argmax agreement "
                 f"{b['argmax_agreement']:.0%}; matmuls {b['matmuls']['fused']} fused vs {b['matmuls']['unfused']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
