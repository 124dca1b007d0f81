"""What the HTTP load generator itself costs: CPU per streamed request of
:func:`kvscope.bench.http_driver.run_http_workload`, and how long it takes to get ``--requests``
requests, sent at once, through a server that costs next to nothing. A benchmark, not a test.

Why: ``kvscope serve`` loses 8% of the in-process engine's throughput at 256 concurrent requests on
an H100 whatever its number of front-end processes (``results/serve_overhead_frontends_h100.md``),
so something other than the front end delays the requests' arrival. The client is one asyncio
process, as vLLM's ``bench serve`` is; this measures its share.

The server is a stub in its own process: a raw asyncio protocol that answers each POST at once with
a three-event stream (one token, the closing chunk with ``usage``, ``[DONE]``) and closes the
connection, so nearly all the CPU of a run is the client's. The client is the real driver (one
connection per request, streaming, ``offline`` mode). Its CPU (``getrusage`` of this process) and
wall time are read around each run; medians over ``--repeats`` runs after one warm-up. Timing on a
shared machine is only meaningful with nothing else running: the result records the load average
before the runs. Writes ``http_client_cpu.{json,md}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvscope.bench.http_driver import run_http_workload
from kvscope.workload.requests import WorkloadRequest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from envinfo import environment  # noqa: E402
from server_process import free_port, wait_ready  # noqa: E402

_BODY = (b'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n'
         b'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}],'
         b'"usage":{"prompt_tokens":100,"completion_tokens":1}}\n\n'
         b"data: [DONE]\n\n")
_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n"
             b"connection: close\r\n\r\n" % len(_BODY)) + _BODY


class _Stub(asyncio.Protocol):
    """Reads one request (headers and a body of content-length bytes), answers, closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length = next((int(line.split(b":")[1]) for line in self.buf[:end].lower().split(b"\r\n")
                       if line.startswith(b"content-length:")), 0)
        if len(self.buf) - end - 4 >= length:
            self.transport.write(_RESPONSE)  # type: ignore[attr-defined]
            self.transport.close()


async def _serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Stub, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def one_run(url: str, requests: int) -> dict[str, float]:
    reqs = [WorkloadRequest(prompt=list(range(100)), output_len=1, prompt_len=100) for _ in range(requests)]
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run = run_http_workload(url, reqs, "stub", mode="offline")
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    failed = [r.error for r in run.records if r.error]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, first: {failed[0]}")
    return {"cpu_s": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, "wall_s": wall,
            "last_token_s": max(r.token_times[0] for r in run.records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--stub-port", type=int, default=None, help=argparse.SUPPRESS)  # the stub's own process
    args = ap.parse_args()
    if args.stub_port is not None:
        asyncio.run(_serve(args.stub_port))
        return
    load = os.getloadavg()[0]
    port = free_port()
    stub = subprocess.Popen([sys.executable, __file__, "--stub-port", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, stub, 30)  # the stub answers any request, /health too
        one_run(url, args.requests)  # warm-up
        runs = [one_run(url, args.requests) for _ in range(args.repeats)]
    finally:
        stub.terminate()
        stub.wait(10)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result: dict[str, Any] = {
        "benchmark": "http_client_cpu", "environment": environment(), "load_average_before": load,
        "requests": args.requests, "repeats": args.repeats, "runs": runs, "median": med,
        "cpu_us_per_request": 1e6 * med["cpu_s"] / args.requests,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_client_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "http_client_cpu.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    med, n = r["median"], r["requests"]
    env = r["environment"]
    return "\n".join([
        "# The HTTP load generator's own cost", "",
        f"**The load generator spends {r['cpu_us_per_request']:.0f} us of CPU per streamed request: "
        f"{n} requests sent at once take it {1e3 * med['cpu_s']:.0f} ms of CPU and {1e3 * med['wall_s']:.0f} ms "
        f"of wall time through a server that costs next to nothing** (the last request's token arrives "
        f"{1e3 * med['last_token_s']:.0f} ms after the start). Runs (CPU ms): "
        + ", ".join(f"{1e3 * x['cpu_s']:.0f}" for x in r["runs"]) + ".", "",
        f"Measured {env.get('date', '')} on {env.get('cpu', 'CPU')} ({env.get('cpu_count', '?')} cores), load "
        f"average {r['load_average_before']:.2f} before the runs, commit {env.get('commit')}, Python "
        f"{env.get('python')}. `run_http_workload` in `offline` mode (one connection per request, "
        f"streaming) against a stub server in its own process that answers each request at once with "
        f"one token; median of {r['repeats']} runs after a warm-up.", ""])


if __name__ == "__main__":
    main()
