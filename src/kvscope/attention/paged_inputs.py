"""Argument checks and block views shared by the paged Triton kernels (decode and prefill)."""
from __future__ import annotations

import torch


def as_blocks(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[num_slots, Hkv, D]`` (the engine's flat slot layout) or ``[num_blocks, block_size, Hkv, D]``
    -> ``[num_blocks, block_size, Hkv, D]``."""
    if cache.dim() == 3:
        cache = cache.view(-1, block_size, *cache.shape[1:])
    if cache.dim() != 4 or cache.shape[1] != block_size:
        raise ValueError(f"KV cache of shape {tuple(cache.shape)} is not [num_blocks, {block_size}, Hkv, D]")
    if cache.stride(-1) != 1:
        raise ValueError("KV cache: the head dimension must be contiguous")
    return cache


def check_paged_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int, *int32: torch.Tensor,
    cache_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the arguments both paged kernels share; returns the K/V caches as block views
    ``[num_blocks, block_size, Hkv, D]``. ``int32``: index tensors (tables, lengths) that must be int32.
    ``cache_dtype``: the K/V caches' dtype when it is not q's (fp8 codes: uint8)."""
    k_cache = as_blocks(k_cache, block_size)
    v_cache = as_blocks(v_cache, block_size)
    num_heads, head_dim = q.shape[1], q.shape[2]
    if num_heads % k_cache.shape[2] or k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"shapes do not match: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    if cache_dtype is not None:
        if not (k_cache.dtype == v_cache.dtype == cache_dtype) or q.stride(-1) != 1:
            raise ValueError(f"k_cache and v_cache must be {cache_dtype}, and q's last dim contiguous")
    elif not (q.dtype == k_cache.dtype == v_cache.dtype) or q.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must share one dtype, with contiguous last dims")
    if any(t.dtype != torch.int32 for t in int32):
        raise ValueError("block tables, sequence offsets and lengths must be int32")
    return k_cache, v_cache


def check_varlen_batch(cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
    """A varlen prefill batch's per-sequence tensors agree on its size ``B``: ``cu_seqlens_q``
    ``[B + 1]``, ``context_lens`` ``[B]``, ``block_tables`` ``[B, max_blocks]``."""
    batch = context_lens.shape[0]
    if cu_seqlens_q.shape != (batch + 1,) or block_tables.shape[0] != batch:
        raise ValueError(
            f"batch sizes do not match: cu_seqlens_q {tuple(cu_seqlens_q.shape)}, context_lens "
            f"{tuple(context_lens.shape)}, block_tables {tuple(block_tables.shape)}"
        )


def check_fold_scores(fold_scores: torch.Tensor, num_kv_heads: int) -> None:
    """A layer's per-slot scores that a kernel adds its column sums to: ``[num_slots, Hkv]`` float32
    with contiguous heads."""
    if fold_scores.dtype != torch.float32 or fold_scores.dim() != 2 or fold_scores.stride(1) != 1 \
            or fold_scores.shape[1] != num_kv_heads:
        raise ValueError(f"fold_scores must be [num_slots, {num_kv_heads}] float32 with contiguous heads, "
                         f"got {tuple(fold_scores.shape)} {fold_scores.dtype}")
