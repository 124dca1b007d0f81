"""Pure-PyTorch attention over gathered KV: the reference path, on CPU and GPU.

Fast kernels are checked against these functions. Softmax scale is passed explicitly; grouped-query
attention maps query head ``h`` to KV head ``h // (num_heads // num_kv_heads)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# cuDNN's attention, which PyTorch prefers on Hopper, builds an execution plan for every new shape
# (hundreds of milliseconds): in serving, every new prompt length stalls the step that meets it.
# Flash and memory-efficient attention take any length; math is the CPU path.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _fused_ready(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``k``, ``v`` with their KV heads repeated to ``q``'s on CUDA, and whether grouped heads remain.

    PyTorch's fused attention kernels take neither grouped heads with a mask nor 3-D inputs; given
    either, it falls back to the math path, which materialises ``[heads, Tq, T]`` in float32 (three
    times the time of the whole model's prefill for a 3.8k-token prompt of SmolLM2 on an H100). A
    repeated copy of K/V is far cheaper. On CPU the math path is the only one, so nothing is copied.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1 and q.is_cuda:
        return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False
    return k, v, group > 1


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last ``Tq`` tokens of a sequence over all of its ``T`` cached tokens.

    Args:
        q: ``[Tq, Hq, D]`` queries at positions ``T - Tq .. T - 1``.
        k, v: ``[T, Hkv, D]`` keys/values of positions ``0 .. T - 1``.
    Returns:
        ``[Tq, Hq, D]``.
    """
    tq, t = q.shape[0], k.shape[0]
    k, v, gqa = _fused_ready(q, k, v)
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, D]
    if tq == 1:
        mask = None  # the newest token sees everything
        causal = False
    elif tq == t:
        mask, causal = None, True
    elif q.is_cuda:
        mask, causal = causal_lower_right(tq, t), False  # the fused kernels' bottom-right causal mask
    else:
        rows = torch.arange(t - tq, t, device=q.device)[:, None]
        mask = torch.arange(t, device=q.device)[None, :] <= rows
        causal = False
    with sdpa_kernel(_BACKENDS):
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=gqa)
    return out[0].transpose(0, 1)


def attend_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query token per sequence over padded per-sequence KV.

    Args:
        q: ``[B, Hq, D]``.
        k, v: ``[B, Tmax, Hkv, D]``; entries at or past ``lens[b]`` are padding.
        lens: ``[B]`` int64 valid lengths (>= 1).
    Returns:
        ``[B, Hq, D]``.
    """
    tmax = k.shape[1]
    mask = (torch.arange(tmax, device=q.device)[None, :] < lens[:, None])[:, None, None, :]
    k, v, gqa = _fused_ready(q, k.transpose(1, 2), v.transpose(1, 2))  # heads on dim 1: [B, H, T, D]
    with sdpa_kernel(_BACKENDS):
        out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[:, :, 0, :]
