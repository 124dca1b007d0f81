"""Flash-decoding pieces shared by the decode kernels: choosing a split count, cutting a sequence
into splits, finishing a split, and merging the splits' partial outputs.

A decode kernel with a split runs one program per (sequence, KV head, split). Each program covers
the contiguous token range :func:`split_bounds` gives it and writes, per query head, its
softmax-normalised partial output ``[B, Hq, S, D]`` (float32) and base-2 log-sum-exp
``[B, Hq, S]`` (``-inf`` for an empty split); :func:`merge_splits` then combines them. With one
split the kernel writes the final output directly and no merge runs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Split so that at least this many (sequence, KV head, split) programs run per multiprocessor:
# with fewer, too few K/V tiles are in flight to cover memory latency.
_PROGRAMS_PER_SM = 1
# A split shorter than this spends a noticeable share of its time on its fixed costs (loading q,
# writing the float32 partial output) and on the merge.
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 64


def default_num_splits(batch: int, num_kv_heads: int, max_tokens: int, device: torch.device) -> int:
    """Splits per sequence so that ``batch * num_kv_heads * splits`` programs fill the device.

    Decided from shapes alone (no device-to-host read of the lengths), against ``max_tokens``,
    the block table's capacity: the smallest power of two giving ``_PROGRAMS_PER_SM`` programs per
    multiprocessor, but no split shorter than ``_MIN_SPLIT_TOKENS``. A power of two because
    lengths usually are multiples of large powers of two, and then every split gets the same
    number of tiles (an uneven last split leaves the device idle while the others finish).
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.next_power_of_2(math.ceil(_PROGRAMS_PER_SM * sms / (batch * num_kv_heads)))
    longest = 1 << (max(max_tokens // _MIN_SPLIT_TOKENS, 1).bit_length() - 1)  # power of two, rounded down
    return min(wanted, longest, _MAX_SPLITS)


@triton.jit
def split_bounds(ctx, num_splits, split, ALIGN: tl.constexpr):
    """Token range ``[lo, hi)`` of split ``split`` of a sequence of ``ctx`` tokens (empty when
    ``lo >= hi``). Splits are cut per sequence so that short sequences in a long batch get short
    splits; their length is a multiple of ``ALIGN`` so that a tile never straddles two splits."""
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), ALIGN) * ALIGN
    lo = split * split_len
    return lo, tl.minimum(lo + split_len, ctx)


@triton.jit
def split_result(m, l, acc):
    """A split's online-softmax state (running max ``m`` and sum ``l`` ``[G]``, base 2; weighted
    sum ``acc`` ``[G, D]``) -> its normalised output ``[G, D]`` and log-sum-exp ``[G]``. An empty
    split (``l == 0``) gives output 0 and log-sum-exp ``-inf``: weight zero in the merge."""
    nonempty = l > 0
    l_safe = tl.where(nonempty, l, 1.0)
    lse = tl.where(nonempty, m + tl.log2(l_safe), float("-inf"))
    return acc / l_safe[:, None], lse


@triton.jit
def _merge_kernel(
    part_ptr, part_lse_ptr, out_ptr, lse_ptr,
    num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    """One (sequence, query head): merge the splits' outputs, weighted by their sum-exp.

    ``out = sum_s 2^(lse_s - lse) * o_s`` with ``lse = log2(sum_s 2^lse_s)``; also writes ``lse``.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    s_mask = s < num_splits
    d_mask = d < HEAD_DIM
    part_lse = tl.load(part_lse_ptr + b * stride_plb + h * stride_plh + s, mask=s_mask, other=float("-inf"))
    top = tl.max(part_lse, axis=0)  # finite: split 0 always holds the first token
    w = tl.exp2(part_lse - top)
    total = tl.sum(w, axis=0)
    part = tl.load(
        part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(w[:, None] * part, axis=0) / total
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out, mask=d_mask)
    tl.store(lse_ptr + b * stride_lb + h * stride_lh, top + tl.log2(total))


def merge_splits(part: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge ``part`` ``[B, Hq, S, D]`` float32 with ``part_lse`` ``[B, Hq, S]`` (base 2) into
    ``out`` ``[B, Hq, D]`` (any float dtype, last dim contiguous) and ``lse`` ``[B, Hq]`` float32."""
    batch, num_heads, num_splits, head_dim = part.shape
    _merge_kernel[(batch, num_heads)](
        part, part_lse, out, lse,
        num_splits,
        part.stride(0), part.stride(1), part.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1),
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), S_PAD=triton.next_power_of_2(num_splits),
        num_warps=4,
    )
