"""The KV write in Triton: one launch stores a step's new keys and values at their slots.

Layout (the engine's ``SlotKVCache``): ``kv[layer, 0]`` and ``kv[layer, 1]`` are the K and V caches,
``[num_slots, Hkv, D]`` each. The torch path does this with two ``index_copy_`` calls (two
launches, plus a dtype cast of each input when it differs from the cache's); here one program per
new token copies both its K and V rows, casting on the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kernel(
    k_ptr, v_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
    stride_kn, stride_kh,
    stride_vn, stride_vh,
    stride_kcs, stride_kch,
    stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, H_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):
    """One new token ``i``: ``k_cache[slots[i]] = k[i]`` and ``v_cache[slots[i]] = v[i]`` (all heads);
    nothing for a negative slot."""
    i = tl.program_id(0)
    # int64: slot * stride exceeds 2**31 in a pool of a few GiB.
    slot = tl.load(slots_ptr + i).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    if slot >= 0:
        k = tl.load(k_ptr + i * stride_kn + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + i * stride_vn + h[:, None] * stride_vh + d[None, :], mask=mask)
        tl.store(
            k_cache_ptr + slot * stride_kcs + h[:, None] * stride_kch + d[None, :],
            k.to(k_cache_ptr.dtype.element_ty),
            mask=mask,
        )
        tl.store(
            v_cache_ptr + slot * stride_vcs + h[:, None] * stride_vch + d[None, :],
            v.to(v_cache_ptr.dtype.element_ty),
            mask=mask,
        )


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys and values at their slots, in place.

    Args:
        k, v: ``[N, Hkv, D]`` new keys/values (any float dtype; cast to the cache's on the store).
        k_cache, v_cache: ``[num_slots, Hkv, D]``, last dim contiguous.
        slot_mapping: ``[N]`` int32 or int64 destination slot of each token; slots must be distinct
            (as in a step, where each new token gets its own slot), else the winner is unspecified.
            A negative slot skips its token: the padding rows of a captured CUDA graph's batch.
    """
    n, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[1:] != k.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"shapes do not match: k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    if slot_mapping.shape != (n,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be [{n}] int32/int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV cache: the head dimension must be contiguous")
    if n == 0:
        return
    # The model's k and v are usually views of a projection's output; only the last dim must be dense.
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    slot_mapping = slot_mapping.contiguous()
    _write_kernel[(n,)](
        k, v, slot_mapping, k_cache, v_cache,
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        NUM_KV_HEADS=num_kv_heads, H_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
