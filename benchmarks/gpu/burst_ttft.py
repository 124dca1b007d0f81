"""Time to first token of a burst, with the previous step read back before or after the next launch.

With async scheduling a step's tokens are read back after the next step is launched. When the
device has already finished the step (a host-bound step), the engine now reads it back first
(``InFlight.done``), so its tokens go out a launch earlier. This benchmark measures what that
changes: the same burst, served with the early read-back and with it disabled (``done`` forced to
False, the engine before the change), one after the other on fresh engines over one loaded model.

Workload: 100 ShareGPT length pairs (``sharegpt_lengths.json``, prompt <= 1,024 and output <= 256
tokens), random token ids, every request at once (``run_workload`` offline mode), EOS ignored,
greedy. Model ``dummy:llama-3.1-8b`` (random weights), bf16, a 2 GiB KV pool, max_num_seqs 256,
max_num_batched_tokens 8192: the ``h200`` study's capacity point. Strategies ``paged`` and
``h2o`` at 20%. Correctness first: both orders give the same greedy tokens on 8 short requests.
Each (strategy, order) runs ``--repeats`` times after a warm-up; medians reported. ``--tiny``: the
2-layer dummy model on the CPU (a smoke test: no CUDA event, so both orders read back late).
Writes ``burst_ttft.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ceilings import RESULTS, env_line  # noqa: E402
from decode_step import bench_environment  # noqa: E402
from end_to_end import prompts  # noqa: E402

from kvscope.bench.metrics import serving_metrics  # noqa: E402
from kvscope.bench.serve import run_workload  # noqa: E402
from kvscope.engine.inflight import InFlight  # noqa: E402
from kvscope.engine.sampling_params import SamplingParams  # noqa: E402
from kvscope.llm import LLM  # noqa: E402
from kvscope.models.loader import load_model  # noqa: E402
from kvscope.workload.requests import WorkloadRequest  # noqa: E402

STRATEGIES = ("paged", "h2o:heavy_ratio=0.1,recent_ratio=0.1")
METRICS = ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "output_throughput")


def workload(lengths: list[tuple[int, int]], vocab: int, seed: int) -> list[WorkloadRequest]:
    return [WorkloadRequest(prompt=p, output_len=o, arrival_time=0.0)
            for p, (_, o) in zip(prompts(lengths, vocab, seed), lengths)]


def serve(llm: LLM, lengths: list[tuple[int, int]], vocab: int, seed: int) -> dict:
    run = run_workload(llm, workload(lengths, vocab, seed), mode="offline")
    m = serving_metrics(run.records, percentiles=(50, 90, 99))
    return {k: m[k] for k in METRICS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="2-layer dummy model on the CPU (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    model = "dummy:tiny-llama" if args.tiny else "dummy:llama-3.1-8b"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    pairs = json.loads((Path(__file__).parent / "sharegpt_lengths.json").read_text())
    lengths = [(min(int(p), 1024), min(int(o), 256)) for p, o in pairs][:16 if args.tiny else 100]
    if args.tiny:
        lengths = [(min(p, 120), min(o, 16)) for p, o in lengths]
    engine = {"max_num_seqs": 256, "max_num_batched_tokens": 512 if args.tiny else 8192,
              "max_model_len": 256 if args.tiny else 1280, "kv_memory_bytes": (8 if args.tiny else 2048) << 20}
    env = bench_environment(torch.device(device))
    loaded = load_model(model, device=device, dtype=dtype)
    vocab = loaded.config.vocab_size
    real_done = InFlight.done

    def llm_for(spec: str, early: bool) -> LLM:
        InFlight.done = real_done if early else (lambda self: False)
        return LLM(model, strategy=spec, loaded_model=loaded, device=device, dtype=dtype, **engine)

    check = [[(7 * i + j) % vocab for j in range(24)] for i in range(8)]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    results: dict[str, dict] = {}
    for spec in STRATEGIES:
        texts = {}
        for early in (True, False):
            llm = llm_for(spec, early)
            texts[early] = [o.outputs[0].token_ids for o in llm.generate(check, greedy, use_tqdm=False)]
            serve(llm, lengths, vocab, seed=0)  # warm-up at full size, other prompts
            runs = [serve(llm, lengths, vocab, seed=1 + r) for r in range(args.repeats)]
            results[f"{spec} {'early' if early else 'late'}"] = {
                "runs": runs, **{k: statistics.median(r[k] for r in runs) for k in METRICS}}
            print(spec, "early" if early else "late", {k: round(results[f'{spec} {"early" if early else "late"}'][k], 1)
                                                       for k in METRICS}, flush=True)
            del llm
        if texts[True] != texts[False]:
            raise SystemExit(f"{spec}: greedy tokens differ between the two read-back orders")
    InFlight.done = real_done
    result = {"benchmark": "burst_ttft", "environment": env, "model": model, "engine": engine,
              "requests": len(lengths), "prompt_tokens": sum(p for p, _ in lengths),
              "output_tokens": sum(o for _, o in lengths), "repeats": args.repeats, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "burst_ttft.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "burst_ttft.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = ["# Burst TTFT: the previous step read back before or after the next launch", "",
             env_line(r["environment"]), "",
             f"{r['model']}, engine {r['engine']}; {r['requests']} requests at once ({r['prompt_tokens']} prompt, "
             f"{r['output_tokens']} output tokens, greedy, EOS ignored); median of {r['repeats']} runs after a warm-up.",
             "", "| strategy | read-back | median TTFT ms | p90 TTFT ms | p99 TTFT ms | median TPOT ms | output tok/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key, x in r["results"].items():
        spec, order = key.rsplit(" ", 1)
        lines.append(f"| `{spec}` | {order} | {x['median_ttft_ms']:.0f} | {x['p90_ttft_ms']:.0f} | "
                     f"{x['p99_ttft_ms']:.0f} | {x['median_tpot_ms']:.1f} | {x['output_throughput']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
