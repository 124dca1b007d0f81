"""Quality of the strategy families added after the seed study, on real weights, against ``paged``:
KV quantization (``quant`` at four widths), query-aware page selection (``quest`` at four budgets)
and per-layer budgets (``pyramidkv`` beside ``snapkv``, its flat-budget twin, at four budgets).

Two measures per configuration, as ``quality_eviction.py`` takes them (and on its prepared inputs):
perplexity of real prose by teacher-forced decoding, the cache quantizing, selecting or compressing
as it goes; and RULER needle-in-a-haystack accuracy (greedy, string match). A budget is a share of
each prompt; for perplexity the compressing policies get it in tokens of the whole sequence, as in
``quality_eviction.py``, and ``quest`` reads its share of the context at every step.

Writes ``docs/results/families_quality_<model>.json`` and ``.md`` after every configuration, so an
interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from envinfo import environment  # noqa: E402
from quality_eviction import prepare, spec_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RATIOS = [0.1, 0.2, 0.3, 0.5]
QUANT = ["quant:dtype=fp8", "quant:dtype=int8", "quant:dtype=int4,group_size=32", "quant:dtype=int4,group_size=64"]


def configs(seq_len: int) -> list[dict]:
    """Every configuration: family, setting, and the perplexity and RULER specs."""
    out = [{"family": "paged", "setting": "full", "ppl": "paged", "ruler": "paged"}]
    out += [{"family": "quant", "setting": s.split(":", 1)[1], "ppl": s, "ruler": s} for s in QUANT]
    for r in RATIOS:
        q = f"quest:budget_ratio={r}"
        out.append({"family": "quest", "setting": f"{r:.0%}", "ppl": q, "ruler": q})
    for name in ("pyramidkv", "snapkv"):
        out += [{"family": name, "setting": f"{r:.0%}", "ppl": spec_for(name, r, absolute=int(r * seq_len)),
                 "ruler": spec_for(name, r)} for r in RATIOS]
    return out


def measure(args) -> None:
    import torch

    from kvscope import LLM
    from kvscope.bench.quality import perplexity, ruler_accuracy

    inputs = Path(args.inputs)
    seqs = json.loads((inputs / "prose_ids.json").read_text())
    samples = [json.loads(line) for line in (inputs / "ruler.jsonl").read_text().splitlines()]
    common = dict(device=args.device, dtype=args.dtype, kv_memory_bytes=args.kv_memory_mib << 20,
                  max_model_len=args.max_model_len)
    env = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"families_quality_{args.model.replace('/', '_')}"
    rows = []
    for cfg in configs(args.seq_len):
        t0 = time.perf_counter()
        ppl = perplexity(LLM(args.model, strategy=cfg["ppl"], **common), seqs, prefix=args.prefix)
        acc = ruler_accuracy(LLM(args.model, strategy=cfg["ruler"], **common), samples, max_tokens=args.answer_tokens)
        rows.append({**cfg, "perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens_scored"],
                     "ruler_accuracy": acc["accuracy"], "ruler_samples": acc["num_samples"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{cfg['family']:<10} {cfg['setting']:>18}  ppl {ppl['perplexity']:8.3f}  ruler {acc['accuracy']:.3f}"
              f"  ({rows[-1]['seconds']} s)", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result = {"benchmark": "families_quality", "config": {k: v for k, v in vars(args).items() if k != "out"}, "environment": env, "results": rows}
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(result, out / f"{stem}.md")


def _headline(rows: list[dict]) -> list[str]:
    """One sentence per family: its perplexity change and RULER accuracy at each setting."""
    base = next(r for r in rows if r["family"] == "paged")
    lines = []
    for family in ("quant", "quest", "pyramidkv", "snapkv"):
        mine = [r for r in rows if r["family"] == family]
        if mine:
            parts = [f"{r['setting']} {100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}% / "
                     f"{r['ruler_accuracy']:.2f}" for r in mine]
            lines.append(f"- `{family}` (perplexity change / RULER accuracy): " + ", ".join(parts) + ".")
    return lines


def write_markdown(result: dict, path: Path) -> None:
    cfg, env, rows = result["config"], result["environment"], result["results"]
    base = next(r for r in rows if r["family"] == "paged")
    where = env["gpu"] or f"CPU ({env['cpu']}; other jobs running on the machine)"
    scored = rows[0]["tokens_scored"]
    lines = [
        f"# Quality of the newer families on {cfg['model']} (real weights)",
        "",
        f"**Against full KV (`paged`: perplexity {base['perplexity']:.2f}, RULER {base['ruler_accuracy']:.2f}):**",
        "",
        *_headline(rows),
        "",
        f"Measured {env['date']} on {where}, commit {env['commit']}, torch {env['versions']['torch']}, "
        f"dtype {cfg['dtype']}. Quality only: nothing here is timed.",
        "",
        f"- Perplexity: {cfg['num_seqs']} sequences of "
        f"{cfg['seq_len']} prose tokens, the first {cfg['prefix']} the prompt, {scored} tokens scored by "
        "teacher-forced decoding. `pyramidkv`/`snapkv` budgets are the share times the sequence length, in "
        "tokens (they compress the prompt once); `quest` reads its share of the context per step.",
        f"- RULER: {rows[0]['ruler_samples']} samples of {', '.join(cfg['ruler_tasks'])} at max_seq_length "
        f"{cfg['ruler_len']}, {cfg['answer_tokens']} answer tokens, greedy, string match; the budget is a share "
        "of each prompt.",
        f"- Uncertainty: with {rows[0]['ruler_samples']} RULER samples one sample is "
        f"{1 / max(1, rows[0]['ruler_samples']):.2f} of accuracy; perplexity differences under about 1% are "
        "within what another choice of text would move.",
        "",
        "| family | setting | perplexity | vs paged | RULER accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        change = 100 * (r["perplexity"] / base["perplexity"] - 1)
        lines.append(f"| `{r['family']}` | {r['setting']} | {r['perplexity']:.2f} | {change:+.1f}% | "
                     f"{r['ruler_accuracy']:.2f} |")
    lines += ["", "Produced by (the inputs are prepared on the first run):", "", "```bash",
              f"python benchmarks/quality_families.py --model {cfg['model']} --device {cfg['device']} "
              f"--dtype {cfg['dtype']} --num-seqs {cfg['num_seqs']} --seq-len {cfg['seq_len']} --prefix {cfg['prefix']} "
              f"--ruler-len {cfg['ruler_len']} --ruler-samples {cfg['ruler_samples']}",
              "```"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--inputs", help="prepared inputs (default benchmarks/inputs/families_<model>, written if missing)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--num-seqs", type=int, default=4, help="prose sequences (when preparing inputs)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prefix", type=int, default=128, help="prompt tokens of each sequence; the rest is scored")
    ap.add_argument("--ruler-tasks", nargs="+", default=["niah_single_1", "niah_single_2"])
    ap.add_argument("--ruler-len", type=int, default=1024, help="RULER max_seq_length (when preparing inputs)")
    ap.add_argument("--ruler-samples", type=int, default=8, help="RULER samples (when preparing inputs)")
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--kv-memory-mib", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=8192)
    args = ap.parse_args()
    args.inputs = args.inputs or f"benchmarks/inputs/families_{args.model.replace('/', '_')}"
    if not (Path(args.inputs) / "prose_ids.json").exists():
        prepare(args)
    measure(args)


if __name__ == "__main__":
    main()
