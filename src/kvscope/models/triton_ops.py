"""Fused elementwise kernels of the Llama-family decoder layer, in Triton, with torch fallbacks.

A decode step at small batch is a long chain of tiny kernels: each RMSNorm is four (cast, norm,
cast, scale), each residual add one, RoPE a dozen (split, four products, two sums, concatenation)
and SwiGLU's gate two. Inside a CUDA graph each still costs a few microseconds of launch and tail,
about as much as reading a small weight matrix. Here each is one kernel:

* :func:`add_rms_norm`: ``residual = x + residual`` (in the activation dtype, as the unfused model
  adds) and ``out = weight * rms_norm(residual)`` (normalised in float32, cast, then scaled: HF's
  ``LlamaRMSNorm``), one row per program;
* :func:`rotary`: rotate q and k by RoPE's ``cos``/``sin`` in one launch;
* :func:`silu_mul`: ``silu(gate) * up``.

Every intermediate is rounded to the activation dtype exactly where the torch path rounds it, so
float32 results match the fallback to float32 rounding and bf16 ones to within one bf16 rounding of
the reduction order. The kernels run on CUDA when Triton imports (``use_triton=None``); the torch
fallback runs everywhere else, and tests force the kernels through Triton's interpreter on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvscope.models.rope import rotate

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the torch path
    triton = None


def _use_triton(x: torch.Tensor, use_triton: bool | None) -> bool:
    return (x.is_cuda and triton is not None) if use_triton is None else use_triton


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                             HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # the exact sum, rounded to the dtype
            tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        normed = (xf * inv).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * n_cols + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xn, stride_xh,
                       HALF: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, H_PAD)[:, None]
        d = tl.arange(0, D_PAD)[None, :]
        mask = (h < heads) & (d < HALF)
        base = x_ptr + n * stride_xn + h * stride_xh + d
        x1 = tl.load(base, mask=mask, other=0.0)
        x2 = tl.load(base + HALF, mask=mask, other=0.0)
        c = tl.load(cos_ptr + n * HALF + d, mask=d < HALF, other=0.0)
        s = tl.load(sin_ptr + n * HALF + d, mask=d < HALF, other=0.0)
        dt = x1.dtype
        # Each product and sum rounded to the dtype, as the torch expression rounds them.
        a = (x1.to(tl.float32) * c.to(tl.float32)).to(dt)
        b = (x2.to(tl.float32) * s.to(tl.float32)).to(dt)
        e = (x2.to(tl.float32) * c.to(tl.float32)).to(dt)
        f = (x1.to(tl.float32) * s.to(tl.float32)).to(dt)
        out = out_ptr + n * heads * 2 * HALF + h * 2 * HALF + d
        tl.store(out, (a.to(tl.float32) - b.to(tl.float32)).to(dt), mask=mask)
        tl.store(out + HALF, (e.to(tl.float32) + f.to(tl.float32)).to(dt), mask=mask)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n_cols, stride_g, stride_u, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(out_ptr + row * n_cols + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual`` (or ``x`` when ``residual`` is None), then RMSNorm of it.

    Args:
        x, residual: ``[N, H]`` in the activation dtype.
        weight: ``[H]``, the norm's scale.
    Returns:
        ``(weight * rms_norm(residual), residual)``, both ``[N, H]``.
    """
    if not _use_triton(x, use_triton):
        if residual is not None:
            x = x + residual
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype), x
    x = x.contiguous()
    n, h = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _add_rms_norm_kernel[(n,)](x, residual.contiguous() if residual is not None else x, weight, out, res_out, h,
                               eps, HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(h), num_warps=8)
    return out, res_out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """Rotate ``x`` ``[N, H, D]`` (last dim contiguous) by ``cos``/``sin`` ``[N, 1, D/2]`` (in
    ``x``'s dtype) in the "rotate half" layout; returns a new contiguous ``[N, H, D]``."""
    if not _use_triton(x, use_triton):
        return rotate(x, cos, sin)
    n, heads, d = x.shape
    out = torch.empty(n, heads, d, dtype=x.dtype, device=x.device)
    if n:
        _rotary_kernel[(n,)](x, cos.contiguous(), sin.contiguous(), out, heads, x.stride(0), x.stride(1),
                             HALF=d // 2, H_PAD=triton.next_power_of_2(heads), D_PAD=triton.next_power_of_2(d // 2),
                             num_warps=4)
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for ``[N, I]`` inputs (rows may be strided, columns contiguous)."""
    if not _use_triton(gate, use_triton):
        return F.silu(gate) * up
    n, cols = gate.shape
    out = torch.empty(n, cols, dtype=gate.dtype, device=gate.device)
    block = 1024
    if n:
        _silu_mul_kernel[(n, triton.cdiv(cols, block))](gate, up, out, cols, gate.stride(0), up.stride(0),
                                                         BLOCK=block, num_warps=4)
    return out
