"""Sampled decoding: the engine's batched sampler against the row-at-a-time one it replaced.

Until commit 6b00f90 ``sample_on_device`` scaled, filtered, normalised and drew each sampled row on
its own (about ten small ops per row, launched from Python); now the sampled rows of a step go
through one batched filter and softmax, with one noise draw per row from the request's own
generator. Both draw what ``torch.multinomial`` draws with that generator, so with seeded requests
they must return the same tokens: that is checked first, on 16 requests. Then the throughput of
``LLM.generate`` on W1 of ``end_to_end.py`` (256 requests, prompts lognormal median 100 tokens,
128 output tokens each, EOS ignored) under each sampler, for greedy requests (the reference: no
sampler runs) and two sampling settings, A and B alternating, median of ``--repeats`` after a
warm-up. ``dummy:llama-3.1-8b`` (random weights), bf16, ``paged``, max_num_seqs 256, CUDA graphs.
``--tiny``: a 2-layer model on the CPU (smoke test). Writes ``sampler_ab.json`` and ``.md``.
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
from ceilings import RESULTS, env_line  # noqa: E402
from decode_step import bench_environment  # noqa: E402
from end_to_end import lognormal_lengths, prompts  # noqa: E402

import kvscope.engine.inflight as inflight  # noqa: E402
from kvscope.engine.sampler import sample_on_device  # noqa: E402
from kvscope.llm import LLM  # noqa: E402
from kvscope.request import Request  # noqa: E402
from kvscope.sampling_params import SamplingParams  # noqa: E402

SETTINGS = {"greedy": {"temperature": 0.0}, "temperature 1": {"temperature": 1.0},
            "temperature 0.8, top-p 0.95, top-k 50": {"temperature": 0.8, "top_p": 0.95, "top_k": 50}}


def _filter_row(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The replaced sampler's filter of one row ``[V]`` (top-k by torch.topk, top-p by a sort)."""
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, probs.cumsum(-1) - probs >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def per_row_sampler(logits: torch.Tensor, requests: list[Request]
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, Exception]]:
    """The replaced sampler: the same contract as ``sample_on_device``, one row at a time."""
    tokens = logits.argmax(dim=-1)
    valid = None
    for i, req in enumerate(requests):
        if req.params.greedy:
            continue
        if valid is None:
            valid = torch.ones(len(requests), dtype=torch.bool, device=logits.device)
        p = req.params
        probs = _filter_row(logits[i] / p.temperature, p.top_k, p.top_p).softmax(-1)
        q = torch.empty_like(probs).exponential_(1, generator=req.generator)
        tokens[i : i + 1] = (probs / q).argmax(-1, keepdim=True)
        valid[i] = (probs.max() < float("inf")) & (probs.min() >= 0)
    return tokens, valid, {}


SAMPLERS = {"per-row": per_row_sampler, "batched": sample_on_device}


def use(sampler: str) -> None:
    inflight.sample_on_device = SAMPLERS[sampler]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="2-layer dummy model on the CPU (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    model = "dummy:tiny-llama" if args.tiny else "dummy:llama-3.1-8b"
    n, out_len = (16, 16) if args.tiny else (256, 128)
    lengths = [(p, out_len) for p in lognormal_lengths(n, 20 if args.tiny else 100, 0.6, 4, 100 if args.tiny else 1024, 0)]
    env = bench_environment(torch.device(device))
    print(env_line(env), flush=True)
    llm = LLM(model, "paged", device=device, dtype="float32" if args.tiny else "bfloat16", max_num_seqs=min(n, 256),
              max_num_batched_tokens=512 if args.tiny else 8192, max_model_len=256 if args.tiny else 1280,
              **({"kv_memory_bytes": 64 << 20} if args.tiny else {"kv_memory_fraction": 0.8}))
    vocab = llm.engine.model_config.vocab_size

    def generate(seed: int, setting: dict, seeded: bool = False, count: int | None = None) -> tuple[float, list]:
        lens = lengths[:count] if count else lengths
        params = [SamplingParams(max_tokens=o, ignore_eos=True, seed=seed * 1000 + i if seeded else None, **setting)
                  for i, (_, o) in enumerate(lens)]
        t0 = time.perf_counter()
        outs = llm.generate(prompts(lens, vocab, seed), params, use_tqdm=False)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0), [o.token_ids for o in outs]

    checks = {}
    for name, setting in SETTINGS.items():
        got = {}
        for sampler in SAMPLERS:
            use(sampler)
            got[sampler] = generate(99, setting, seeded=True, count=16)[1]
        checks[name] = got["per-row"] == got["batched"]
        print(f"{name}: seeded tokens equal between samplers: {checks[name]}", flush=True)
    if not all(checks.values()):
        raise SystemExit("the batched sampler draws other tokens than the per-row one")

    rows = []
    for name, setting in SETTINGS.items():
        runs: dict[str, list[float]] = {s: [] for s in SAMPLERS}
        # Prompts of their own for every run (warm-up included): the prefix cache keeps finished
        # requests' blocks, and a run on prompts served before would skip most of its prefill.
        for k, sampler in enumerate(SAMPLERS):  # warm-up of each path at full size
            use(sampler)
            generate(1000 + k, setting)
        for rep in range(args.repeats):
            for k, sampler in enumerate(SAMPLERS):
                use(sampler)
                runs[sampler].append(generate(1 + 2 * rep + k, setting)[0])
        row = {"setting": name, **{f"{s}_tok_s": statistics.median(v) for s, v in runs.items()},
               **{f"{s}_runs": v for s, v in runs.items()}}
        row["speedup"] = row["batched_tok_s"] / row["per-row_tok_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    use("batched")
    result = {"benchmark": "sampler_ab", "environment": env, "model": model, "requests": n,
              "prompt_tokens": sum(p for p, _ in lengths), "output_tokens": n * out_len, "repeats": args.repeats,
              "correctness": checks, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampler_ab.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "sampler_ab.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    greedy = next(x for x in r["results"] if x["setting"] == "greedy")["batched_tok_s"]
    lines = ["# Sampled decoding: batched sampler against the per-row one", "", env_line(r["environment"]), "",
             f"{r['model']}, `paged`, bf16, CUDA graphs; `LLM.generate` on {r['requests']} requests "
             f"({r['prompt_tokens']} prompt tokens, {r['output_tokens']} output tokens, EOS ignored); median of "
             f"{r['repeats']} runs after a warm-up, samplers alternating. Correctness first: seeded requests get "
             f"the same tokens from both samplers ({', '.join(f'{k}: {v}' for k, v in r['correctness'].items())}).", "",
             "| sampling | per-row tok/s | batched tok/s | batched / per-row | batched / greedy |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {x['setting']} | {x['per-row_tok_s']:.0f} | {x['batched_tok_s']:.0f} | {x['speedup']:.2f}x | "
              f"{x['batched_tok_s'] / greedy:.2f} |" for x in r["results"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
