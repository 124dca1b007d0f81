"""Quality of the ``quant`` KV cache at each bit width on real weights, against ``paged``:
perplexity (teacher-forced decoding of real prose, every token read back from the quantized cache;
the per-token log-probabilities of the forced tokens, as :func:`kvscope.bench.quality.perplexity`
scores them), top-1 agreement with paged's next-token choice on the same text (same run), and
free-running greedy agreement (:func:`kvscope.bench.quality.agreement`).

Writes docs/results/quant_quality.json and .md. CPU-sized by default (a few minutes).
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
SPECS = ["paged", "quant:dtype=fp8", "quant:dtype=fp8,scale=head", "quant:dtype=int8",
         "quant:dtype=int4,group_size=32", "quant:dtype=int4,group_size=64"]


def measure(args) -> None:
    from kvscope import LLM, SamplingParams
    import math

    from kvscope.bench.quality import agreement
    from kvscope.kv import registry
    from kvscope.workload.text import token_sequences

    common = dict(device=args.device, dtype=args.dtype, kv_memory_bytes=args.kv_memory_mib << 20)
    rows, ref_top1, ref_greedy = [], None, None
    for spec in SPECS:
        t0 = time.perf_counter()
        llm = LLM(args.model, strategy=spec, **common)
        seqs = token_sequences(llm.tokenizer, args.num_seqs, args.seq_len)
        forced = [SamplingParams(max_tokens=args.seq_len - args.prefix, temperature=0.0, ignore_eos=True,
                                 logprobs=True, return_logits=True, forced_token_ids=s[args.prefix:]) for s in seqs]
        outs = llm.generate([s[: args.prefix] for s in seqs], forced, use_tqdm=False)
        nll = [-lp for o in outs for lp in o.outputs[0].logprobs]
        assert len(nll) == len(seqs) * (args.seq_len - args.prefix)  # nothing cut short
        top1 = [[int(row.argmax()) for row in o.outputs[0].logits] for o in outs]
        greedy = llm.generate([s[: args.prefix] for s in seqs],
                              SamplingParams(max_tokens=args.greedy_tokens, temperature=0.0, ignore_eos=True),
                              use_tqdm=False)
        if ref_top1 is None:
            ref_top1, ref_greedy = top1, greedy
        pairs = [(a, b) for r, x in zip(ref_top1, top1) for a, b in zip(r, x)]
        agree = agreement(ref_greedy, greedy)
        stats = llm.engine.stats()
        row = {
            "strategy": spec, "kv_bits": registry.facts(spec).kv_bits or 32.0,
            "tokens_capacity": stats.get("tokens_capacity", stats["num_blocks"] * stats["block_size"]),
            "perplexity": math.exp(sum(nll) / len(nll)), "tokens_scored": len(nll),
            "top1_agreement": sum(a == b for a, b in pairs) / len(pairs), "top1_positions": len(pairs),
            "greedy_match_fraction": agree["match_fraction"], "greedy_exact": agree["exact_match"],
            "greedy_first_divergence": [p["first_divergence"] for p in agree["per_request"]],
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(f"{spec:<34} ppl {row['perplexity']:7.3f}  top1 {row['top1_agreement']:.3f}  greedy "
              f"{row['greedy_match_fraction']:.3f}  ({row['seconds']:.0f} s)", flush=True)
        result = {"benchmark": "quant_quality", "config": {k: v for k, v in vars(args).items() if k != "out"}, "environment": environment(), "results": rows}
        out = Path(args.out)
        (out / "quant_quality.json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(result, out / "quant_quality.md")


def write_markdown(result: dict, path: Path) -> None:
    """The table of ``result``, led by its setting; the conclusions are written above it by hand."""
    cfg, env, rows = result["config"], result["environment"], result["results"]
    scored = cfg["num_seqs"] * (cfg["seq_len"] - cfg["prefix"])
    lines = [
        f"Measured {env['date']} on {env['gpu'] or env['cpu']} (CPU, other jobs running on the machine), "
        f"commit {env['commit']}, torch {env['versions']['torch']}, model {cfg['model']}, dtype {cfg['dtype']}.",
        "",
        f"- Perplexity: {cfg['num_seqs']} windows of {cfg['seq_len']} tokens of public-domain prose; the first "
        f"{cfg['prefix']} are the prompt, the other {scored} are scored by teacher-forced decoding, every token "
        "read back from the strategy's cache.",
        "- Top-1 agreement: on the same forced text, the share of positions whose most likely next token is "
        "paged's.",
        f"- Greedy: free-running greedy continuation of each prompt, {cfg['greedy_tokens']} tokens, matched "
        "position by position with paged's (first divergences listed).",
        "",
        "| strategy | bits/element | token capacity | perplexity | top-1 agreement | greedy match | first divergences |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['strategy']}` | {r['kv_bits']:g} | {r['tokens_capacity']} | {r['perplexity']:.3f} | "
                     f"{r['top1_agreement']:.3f} | {r['greedy_match_fraction']:.3f} | "
                     f"{r['greedy_first_divergence']} |")
    lines += ["", "Produced by `python benchmarks/quality_quant.py` (defaults)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--num-seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--prefix", type=int, default=64, help="prompt tokens of each sequence; the rest is scored")
    ap.add_argument("--greedy-tokens", type=int, default=16)
    ap.add_argument("--kv-memory-mib", type=int, default=256)
    measure(ap.parse_args())


if __name__ == "__main__":
    main()
