"""Host (Python) cost of one pure-decode engine step, by phase, on the CPU. A benchmark, not a test.

On a GPU the decode step's forward is a CUDA-graph replay; what is left per step is host work not
overlapped with the GPU: scheduling, building the step batch, loading the static graph buffers
(``BlockTableGraphs.load``), sampling and output bookkeeping. This runs ``engine.step()`` as is on a
tiny dummy model (``dummy:tiny-llama``, float32, ``paged``) with its phases timed: the eager CPU
forward stands in for the replay (reported, not host cost), and the static buffers of the block-table
graphs are loaded before it, as a replayed step would. Batch 64 and 256, context ~450-480 tokens.

Adds a ``--label``ed entry to benchmarks/results/engine_host_step.json (``--profile``: prints cProfile's
top entries instead).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from envinfo import environment  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPT, MAX_LEN = 440, 512
PHASES = ("schedule", "build_batch", "load_static", "forward", "rest")


class _Layout:
    """``paged`` as the block-table graphs see it, with the layout that the Triton backend gives
    (the CPU engine runs the torch backend, whose strategy declines graphs)."""

    def __init__(self, kv) -> None:
        self._kv = kv

    def __getattr__(self, name: str):
        return getattr(self._kv, name)

    def block_table_layout(self):
        from kvscope.kv.graphs import BlockTableLayout

        return BlockTableLayout(self._kv.cache, self._kv.block_size)


def measure(batch: int, steps: int, warmup: int, profile: bool, output_kind: str = "cumulative") -> dict[str, float]:
    """Median ms per phase over ``steps`` pure-decode steps of ``batch`` requests."""
    from kvscope import LLM, SamplingParams
    from kvscope.engine.cuda_graph import default_graph_sizes
    from kvscope.kv.block_table_graphs import BlockTableGraphs

    llm = LLM("dummy:tiny-llama", strategy="paged", kv_memory_bytes=256 << 20, max_model_len=MAX_LEN,
              max_num_seqs=batch, max_num_batched_tokens=8192)
    e = llm.engine
    graphs = BlockTableGraphs(_Layout(e.kv), default_graph_sizes(batch), MAX_LEN, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=MAX_LEN - PROMPT, temperature=0.0, ignore_eos=True, output_kind=output_kind)
    for _ in range(batch):
        e.add_request(torch.randint(1, 500, (PROMPT,), generator=gen).tolist(), params)
    cur: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args):
            t = time.perf_counter()
            out = fn(*args)
            cur[name] = cur.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    forward = e.runner.run

    def run(b, rows):
        t = time.perf_counter()
        key = graphs.key(b) if all(n == 1 for n in b.num_new_tokens) else None
        if key is not None:
            graphs.load(b, key)
        cur["load_static"] = time.perf_counter() - t
        return timed("forward", forward)(b, rows)

    e.scheduler.schedule = timed("schedule", e.scheduler.schedule)
    e.runner.build_batch = timed("build_batch", e.runner.build_batch)
    e.runner.run = run
    while not (len(e.scheduler.running) == batch and all(r.output_token_ids for r in e.scheduler.running)):
        e.step()  # prefill
    rows: list[dict[str, float]] = []
    prof = cProfile.Profile() if profile else None
    for i in range(warmup + steps):
        cur.clear()
        if prof is not None and i >= warmup:
            prof.enable()
        t = time.perf_counter()
        outs = e.step()
        total = time.perf_counter() - t
        if prof is not None:
            prof.disable()
        assert cur.get("load_static", 0) > 0 and len(outs) == (batch if output_kind == "cumulative" else 0), \
            "not a full pure-decode step"
        cur["rest"] = total - cur["schedule"] - cur["build_batch"] - cur["load_static"] - cur["forward"]
        if i >= warmup:
            rows.append(dict(cur))
    if prof is not None:
        print(f"--- batch {batch}: top host costs (cumulative over {steps} steps)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    med = {p: statistics.median(r[p] for r in rows) * 1e3 for p in PHASES}
    med["host"] = statistics.median((sum(r.values()) - r["forward"]) for r in rows) * 1e3
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="runs per batch; the median run is reported")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top entries, write nothing")
    ap.add_argument("--label", default="", help="a name for this run in the results")
    ap.add_argument("--output-kind", choices=["cumulative", "final_only"], default="cumulative",
                    help="the requests' outputs: every step (streaming) or only at the end (LLM.generate)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for b in args.batches:
        runs = [measure(b, args.steps, args.warmup, args.profile, args.output_kind) for _ in range(args.repeats)]
        out[b] = {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs_host_ms": [r["host"] for r in runs]}
        print(f"batch {b}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in out[b].items() if k != "runs_host_ms"))
    if args.profile:
        return
    path = RESULTS / "engine_host_step.json"  # one entry per --label: before and after a change
    rec = json.loads(path.read_text()) if path.exists() else {
        "note": "CPU host cost per pure-decode step (ms, medians of medians), not a GPU figure"}
    rec[args.label or "run"] = {"env": environment(), "steps": args.steps, "prompt_len": PROMPT,
                                "output_kind": args.output_kind,
                                "max_len": MAX_LEN, "batches": out}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(rec, indent=2) + "\n")


if __name__ == "__main__":
    main()
