"""InfiniGen on real weights (SmolLM2-135M-Instruct): how well speculation finds the tokens the next
layer attends to, and quality next to H2O at equal budgets.

1. **Speculation recall.** Dense forward over 1024 tokens of prose; for the last 64 positions and
   every layer ``l >= 2``, the tokens InfiniGen selects for layer ``l`` from layer ``l - 1``'s input
   (threshold ``max - alpha``, k = mean count over heads, no cap) are compared with layer ``l``'s
   true attention: *top-k recall* (share of the true top-k tokens, same k, that were selected) and
   *mass recall* (share of the true attention probability that falls on selected tokens), at
   alpha 1, 2, 4, 8. The newest token is always attended and excluded from both.
2. **Quality** with ``quality_eviction.py``'s inputs and protocol: perplexity under the strategy
   (teacher-forced decoding) and RULER needle accuracy at about 4k tokens, for ``paged``,
   ``infinigen`` (alpha 4; per-head selection as InfiniGen, and whole-token selection) and ``h2o``
   at budgets 10%, 20%, 50%. InfiniGen's budget caps the tokens
   fetched per step for layers >= 2 (layers 0-1 and the prompt are dense, as in InfiniGen); the
   measured fetched fraction averaged over all layers is reported beside it.

Writes docs/results/infinigen_quality.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from envinfo import environment  # noqa: E402
from quality_eviction import spec_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALPHAS = [1.0, 2.0, 4.0, 8.0]
RATIOS = [0.1, 0.2, 0.5]


class _Capture:
    """Dense causal attention that keeps each layer's input, queries and keys (post-RoPE)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.x: dict[int, torch.Tensor] = {}
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}

    def layer_input(self, layer: int, x: torch.Tensor) -> None:
        self.x[layer] = x

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from kvscope.attention.torch_ref import attend_causal

        self.q[layer], self.k[layer] = q, k
        return attend_causal(q, k, v, self.scale)


