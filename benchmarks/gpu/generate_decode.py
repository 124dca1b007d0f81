"""Decode step time read off whole ``generate`` calls, measured the same way for kvscope and vLLM.

``decode_step.py`` times kvscope's step from the inside (requests injected at their context, one
step timed). No such hook exists in another engine, so the side-by-side figure is taken from the
outside, identically for both: for a point (batch B, context T), B requests of T random prompt
tokens are generated, all submitted at once, greedy with EOS ignored, once with ``N1`` and once with
``N2`` output tokens each. Prefill and the first ``N1`` steps are common to both calls; the
difference of their wall times over ``N2 - N1`` is one decode step at batch B and context
T + N1 .. T + N2, with everything the engine does per step (scheduling, sampling, output
bookkeeping) and no prefill. Medians of ``repeats`` calls of each length, after one warm-up call
(which also captures or compiles the shapes), each call on prompts no other call used, and prefix
caching off in both engines.

This module imports neither engine: ``decode_step.py`` drives kvscope through :func:`kvscope_run`,
``vllm_peer.py`` drives vLLM in its own process.
"""
from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from kvscope.engine.engine import LLMEngine

#: Output lengths of the two calls. 32 steps let every request of a 64 x 2048 batch finish its
#: chunked prefill (16 chunks of 8192 tokens) before the shorter call ends; 128 steps between the
#: two keep the difference far above the run-to-run noise of a call.
N1, N2 = 32, 160
REPEATS = 3


def point_prompts(batch: int, context: int, vocab: int, seed: int) -> list[list[int]]:
    """``batch`` prompts of ``context`` random token ids (seeded by the point and ``seed``)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 100_003 + context)
    return torch.randint(0, vocab, (batch, context), generator=gen).tolist()


def differenced_step_ms(run: Callable[[int, int], float], n1: int = N1, n2: int = N2,
                        repeats: int = REPEATS) -> dict:
    """One decode step in ms from ``run(max_tokens, seed) -> wall seconds`` (see the module docstring)."""
    run(n1, 0)
    # Every call on prompts of its own: a prompt seen before would hit kvscope's prefix cache and
    # skip its prefill in one call of the pair only.
    short = [run(n1, seed) for seed in range(1, repeats + 1)]
    long = [run(n2, seed) for seed in range(repeats + 1, 2 * repeats + 1)]
    step_ms = (statistics.median(long) - statistics.median(short)) / (n2 - n1) * 1e3
    return {"step_ms": step_ms, "n1": n1, "n2": n2, "n1_runs_s": short, "n2_runs_s": long}


def kvscope_run(engine: LLMEngine, batch: int, context: int) -> Callable[[int, int], float]:
    """``run(max_tokens, seed)`` for :func:`differenced_step_ms`: the engine's own generate loop."""
    from kvscope.engine.sampling_params import SamplingParams

    vocab = engine.model_config.vocab_size

    def run(max_tokens: int, seed: int) -> float:
        prompts = point_prompts(batch, context, vocab, seed)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        for p in prompts:
            engine.add_request(p, params)
        done = 0
        while engine.has_unfinished_requests():
            done += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
        elapsed = time.perf_counter() - t0
        if done != batch * max_tokens:
            raise RuntimeError(f"kvscope generated {done} tokens, expected {batch} x {max_tokens}")
        return elapsed

    return run


def vllm_run(llm, batch: int, context: int, vocab: int) -> Callable[[int, int], float]:
    """``run(max_tokens, seed)`` for :func:`differenced_step_ms` through vLLM's ``LLM.generate``."""
    from vllm import SamplingParams

    def run(max_tokens: int, seed: int) -> float:
        prompts = [{"prompt_token_ids": p} for p in point_prompts(batch, context, vocab, seed)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        done = sum(len(o.outputs[0].token_ids) for o in outs)
        if done != batch * max_tokens:
            raise RuntimeError(f"vLLM generated {done} tokens, expected {batch} x {max_tokens}")
        return elapsed

    return run


def markdown(rows: list[dict], vllm: dict) -> list[str]:
    """The side-by-side section of ``decode_step.md``."""
    if not rows:
        return []
    lines = ["", "## Side by side with vLLM: decode step from whole generate calls", "",
             f"Both engines measured the same way (`generate_decode.py`): B requests of T random tokens, all at "
             f"once, greedy, EOS ignored; (wall time with {N2} output tokens - with {N1}) / {N2 - N1} = one decode "
             f"step with scheduling, sampling and output handling, no prefill; medians of {REPEATS} calls after a "
             "warm-up. Roofline: weights + KV at the mean context of the differenced steps, at the copy bandwidth "
             f"above. vLLM: {vllm.get('version', '-')}, default CUDA graphs and compilation, prefix caching off"
             + (f"; not run: {vllm['error'][:300]}" if vllm.get("error") else "") + ".", "",
             "| batch | context | roofline ms | kvscope ms | kvscope % | vLLM ms | vLLM % | kvscope / vLLM speed |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        k, v = r.get("kvscope_ms"), r.get("vllm_ms")
        lines.append(f"| {r['batch']} | {r['context']} | {r['roofline_ms']:.2f} | "
                     + (f"{k:.2f} | {r['roofline_ms'] / k:.0%}" if k else "- | -") + " | "
                     + (f"{v:.2f} | {r['roofline_ms'] / v:.0%}" if v else "- | -") + " | "
                     + (f"{v / k:.2f}x" if k and v else "-") + " |")
    return lines


def side_by_side(engine: LLMEngine, points: list[tuple[int, int]], vllm: dict,
                 roofline_ms: Callable[[int, float], float]) -> list[dict]:
    """kvscope's differenced decode step at ``points`` on ``engine`` beside vLLM's (``vllm_peer``
    output, measured before in its own process); ``roofline_ms(batch, mean context)``."""
    rows = []
    for b, t in points:
        k = differenced_step_ms(kvscope_run(engine, b, t))
        v = vllm.get("results", {}).get(f"{b}x{t}", {})
        rows.append({"batch": b, "context": t, "roofline_ms": roofline_ms(b, t + (N1 + N2) / 2),
                     "kvscope_ms": k["step_ms"], "kvscope": k, "vllm_ms": v.get("step_ms"), "vllm": v})
        print(f"generate decode {b}x{t}: kvscope {k['step_ms']:.2f} ms, vLLM {v.get('step_ms') or float('nan'):.2f} ms",
              flush=True)
    return rows


def engine_limits(points: list[tuple[int, int]]) -> dict:
    """Engine limits both systems get for ``points``: room for the longest call of every point."""
    return {"max_num_seqs": max(b for b, _ in points), "max_num_batched_tokens": 8192,
            "max_model_len": max(t for _, t in points) + N2 + 16}


def kv_pool_bytes(points: list[tuple[int, int]], kv_bytes_per_token: int) -> int:
    """kvscope's pool: the largest point's requests at full length, whole blocks, with a margin."""
    return max(b * (t + N2 + 32) for b, t in points) * kv_bytes_per_token
