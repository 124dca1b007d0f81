"""Step times of the eviction strategies against ``paged`` on one long prompt (SmolLM2-135M shapes,
bf16, dummy weights): what a long RULER request costs each of them in the mixed-workload study.

For each strategy, after a correctness check (at a budget that keeps every token, ``snapkv`` and
``h2o`` give ``paged``'s greedy tokens) and a warm-up request:

* **prefill**: the engine step that prefills a ``--prompt``-token prompt in one chunk (for the
  eviction strategies it also scores the prompt and compresses it to its budget), median of
  ``--repeats`` fresh requests;
* **decode**: the median engine step of ``--decode`` decode steps of one request after that
  prefill (CUDA-graph replays where the strategy has them).

Each step is timed on the host around ``engine.step()`` with the device synchronised, as a served
step costs. One ``snapkv`` prefill step is then profiled and its 15 ops with the most device time
printed.

Writes ``benchmarks/results/eviction_steps.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ceilings import env_line, gpu_environment  # noqa: E402

from kvscope.config import EngineConfig  # noqa: E402
from kvscope.engine.engine import LLMEngine  # noqa: E402
from kvscope.engine.sampling_params import SamplingParams  # noqa: E402
from kvscope.kv.registry import create  # noqa: E402
from kvscope.models.loader import load_model  # noqa: E402

RESULTS = Path(__file__).parents[1] / "results"
MODEL = "dummy:smollm2-135m"
STRATEGIES = ["paged", "snapkv:budget_ratio=0.2", "h2o:heavy_ratio=0.1,recent_ratio=0.1"]


def make_engine(loaded, strategy: str) -> LLMEngine:
    cfg = EngineConfig(model=MODEL, device="cuda", dtype="bfloat16", max_model_len=4096, max_num_seqs=128,
                       max_num_batched_tokens=8192, kv_memory_bytes=512 << 20)
    return LLMEngine(loaded, create(strategy), cfg)


def timed_step(engine: LLMEngine) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def run_request(engine: LLMEngine, prompt: list[int], decode: int) -> tuple[float, list[float]]:
    """(prefill step ms, decode step ms each) of one request served alone."""
    engine.add_request(prompt, SamplingParams(max_tokens=decode + 1, ignore_eos=True))
    prefill = timed_step(engine)
    steps = []
    while engine.has_unfinished_requests():
        steps.append(timed_step(engine))
    return prefill, steps


def check(loaded, prompt: list[int]) -> None:
    """At a budget that keeps every token, the eviction strategies give paged's greedy tokens."""
    tokens = {}
    for spec in ("paged", "snapkv:budget_ratio=1.0", "h2o:heavy_ratio=0.5,recent_ratio=0.5"):
        eng = make_engine(loaded, spec)
        eng.add_request(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), request_id="r")
        out = None
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    out = o
        tokens[spec] = out.token_ids
    ref = tokens.pop("paged")
    for spec, t in tokens.items():
        agree = sum(a == b for a, b in zip(t, ref)) / len(ref)
        print(f"check: {spec} at full budget agrees with paged on {agree:.0%} of 16 greedy tokens")
        if agree < 0.75:  # bf16: a near-tie may flip late tokens, not most of them
            raise SystemExit(f"check failed: {spec} {t} vs paged {ref}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt", type=int, default=3840)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    env = gpu_environment()
    loaded = load_model(MODEL, device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, loaded.config.vocab_size, (args.prompt,), generator=gen).tolist()
    check(loaded, prompt[:512])
    rows = []
    for spec in STRATEGIES:
        eng = make_engine(loaded, spec)
        run_request(eng, prompt, args.decode)  # warm-up: compiles, graph captures
        prefills, decodes = [], []
        for _ in range(args.repeats):
            p, d = run_request(eng, prompt, args.decode)
            prefills.append(p)
            decodes += d
        row = {"strategy": spec, "prefill_ms": statistics.median(prefills), "decode_ms": statistics.median(decodes),
               "prefill_all_ms": prefills}
        rows.append(row)
        print(f"{spec:40s} prefill {row['prefill_ms']:7.2f} ms   decode {row['decode_ms']:6.2f} ms")
        if spec.startswith("snapkv"):
            eng.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                timed_step(eng)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
            while eng.has_unfinished_requests():
                eng.step()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"environment": env, "config": {"model": MODEL, "dtype": "bfloat16", **vars(args)}, "rows": rows}
    (out / "eviction_steps.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Eviction strategies' step times on one long prompt", "", env_line(env), "",
             f"SmolLM2-135M shapes, dummy weights, bf16; one {args.prompt}-token prompt prefilled in one chunk, "
             f"then {args.decode} decode steps; medians of {args.repeats} requests after a warm-up one.", "",
             "| strategy | prefill step ms | decode step ms |", "|---|---:|---:|"]
    lines += [f"| `{r['strategy']}` | {r['prefill_ms']:.2f} | {r['decode_ms']:.2f} |" for r in rows]
    (out / "eviction_steps.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
