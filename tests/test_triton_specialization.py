"""Serving never needs a second compile of a Triton kernel: what Triton specialises a launch on
stays the same from step to step.

Triton compiles a kernel once per combination of its integer arguments' class (equal to 1,
divisible by 16, other) and its pointer arguments' 16-byte alignment, except for the arguments a
kernel lists in ``do_not_specialize``. A class that follows the step (a block table's width, a view
at an offset that depends on the batch) means a compile in the middle of serving, seconds during
which every stream waits (the ``h200`` study's OPT ``h2o`` rows). A child process serves varied
steps (prompts of 3-400 tokens, alone, staggered and all at once) with the Triton backend under
Triton's interpreter, records each launch's classes by those rules, and the test asserts one
combination per kernel and set of constexprs.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = r'''
import collections, random, sys
import torch
import triton.runtime.interpreter as I
from kvscope.bench.serve import run_workload
from kvscope.llm import LLM
from kvscope.workload.requests import WorkloadRequest, with_arrivals

SEEN = collections.defaultdict(set)
run = I.InterpretedFunction.run


def cls(v):
    if isinstance(v, bool) or not isinstance(v, (int, torch.Tensor)):
        return "-"
    if isinstance(v, int):
        return "1" if v == 1 else ("16" if v % 16 == 0 else "i")
    return "aligned" if v.data_ptr() % 16 == 0 else "unaligned"


def recording(self, *args, grid, warmup, **kwargs):
    skip = {a if isinstance(a, int) else self.arg_names.index(a) for a in self.kwargs.get("do_not_specialize") or []}
    constexprs = tuple(sorted((k, str(v)) for k, v in kwargs.items() if k.isupper()))
    SEEN[(self.fn.__name__, constexprs)].add(tuple("-" if i in skip else cls(a) for i, a in enumerate(args)))
    return run(self, *args, grid=grid, warmup=warmup, **kwargs)


I.InterpretedFunction.run = recording
rng = random.Random(0)
# Tables of 1 block, of 16 (250 tokens and a few more), and of other widths; chunks of one prompt and of many.
lengths = [3, 9, 17, 100, 250, 300] + [rng.randint(3, 400) for _ in range(3)]
reqs = [WorkloadRequest([rng.randrange(1, 500) for _ in range(n)], output_len=rng.randint(1, 12), prompt_len=n)
        for n in lengths]
names = {}
for strategy in sys.argv[1].split(";"):
    llm = LLM("dummy:tiny-opt", strategy, dtype="float32", kv_memory_bytes=64 << 20, max_num_batched_tokens=512,
              max_model_len=1024, attention_backend="triton")
    run_workload(llm, reqs, mode="offline")
    run_workload(llm, with_arrivals(reqs, [i * 0.02 for i in range(len(reqs))]), mode="timed")
    for r in reqs[:2]:
        run_workload(llm, [r], mode="offline")
bad = {f"{name} {cx}": sorted(specs) for (name, cx), specs in SEEN.items() if len(specs) > 1}
print("kernels", len(SEEN), "varying", bad)
'''


@pytest.mark.parametrize("strategies", ["paged;h2o:heavy_ratio=0.1,recent_ratio=0.1",
                                        "snapkv:budget_ratio=0.2;quest:budget_ratio=0.2"])
def test_each_kernel_launches_with_one_specialisation_whatever_the_step(triton_interpreter, strategies):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", CHILD, strategies], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("kernels ") and int(line.split()[1]) > 0, res.stdout[-2000:]
    assert line.endswith("varying {}"), line
