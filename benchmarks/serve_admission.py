"""Admission throughput of ``kvscope serve`` with one and with several HTTP front-end processes
(``--api-server-count``): requests a second taken in when ``--requests`` one-token requests arrive
at once. A benchmark, not a test.

A one-token request is almost all admission: accept, parse, validate, tokenize, hand to the engine
core, one chunk back. The engine is a tiny dummy model that does next to nothing per step, so the
figure is the front ends': one process admits the requests in turn, N share them (the kernel hands
each connection to one). Per server: a warm-up, then ``--repeats`` runs of ``--requests`` streamed
requests, all in flight at once (the client in this process); requests/s is requests / wall time,
with the time to first chunk (the last request's tells how late admission lets it in).

Timing on a shared machine is only meaningful with nothing else running, and on a machine with
fewer cores than front ends + engine + client only indicative: the result records the load average
and core count. Writes ``serve_admission.{json,md}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvscope.bench.http_driver import run_http_workload
from kvscope.workload.requests import WorkloadRequest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from envinfo import environment  # noqa: E402
from server_process import free_port, wait_ready  # noqa: E402

MODEL = "dummy:tiny-llama"


def one_run(url: str, requests: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    reqs = [WorkloadRequest(prompt=p, output_len=1, prompt_len=len(p))
            for p in ([rng.randrange(4, 500) for _ in range(120)] for _ in range(requests))]
    run = run_http_workload(url, reqs, MODEL, mode="offline", max_concurrency=requests)
    failed = [r.error for r in run.records if r.error]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, first: {failed[0]}")
    ttft = sorted(r.token_times[0] - r.arrival_time for r in run.records)
    return {"wall_s": run.wall_time_s, "requests_per_s": requests / run.wall_time_s,
            "ttft_p50_s": ttft[len(ttft) // 2], "ttft_max_s": ttft[-1]}


def serve_and_measure(count: int, requests: int, repeats: int) -> list[dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "kvscope.cli", "serve", MODEL, "--port", str(port),
                               "--api-server-count", str(count), "--max-num-seqs", str(max(requests, 256)),
                               "--kv-memory", "64MiB", "--log-level", "warning"])
    try:
        wait_ready(url, server, timeout=120)
        for k in range(2):  # warm-up, reaching every front end
            one_run(url, 64, seed=99 + k)
        return [one_run(url, requests, seed=k) for k in range(repeats)]
    finally:
        server.terminate()  # SIGTERM: a graceful shutdown of every process of the server
        server.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--api-server-count", type=int, nargs="+", default=[1, 2], dest="counts",
                    help="front-end process counts to compare (default: 1 2)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    runs = {n: serve_and_measure(n, args.requests, args.repeats) for n in args.counts}
    summary = {str(n): {key: statistics.median(r[key] for r in rs) for key in rs[0]} for n, rs in runs.items()}
    result = {"benchmark": "serve_admission", "environment": environment(), "load_average_before": load,
              "load_average_after": os.getloadavg()[0], "model": MODEL, "requests": args.requests,
              "runs": {str(n): rs for n, rs in runs.items()}, "median": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_admission.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / "serve_admission.md").write_text(md)
    print(md)


def markdown(r: dict[str, Any]) -> str:
    e = r["environment"]
    rows = []
    for n, m in r["median"].items():
        each = ", ".join(f"{x['requests_per_s']:,.0f}" for x in r["runs"][n])
        rows.append(f"| {n} | {m['requests_per_s']:,.0f} | {each} | {1e3 * m['ttft_p50_s']:.0f} "
                    f"| {1e3 * m['ttft_max_s']:.0f} |")
    return "\n".join([
        "# `kvscope serve`: admission throughput by number of front-end processes (`--api-server-count`)",
        "",
        f"{r['requests']} streamed one-token requests, all in flight at once, on `kvscope serve {r['model']}` "
        "(engine in its own process); medians of the runs.",
        "",
        "| front ends | requests/s | runs | TTFT p50 (ms) | TTFT max (ms) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Measured {e['date']} on {e['cpu']} ({e['cpu_count']} cores), load average {r['load_average_before']:.2f} "
        f"before and {r['load_average_after']:.2f} after, commit {e['commit']}, Python {e['python']}; the client "
        "in the benchmark's process. With fewer cores than front ends + engine + client the figures are only "
        "indicative.",
        "",
    ])


if __name__ == "__main__":
    main()
