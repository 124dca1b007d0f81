"""vLLM as a peer in kvscope's GPU benchmarks: the same workloads, run offline in vLLM's own process.

A benchmark aid, never a dependency of kvscope: ``end_to_end.py --vllm`` runs this file as a
subprocess before it loads kvscope's model, so that each engine has the GPU to itself. vLLM must
be importable in that process (carried onto the GPU machine; see the GPU notes).

Input (``--job FILE``, JSON): ``preset`` (a kvscope dummy preset: its shapes become an HF
``config.json`` and vLLM loads random weights with ``load_format="dummy"``), ``workloads``
(``{name: [[prompt_len, output_len], ...]}``), ``repeats``, ``max_num_seqs``, ``sampling``
(``temperature``, ``top_p``, ``top_k`` of every request; default greedy),
``max_num_batched_tokens``, ``max_model_len``, optional ``kv_tokens`` (the KV pool in tokens, given to
vLLM as ``num_gpu_blocks_override`` blocks of 16) and ``gpu_memory_utilization``.
Prompts are the same random token ids as kvscope's runs (``end_to_end.prompts``, seeds 0..repeats:
seed 0 warms up, as for kvscope). Every request generates exactly its output length (EOS ignored). Throughput = output tokens / wall time of ``LLM.generate``; median of the repeats.
Output (``--out FILE``, JSON): ``{"version", "engine_s", "config", "results": {name: {...}}}``.

A job with ``decode_points`` (``[[batch, context], ...]``) instead of ``workloads`` times vLLM's decode
step at each point as ``generate_decode.py`` defines it (differenced generate calls); its
``results`` are ``{"BxT": {"step_ms", ...}}``.
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
from pathlib import Path

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is not carried
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

sys.path.insert(0, str(Path(__file__).parent))

BLOCK = 16  # vLLM's default KV block size on CUDA


def write_config(preset: str, folder: Path) -> None:
    """An HF ``config.json`` with the preset's shapes (vLLM reads nothing else with dummy weights)."""
    from transformers import LlamaConfig

    from kvscope.models.dummy import PRESETS

    d = {k: v for k, v in PRESETS[preset].items() if k != "model_type"}
    cfg = LlamaConfig.from_dict(d | {"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0,
                                     "torch_dtype": "bfloat16"})
    cfg.save_pretrained(folder)


def run_job(job: dict) -> dict:
    """``job`` run by this file in a subprocess; its JSON output, with ``error`` if it failed."""
    tmp = Path(tempfile.mkdtemp(prefix="e2e-vllm-"))
    (tmp / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, __file__, "--job", str(tmp / "job.json"),
                           "--out", str(tmp / "out.json")], capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
    out = json.loads((tmp / "out.json").read_text()) if (tmp / "out.json").is_file() else {}
    if proc.returncode:
        out["error"] = f"vllm_peer.py exited {proc.returncode}: {proc.stderr[-400:]}"
    return out


def run_vllm(preset: str, live: dict[str, list[tuple[int, int]]], repeats: int, max_seqs: int, batched: int, max_model_len: int,
             pool: int | None, sampling: dict[str, float]) -> dict:
    """vLLM on the same workloads in its own process (``vllm_peer.py``); ``{}`` fields say why if it failed."""
    kv_tokens = None
    if pool:
        import torch

        from kvscope.models.dummy import preset_config

        kv_tokens = pool // preset_config(preset).kv_bytes_per_token(torch.bfloat16)
    job = {"preset": preset, "workloads": live, "repeats": repeats, "max_num_seqs": max_seqs,
           "max_num_batched_tokens": batched, "max_model_len": max_model_len, "kv_tokens": kv_tokens,
           "sampling": sampling}
    return run_job(job) | {"kv_tokens": kv_tokens}


def run_decode_job(job: dict, preset: str) -> dict:
    """vLLM's decode step at each of ``job["decode_points"]`` (see ``generate_decode.py``)."""
    from vllm import LLM

    from generate_decode import differenced_step_ms, vllm_run

    folder = Path(tempfile.mkdtemp(prefix="vllm-peer-"))
    write_config(preset, folder)
    t0 = time.perf_counter()
    llm = LLM(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              max_num_seqs=job["max_num_seqs"], max_num_batched_tokens=job["max_num_batched_tokens"],
              max_model_len=job["max_model_len"], enable_prefix_caching=False,
              gpu_memory_utilization=job.get("gpu_memory_utilization", 0.8))
    engine_s = time.perf_counter() - t0
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    results = {}
    for b, t in job["decode_points"]:
        results[f"{b}x{t}"] = differenced_step_ms(vllm_run(llm, b, t, vocab))
        print(f"vllm decode {b}x{t}: {results[f'{b}x{t}']['step_ms']:.2f} ms/step", flush=True)
    return {"engine_s": engine_s, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    job = json.loads(a.job.read_text())
    import vllm
    if job.get("decode_points"):
        out = run_decode_job(job, job["preset"])
        a.out.write_text(json.dumps({"version": vllm.__version__, "config": {
            k: job[k] for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len")}} | out))
        return
    from vllm import LLM, SamplingParams

    from end_to_end import prompts

    folder = Path(tempfile.mkdtemp(prefix="vllm-peer-"))
    write_config(job["preset"], folder)
    kw = {}
    if job.get("kv_tokens"):
        kw["num_gpu_blocks_override"] = -(-int(job["kv_tokens"]) // BLOCK)
    t0 = time.perf_counter()
    llm = LLM(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              max_num_seqs=job["max_num_seqs"], max_num_batched_tokens=job["max_num_batched_tokens"],
              max_model_len=job["max_model_len"], enable_prefix_caching=False,
              gpu_memory_utilization=job.get("gpu_memory_utilization", 0.8), **kw)
    engine_s = time.perf_counter() - t0
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    # vLLM's top_k -1 and kvscope's 0 both mean off.
    sampling = job.get("sampling") or {"temperature": 0.0}
    sampling = sampling | ({"top_k": -1} if sampling.get("top_k") == 0 else {})
    results = {}
    for name, lengths in job["workloads"].items():
        lengths = [(int(p), int(o)) for p, o in lengths]

        def make(seed: int, lens=lengths):
            ids = prompts(lens, vocab, seed)
            params = [SamplingParams(max_tokens=o, ignore_eos=True, detokenize=False, **sampling)
                      for _, o in lens]
            return [{"prompt_token_ids": p} for p in ids], params

        def run(x) -> int:
            outs = llm.generate(x[0], x[1], use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs)

        run(make(0, [(p, min(o, 16)) for p, o in lengths[:16]]))
        tok_s, secs = [], []
        for seed in range(1, job["repeats"] + 1):
            x = make(seed)
            t = time.perf_counter()
            n = run(x)
            secs.append(time.perf_counter() - t)
            tok_s.append(n / secs[-1])
        results[name] = {"tok_s": statistics.median(tok_s), "runs_tok_s": tok_s, "runs_s": secs, "output_tokens": n}
        print(f"vllm {name}: {results[name]['tok_s']:.0f} tok/s", flush=True)
        a.out.write_text(json.dumps({"version": vllm.__version__, "engine_s": engine_s, "config": kw | {
            k: job[k] for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len")}, "results": results}))


if __name__ == "__main__":
    main()
