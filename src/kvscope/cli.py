"""Command line: ``kvscope generate | models | strategies | study run | study report | advise``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from kvscope.errors import KVScopeError

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about memory.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
]


def _size(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"1000000"`` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB, 1000000)") from None


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with one model and one KV strategy")
    p.add_argument("prompts", nargs="*", help="prompts (default: a few demo questions)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--strategy", default="paged", help="name[:key=value,...], e.g. paged:block_size=32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-memory", type=_size, default=None, help="KV pool size, e.g. 256MiB")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps (debugging)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, not as chat turns")
    p.add_argument("--json", action="store_true", help="print one JSON object per request, then stats")


def _generate(args: argparse.Namespace) -> int:
    from kvscope import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        strategy=args.strategy,
        kv_memory_bytes=args.kv_memory,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        preemption_mode=args.preemption_mode,
        enforce_eager=args.enforce_eager,
    )
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
    src.add_argument("--preset", help="a named study: quick (CPU, minutes) or paper (GPU)")
    run.add_argument("--results", default=None, help="results directory (default: results/<study name>)")
    run.add_argument("--no-progress", action="store_true")
    report = study.add_parser("report", help="write report.html and report.md from a results directory")
    report.add_argument("results_dir")


def _study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvscope.study import load_spec, preset, read_results, run_study
    from kvscope.study.report import write_report

    if args.study_command == "report":
        html, md = write_report(args.results_dir)
        print(f"wrote {html} and {md}")
        return 0
    spec = preset(args.preset) if args.preset else load_spec(args.spec)
    results = Path(args.results or Path("results") / spec.name)
    new = run_study(spec, results, progress=not args.no_progress)
    rows = read_results(results / "results.jsonl")
    errors = sum(r.get("status") == "error" for r in new)
    print(f"{len(new)} points run ({errors} errors); {len(rows)} rows in {results / 'results.jsonl'}")
    # The report covers every row, so a resumed run's report includes the earlier points too.
    html, md = write_report(results)
    print(f"report: {html} (and {md.name} beside it)")
    return 0


def _add_advise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("advise", help="recommend a KV strategy for a workload, model, hardware, SLOs and quality floor")
    p.add_argument("--model", default="smollm2-135m", help="preset (llama-3-8b, dummy:opt-6.7b, ...) or HF folder")
    p.add_argument("--hardware", default="this", help="h100 | h200 | cpu | this (detected)")
    p.add_argument("--gpu-memory", type=_size, default=None, help="override: device memory, e.g. 80GiB")
    p.add_argument("--hbm-gbps", type=float, default=None, help="override: device memory bandwidth, GB/s")
    p.add_argument("--pcie-gbps", type=float, default=None, help="override: host<->device bandwidth, GB/s")
    p.add_argument("--tflops", type=float, default=None, help="override: matmul rate, TFLOP/s")
    p.add_argument("--host-memory", type=_size, default=None, help="override: host memory for offloaded KV")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", default=None, help="JSONL trace (arrival_time, prompt, output_len[, prompt_len])")
    src.add_argument("--dataset", choices=["sharegpt"], default=None, help="a data set's mean lengths")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per request (no trace/dataset)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (no trace/dataset)")
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s (inf = all at once; default inf, or the trace's)")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--kv-memory", type=_size, default=None,
                   help="device KV pool (default: 90%% of memory after weights)")
    p.add_argument("--ttft-ms", type=float, default=None, help="SLO on p90 time to first token")
    p.add_argument("--tpot-ms", type=float, default=None, help="SLO on p90 time per output token")
    p.add_argument("--quality-floor", type=float, default=0.8,
                   help="minimum full-cache perplexity / strategy perplexity (1 = lossless; 0 = no floor)")
    p.add_argument("--results", default=None,
                   help="a study's results.jsonl: measured rows used where they cover the case")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
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
    from kvscope.study.runner import read_results

    hw = hardware_preset(args.hardware).with_overrides(
        memory_bytes=args.gpu_memory, hbm_bytes_per_s=args.hbm_gbps and args.hbm_gbps * 1e9,
        host_device_bytes_per_s=args.pcie_gbps and args.pcie_gbps * 1e9,
        matmul_flops_per_s=args.tflops and args.tflops * 1e12, host_memory_bytes=args.host_memory)
    if args.trace:
        workload = trace_workload(args.trace, args.rate)
    else:
        rate = math.inf if args.rate is None else args.rate
        workload = (sharegpt_workload(rate, args.num_requests) if args.dataset == "sharegpt"
                    else fixed_workload(args.prompt_len, args.output_len, rate, args.num_requests))
    rows = None
    if args.results:
        from pathlib import Path

        if not Path(args.results).is_file():
            raise KVScopeError(f"--results: no such file: {args.results}")
        rows = read_results(args.results)
    advice = advise(workload, resolve_model(args.model), hw, SLOs(args.ttft_ms, args.tpot_ms), args.quality_floor,
                    results=rows, kv_memory=args.kv_memory,
                    limits=EngineLimits(args.max_num_seqs, args.max_num_batched_tokens))
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


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve one model and KV strategy over an OpenAI-compatible HTTP API")
    p.add_argument("model", nargs="?", default="smollm2-135m", help="model spec (see `kvscope models`)")
    p.add_argument("--strategy", default="paged", help="name[:key=value,...], e.g. h2o:heavy_ratio=0.1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-memory", type=_size, default=None, help="KV pool size, e.g. 256MiB")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps (debugging)")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: MODEL)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests admitted at once (waiting + running); above it: 503 + Retry-After "
                        "(default: 4 x --max-num-seqs)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("kvscope serve needs the serve extra: pip install 'kvscope[serve]'", file=sys.stderr)
        return 2
    from kvscope import LLM
    from kvscope.serve.server import run_server

    if args.max_queue is not None and args.max_queue < 1:
        raise KVScopeError(f"--max-queue must be >= 1, got {args.max_queue}")
    llm = LLM(
        model=args.model,
        strategy=args.strategy,
        kv_memory_bytes=args.kv_memory,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        preemption_mode=args.preemption_mode,
        enforce_eager=args.enforce_eager,
    )
    run_server(llm, args.host, args.port, args.served_model_name, args.max_queue, args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    sub.add_parser("models", help="list the models kvscope can load")
    sub.add_parser("strategies", help="list the KV-cache strategies and their arguments")
    _add_study(sub)
    _add_advise(sub)
    _add_serve(sub)
    return parser


COMMANDS: dict[str, Any] = {"generate": _generate, "models": _models, "strategies": _strategies, "study": _study,
                             "advise": _advise, "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KVScopeError as e:
        print(f"kvscope: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
