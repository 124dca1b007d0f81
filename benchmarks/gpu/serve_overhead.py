"""What ``kvscope serve`` costs over the in-process engine: output tokens/s of the same 256 requests,
sent at once, through the OpenAI-compatible HTTP server and straight into the engine.

Workload: W1 of ``end_to_end.py`` (256 requests, prompts lognormal median 100 tokens, 128 output
tokens each, EOS ignored, greedy), as random token ids (the completions API takes token-id prompts).
Model: ``dummy:llama-3.1-8b`` (random weights, seed 0), bf16, ``paged``, max_num_seqs 256,
max_num_batched_tokens 8192, CUDA graphs on.

Systems, in one run, one after the other, each with the GPU to itself:

- **in-process**: :func:`kvscope.bench.serve.run_workload` in ``offline`` mode (every request due at
  once), and ``LLM.generate`` on prompts of the same lengths (what an offline user gets);
- **HTTP**: ``kvscope serve`` in its own process on loopback, driven by
  :func:`kvscope.bench.http_driver.run_http_workload` (streaming, one connection per request, all
  sent at once: 256 concurrent requests).

``--piecewise-ab`` serves a second time with piecewise graphs off (``--piecewise-graph-sizes none``).
Both paths report through :func:`kvscope.bench.metrics.serving_metrics`. Output throughput is the
median of ``--repeats`` runs after a warm-up run on other prompts. Every run of one engine gets
prompts that engine has not seen (the prefix cache keeps finished requests' blocks):
``run_workload`` and the server (a fresh process) the same seeds, ``LLM.generate`` the next ones.
``--client-processes K`` also sends each server's runs (the default and each ``--api-server-counts``)
from K client processes at once (``kvscope.bench.client_processes``, as ``kvscope bench serve
--client-processes``), so that the load generator's own CPU (about 0.35 ms a request in one
asyncio process) does not delay the requests' arrival. Each HTTP run also reads the server's
``/metrics`` before and after: the mean TTFT and queue time the
server timed (from a front end's hand-over to the engine) beside the client's mean TTFT, so that
the difference shows the way in and the first chunk's way out; and the engine core's working
time by part (admission, step, messages) with its turns longer than a quarter second.
Correctness first: 8 short greedy requests must return the same text through the server as
in-process (the same weights, by seed). Target (recorded, not asserted): the server loses at most
5% of in-process throughput. ``--tiny``: a 2-layer model on the CPU (smoke test; ``--requests`` and
``--output-len`` make it heavier). Writes ``serve_overhead.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from ceilings import RESULTS, env_line  # noqa: E402
from decode_step import bench_environment  # noqa: E402
from envinfo import package_version  # noqa: E402
from end_to_end import lognormal_lengths, prompts  # noqa: E402
from server_process import free_port, wait_ready  # noqa: E402

from kvscope.bench.client_processes import ClientProcesses  # noqa: E402
from kvscope.bench.http_driver import run_http_workload  # noqa: E402
from kvscope.bench.metrics import serving_metrics  # noqa: E402
from kvscope.bench.serve import run_workload  # noqa: E402
from kvscope.engine.sampling_params import SamplingParams  # noqa: E402
from kvscope.llm import LLM  # noqa: E402
from kvscope.workload.requests import WorkloadRequest  # noqa: E402


def workload(lengths: list[tuple[int, int]], vocab: int, seed: int) -> list[WorkloadRequest]:
    return [WorkloadRequest(prompt=ids, output_len=o, prompt_len=len(ids))
            for ids, (_, o) in zip(prompts(lengths, vocab, seed), lengths)]


def throughput(records: list) -> dict:
    m = serving_metrics(records)
    out = {k: m[k] for k in ("completed", "failed", "duration", "output_throughput", "mean_ttft_ms",
                             "median_ttft_ms", "median_tpot_ms", "median_itl_ms", "mean_e2el_ms")}
    # Throughput counts completed requests only: a run with failures is no overhead figure, so keep why.
    out["errors"] = sorted({r.error for r in records if r.error})[:5]
    # How long the client took to put every request on its way (all are due at once): a run's
    # duration beyond its requests' mean E2E latency.
    arrivals = [r.arrival_time for r in records]
    out["send_spread_ms"] = 1e3 * (max(arrivals) - min(arrivals)) if arrivals else None
    return out


# The server's own latency histograms (vLLM's names), timed from when a front end hands the request
# to the engine: the client's TTFT minus the server's is the way in (connection, HTTP parsing,
# validation) and the first chunk's way out; the client's E2E minus the server's adds the last
# token's way out, so a front end that falls behind the engine shows there.
SERVER_HISTOGRAMS = {"server_mean_ttft_ms": "vllm:time_to_first_token_seconds",
                     "server_mean_queue_ms": "vllm:request_queue_time_seconds",
                     "server_mean_e2e_ms": "vllm:e2e_request_latency_seconds"}


# The engine core's own loop (counters of its working time by part, and its turns longer than a
# quarter second), so that a run whose requests wait can tell a long step from a busy admission.
CORE_COUNTERS = {"core_admit_s": "kvscope:engine_core_admit_seconds_total",
                 "core_step_s": "kvscope:engine_core_step_seconds_total",
                 "core_output_s": "kvscope:engine_core_output_seconds_total"}
LONG_TURN = "0.25"


def histogram_sums(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each of :data:`SERVER_HISTOGRAMS` on ``url``'s ``/metrics``, over its labels;
    also each of :data:`CORE_COUNTERS` and the core's turns longer than :data:`LONG_TURN` s, as
    (value, 0)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    sums = {name: [0.0, 0.0] for name in SERVER_HISTOGRAMS.values()}
    core = {name: 0.0 for name in [*CORE_COUNTERS.values(), "turns", "short_turns"]}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, acc in sums.items():
                if sample.name == f"{name}_sum":
                    acc[0] += sample.value
                elif sample.name == f"{name}_count":
                    acc[1] += sample.value
            if sample.name in core:
                core[sample.name] = sample.value
            elif sample.name == "kvscope:engine_core_turn_seconds_count":
                core["turns"] = sample.value
            elif sample.name == "kvscope:engine_core_turn_seconds_bucket" and sample.labels.get("le") == LONG_TURN:
                core["short_turns"] = sample.value
    core["long_turns"] = core.pop("turns") - core.pop("short_turns")
    return {name: (a[0], a[1]) for name, a in sums.items()} | {name: (v, 0.0) for name, v in core.items()}


def server_means(before: dict, after: dict) -> dict[str, float | None]:
    """Mean of each histogram over the requests observed between two :func:`histogram_sums`, ms;
    and what the engine core's counters gained in between (seconds, and turns)."""
    out = {}
    for key, name in SERVER_HISTOGRAMS.items():
        total, count = (after[name][i] - before[name][i] for i in (0, 1))
        out[key] = 1e3 * total / count if count else None
    for key, name in [*CORE_COUNTERS.items(), ("core_long_turns", "long_turns")]:
        out[key] = after[name][0] - before[name][0]
    return out


