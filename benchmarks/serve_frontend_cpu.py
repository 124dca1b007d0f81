"""What one ``kvscope serve`` front-end process costs in CPU per request and per streamed chunk, and
so how many chunks a second it can stream at most. A benchmark, not a test.

``kvscope serve`` runs its engine in a process of its own (the default): the server's process only
handles HTTP (accept, parse, validate, hand the request to the engine core, stream the chunks). Its
CPU time (``utime + stime`` from ``/proc``) is read around runs of ``--requests`` streamed requests
(``--concurrency`` in flight) of 1 and of ``--output-len`` output tokens on a tiny dummy model,
whose engine does next to nothing. The two give, by difference, the CPU per streamed chunk (chunks
as the client received them) and the CPU per request without its chunks; their inverse is the
front end's ceiling. A GPU engine that produces more tokens a second than that ceiling waits on its
front end (``benchmarks/results/serve_overhead.md``: about 16k output tokens/s at 256 concurrent
requests on an H200).

Timing on a shared machine is only meaningful with nothing else running: the result records the
load average before the runs. Writes ``serve_frontend_cpu.{json,md}`` to ``--out``.
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(url: str, pid: int, requests: int, output_len: int, concurrency: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    reqs = [WorkloadRequest(prompt=p, output_len=output_len, prompt_len=len(p))
            for p in ([rng.randrange(4, 500) for _ in range(120)] for _ in range(requests))]
    before = cpu_seconds(pid)
    run = run_http_workload(url, reqs, MODEL, mode="offline", max_concurrency=concurrency)
    cpu = cpu_seconds(pid) - before
    failed = [r.error for r in run.records if r.error]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, first: {failed[0]}")
    return {"cpu_s": cpu, "wall_s": run.wall_time_s, "chunks": sum(len(r.token_times) for r in run.records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "kvscope.cli", "serve", MODEL, "--port", str(port),
                               "--max-num-seqs", "256", "--kv-memory", "64MiB", "--log-level", "warning"])
    try:
        wait_ready(url, server, timeout=120)
        one_run(url, server.pid, 32, 4, args.concurrency, seed=99)  # warm-up
        runs = {n: [one_run(url, server.pid, args.requests, n, args.concurrency, seed=k)
                    for k in range(args.repeats)] for n in (1, args.output_len)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    short, long = runs[1], runs[args.output_len]
    per_chunk = [(b["cpu_s"] - a["cpu_s"]) / (b["chunks"] - a["chunks"]) for a, b in zip(short, long)]
    per_request = [(a["cpu_s"] - c * a["chunks"]) / args.requests for a, c in zip(short, per_chunk)]
    result = {"benchmark": "serve_frontend_cpu", "environment": environment(), "load_average_before": load,
              "model": MODEL, "requests": args.requests, "output_len": args.output_len,
              "concurrency": args.concurrency, "runs": {str(n): r for n, r in runs.items()},
              "cpu_ms_per_request": 1e3 * statistics.median(per_request),
              "cpu_us_per_chunk": 1e6 * statistics.median(per_chunk),
              "ceiling_chunks_per_s": 1 / statistics.median(per_chunk)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_frontend_cpu.json").write_text(json.dumps(result, indent=1))
    md = markdown(result, per_request, per_chunk)
    (args.out / "serve_frontend_cpu.md").write_text(md)
    print(md)


def markdown(r: dict[str, Any], per_request: list[float], per_chunk: list[float]) -> str:
    e = r["environment"]
    return "\n".join([
        "# `kvscope serve`: CPU of the front-end process per request and per streamed chunk",
        "",
        f"**One front-end process spends {r['cpu_ms_per_request']:.2f} ms of CPU per request and "
        f"{r['cpu_us_per_chunk']:.0f} µs per streamed chunk: it can stream at most about "
        f"{r['ceiling_chunks_per_s']:,.0f} chunks a second on this CPU.** Runs: per request "
        f"{', '.join(f'{1e3 * x:.2f}' for x in per_request)} ms; per chunk "
        f"{', '.join(f'{1e6 * x:.0f}' for x in per_chunk)} µs.",
        "",
        f"Measured {e['date']} on {e['cpu']} ({e['cpu_count']} cores), load average {r['load_average_before']:.2f} "
        f"before the runs, commit {e['commit']}, Python {e['python']}. `kvscope serve {r['model']}` with its engine "
        f"in a process of its own; {r['requests']} streamed requests of 1 and of {r['output_len']} output tokens, "
        f"{r['concurrency']} in flight, the client in a third process; the server process's utime + stime around "
        "each run, median of the runs' differences.",
        "",
    ])


if __name__ == "__main__":
    main()
