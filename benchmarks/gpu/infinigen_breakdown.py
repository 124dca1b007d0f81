"""Where an ``infinigen`` decode step's time goes (Llama-3-8B shapes, bf16, dummy weights).

For each (batch, context) it measures, each as the median of 10 replays of a CUDA graph after
warm-up:

* the whole decode step (captured by the engine's graph runner, as the engine runs it), once per number of programs
  the copy kernels may run on (``TransferEngine.copy_programs``; ``all``: one per row block);
* the speculation of one layer alone (query projection, partial-key logits, selection), captured
  30 times in one graph and divided by 30;
* the gather of one speculative layer's selected rows alone, per number of programs;
* ``paged``'s decode step at the same shape (the compute a step cannot avoid).

With the copy overlapped, a step should take about the larger of ``paged + layers x speculation``
and ``layers x gather``; a step near their sum means the copy and the compute serialise. Then one
eager step is profiled and the 20 kernels with the most GPU time are printed.

Writes ``benchmarks/results/infinigen_breakdown.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ceilings import env_line, gpu_environment, host_bandwidth  # noqa: E402
from offload_decode import MODEL, fill_random, make_engine  # noqa: E402

from kvscope.attention.triton_gather import gather_rows  # noqa: E402
from kvscope.engine.request import Request  # noqa: E402
from kvscope.engine.sampling_params import SamplingParams  # noqa: E402
from kvscope.kv.host_decode import context_bucket  # noqa: E402
from kvscope.kv.infinigen_decode import InfiniGenDecode  # noqa: E402
from kvscope.models.loader import load_model  # noqa: E402

RESULTS = Path(__file__).parents[1] / "results"
SPEC_REPEATS = 30


def graph_ms(fn, repeats: int = 10) -> float:
    """Median ms of replaying a graph of ``fn`` (captured after two eager warm-up calls)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def admit(engine, batch: int, context: int) -> list[Request]:
    reqs = []
    for i in range(batch):
        r = Request(f"b{i}", [1] * context, SamplingParams(max_tokens=8, ignore_eos=True))
        r.output_token_ids.append(1)
        assert engine.kv.allocate(r, context) and engine.kv.allocate(r, context + 1)
        r.num_computed_tokens = context
        reqs.append(r)
    return reqs


def step_ms(engine, reqs: list[Request]) -> float:
    batch_obj = engine.runner.build_batch(reqs, [1] * len(reqs))
    rows = list(range(len(reqs)))
    times = []
    for i in range(13):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        engine.runner.run(batch_obj, rows)
        e.record()
        engine.kv.end_step(batch_obj)
        e.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e))
    return statistics.median(times)


@torch.inference_mode()
def parts(engine, reqs: list[Request], programs: list[int | None]) -> dict:
    """Speculation of one speculative layer alone, and the gather of its selected rows alone with
    each number of copy programs, all from graphs."""
    g = engine.kv
    prev = [g.pool.slots(r.request_id)[:-1] for r in reqs]
    new = torch.stack([g.pool.slots(r.request_id)[-1] for r in reqs])
    positions = torch.tensor([p.numel() for p in prev], device="cuda")
    dec = InfiniGenDecode(g, len(reqs), context_bucket(max(p.numel() for p in prev)))
    dec.load(prev, new, positions)
    dec.begin()
    g.transfer.join()
    layer = g.num_layers - 1
    x = torch.randn(len(reqs), g.setup.model.hidden_size, dtype=torch.bfloat16, device="cuda")
    spec = graph_ms(lambda: [dec.speculate(layer, x) for _ in range(SPEC_REPEATS)]) / SPEC_REPEATS
    rows, valid = dec.speculate(layer, x)
    host = g.pool.layer_rows(layer, per_head=dec.per_head)
    out = torch.empty(2, rows.numel(), host.shape[2], dtype=host.dtype, device="cuda")
    nbytes = int(valid.sum()) * 2 * host.shape[2] * host.element_size()
    gather = {}
    for p in programs:
        ms = graph_ms(lambda: gather_rows(host, rows, out=out, valid=valid, sort=True, max_programs=p))
        gather[f"{p or 'all'}, sorted"] = {"ms": ms, "gb_s": nbytes / ms / 1e6}
    # The selection writes each head's rows in position order, and the engine fetches them so; this
    # compares with sorting them all by address first.
    p = g.transfer.copy_programs
    ms = graph_ms(lambda: gather_rows(host, rows, out=out, valid=valid, sort=False, max_programs=p))
    gather[f"{p or 'all'}, unsorted"] = {"ms": ms, "gb_s": nbytes / ms / 1e6}
    return {"speculate_ms_per_layer": spec, "fetched_bytes_per_layer": nbytes, "gather_alone": gather}


