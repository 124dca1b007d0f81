"""The row gather/scatter kernel (``attention/triton_gather.py``) against ``index_select`` /
``index_copy_``: through Triton's interpreter on CPU (in a child process, for the reason given in
``test_triton_decode.py``), and compiled, reading pinned host memory, on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

CHILD = r"""
import torch
from kvscope.attention.triton_gather import gather_rows, scatter_rows
gen = torch.Generator().manual_seed(0)
for width, rows, m in ((128, 50, 37), (96, 20, 5), (8, 300, 257)):  # 96: not a power of two
    src = torch.randn(2, rows, width, generator=gen)
    idx = torch.randint(0, rows, (m,), generator=gen)
    got = gather_rows(src, idx, use_triton=True)
    assert torch.equal(got, src.index_select(1, idx)), width
    assert torch.equal(gather_rows(src, idx, use_triton=True, sort=True), got), width
    # Fewer programs than row blocks: each program loops over several.
    assert torch.equal(gather_rows(src, idx, use_triton=True, sort=True, max_programs=2), got), width
    valid = torch.rand(m, generator=gen) < 0.5
    out = torch.full((2, m, width), -7.0)
    gather_rows(src, idx, out=out, use_triton=True, valid=valid, sort=True)
    assert torch.equal(out[:, valid], got[:, valid]) and bool((out[:, ~valid] == -7).all()), width
    dst = torch.zeros(2, rows, width)
    uniq = torch.randperm(rows, generator=gen)[: min(m, rows)]
    new = torch.randn(2, uniq.numel(), width, generator=gen)
    scatter_rows(dst, uniq, new, use_triton=True, max_programs=1)
    assert torch.equal(dst, torch.zeros(2, rows, width).index_copy_(1, uniq, new)), width
print("ok")
"""


def test_gather_and_scatter_in_interpreter(triton_interpreter):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_from_pinned_host_memory(dtype):
    from kvscope.attention.triton_gather import gather_rows, scatter_rows

    src = torch.randn(2, 1000, 128).to(dtype).pin_memory()
    idx = torch.randint(0, 1000, (333,))
    got = gather_rows(src, idx.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), src.index_select(1, idx))
    looped = gather_rows(src, idx.cuda(), sort=True, max_programs=3)
    assert torch.equal(looped.cpu(), src.index_select(1, idx))
    dst = torch.zeros(2, 1000, 128, dtype=dtype).pin_memory()
    uniq = torch.randperm(1000)[:100]
    new = torch.randn(2, 100, 128, device="cuda").to(dtype)
    scatter_rows(dst, uniq.cuda(), new, max_programs=2)
    torch.cuda.synchronize()
    assert torch.equal(dst[:, uniq], new.cpu())
