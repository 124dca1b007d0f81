"""Output tokens/s of kvscope's `paged` and `contiguous` strategies against HF transformers'
`generate` on SmolLM2-135M (CPU, float32), at batch 1 and 16. A benchmark, not a test.

Each configuration runs once to warm up, then `--repeats` times; the median is reported.
Writes benchmarks/results/cpu_generate.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from envinfo import environment  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books faster and more cheaply than ever before. Within a few decades"
)


def prompts(tok, batch: int, prompt_len: int) -> list[list[int]]:
    """``batch`` distinct prompts of exactly ``prompt_len`` tokens, cut from real text."""
    ids = tok.encode(TEXT * 4)
    return [ids[i : i + prompt_len] for i in range(batch)]


def time_kvscope(strategy: str, batch: int, ps, new: int, repeats: int) -> list[float]:
    from kvscope import LLM, SamplingParams

    llm = LLM("smollm2-135m", strategy=strategy, kv_memory_bytes=1 << 30, max_model_len=1024)
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    llm.generate(ps[:batch], sp, use_tqdm=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(ps[:batch], sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        assert all(len(o.token_ids) == new for o in outs)
    return times


def time_hf(batch: int, ps, new: int, repeats: int) -> list[float]:
    from transformers import AutoModelForCausalLM

    from kvscope.models.gguf_convert import converted_gguf
    from kvscope.models.registry import PACKAGED

    folder = converted_gguf(PACKAGED["smollm2-135m"].locate(), "smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    inp = torch.tensor(ps[:batch])

    def run():
        with torch.inference_mode():
            out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == inp.shape[1] + new

    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from kvscope.models.loader import load_model

    tok = load_model("smollm2-135m").tokenizer
    ps = prompts(tok, max(args.batches), args.prompt_len)
    rows = []
    for batch in args.batches:
        for name, fn in (
            ("kvscope paged", lambda: time_kvscope("paged", batch, ps, args.new_tokens, args.repeats)),
            ("kvscope contiguous", lambda: time_kvscope("contiguous", batch, ps, args.new_tokens, args.repeats)),
            ("HF generate", lambda: time_hf(batch, ps, args.new_tokens, args.repeats)),
        ):
            times = fn()
            med = statistics.median(times)
            row = {"system": name, "batch": batch, "median_s": med, "times_s": times,
                   "output_tokens_per_s": batch * args.new_tokens / med}
            rows.append(row)
            print(f"{name:<20} batch {batch:>3}: {row['output_tokens_per_s']:8.1f} tok/s (median {med:.2f} s)")

    result = {
        "benchmark": "cpu_generate",
        "config": {"model": "smollm2-135m", "dtype": "float32", "device": "cpu",
                   "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "repeats": args.repeats, "greedy": True},
        "environment": environment(),
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_generate.json").write_text(json.dumps(result, indent=2) + "\n")
    env = result["environment"]
    lines = [
        "# CPU generation throughput (SmolLM2-135M, float32)",
        "",
        f"Measured {env['date']} on {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads), "
        f"commit {env['commit']}, torch {env['versions']['torch']}, transformers {env['versions']['transformers']}.",
        f"Prompts of {args.prompt_len} tokens cut from real text, {args.new_tokens} greedy output tokens each, "
        f"median of {args.repeats} runs after one warm-up.",
        "",
        "| system | batch | output tok/s | median s |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['system']} | {r['batch']} | {r['output_tokens_per_s']:.1f} | {r['median_s']:.2f} |" for r in rows]
    (RESULTS / "cpu_generate.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