def profile(engine, reqs: list[Request]) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    batch_obj = engine.runner.build_batch(reqs, [1] * len(reqs))
    rows = list(range(len(reqs)))
    engine.runner.run(batch_obj, rows)
    engine.kv.end_step(batch_obj)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.runner.run(batch_obj, rows)
        engine.kv.end_step(batch_obj)
        torch.cuda.synchronize()
    table = []
    for ev in prof.key_averages():
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if us > 0:
            table.append({"kernel": ev.key[:90], "calls": ev.count, "ms": us / 1e3})
    return sorted(table, key=lambda r: -r["ms"])[:20]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--grid", default="1x16384,4x16384")
    ap.add_argument("--strategy", default="infinigen:calibration=random")
    ap.add_argument("--programs", default="all,8,16,32,64", help="copy-kernel program counts to compare")
    args = ap.parse_args()
    grid = [tuple(int(v) for v in item.split("x")) for item in args.grid.split(",")]
    env = gpu_environment()
    print(env_line(env), flush=True)
    h2d = host_bandwidth("h2d")
    loaded = load_model(MODEL, device="cuda", dtype=torch.bfloat16)
    max_tokens = max(b * t for b, t in grid) + 16 * 64
    rows = []
    paged = make_engine(loaded, "paged", max_tokens)
    paged_ms = {}
    for b, t in grid:
        reqs = admit(paged, b, t)
        paged_ms[(b, t)] = step_ms(paged, reqs)
        for r in reqs:
            paged.kv.free(r)
    del paged
    torch.cuda.empty_cache()
    engine = make_engine(loaded, args.strategy + f",host_kv_bytes={(max_tokens + 4096) * 131072}", max_tokens)
    fill_random(engine)
    layers = engine.kv.num_layers
    default_programs = engine.kv.transfer.copy_programs
    programs = [None if p == "all" else int(p) for p in args.programs.split(",")]
    for b, t in grid:
        reqs = admit(engine, b, t)
        row = {"batch": b, "context": t, "paged_step_ms": paged_ms[(b, t)]}
        row.update(parts(engine, reqs, programs))
        row["step_ms"] = {}
        for p in programs:
            engine.kv.transfer.copy_programs = p
            engine.runner.graphs._steps.clear()  # captured with the old program count
            row["step_ms"][str(p or "all")] = step_ms(engine, reqs)
        engine.kv.transfer.copy_programs = default_programs
        spec_layers = layers - engine.kv.dense_layers
        row["paged_plus_speculation_ms"] = row["paged_step_ms"] + spec_layers * row["speculate_ms_per_layer"]
        best = min(row["gather_alone"].values(), key=lambda v: v["ms"])
        row["gather_alone_best"] = best
        row["fetch_bound_ms"] = spec_layers * best["ms"]
        graphs, engine.runner.graphs = engine.runner.graphs, None  # eager: kernels attributable by name
        row["top_kernels_eager"] = profile(engine, reqs)
        engine.runner.graphs = graphs
        for r in reqs:
            engine.kv.free(r)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels_eager"}), flush=True)
        for k in row["top_kernels_eager"]:
            print(f"   {k['ms']:8.3f} ms {k['calls']:5d}x  {k['kernel']}")
        rows.append(row)
    engine.kv.transfer.copy_programs = default_programs
    result = {"env": env, "model": MODEL, "strategy": args.strategy, "h2d": h2d, "rows": rows,
              "default_copy_programs": default_programs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "infinigen_breakdown.json").write_text(json.dumps(result, indent=1))
    (args.out / "infinigen_breakdown.md").write_text(markdown(result))


def markdown(r: dict) -> str:
    keys = list(r["rows"][0]["step_ms"])
    gkeys = list(r["rows"][0]["gather_alone"])
    lines = ["# Where an `infinigen` decode step's time goes (Llama-3-8B shapes, bf16)", "",
             env_line(r["env"]).rstrip(".") + f"; pinned h2d {r['h2d']['gb_per_s']:.1f} GB/s; strategy `{r['strategy']}`; "
             f"copy programs by default: {r['default_copy_programs']}.", "",
             "Step: the engine's decode step (CUDA graph), by the number of programs the copy kernels run on. "
             "Gather: one speculative layer's selected rows alone. Speculation: one layer's, alone.", "",
             "| batch | context | paged ms | speculation ms/layer | paged + speculation ms | fetch-bound ms | "
             + " | ".join(f"step ms ({k})" for k in keys) + " | "
             + " | ".join(f"gather GB/s ({k})" for k in gkeys) + " |",
             "|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(keys) + len(gkeys))]
    for x in r["rows"]:
        lines.append(f"| {x['batch']} | {x['context']} | {x['paged_step_ms']:.2f} | {x['speculate_ms_per_layer']:.3f} | "
                     f"{x['paged_plus_speculation_ms']:.2f} | {x['fetch_bound_ms']:.2f} | "
                     + " | ".join(f"{x['step_ms'][k]:.2f}" for k in keys) + " | "
                     + " | ".join(f"{x['gather_alone'][k]['gb_s']:.1f}" for k in gkeys) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
