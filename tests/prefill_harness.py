"""What the interpreted tests of the Triton prefills share: the child process under Triton's
interpreter that runs every case and prints one JSON line, and (for ``quant``'s) the engine case:
the strategy on the Triton backend against its torch backend, and full-precision ``paged`` for scale."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ENGINE_NEW = 6


def run_engine_case(path: str, strategy: str, prefill_name: str) -> dict:
    """``strategy`` on the tiny checkpoint at ``path``: prompts of several chunks each
    (max_num_batched_tokens 16) with decode rows in the same steps as other requests' chunks
    (max_num_seqs 4); counts the calls of the step's prefill kernel ``prefill_name`` and of its decode
    kernel in steps that also hold chunks."""
    from kvscope import LLM, SamplingParams
    from kvscope.kv import quant_triton_step

    calls = {"prefill": 0, "mixed": 0}
    prefill, decode = getattr(quant_triton_step, prefill_name), quant_triton_step.quant_decode_attention

    def count_prefill(*args, **kwargs):
        calls["prefill"] += 1
        return prefill(*args, **kwargs)

    def count_decode(*args, **kwargs):  # decode rows of a step that also holds prefill chunks
        calls["mixed"] += 1
        return decode(*args, **kwargs)

    rng = random.Random(5)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (37, 5, 50, 21)]
    sp = SamplingParams(max_tokens=ENGINE_NEW, temperature=0.0, ignore_eos=True, return_logits=True)
    runs = {}
    # "paged" at full precision measures what quantization itself moves the logits by.
    runs_of = (("full", "paged", "torch"), ("torch", strategy, "torch"), ("triton", strategy, "triton"))
    setattr(quant_triton_step, prefill_name, count_prefill)
    quant_triton_step.quant_decode_attention = count_decode
    try:
        for name, spec, backend in runs_of:
            llm = LLM(path, strategy=spec, kv_memory_bytes=4 << 20, attention_backend=backend,
                      max_num_batched_tokens=16, max_num_seqs=4)
            runs[name] = (llm.engine.kv.setup.attention_backend, llm.generate(prompts, sp, use_tqdm=False))
    finally:
        setattr(quant_triton_step, prefill_name, prefill)
        quant_triton_step.quant_decode_attention = decode

    def max_diff(x, y):
        return max((torch.stack(a.outputs[0].logits) - torch.stack(b.outputs[0].logits)).abs().max().item()
                   for a, b in zip(x, y))

    (_, full), (_, ref), (used, got) = runs["full"], runs["torch"], runs["triton"]
    return {"backend": used, "tokens_equal": [a.token_ids for a in ref] == [b.token_ids for b in got],
            "max_logit_diff": max_diff(ref, got), "quant_logit_diff": max_diff(full, ref), **calls}


def run_jobs(jobs: dict[str, Callable[[], dict]]) -> None:
    """In the interpreter process: every job's result (or error) as one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = job()
        except Exception as e:  # reported by the case's own test in the parent
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))


def interpreted(test_file: str, tmp_path_factory) -> dict:
    """The results of ``test_file``'s ``_child_main(checkpoint)``, run under the interpreter in a child
    process with a fresh tiny Llama checkpoint."""
    from hf_ref import make_tiny_checkpoint

    checkpoint = tmp_path_factory.mktemp("llama")
    make_tiny_checkpoint("llama", checkpoint)
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(test_file)
    code = (f"import sys; sys.path.insert(0, {str(here.parent)!r}); import {here.stem} as t; "
            f"t._child_main({str(checkpoint)!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def ok(results: dict, name: str) -> dict:
    r = results[name]
    assert "error" not in r, r.get("error")
    return r
