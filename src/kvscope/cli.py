"""Command line: ``kvscope generate | models | strategies | study run | study report | advise | serve | bench serve``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from kvscope.cli_args import _add_engine_args, _finite, _llm, _positive_int, _rate, _size
from kvscope.cli_serving import _add_bench, _add_serve, _bench, _serve
from kvscope.constants import QUALITY_FLOOR
from kvscope.errors import KVScopeError

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about memory.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
]


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with one model and one KV strategy")
    p.add_argument("prompts", nargs="*", help="prompts (default: a few demo questions)")
    p.add_argument("--model", default="smollm2-135m")
    _add_engine_args(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=_finite, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=_finite, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, not as chat turns")
    p.add_argument("--json", action="store_true", help="print one JSON object per request, then stats")


def _generate(args: argparse.Namespace) -> int:

    llm = _llm(args)
    try:
        return _generate_with(llm, args)
    finally:
        llm.close()  # tensor-parallel workers


def _generate_with(llm: Any, args: argparse.Namespace) -> int:
    from kvscope import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    prompts = args.prompts or DEMO_PROMPTS
    t0 = time.perf_counter()
    if args.raw or not llm.tokenizer.has_chat_template:
        outs = llm.generate(prompts, params)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    elapsed = time.perf_counter() - t0
    stats = llm.engine.stats()
    n_out = sum(len(o.token_ids) for o in outs)
    summary = {"elapsed_s": elapsed, "output_tokens": n_out, "output_tokens_per_s": n_out / elapsed}
    if args.json:
        for prompt, o in zip(prompts, outs):
            print(json.dumps({"prompt": prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason, "ttft_s": o.metrics.ttft}))
        print(json.dumps({"stats": stats, **summary}))
        return 0
    for prompt, o in zip(prompts, outs):
        print(f"\n>>> {prompt}\n{o.text.strip()}  [{len(o.token_ids)} tokens, {o.finish_reason}]")
    print(
        f"\n{len(outs)} requests, {n_out} output tokens in {elapsed:.2f} s "
        f"({summary['output_tokens_per_s']:.1f} tok/s) | strategy={stats['strategy']} "
        f"preemptions={stats['num_preemptions']} peak KV used={stats.get('peak_kv_bytes_used', 0) / 2**20:.1f} MiB "
        f"of {stats['kv_bytes_reserved'] / 2**20:.1f} MiB reserved"
    )
    return 0


def _models(_: argparse.Namespace) -> int:
    from kvscope.models.loader import list_models

    rows = list_models()
    print(f"{'name':<24} {'kind':<9} {'arch':<6} {'params':>9}  available")
    for r in rows:
        params = f"{r['params'] / 1e9:.2f}B" if r.get("params") else "-"
        avail = "yes" if r.get("available") else f"no ({r.get('install', '')})"
        print(f"{r['name']:<24} {r['kind']:<9} {r.get('arch', '-'):<6} {params:>9}  {avail}")
    print("\nAlso: a path to an HF safetensors folder or to a .gguf file.")
    return 0


def _strategies(_: argparse.Namespace) -> int:
    from kvscope.kv import registry

    for name, cls in registry.available().items():
        caps = [c for c in ("lossless", "supports_prefix_caching", "supports_swap", "supports_fork")
                if getattr(cls, c)]
        args = ", ".join(f"{n}={p.default!r}" for n, p in registry.accepted_args(cls).items())
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<12} {doc}\n{'':<12} args: {args or '-'}\n{'':<12} {', '.join(caps)}")
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run a grid of configurations resumably, and report on it")
    study = p.add_subparsers(dest="study_command", required=True)
    run = study.add_parser("run", help="run every point of a study not yet in its results, then write its report")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("spec", nargs="?", help="YAML study spec")
    src.add_argument("--preset", help="a named study: quick (CPU, minutes), h200 (one H200, speed and memory, "
                                      "about 15 GPU minutes in chunks), h200-quality (its quality runs on real "
                                      "weights) or paper (GPU, the full grid)")
    run.add_argument("--results", default=None, help="results directory (default: results/<study name>)")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--no-retry-errors", action="store_true",
                     help="skip points whose last row is an error (by default a rerun runs them again)")
    run.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run the points on Ray workers, one point per worker slot, this process writing the "
                          "results: on a new local Ray instance, or on the cluster at ADDRESS ('auto', HOST:PORT, "
                          "ray://HOST:PORT); a point whose worker dies runs again up to twice. Put it after SPEC "
                          "(needs pip install 'kvscope[ray]')")
    run.add_argument("--time-limit", type=_finite, default=None, metavar="SECONDS",
                     help="start no point that would likely end more than SECONDS after the run began (estimated "
                          "from the finished points most like it); exit 0 naming the points left, which a rerun "
                          "of the same command runs. Not counted: start-up and the report written at the end")
    run.add_argument("--ray-cpus-per-point", type=float, default=None, metavar="N",
                     help="CPUs each point asks Ray for (default 1; a point on device cuda also asks for one GPU)")
    report = study.add_parser("report", help="write report.html and report.md from a results directory")
    report.add_argument("results_dir")


def _study(args: argparse.Namespace) -> int:
    """``study report``: 0. ``study run``: 0 when every point of the study is ``ok``, or, with
    ``--time-limit``, every point run so far (the rest are named and left to a rerun); 1 when any
    failed (the report lists them; a rerun retries them), 2 for a problem found before any point."""
    from pathlib import Path

    from kvscope.errors import ConfigError
    from kvscope.study import expand, load_spec, preset, run_study
    from kvscope.report import write_report
    from kvscope.study.results_io import (
        RESULTS_FILE,
        ResultsFolderError,
        check_results_target,
        read_results_file,
        results_lock,
    )

    if args.study_command == "report":
        html, md = write_report(args.results_dir)
        print(f"wrote {html} and {md}")
        return 0
    spec = preset(args.preset) if args.preset else load_spec(args.spec)
    results = Path(args.results or Path("results") / spec.name)
    if results.suffix == ".jsonl":  # run_study would take it for the results file, and the report has no folder
        raise ResultsFolderError(f"--results {results}: names a folder (it holds {RESULTS_FILE}, spec.json and the "
                                 f"report), not a .jsonl file; e.g. --results {results.with_suffix('')}")
    ray = None
    if args.ray is not None:
        from kvscope.study.ray_runner import RayOptions

        ray = RayOptions(args.ray, **({} if args.ray_cpus_per_point is None else
                                      {"cpus_per_point": args.ray_cpus_per_point}))
    elif args.ray_cpus_per_point is not None:
        raise ConfigError("--ray-cpus-per-point: applies to a run on Ray; add --ray [ADDRESS]")
    if args.time_limit is not None and (ray is not None or not args.time_limit > 0):
        raise ConfigError(f"--time-limit: must be seconds > 0, for a run without --ray; got {args.time_limit:g}"
                          + (" with --ray" if ray is not None else ""))
    target = check_results_target(results)  # before any point, as run_study checks again under the lock
    with results_lock(target):  # held across the run and the report
        new = run_study(spec, results, progress=not args.no_progress, retry_errors=not args.no_retry_errors,
                        ray=ray, time_limit=args.time_limit)
        read = read_results_file(target, warn=False)
        rows = read.rows
        failed = sum(r["status"] != "ok" for r in rows)
        print(f"{len(new)} points run ({sum(r['status'] != 'ok' for r in new)} failed); {len(rows)} points in "
              f"{target}, {failed} of them failed")
        left = len({p.id for p in expand(spec)} - read.done_ids(not args.no_retry_errors))
        if args.time_limit is not None and left:
            print(f"time limit of {args.time_limit:g} s reached: {left} points remain; rerun the same command to "
                  "run them")
        # The report covers every row, so a resumed run's report includes the earlier points too.
        html, md = write_report(results, warn=False)
    print(f"report: {html} (and {md.name} beside it)")
    return 1 if failed else 0


def _add_advise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("advise", help="recommend a KV strategy for a workload, model, hardware, SLOs and quality floor")
    p.add_argument("--model", default="smollm2-135m", help="preset (llama-3-8b, dummy:opt-6.7b, ...) or HF folder")
    p.add_argument("--hardware", default="this", help="h100 | h200 | cpu | this (detected)")
    p.add_argument("--gpu-memory", type=_size, default=None, help="override: device memory, e.g. 80GiB")
    p.add_argument("--hbm-gbps", type=_finite, default=None, help="override: device memory bandwidth, GB/s")
    p.add_argument("--pcie-gbps", type=_finite, default=None, help="override: host<->device bandwidth, GB/s")
    p.add_argument("--tflops", type=_finite, default=None, help="override: matmul rate, TFLOP/s")
    p.add_argument("--host-memory", type=_size, default=None, help="override: host memory for offloaded KV")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", default=None, help="JSONL trace (arrival_time, prompt, output_len[, prompt_len])")
    src.add_argument("--dataset", choices=["sharegpt"], default=None, help="a data set's mean lengths")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per request (no trace/dataset)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (no trace/dataset)")
    p.add_argument("--rate", type=_rate, default=None,
                   help="requests/s (inf = all at once; default inf, or the trace's)")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--kv-memory", type=_size, default=None,
                   help="device KV pool (default: 90%% of memory after weights)")
    p.add_argument("--ttft-ms", type=_finite, default=None, help="SLO on p90 time to first token")
    p.add_argument("--tpot-ms", type=_finite, default=None, help="SLO on p90 time per output token")
    p.add_argument("--quality-floor", type=_finite, default=QUALITY_FLOOR,
                   help=f"minimum full-cache perplexity / strategy perplexity (1 = lossless; 0 = no floor; "
                        f"default {QUALITY_FLOOR:g}, the study report's floor)")
    p.add_argument("--results", default=None,
                   help="a study's results.jsonl (or its folder): measured rows used where they cover the case")
    p.add_argument("--max-num-seqs", type=_positive_int, default=64)
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048)
    p.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1,
                   help="ranks (GPUs) the model is split over; memory figures are per rank")
    p.add_argument("--interconnect-gbps", type=_finite, default=None,
                   help="override: per-direction link rate between ranks, GB/s")
    p.add_argument("--json", action="store_true", help="print the advice as one JSON object")


def _advise(args: argparse.Namespace) -> int:
    import math

    from kvscope.advise import (
        SLOs,
        advise,
        fixed_workload,
        hardware_preset,
        resolve_model,
        sharegpt_workload,
        trace_workload,
    )
    from kvscope.advise.simulate import EngineLimits
    from kvscope.study.results_io import RESULTS_FILE, read_results

    hw = hardware_preset(args.hardware).with_overrides(
        memory_bytes=args.gpu_memory, hbm_bytes_per_s=args.hbm_gbps and args.hbm_gbps * 1e9,
        host_device_bytes_per_s=args.pcie_gbps and args.pcie_gbps * 1e9,
        matmul_flops_per_s=args.tflops and args.tflops * 1e12, host_memory_bytes=args.host_memory,
        interconnect_bytes_per_s=args.interconnect_gbps and args.interconnect_gbps * 1e9)
    if args.trace:
        workload = trace_workload(args.trace, args.rate)
    else:
        rate = math.inf if args.rate is None else args.rate
        workload = (sharegpt_workload(rate, args.num_requests) if args.dataset == "sharegpt"
                    else fixed_workload(args.prompt_len, args.output_len, rate, args.num_requests))
    rows = None
    if args.results:
        from pathlib import Path

        path = Path(args.results) / RESULTS_FILE if Path(args.results).is_dir() else Path(args.results)
        if not path.is_file():
            raise KVScopeError(f"--results: no such file: {path}")
        rows = read_results(path)
    advice = advise(workload, resolve_model(args.model), hw, SLOs(args.ttft_ms, args.tpot_ms), args.quality_floor,
                    results=rows, kv_memory=args.kv_memory,
                    limits=EngineLimits(args.max_num_seqs, args.max_num_batched_tokens, args.tensor_parallel_size))
    if args.json:
        print(json.dumps(advice.to_dict(), default=str))
        return 0 if advice.feasible else 1
    print(f"model {args.model} | hardware {hw.name} | workload {workload.name} | source {advice.source}")
    if not advice.feasible:
        print(f"no recommendation: {advice.message}")
        return 1

    def line(label: str, spec: str | None, m: dict[str, Any]) -> str:
        if not spec:
            return f"{label:<12} -"
        q = m.get("quality_score")
        return (f"{label:<12} {spec:<46} {m['output_throughput']:>9.1f} {m['p90_ttft_ms']:>10.1f} "
                f"{m['p90_tpot_ms']:>9.2f} {'-' if q is None else f'{q:.2f}':>7}")

    print(f"{'':<12} {'strategy':<46} {'tok/s':>9} {'p90 TTFT':>10} {'p90 TPOT':>9} {'quality':>7}")
    print(line("recommended", advice.recommended, advice.expected))
    print(line("runner-up", advice.runner_up, advice.runner_up_expected))
    print(f"engine: {', '.join(f'{k}={v}' for k, v in advice.engine_args.items())}")
    print("why:")
    for r in advice.reasons:
        print(f"  - {r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    sub.add_parser("models", help="list the models kvscope can load")
    sub.add_parser("strategies", help="list the KV-cache strategies and their arguments")
    _add_study(sub)
    _add_advise(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


COMMANDS: dict[str, Any] = {"generate": _generate, "models": _models, "strategies": _strategies, "study": _study,
                             "advise": _advise, "bench": _bench, "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KVScopeError as e:
        print(f"kvscope: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
