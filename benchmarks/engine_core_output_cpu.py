"""What the server's engine core spends per step on its output path: the per-request deltas
(:meth:`kvscope.serve.engine_core._Sent.delta`) and the pickling of the turn's one message, with
``--requests`` requests decoding at once. A benchmark, not a test.

Why: ``kvscope serve`` loses about 9% of the in-process engine's throughput at 256 concurrent
streamed requests on an H100 even with the load sent from four client processes, while the
server's own TTFT equals the in-process engine's (``results/serve_overhead_clients_h100.md``), so
the loss accrues while tokens stream out. The engine core does this work in its loop after every
step, on the engine's own thread (the pickling: on a writer thread, which holds the GIL while it
pickles); this measures its share.

A tiny random-weight model on the CPU decodes ``--requests`` requests together (every one moves
every step); after each of ``--steps`` steps the deltas of all of them are taken and the turn's
message pickled, as the core does. Medians over the steps, after three warm-up steps. Timing on a
shared machine is only meaningful with nothing else running: the result records the load average
before the run. Writes ``engine_core_output_cpu.{json,md}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from kvscope import LLM, SamplingParams
from kvscope.serve.engine_core import _Sent

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from envinfo import environment  # noqa: E402


class _Reader:
    """Stands in for a front end: the core only groups deltas by it."""


def measure(requests: int, steps: int) -> dict[str, Any]:
    """Per-step seconds of the engine step, the deltas and the pickling, and the message size."""
    llm = LLM(model="dummy:tiny-llama", strategy="paged", kv_memory_bytes=256 << 20, device="cpu", dtype="float32",
              max_model_len=512, max_num_seqs=requests, max_num_batched_tokens=requests * 80)
    eng = llm.engine
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, temperature=0.0)
    ids = [eng.add_request([1 + i % 50] * 64, params) for i in range(requests)]
    reader = _Reader()
    live = [_Sent(reader, eng.samples(rid)) for rid in ids]
    for _ in range(3):  # the prompts' prefill, then decode
        eng.step()
        for sent in live:
            sent.delta()
    rows = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        t1 = time.perf_counter()
        outputs = [d for d in (sent.delta() for sent in live) if d is not None]
        t2 = time.perf_counter()
        blob = pickle.dumps(([], outputs, None), protocol=pickle.HIGHEST_PROTOCOL)
        t3 = time.perf_counter()
        rows.append({"step_s": t1 - t0, "deltas_s": t2 - t1, "pickle_s": t3 - t2, "bytes": len(blob),
                     "moved": len(outputs)})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    med = measure(args.requests, args.steps)
    result = {"benchmark": "engine_core_output_cpu", "environment": environment(), "load_average_before": load,
              "requests": args.requests, "steps": args.steps, "median": med}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_core_output_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "engine_core_output_cpu.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    med, n, env = r["median"], r["requests"], r["environment"]
    out_ms = 1e3 * (med["deltas_s"] + med["pickle_s"])
    return "\n".join([
        "# The engine core's output path per step", "",
        f"**With {n} requests decoding at once, the engine core spends {out_ms:.2f} ms per step on its output "
        f"path: {1e3 * med['deltas_s']:.2f} ms taking every request's delta and {1e3 * med['pickle_s']:.2f} ms "
        f"pickling the turn's message ({med['bytes'] / 1e3:.1f} kB, {med['moved']:.0f} requests moved).** "
        f"Over the 128 decode steps of `serve_overhead.py`'s workload that is {128 * out_ms:.0f} ms of a run "
        f"of about 2.1 s on an H100 ({128 * out_ms / 21:.0f}% of it, if the GPU host's cores are as fast as "
        "these), against the 0.2 s the server loses there: the core's output path is a part of the loss, not "
        "what bounds it.", "",
        f"Measured {env.get('date', '')} on {env.get('cpu', 'CPU')} ({env.get('cpu_count', '?')} cores), load "
        f"average {r['load_average_before']:.2f} before the run, commit {env.get('commit')}, Python "
        f"{env.get('python')}, torch {env.get('versions', {}).get('torch')}. `dummy:tiny-llama` (random weights, float32) decoding "
        f"{n} requests of 64 prompt tokens together (its step: {1e3 * med['step_s']:.1f} ms, not a figure of "
        f"interest); medians over {r['steps']} steps after three warm-up steps.", ""])


if __name__ == "__main__":
    main()
