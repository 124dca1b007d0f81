"""``kvscope serve`` and ``kvscope bench serve``: the command-line side of the HTTP server and of the
load generator (their code lives in :mod:`kvscope.serve` and :mod:`kvscope.bench`)."""
from __future__ import annotations

import argparse
import sys

from kvscope.cli_args import _add_engine_args, _llm, _llm_args, _positive_int
from kvscope.errors import ConfigError, KVScopeError


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
    s.add_argument("--client-processes", type=int, default=1, metavar="N",
                   help="send from N processes (each a share of the requests, on one clock), so that the "
                        "client's own CPU does not spread a burst's arrivals; --max-concurrency is split among them")
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
    _add_engine_args(p)
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: MODEL)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests admitted at once (waiting + running); above it: 503 + Retry-After "
                        "(default: 4 x --max-num-seqs)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine in a process of its own (default), so that the HTTP front end never "
                        "slows its steps; --no-engine-process runs it on a thread of the server (debugging)")
    p.add_argument("--api-server-count", type=_positive_int, default=1, metavar="N",
                   help="HTTP front-end processes sharing the port, all in front of the one engine process "
                        "(vLLM's option): N processes parse, tokenize and stream requests at once; /metrics of "
                        "any of them reports the whole server (default 1; needs the engine process)")


def _serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("kvscope serve needs the serve extra: pip install 'kvscope[serve]'", file=sys.stderr)
        return 2
    from functools import partial

    from kvscope import LLM
    from kvscope.serve.server import run_server

    if args.max_queue is not None and args.max_queue < 1:
        raise KVScopeError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.api_server_count > 1:
        if not args.engine_process:
            raise ConfigError("--api-server-count above 1 needs the engine in a process of its own; "
                              "drop --no-engine-process")
        from kvscope.serve.frontends import serve_frontends

        serve_frontends(partial(LLM, **_llm_args(args)), args.api_server_count, args.host, args.port,
                        args.served_model_name, args.max_queue, args.log_level)
        return 0
    if args.engine_process:
        from kvscope.serve.engine_client import EngineProcess

        engine = EngineProcess(partial(LLM, **_llm_args(args)))
    else:
        engine = _llm(args)
    try:
        run_server(engine, args.host, args.port, args.served_model_name, args.max_queue, args.log_level)
    finally:
        engine.close()  # the engine process, or tensor-parallel workers
    return 0
