"""The fused decoder-layer kernels (``models/triton_ops.py``) against their torch fallbacks.

The kernels run in a child process under Triton's interpreter (see ``test_triton_decode.py`` for
why a child); the GPU test runs them compiled. float32 must match the fallback to rounding of the
reduction order; bf16 to a bf16 rounding or two (the fallback rounds every product, the kernels
emulate each of those roundings; the interpreter rounds toward zero, the GPU to nearest even).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cases(ops, device: str) -> dict:
    """Max |kernel - fallback| per op and dtype, and the fallback's magnitude."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in DTYPES.items():
        x = torch.randn(5, 96, generator=gen).to(device, dtype)
        res = torch.randn(5, 96, generator=gen).to(device, dtype)
        w = (1 + 0.1 * torch.randn(96, generator=gen)).to(device, dtype)
        for with_res in (False, True):
            r = res if with_res else None
            got, got_res = ops.add_rms_norm(x, r, w, 1e-5, use_triton=True)
            ref, ref_res = ops.add_rms_norm(x, r, w, 1e-5, use_triton=False)
            out[f"norm_{name}_{with_res}"] = [float((got.float() - ref.float()).abs().max()),
                                               float((got_res.float() - ref_res.float()).abs().max()),
                                               max(float(ref.float().abs().max()), float(ref_res.float().abs().max()))]
        # q as a view of a wider projection (head stride 2 D), as RoPE gets it; D = 24 (no power of two).
        q = torch.randn(7, 3, 48, generator=gen).to(device, dtype)[:, :, :24]
        pos = torch.arange(7)
        ang = pos[:, None].float() * torch.rand(12, generator=gen)[None, :]
        cos, sin = ang.cos().to(device, dtype)[:, None], ang.sin().to(device, dtype)[:, None]
        got = ops.rotary(q, cos, sin, use_triton=True)
        ref = ops.rotary(q, cos, sin, use_triton=False)
        out[f"rotary_{name}"] = [float((got.float() - ref.float()).abs().max()), 0.0, float(ref.float().abs().max())]
        # k as the fused qkv_proj output gives it: rows [q (3 heads), k (2 heads), v (2 heads)] of D = 24,
        # so row stride 7 D, head stride D, starting 3 D into each row.
        qkv = torch.randn(7, 7 * 24, generator=gen).to(device, dtype)
        k = qkv[:, 72:120].view(7, 2, 24)
        got = ops.rotary(k, cos, sin, use_triton=True)
        ref = ops.rotary(k, cos, sin, use_triton=False)
        out[f"rotary_fused_{name}"] = [float((got.float() - ref.float()).abs().max()), 0.0,
                                       float(ref.float().abs().max())]
        gu = torch.randn(4, 2 * 1500, generator=gen).to(device, dtype)  # gate and up as column halves
        got = ops.silu_mul(gu[:, :1500], gu[:, 1500:], use_triton=True)
        ref = ops.silu_mul(gu[:, :1500], gu[:, 1500:], use_triton=False)
        out[f"silu_{name}"] = [float((got.float() - ref.float()).abs().max()), 0.0, float(ref.float().abs().max())]
    return out


def _child_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from kvscope.models import triton_ops

    print(json.dumps(_cases(triton_ops, "cpu")))


@pytest.fixture(scope="module")
def interpreted(triton_interpreter) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__)
    code = f"import sys; sys.path.insert(0, {str(here.parent)!r}); import {here.stem} as t; t._child_main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _judge(results: dict) -> None:
    for key, (diff, res_diff, scale) in results.items():
        # bf16: two roundings (the interpreter rounds toward zero where the GPU and torch round to
        # nearest even, and RoPE rounds three times).
        tol = 1e-5 * scale if "float32" in key else 2 ** -6 * scale
        assert diff <= tol, (key, diff, scale)
        assert res_diff <= tol, (key, res_diff)  # one add, rounded once in both


@pytest.mark.parametrize("op", ["norm", "rotary", "silu"])
def test_interpreted_kernels_match_fallback(interpreted, op):
    _judge({k: v for k, v in interpreted.items() if k.startswith(op)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_match_fallback():
    from kvscope.models import triton_ops

    _judge(_cases(triton_ops, "cuda"))
