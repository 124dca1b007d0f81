"""Memory benefit of eviction at a fixed KV memory budget: how many requests run concurrently, and
what output throughput, `h2o` at a 20% budget reaches against `paged` (and the other strategies
given on the command line). A benchmark, not a test.

Workload: N requests, prompts of P tokens cut from real prose, G greedy output tokens each, all
sent at t=0. Writes benchmarks/results/h2o_memory_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from envinfo import environment  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run(model: str, strategy: str, prompts, new: int, kv_bytes: int, device: str, dtype: str, budget_tokens: int):
    from kvscope import LLM, SamplingParams

    llm = LLM(model, strategy=strategy, kv_memory_bytes=kv_bytes, device=device, dtype=dtype,
              max_num_seqs=256, max_num_batched_tokens=budget_tokens)
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), use_tqdm=False)
    eng = llm.engine
    for p in prompts:
        eng.add_request(p, sp)
    t0 = time.perf_counter()
    running = []
    n_out = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            n_out += out.finished * len(out.token_ids)
        running.append(len(eng.scheduler.running))
    elapsed = time.perf_counter() - t0
    s = eng.stats()
    return {
        "strategy": strategy,
        "elapsed_s": elapsed,
        "output_tokens": n_out,
        "output_tokens_per_s": n_out / elapsed,
        "peak_concurrent_requests": max(running),
        "mean_concurrent_requests": sum(running) / len(running),
        "steps": s["num_steps"],
        "preemptions": s["num_preemptions"],
        "kv_bytes_reserved": s["kv_bytes_reserved"],
        "peak_kv_bytes_used": s.get("peak_kv_bytes_used"),
        "peak_kv_bytes_allocated": s.get("peak_kv_bytes_allocated"),
        "freed_blocks": s.get("freed_blocks", 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--kv-tokens", type=int, default=2048, help="KV pool size, in tokens of the model")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--strategies", nargs="+", default=["paged", "h2o:heavy_ratio=0.1,recent_ratio=0.1"])
    args = ap.parse_args()

    from kvscope.config import parse_dtype
    from kvscope.models.loader import load_model
    from kvscope.workload.text import load_prose

    loaded = load_model(args.model)
    ids = loaded.tokenizer.encode(load_prose())
    stride = args.prompt_len
    prompts = [ids[i * stride : (i + 1) * stride] for i in range(args.requests)]
    kv_bytes = args.kv_tokens * loaded.config.kv_bytes_per_token(parse_dtype(args.dtype))
    del loaded
    rows = []
    for strategy in args.strategies:
        row = run(args.model, strategy, prompts, args.new_tokens, kv_bytes, args.device, args.dtype,
                  args.max_num_batched_tokens)
        rows.append(row)
        print(f"{strategy:<40} peak concurrency {row['peak_concurrent_requests']:>3} "
              f"(mean {row['mean_concurrent_requests']:.1f})  {row['output_tokens_per_s']:8.1f} out tok/s  "
              f"preemptions {row['preemptions']}")
    base = rows[0]
    for r in rows:
        r["throughput_vs_first"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        r["concurrency_vs_first"] = r["mean_concurrent_requests"] / base["mean_concurrent_requests"]
    env = environment()
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    result = {"benchmark": "h2o_memory", "config": vars(args) | {"kv_memory_bytes": kv_bytes},
              "environment": env, "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"h2o_memory_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / f"h2o_memory_{tag}.md")


def write_markdown(result: dict, path: Path) -> None:
    args, env, rows = argparse.Namespace(**result["config"]), result["environment"], result["results"]
    kv_bytes = result["config"]["kv_memory_bytes"]
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    where = env["gpu"] or f"{env['cpu']} ({env['torch_threads']} torch threads)"
    lines = [
        f"# Memory benefit of eviction at a fixed KV budget ({args.model}, {args.dtype}, {tag})",
        "",
        f"Measured {env['date']} on {where}, commit {env['commit']}, torch {env['versions']['torch']}.",
        f"{args.requests} requests of {args.prompt_len} prompt tokens (real prose) + {args.new_tokens} greedy "
        f"output tokens, all at t=0; KV pool {args.kv_tokens} tokens ({kv_bytes / 2**20:.1f} MiB); "
        f"token budget per step {args.max_num_batched_tokens}.",
        "",
        "| strategy | peak / mean concurrent requests | output tok/s | x first row | preemptions | peak KV used MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['strategy']}` | {r['peak_concurrent_requests']} / {r['mean_concurrent_requests']:.1f} | "
            f"{r['output_tokens_per_s']:.1f} | {r['throughput_vs_first']:.2f} | {r['preemptions']} | "
            f"{(r['peak_kv_bytes_used'] or 0) / 2**20:.1f} |"
        )
    lines += [
        "",
        "Same pool bytes for every strategy. Evicting strategies also keep a float32 score and an int64 "
        "position per token, layer and KV head beside the KV, so the same bytes give them slightly fewer "
        "slots. `h2o` still needs the whole prompt during prefill (the prompt is evicted at the first decode "
        "step), which is what bounds its concurrency here; decoding requests hold their 20% budget "
        "rounded up to a block.",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