def with_server_means(url: str, send, log: Path) -> dict:
    """:func:`throughput` of the records ``send()`` returns, with the server's means over them and
    the engine core's slow-turn warnings that the server wrote to ``log`` (its stderr) meanwhile."""
    before, offset = histogram_sums(url), log.stat().st_size
    out = throughput(send()) | server_means(before, histogram_sums(url))
    with log.open("rb") as f:
        f.seek(offset)
        out["slow_turns"] = [line.strip() for line in f.read().decode(errors="replace").splitlines()
                             if "engine core turn" in line]
    return out


def median_runs(fn, repeats: int, first_seed: int = 1) -> dict:
    runs = [fn(seed) for seed in range(first_seed, first_seed + repeats)]
    return {"tok_s": statistics.median(r["output_throughput"] for r in runs), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="2-layer dummy model on the CPU (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=None, help="requests sent at once (default 256; 16 with --tiny)")
    ap.add_argument("--output-len", type=int, default=None, help="output tokens each (default 128; 16 with --tiny)")
    ap.add_argument("--piecewise-ab", action="store_true", help="also serve with piecewise graphs off")
    ap.add_argument("--client-processes", type=int, default=1, metavar="K",
                    help="also send each server's runs from K client processes (the load generator "
                         "spends about 0.35 ms of CPU a request: benchmarks/results/http_client_cpu.md)")
    ap.add_argument("--api-server-counts", default="", metavar="N,N",
                    help="also serve with these numbers of front-end processes (--api-server-count), e.g. 2,4")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    model = "dummy:tiny-llama" if args.tiny else "dummy:llama-3.1-8b"
    n, out_len = (16, 16) if args.tiny else (256, 128)
    n, out_len = args.requests or n, args.output_len or out_len
    lengths = [(p, out_len) for p in lognormal_lengths(n, 20 if args.tiny else 100, 0.6, 4, 100 if args.tiny else 1024, 0)]
    engine = {"max_num_seqs": min(n, 256), "max_num_batched_tokens": 512 if args.tiny else 8192,
              "max_model_len": 256 if args.tiny else 1280}
    kv = {"kv_memory_bytes": 64 << 20} if args.tiny else {"kv_memory_fraction": 0.8}
    env = bench_environment(torch.device(device))
    # The front end's cost per request depends on which event loop and HTTP parser uvicorn found.
    env["server_stack"] = {p: package_version(p) for p in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools",
                                                       "pydantic")}
    print(env_line(env), flush=True)

    llm = LLM(model, "paged", device=device, dtype="float32" if args.tiny else "bfloat16", **engine, **kv)
    vocab = llm.engine.model_config.vocab_size
    check_reqs = workload([(32, 16)] * 8, vocab, 999)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ref_texts = [o.text for o in llm.generate([r.prompt for r in check_reqs], greedy, use_tqdm=False)]
    # Warm-up at full size (other prompts): the first run at 256 rows otherwise pays one-time costs
    # (the H200 run at 9ac6db0: 11,376 then 14,208 tok/s).
    run_workload(llm, workload(lengths, vocab, 0), mode="offline")
    inproc = median_runs(lambda s: throughput(run_workload(llm, workload(lengths, vocab, s), mode="offline").records),
                         args.repeats)
    print(f"in-process run_workload: {inproc['tok_s']:.0f} tok/s", flush=True)

    def generate(seed: int) -> dict:
        reqs = workload(lengths, vocab, seed)
        params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in reqs]
        t0 = time.perf_counter()
        outs = llm.generate([r.prompt for r in reqs], params, use_tqdm=False)
        return {"output_throughput": sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)}

    # Prompts run_workload has not served: its finished requests' blocks stay in the prefix cache,
    # and the same prompts again would skip most of their prefill.
    gen = median_runs(generate, args.repeats, first_seed=1 + args.repeats)
    print(f"in-process LLM.generate: {gen['tok_s']:.0f} tok/s", flush=True)
    del llm
    if device == "cuda":
        torch.cuda.empty_cache()

    def serve(extra: list[str], clients: ClientProcesses | None = None) -> tuple[dict, dict | None, list[bool]]:
        """Median HTTP throughput of a fresh server given ``extra`` options, the same sent by
        ``clients`` (several client processes) when given, and the check's texts."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "kvscope.cli", "serve", model, "--strategy", "paged", "--device", device,
               "--dtype", "float32" if args.tiny else "bfloat16", "--port", str(port), "--log-level", "warning",
               "--max-num-seqs", str(engine["max_num_seqs"]), "--max-num-batched-tokens",
               str(engine["max_num_batched_tokens"]), "--max-model-len", str(engine["max_model_len"]),
               "--max-queue", str(4 * n)] + (["--kv-memory", str(kv["kv_memory_bytes"])] if args.tiny else []) + extra
        log = Path(tempfile.mkdtemp(prefix="serve-overhead-")) / "server.log"
        with log.open("wb") as stderr:
            server = subprocess.Popen(cmd, env=os.environ | {"PYTHONUNBUFFERED": "1"}, stderr=stderr)
        try:
            wait_ready(url, server, 600)
            name = json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"][0]["id"]
            check = run_http_workload(url, check_reqs, name, mode="offline", extra_body={"temperature": 0.0})
            same = [a == b for a, b in zip(check.texts, ref_texts)]
            print(f"server {extra} vs in-process greedy texts: {sum(same)} of {len(same)} equal", flush=True)
            if not all(same):
                raise SystemExit("the server's greedy texts differ from the in-process engine's")
            run_http_workload(url, workload(lengths, vocab, 0), name, mode="offline")  # warm-up at full size
            http = median_runs(lambda s: with_server_means(url, lambda: run_http_workload(
                url, workload(lengths, vocab, s), name, mode="offline").records, log), args.repeats)
            print(f"HTTP server {extra}: {http['tok_s']:.0f} tok/s", flush=True)
            split = None
            if clients is not None:
                def timed_split(seed: int) -> dict:
                    return with_server_means(url, lambda: clients.run(url, workload(lengths, vocab, seed), name, mode="offline").records,
                                             log)

                # Seeds this server has not seen (its prefix cache keeps the single client's prompts).
                timed_split(10_000)  # warm-up of the client processes' path
                split = median_runs(timed_split, args.repeats, first_seed=1 + args.repeats)
                print(f"HTTP server {extra}, {clients.processes} client processes: {split['tok_s']:.0f} tok/s",
                      flush=True)
        finally:
            server.terminate()
            server.wait(60)
            print(f"server {extra} stderr, last lines:", *log.read_text(errors="replace").splitlines()[-8:],
                  sep="\n  ", flush=True)
        return http, split, same

    clients = ClientProcesses(args.client_processes) if args.client_processes > 1 else None
    k = args.client_processes
    try:
        http, split, same = serve([], clients)
        ab = {} if split is None else {f"http_clients_{k}": split}
        if args.piecewise_ab:
            ab["http_no_piecewise"] = serve(["--piecewise-graph-sizes", "none"])[0]
        # Several front ends with several client processes too: with one client process the
        # client's own CPU may be what spreads the requests' arrival, whatever the server does.
        for count in [int(c) for c in args.api_server_counts.split(",") if c]:
            one, several, _ = serve(["--api-server-count", str(count)], clients)
            ab[f"http_api_servers_{count}"] = one
            if several is not None:
                ab[f"http_api_servers_{count}_clients_{k}"] = several
    finally:
        if clients is not None:
            clients.close()

    result = {"benchmark": "serve_overhead", "environment": env, "model": model, "engine": engine | kv,
              "requests": n, "prompt_tokens": sum(p for p, _ in lengths), "output_tokens": n * out_len,
              "repeats": args.repeats, "correctness": {"equal_texts": sum(same), "of": len(same)},
              "in_process_run_workload": inproc, "in_process_generate": gen, "http": http,
              "loss_vs_run_workload": 1 - http["tok_s"] / inproc["tok_s"],
              "loss_vs_generate": 1 - http["tok_s"] / gen["tok_s"], **ab}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "serve_overhead.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    def row(label: str, x: dict) -> str:
        runs = ", ".join(f"{v['output_throughput']:.0f}" for v in x["runs"])
        return f"| {label} | {x['tok_s']:.0f} | {runs} |"

    loss = r["loss_vs_run_workload"]
    runs = [run for x in ("in_process_run_workload", "http") for run in r[x]["runs"]]
    failed = sum(run["failed"] for run in runs)
    errors = sorted({e for run in runs for e in run["errors"]})[:5]
    warning = (f"**Not an overhead figure: {failed} requests failed in the timed runs** (throughput counts "
               f"completed requests only; errors: {errors}).\n\n" if failed else "")
    return "\n".join([
        "# kvscope serve: HTTP overhead against the in-process engine", "",
        warning + f"The server loses {loss:.1%} of in-process throughput ({r['http']['tok_s']:.0f} against "
        f"{r['in_process_run_workload']['tok_s']:.0f} output tok/s) at {r['requests']} concurrent requests; "
        f"target: loss <= 5%, {'met' if loss <= 0.05 else 'missed'}.", "", env_line(r["environment"]), "",
        f"{r['model']}, `paged`, engine {r['engine']}; {r['requests']} requests sent at once ({r['prompt_tokens']} "
        f"prompt tokens, {r['output_tokens']} output tokens, greedy, EOS ignored); median of {r['repeats']} runs "
        "after a warm-up. HTTP: `kvscope serve` in its own process on loopback, every request streamed.", "",
        "| path | output tok/s (median) | runs |", "|---|---:|---|",
        row("in-process `run_workload` (offline)", r["in_process_run_workload"]),
        row("in-process `LLM.generate`", r["in_process_generate"]),
        *[row(label, r[k]) for label, k in http_paths(r)], "",
        f"Against `LLM.generate`: {r['loss_vs_generate']:.1%} lost. Correctness before timing: "
        f"{r['correctness']['equal_texts']} of {r['correctness']['of']} greedy texts equal between server and "
        "in-process engine.", "", *ttft_split(r)])


def http_paths(r: dict) -> list[tuple[str, str]]:
    """(label, result key) of each HTTP configuration ``r`` measured."""
    def label(k: str) -> str:
        # http_clients_K, http_api_servers_N or http_api_servers_N_clients_K
        parts = k.split("_")
        servers = f" --api-server-count {parts[3]}" if k.startswith("http_api_servers_") else ""
        clients = f", {parts[-1]} client processes" if "clients" in parts else ""
        return f"HTTP `kvscope serve{servers}`{clients}"

    return [("HTTP `kvscope serve`", "http"),
            *([("HTTP `kvscope serve --piecewise-graph-sizes none`", "http_no_piecewise")]
              if "http_no_piecewise" in r else []),
            *[(label(k), k) for k in r if k.startswith(("http_clients_", "http_api_servers_"))]]


def ttft_split(r: dict) -> list[str]:
    """Mean TTFT and E2E latency per path as the client saw them, and for HTTP as the server timed
    them (from the front end's hand-over), with the queue part and the client's send spread
    (medians over the runs); then the engine core's working time and long turns, run by run."""
    def med(x: dict, key: str) -> str:
        vals = [run[key] for run in x["runs"] if run.get(key) is not None]
        return f"{statistics.median(vals):.0f}" if vals else "-"

    paths = [("in-process `run_workload`", "in_process_run_workload"), *http_paths(r)]
    if not any("server_mean_ttft_ms" in run for _, k in paths for run in r[k]["runs"]):
        return []
    core = []
    if any("core_step_s" in run for _, k in http_paths(r) for run in r[k]["runs"]):
        def runs(x: dict, key: str, fmt: str) -> str:
            return ", ".join(format(run[key], fmt) for run in x["runs"])

        core = [f"The engine core's working time per run, s (admission: taking and applying commands; step; "
                f"messages), and its turns longer than {LONG_TURN} s, each run:", "",
                "| path | admission s | step s | messages s | turns > 0.25 s |", "|---|---|---|---|---|",
                *[f"| {label} | {runs(r[k], 'core_admit_s', '.3f')} | {runs(r[k], 'core_step_s', '.2f')} | "
                  f"{runs(r[k], 'core_output_s', '.3f')} | {runs(r[k], 'core_long_turns', '.0f')} |"
                  for label, k in http_paths(r)], ""]
        slow = [f"- {label}, run {i + 1}: {line}" for label, k in http_paths(r)
                for i, run in enumerate(r[k]["runs"]) for line in run.get("slow_turns", [])]
        if any("slow_turns" in run for _, k in http_paths(r) for run in r[k]["runs"]):
            core += ["The engine core's turns longer than 0.5 s, as its log gave them, each run:", "",
                     *(slow or ["- none"]), ""]
    return ["| path | client mean TTFT ms | server mean TTFT ms | server mean queue ms | client mean E2E ms | "
            "server mean E2E ms | send spread ms |", "|---|---:|---:|---:|---:|---:|---:|",
            *[f"| {label} | {med(r[k], 'mean_ttft_ms')} | {med(r[k], 'server_mean_ttft_ms')} | "
              f"{med(r[k], 'server_mean_queue_ms')} | {med(r[k], 'mean_e2el_ms')} | "
              f"{med(r[k], 'server_mean_e2e_ms')} | {med(r[k], 'send_spread_ms')} |" for label, k in paths], "",
            *core]


if __name__ == "__main__":
    main()
