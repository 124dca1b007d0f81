"""Pure-PyTorch attention over gathered KV: the reference path, on CPU and GPU.

Fast kernels are checked against these functions. Softmax scale is passed explicitly; grouped-query
attention maps query head ``h`` to KV head ``h // (num_heads // num_kv_heads)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last ``Tq`` tokens of a sequence over all of its ``T`` cached tokens.

    Args:
        q: ``[Tq, Hq, D]`` queries at positions ``T - Tq .. T - 1``.
        k, v: ``[T, Hkv, D]`` keys/values of positions ``0 .. T - 1``.
    Returns:
        ``[Tq, Hq, D]``.
    """
    tq, t = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if tq == 1:
        mask = None  # the newest token sees everything
        causal = False
    elif tq == t:
        mask, causal = None, True
    else:
        rows = torch.arange(t - tq, t, device=q.device)[:, None]
        mask = torch.arange(t, device=q.device)[None, :] <= rows
        causal = False
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=kh.shape[0] != qh.shape[0]
    )
    return out.transpose(0, 1)


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
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=k.shape[2] != q.shape[1],
    )
    return out[:, :, 0, :]
