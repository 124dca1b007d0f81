"""Command line: ``kvscope generate | models | strategies | study run | study report | advise | serve | bench serve``."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from kvscope.errors import KVScopeError
from kvscope.kv.adaptive_thresholds import DEFAULT_QUALITY_FLOOR

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about memory.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
]


def _size(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"1000000"`` -> bytes (:func:`kvscope.units.parse_size`)."""
    from kvscope.units import parse_size

    try:
        return parse_size(text, "size")
    except KVScopeError as e:  # argparse names the option; the field prefix would say it twice
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None


def _finite(text: str) -> float:
    """A finite number: nan and inf mean nothing as a temperature, a probability or a bandwidth."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _rate(text: str) -> float:
    """Requests/s: a finite number, or ``inf`` for all at once (its range is the workload's to check)."""
    return math.inf if text.strip().lower() in ("inf", "infinity") else _finite(text)


def _positive_int(text: str) -> int:
    """An integer >= 1 (scheduler limits: 0 would admit or compute nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with one model and one KV strategy")
    p.add_argument("prompts", nargs="*", help="prompts (default: a few demo questions)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--strategy", default="paged", help="name[:key=value,...], e.g. paged:block_size=32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-memory", type=_size, default=None, help="KV pool size, e.g. 256MiB")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=_positive_int, default=64)
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048)
    p.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps (debugging)")
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
    run.add_argument("--no-retry-errors", action="store_true",
                     help="skip points whose last row is an error (by default a rerun runs them again)")
    report = study.add_parser("report", help="write report.html and report.md from a results directory")
    report.add_argument("results_dir")


def _study(args: argparse.Namespace) -> int:
    """``study report``: 0. ``study run``: 0 when every point of the study is ``ok``, 1 when any
    failed (the report lists them; a rerun retries them), 2 for a problem found before any point."""
    from pathlib import Path

    from kvscope.study import load_spec, preset, run_study
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
    target = check_results_target(results)  # before any point, as run_study checks again under the lock
    with results_lock(target):  # held across the run and the report
        new = run_study(spec, results, progress=not args.no_progress, retry_errors=not args.no_retry_errors)
        rows = read_results_file(target, warn=False).rows
        failed = sum(r["status"] != "ok" for r in rows)
        print(f"{len(new)} points run ({sum(r['status'] != 'ok' for r in new)} failed); {len(rows)} points in "
              f"{target}, {failed} of them failed")
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
    p.add_argument("--quality-floor", type=_finite, default=DEFAULT_QUALITY_FLOOR,
                   help=f"minimum full-cache perplexity / strategy perplexity (1 = lossless; 0 = no floor; "
                        f"default {DEFAULT_QUALITY_FLOOR:g}, the study report's floor)")
    p.add_argument("--results", default=None,
                   help="a study's results.jsonl (or its folder): measured rows used where they cover the case")
    p.add_argument("--max-num-seqs", type=_positive_int, default=64)
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048)
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

        path = Path(args.results) / RESULTS_FILE if Path(args.results).is_dir() else Path(args.results)
        if not path.is_file():
            raise KVScopeError(f"--results: no such file: {path}")
        rows = read_results(path)
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


def _goodput(text: str) -> tuple[str, float]:
    """``"ttft:500"`` -> ``("ttft", 500.0)`` (vLLM's ``--goodput KEY:VALUE`` in milliseconds)."""
    key, sep, value = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not KEY:MILLISECONDS: {text!r} (e.g. ttft:500 tpot:50)") from None


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from kvscope.bench.http_bench import DATASETS
    from kvscope.bench.endpoints import ENDPOINTS, REMOTE_HELP

    p = sub.add_parser("bench", help="benchmarks against a running server")
    bench = p.add_subparsers(dest="bench_command", required=True)
    s = bench.add_parser("serve", help="vLLM's serving benchmark against an OpenAI-compatible server",
                         description="Send a workload to an OpenAI-compatible server on the wall clock, "
                                     "streaming every response, and report vLLM's serving metrics.")
    s.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (or .../v1)")
    s.add_argument("--allow-remote", action="store_true", help=f"allow a host that is not loopback (127.0.0.0/8, ::1, localhost); refused by "
                                                             f"default because {REMOTE_HELP}")
    s.add_argument("--model", default=None, help="model name sent in requests (default: first id of GET /v1/models)")
    s.add_argument("--endpoint", default=ENDPOINTS[0], choices=ENDPOINTS)
    s.add_argument("--tokenizer", default="smollm2-135m",
                   help="kvscope model whose tokenizer builds the prompts and counts their tokens")
    s.add_argument("--dataset", "--dataset-name", dest="dataset", default="sharegpt", choices=DATASETS)
    s.add_argument("--trace", default=None, help="JSONL trace (arrival_time, prompt, output_len) for --dataset trace")
    s.add_argument("--num-prompts", type=int, default=None,
                   help="requests (default 1000; 20 for ruler; every row of a trace)")
    s.add_argument("--request-rate", type=float, default=None,
                   help="requests/s, inf = all at once (default inf; a trace's own times)")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps; 1 = Poisson")
    s.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    s.add_argument("--random-input-len", type=int, default=1024)
    s.add_argument("--random-output-len", type=int, default=128)
    s.add_argument("--random-range-ratio", type=float, default=0.0)
    s.add_argument("--sharegpt-output-len", type=int, default=None, help="output length for every ShareGPT request")
    s.add_argument("--ruler-task", default="niah_single_1")
    s.add_argument("--ruler-length", type=int, default=4096, help="RULER max_seq_length in tokens")
    s.add_argument("--goodput", nargs="+", type=_goodput, default=[], metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el)")
    s.add_argument("--metric-percentiles", default="90,99", help="comma-separated percentiles")
    s.add_argument("--result-file", "--result-filename", dest="result_file", default=None,
                   help="write the results JSON here (vLLM's field names)")
    s.add_argument("--max-duration-s", type=float, default=600.0,
                   help="stop the run after this long; requests still running count as failed")
    s.add_argument("--request-timeout-s", type=float, default=300.0, help="bound on each request")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--disable-tqdm", action="store_true")


def _bench(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from kvscope.bench.http_bench import BenchServeConfig, bench_serve, summary_lines
    from kvscope.errors import ConfigError

    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--metric-percentiles: not a comma-separated list of numbers: "
                          f"{args.metric_percentiles!r}") from None
    values = {**vars(args), "goodput": dict(args.goodput), "metric_percentiles": percentiles}
    result = bench_serve(BenchServeConfig(**{f.name: values[f.name] for f in fields(BenchServeConfig)}))
    print("\n".join(summary_lines(result)))
    if args.result_file:
        print(f"results: {args.result_file}")
    return 0 if result["completed"] else 1


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