@torch.inference_mode()
def recall(model, skew, ids: list[int], device: str, last: int = 64, ratio: float = 0.2) -> list[dict]:
    cfg = model.config
    hkv, g, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    scale = d**-0.5
    cap = _Capture(scale)
    t = len(ids)
    pos = torch.arange(t, device=device)
    model(torch.tensor(ids, device=device), pos, cap)
    _, sub = skew.partial(ratio)
    sub = sub.to(device)
    rows = []
    for alpha in ALPHAS:
        topk_hits = mass = n = ks = 0.0
        for layer in range(2, cfg.num_layers):
            qpos = pos[t - last :]
            q_spec = model.attention_query(layer, cap.x[layer - 1][t - last :], qpos).float()  # [P, Hq, D]
            qp = torch.einsum("phgd,hdc->phgc", q_spec.view(last, hkv, g, d), sub[layer])
            kp = torch.einsum("thd,hdc->thc", cap.k[layer].float(), sub[layer])  # [T, Hkv, d']
            approx = torch.einsum("phgc,thc->phgt", qp, kp) * scale
            true = torch.einsum("phgd,thd->phgt", cap.q[layer][t - last :].float().view(last, hkv, g, d),
                                cap.k[layer].float()) * scale
            # Candidates: earlier tokens only (the newest is always attended).
            visible = torch.arange(t, device=device)[None, :] < qpos[:, None]
            approx = approx.masked_fill(~visible[:, None, None, :], float("-inf"))
            probs = true.masked_fill(~(torch.arange(t, device=device)[None, :] <= qpos[:, None])[:, None, None, :],
                                     float("-inf")).softmax(-1)
            probs = probs.masked_fill(~visible[:, None, None, :], 0.0)
            rel = (approx - approx.amax(-1, keepdim=True)).amax(2)  # [P, Hkv, T]
            counts = (rel > -alpha).sum(-1)  # [P, Hkv]
            for p in range(last):
                k = max(1, int(counts[p].float().mean()))
                ks += k
                sel = rel[p].topk(k, dim=-1).indices  # [Hkv, k]
                head_probs = probs[p].sum(1)  # [Hkv, T]: the group's attention per KV head
                true_top = head_probs.topk(k, dim=-1).indices
                hit = torch.zeros(hkv, t, dtype=torch.bool, device=device)
                hit.scatter_(1, sel, True)
                topk_hits += float(hit.gather(1, true_top).float().mean())
                mass += float((head_probs * hit).sum() / head_probs.sum())
                n += 1
        rows.append({"alpha": alpha, "topk_recall": topk_hits / n, "mass_recall": mass / n, "mean_k": ks / n,
                     "positions": last, "layers": cfg.num_layers - 2, "context": t})
        print(f"alpha {alpha}: top-k recall {topk_hits / n:.3f}, attention-mass recall {mass / n:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--inputs", default="benchmarks/inputs/quality")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--prefix", type=int, default=128)
    ap.add_argument("--answer-tokens", type=int, default=32)
    args = ap.parse_args()

    from kvscope import LLM
    from kvscope.bench.quality import perplexity, ruler_accuracy
    from kvscope.kv.skew import calibration_tokens, load_or_compute_skew
    from kvscope.models.loader import load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    seqs = json.loads((Path(args.inputs) / "prose_ids.json").read_text())
    samples = [json.loads(line) for line in (Path(args.inputs) / "ruler.jsonl").read_text().splitlines()]
    loaded = load_model(args.model, device=args.device, dtype=dtype)
    skew, _ = load_or_compute_skew(loaded.model, calibration_tokens(loaded.tokenizer, loaded.config.vocab_size,
                                                                    "britannica"), torch.device(args.device))
    # 1024 consecutive tokens: the prose windows are consecutive cuts of one text.
    recall_rows = recall(loaded.model, skew, [i for s in seqs[:4] for i in s], args.device)

    common = dict(device=args.device, dtype=args.dtype, kv_memory_bytes=8 << 30, max_model_len=8192,
                  max_num_batched_tokens=8192)
    seq_len = len(seqs[0])
    configs = [("paged", None)] + [(s, r) for r in RATIOS for s in ("infinigen", "infinigen-token", "h2o")]
    rows = []
    env = environment()
    out = Path(args.out)
    for name, ratio in configs:
        t0 = time.perf_counter()
        if name.startswith("infinigen"):
            select = "token" if name.endswith("token") else "head"
            ppl_spec = ruler_spec = f"infinigen:budget_ratio={ratio},select={select}"
        elif name == "paged":
            ppl_spec = ruler_spec = "paged"
        else:
            ppl_spec, ruler_spec = spec_for(name, ratio, absolute=int(ratio * seq_len)), spec_for(name, ratio)
        llm = LLM(args.model, strategy=ppl_spec, **common)
        ppl = perplexity(llm, seqs, prefix=args.prefix)
        fetched = llm.engine.stats().get("selected_fraction_per_layer")
        llm = LLM(args.model, strategy=ruler_spec, **common)
        acc = ruler_accuracy(llm, samples, max_tokens=args.answer_tokens)
        ruler_fetched = llm.engine.stats().get("selected_fraction_per_layer")
        row = {"strategy": name, "budget_ratio": ratio, "perplexity_spec": ppl_spec, "ruler_spec": ruler_spec,
               "perplexity": ppl["perplexity"], "ruler_accuracy": acc["accuracy"], "ruler_samples": acc["num_samples"],
               "seconds": time.perf_counter() - t0}
        if fetched is not None:
            row["perplexity_mean_fetched_fraction"] = _mean_fraction(fetched)
            row["ruler_mean_fetched_fraction"] = _mean_fraction(ruler_fetched)
        rows.append(row)
        print(json.dumps(row), flush=True)
        result = {"benchmark": "infinigen_quality", "config": {k: v for k, v in vars(args).items() if k != "out"}, "environment": env,
                  "recall": recall_rows, "results": rows}
        out.mkdir(parents=True, exist_ok=True)
        (out / "infinigen_quality.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "infinigen_quality.md").write_text(markdown(result))


def _mean_fraction(per_layer: list[float]) -> float:
    """Fetched share of the context averaged over all layers."""
    return sum(per_layer) / len(per_layer)


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = ["# InfiniGen on SmolLM2-135M-Instruct (real weights)", "",
             f"Measured {env['date']} on {env['gpu'] or env['cpu']}, commit {env['commit']}, "
             f"torch {env['versions']['torch']}, dtype {r['config']['dtype']}.", "",
             "## Speculation recall (layer l's selection from layer l-1's input vs layer l's true attention)", "",
             "1024-token prose context, last 64 positions, layers 2-29, partial ratio 0.2, skew from 2048 "
             "calibration tokens; k = mean count over KV heads of tokens within alpha of the head's max.", "",
             "| alpha | mean k | top-k recall | attention-mass recall |", "|---:|---:|---:|---:|"]
    for x in r["recall"]:
        lines.append(f"| {x['alpha']:g} | {x['mean_k']:.0f} | {x['topk_recall']:.3f} | {x['mass_recall']:.3f} |")
    lines += ["", "## Quality at equal budgets", "",
              "Budget = tokens kept (H2O) or fetched per step for layers >= 2 (InfiniGen) as a share of the "
              "context. InfiniGen's layers 0-1 and its prefill are dense; 'mean fetched' is its measured "
              "fetched share averaged over all layers.", "",
              "| strategy | budget | perplexity | RULER accuracy | mean fetched (ppl / RULER) |",
              "|---|---:|---:|---:|---:|"]
    for x in r["results"]:
        b = "full" if x["budget_ratio"] is None else f"{int(x['budget_ratio'] * 100)}%"
        f = (f"{x['perplexity_mean_fetched_fraction']:.0%} / {x['ruler_mean_fetched_fraction']:.0%}"
             if "perplexity_mean_fetched_fraction" in x else "-")
        lines.append(f"| `{x['strategy']}` | {b} | {x['perplexity']:.2f} | {x['ruler_accuracy']:.2f} | {f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
