"""Quality of every eviction strategy at budgets 10%, 20%, 50% and 100% on real weights:
perplexity under eviction (teacher-forced decoding of real prose, the cache evicting as it goes)
and RULER needle-in-a-haystack accuracy at about 4k tokens. `paged` (full cache) is the baseline.

Inputs are prepared once by `--prepare` (token ids of the prose and RULER samples, which need the
dataset packages) so the measurement itself needs only the model; writes
docs/results/eviction_quality.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from envinfo import environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ["h2o", "streaming", "tova", "snapkv", "knorm", "random"]
RATIOS = [0.1, 0.2, 0.5, 1.0]


def spec_for(name: str, ratio: float, absolute: int | None = None) -> str:
    """Strategy spec at a budget ``ratio`` of the prompt (or ``absolute`` tokens)."""
    if absolute is not None:
        if name == "h2o":
            return f"h2o:budget={absolute},recent={max(1, absolute // 2)}"
        return f"{name}:budget={absolute}"
    if name == "h2o":
        return f"h2o:heavy_ratio={ratio / 2},recent_ratio={ratio / 2}"
    return f"{name}:budget_ratio={ratio}"


def prepare(args) -> None:
    from kvscope.models.loader import load_model
    from kvscope.workload.ruler import ruler_samples
    from kvscope.workload.text import load_prose

    tok = load_model(args.model).tokenizer
    ids = tok.encode(load_prose())
    seqs = [ids[i * args.seq_len : (i + 1) * args.seq_len] for i in range(args.num_seqs)]
    samples = []
    for task in args.ruler_tasks:
        samples += ruler_samples(task, args.ruler_len, tok, num_samples=args.ruler_samples // len(args.ruler_tasks))
    Path(args.inputs).mkdir(parents=True, exist_ok=True)
    (Path(args.inputs) / "prose_ids.json").write_text(json.dumps(seqs))
    (Path(args.inputs) / "ruler.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    print(f"prepared {len(seqs)} x {args.seq_len} prose tokens and {len(samples)} RULER samples in {args.inputs}")


def measure(args) -> None:
    import torch

    from kvscope import LLM
    from kvscope.bench.quality import perplexity, ruler_accuracy

    seqs = json.loads((Path(args.inputs) / "prose_ids.json").read_text())
    samples = [json.loads(line) for line in (Path(args.inputs) / "ruler.jsonl").read_text().splitlines()]
    common = dict(device=args.device, dtype=args.dtype, kv_memory_bytes=args.kv_memory_gib << 30,
                  max_model_len=8192, max_num_batched_tokens=args.max_num_batched_tokens)
    env = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    configs = [("paged", None)] + [(s, r) for s in args.strategies for r in RATIOS]
    for name, ratio in configs:
        t0 = time.perf_counter()
        ppl_spec = "paged" if ratio is None else spec_for(name, ratio, absolute=int(ratio * args.seq_len))
        ruler_spec = "paged" if ratio is None else spec_for(name, ratio)
        ppl = perplexity(LLM(args.model, strategy=ppl_spec, **common), seqs, prefix=args.prefix)
        llm = LLM(args.model, strategy=ruler_spec, **common)
        acc = ruler_accuracy(llm, samples, max_tokens=args.answer_tokens)
        row = {"strategy": name, "budget_ratio": ratio, "perplexity_spec": ppl_spec, "ruler_spec": ruler_spec,
               "perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens_scored"],
               "ruler_accuracy": acc["accuracy"], "ruler_samples": acc["num_samples"],
               "ruler_by_task": {t: v["accuracy"] for t, v in acc["per_task"].items()}, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name:<10} {str(ratio):>5}  ppl {row['perplexity']:8.3f}  ruler {row['ruler_accuracy']:.3f}"
              f"  ({row['seconds']:.1f} s)", flush=True)
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # Written after every configuration, so an interrupted run keeps what it measured.
        result = {"benchmark": "eviction_quality", "config": {k: v for k, v in vars(args).items() if k != "out"}, "environment": env, "results": rows}
        (out / "eviction_quality.json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(result, out / "eviction_quality.md")


def write_markdown(result: dict, path: Path) -> None:
    cfg, env, rows = result["config"], result["environment"], result["results"]
    where = env["gpu"] or env["cpu"]
    lines = [
        "# Eviction quality on SmolLM2-135M-Instruct (real weights)",
        "",
        f"Measured {env['date']} on {where}, commit {env['commit']}, torch {env['versions']['torch']}, "
        f"dtype {cfg['dtype']}.",
        "",
        f"- Perplexity: {cfg['num_seqs']} sequences of {cfg['seq_len']} tokens of public-domain prose, batched; "
        f"the first {cfg['prefix']} tokens are the prompt, the other "
        f"{cfg['num_seqs'] * (cfg['seq_len'] - cfg['prefix'])} are scored by teacher-forced decoding while the "
        f"cache evicts as it goes. The budget is the ratio times the {cfg['seq_len']}-token sequence "
        "(absolute `budget=`). `snapkv` only compresses the prompt, so its decode keeps every new token.",
        f"- RULER: {', '.join(cfg['ruler_tasks'])} at max_seq_length {cfg['ruler_len']} (prompts of about "
        f"{cfg['ruler_len'] - 128} tokens), {cfg['ruler_samples']} "
        "samples, greedy, string-match scoring. The budget is the ratio of each prompt "
        "(`h2o` splits it half heavy, half recent, as the paper's 10% + 10%).",
        "- `paged` keeps everything (the reference).",
        "",
        "| strategy | budget | perplexity | RULER accuracy |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        b = "full" if r["budget_ratio"] is None else f"{int(r['budget_ratio'] * 100)}%"
        lines.append(f"| `{r['strategy']}` | {b} | {r['perplexity']:.2f} | {r['ruler_accuracy']:.2f} |")
    lines += ["", "Produced by:", "", "```bash",
              f"python benchmarks/quality_eviction.py --prepare --inputs {cfg['inputs']}",
              f"python benchmarks/quality_eviction.py --model {cfg['model']} --device {cfg['device']} "
              f"--dtype {cfg['dtype']} --inputs {cfg['inputs']}", "```"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepare", action="store_true", help="write the inputs (needs the dataset packages)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--inputs", default="benchmarks/inputs/quality")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--num-seqs", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=128, help="prompt tokens of each sequence; the rest is scored")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ruler-tasks", nargs="+", default=["niah_single_1", "niah_single_2"])
    ap.add_argument("--ruler-len", type=int, default=4096, help="RULER max_seq_length (prompt ~3.9k tokens)")
    ap.add_argument("--ruler-samples", type=int, default=20)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--kv-memory-gib", type=int, default=8)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = ap.parse_args()
    prepare(args) if args.prepare else measure(args)


if __name__ == "__main__":
    main()
