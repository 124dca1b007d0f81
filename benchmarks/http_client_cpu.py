"""What the HTTP load generator itself costs: CPU per streamed request and per streamed token of
:func:`kvscope.bench.http_driver.run_http_workload`, and how long it takes to get ``--requests``
requests, sent at once, through a server that costs next to nothing. A benchmark, not a test.

Why: ``kvscope serve`` loses 9-13% of the in-process engine's throughput at 256 concurrent
requests of 128 tokens on an H100, less when the load comes from four client processes than from
one (``results/serve_overhead_clients_h100.md``), while the server's own TTFT equals the
in-process engine's. The client is one asyncio process, as vLLM's ``bench serve`` is; this
measures its share.

The server is a stub in its own process: a raw asyncio protocol that answers each POST at once with
a stream of one-token events written ``--interval-ms`` apart (then the closing chunk with
``usage`` and ``[DONE]``) and closes the connection, so nearly all the CPU of a run is the
client's. The client is the real driver (one
connection per request, streaming, ``offline`` mode). Its CPU (``getrusage`` of this process) and
wall time are read around each run, with answers of one token and of ``--tokens``; the one-token
run holds every per-request cost, and what the longer answers add, per token, is the cost of
reading a streamed token. Medians over ``--repeats`` runs after one warm-up. Timing on a shared
machine is only meaningful with nothing else running: the result records the load average before
the runs. Writes ``http_client_cpu.{json,md}`` to ``--out``.
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

_TOKEN = b'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n'


def _response(tokens: int) -> list[bytes]:
    """The stub's answer in the parts it writes apart: the headers with the first token's event,
    one event per further token, then the closing chunk with ``usage`` and ``[DONE]``."""
    end = (b'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}],'
           b'"usage":{"prompt_tokens":100,"completion_tokens":%d}}\n\n' % tokens + b"data: [DONE]\n\n")
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (len(_TOKEN) * tokens + len(end)))
    return [head + _TOKEN] + [_TOKEN] * (tokens - 1) + [end]


class _Stub(asyncio.Protocol):
    """Reads one request (headers and a body of content-length bytes), answers, closes. The answer's
    parts go out ``interval`` seconds apart, as a server sends a token per engine step, so that the
    client reads each token on its own as it would from a real server."""

    def __init__(self, parts: list[bytes], interval: float) -> None:
        self.parts, self.interval = parts, interval

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
            loop = asyncio.get_running_loop()
            for i, part in enumerate(self.parts):
                loop.call_later(i * self.interval, self._write, part)
            loop.call_later((len(self.parts) - 1) * self.interval, self.transport.close)

    def _write(self, part: bytes) -> None:
        if not self.transport.is_closing():  # a reader that left early (the readiness probe) gets no more
            self.transport.write(part)  # type: ignore[attr-defined]


async def _serve(port: int, tokens: int, interval: float) -> None:
    parts = _response(tokens)
    server = await asyncio.get_running_loop().create_server(lambda: _Stub(parts, interval), "127.0.0.1", port,
                                                            backlog=4096)
    async with server:
        await server.serve_forever()


def one_run(url: str, requests: int, tokens: int) -> dict[str, float]:
    reqs = [WorkloadRequest(prompt=list(range(100)), output_len=tokens, prompt_len=100) for _ in range(requests)]
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run = run_http_workload(url, reqs, "stub", mode="offline")
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    failed = [r.error for r in run.records if r.error]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, first: {failed[0]}")
    return {"cpu_s": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, "wall_s": wall,
            "last_token_s": max(r.token_times[-1] for r in run.records)}


def timed_runs(requests: int, tokens: int, interval_ms: float, repeats: int) -> list[dict[str, float]]:
    """``repeats`` runs after a warm-up, against a stub (its own process) answering ``tokens`` tokens
    ``interval_ms`` apart."""
    port = free_port()
    stub = subprocess.Popen([sys.executable, __file__, "--stub-port", str(port), "--stub-tokens", str(tokens),
                             "--stub-interval-ms", str(interval_ms)])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, stub, 30)  # the stub answers any request, /health too
        one_run(url, requests, tokens)  # warm-up
        return [one_run(url, requests, tokens) for _ in range(repeats)]
    finally:
        stub.terminate()
        stub.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128, help="tokens each answer streams (beside a one-token run)")
    ap.add_argument("--interval-ms", type=float, default=2.0, help="between the stub's writes of one answer")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--stub-port", type=int, default=None, help=argparse.SUPPRESS)  # the stub's own process
    ap.add_argument("--stub-tokens", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--stub-interval-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stub_port is not None:
        asyncio.run(_serve(args.stub_port, args.stub_tokens, args.stub_interval_ms / 1e3))
        return
    load = os.getloadavg()[0]
    by_tokens = {}
    for tokens in (1, args.tokens):
        runs = timed_runs(args.requests, tokens, args.interval_ms, args.repeats)
        by_tokens[tokens] = {"runs": runs, "median": {k: statistics.median(r[k] for r in runs) for k in runs[0]}}
    one, many = by_tokens[1]["median"], by_tokens[args.tokens]["median"]
    result: dict[str, Any] = {
        "benchmark": "http_client_cpu", "environment": environment(), "load_average_before": load,
        "requests": args.requests, "tokens": args.tokens, "interval_ms": args.interval_ms, "repeats": args.repeats,
        "runs": by_tokens[1]["runs"], "median": one, "runs_tokens": by_tokens[args.tokens]["runs"],
        "median_tokens": many, "cpu_us_per_request": 1e6 * one["cpu_s"] / args.requests,
        # The one-token run holds every per-request cost; what the longer answers add is per token.
        "cpu_us_per_token": 1e6 * (many["cpu_s"] - one["cpu_s"]) / (args.requests * (args.tokens - 1)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_client_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "http_client_cpu.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    med, many, n, k = r["median"], r["median_tokens"], r["requests"], r["tokens"]
    env = r["environment"]
    return "\n".join([
        "# The HTTP load generator's own cost", "",
        f"**The load generator spends {r['cpu_us_per_request']:.0f} us of CPU per streamed request and "
        f"{r['cpu_us_per_token']:.1f} us per streamed token: {n} requests of {k} tokens sent at once take it "
        f"{1e3 * many['cpu_s']:.0f} ms of CPU and {1e3 * many['wall_s']:.0f} ms of wall time through a server that "
        f"costs next to nothing** (of one token: {1e3 * med['cpu_s']:.0f} ms of CPU, {1e3 * med['wall_s']:.0f} ms). "
        f"Runs (CPU ms), one token: " + ", ".join(f"{1e3 * x['cpu_s']:.0f}" for x in r["runs"])
        + f"; {k} tokens: " + ", ".join(f"{1e3 * x['cpu_s']:.0f}" for x in r["runs_tokens"]) + ".", "",
        f"Measured {env.get('date', '')} on {env.get('cpu', 'CPU')} ({env.get('cpu_count', '?')} cores), load "
        f"average {r['load_average_before']:.2f} before the runs, commit {env.get('commit')}, Python "
        f"{env.get('python')}. `run_http_workload` in `offline` mode (one connection per request, "
        f"streaming) against a stub server in its own process that answers each request at once with "
        f"one token, then with {k}, written {r['interval_ms']:g} ms apart (a token per read, as from a server "
        f"that sends one per engine step); median of {r['repeats']} runs each after a warm-up.", ""])


if __name__ == "__main__":
    main()
