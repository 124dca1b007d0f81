"""The quantizers of the ``quant`` strategy: pure torch functions, the reference of every kernel.

Two codecs:

* **fp8** (vLLM's ``kv_cache_dtype="fp8"``): ``q = fp8_e4m3(clamp(x / scale, +-448))``,
  ``x' = float(q) * scale``, with ``scale`` float32 per tensor or per KV head.
* **int8 / int4** (KIVI, Liu et al., 2024): asymmetric min/max quantization over a group,
  ``scale = (max - min) / (2^bits - 1)`` (IEEE float32 division), ``zero = min``, both stored as float16;
  ``q = clamp(round((x - zero) / scale), 0, 2^bits - 1)`` with the stored (float16-rounded) scale
  and zero, ``x' = q * scale + zero`` in float32. Keys are quantized **per channel** (the group is
  the block's tokens: KIVI's outlier channels get their own range), values **per token** (the
  group is ``value_group`` consecutive channels of one token). int4 packs two codes per byte, the
  even channel in the low nibble.
"""
from __future__ import annotations

import torch

#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0
#: vLLM's dynamic KV scales (``K_SCALE_CONSTANT``, ``V_SCALE_CONSTANT``): ``scale = amax / range``
#: leaves 448 / range of headroom for later tokens larger than the calibration's.
FP8_K_RANGE = 200.0
FP8_V_RANGE = 100.0
#: Smallest scale (a constant group of zeros would otherwise divide by zero); float16's smallest
#: normal number, so that the stored scale keeps its relative precision.
MIN_SCALE = 2.0**-14
SCALE_DTYPE = torch.float16


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` ``[..., Hkv, D]`` at float32 ``scale`` (broadcast, e.g. ``[Hkv, 1]``) -> float8_e4m3fn codes."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fp8_quantize`, float32."""
    return q.float() * scale


def fp8_scale(x: torch.Tensor, value_range: float, per_head: bool) -> torch.Tensor:
    """Calibrated scales ``[Hkv]`` float32 from ``x`` ``[N, Hkv, D]``: ``amax / value_range``, the
    amax per KV head or over the whole tensor (then the same for every head)."""
    amax = x.float().abs().amax(dim=(0, 2))
    if not per_head:
        amax = amax.amax().expand_as(amax)
    return (amax / value_range).clamp_min(MIN_SCALE).contiguous()


def int_quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of ``x`` over ``dim`` (the group).

    Returns ``(codes, scale, zero)``: ``codes`` uint8 of ``x``'s shape (unpacked), ``scale`` and
    ``zero`` float16 with ``dim`` kept as size 1.
    """
    x = x.float()
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    # Divided by a tensor, not by the number: on CUDA torch divides by a Python scalar through its
    # float32 reciprocal, which moves a scale by an ulp now and then; IEEE division on every device
    # is also what the captured step's write computes (attention/triton_kivi_write.py).
    scale = ((hi - lo) / torch.full_like(hi, levels)).clamp_min(MIN_SCALE).to(SCALE_DTYPE)
    zero = lo.to(SCALE_DTYPE)
    codes = ((x - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def int_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`int_quantize` (``scale``/``zero`` broadcast over the group), float32."""
    return codes.float() * scale.float() + zero.float()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` uint8 codes below 16 -> ``[..., D / 2]`` bytes, channel ``2j`` in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., D / 2]`` -> ``[..., D]``."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def kivi_quantize_block(
    k: torch.Tensor, v: torch.Tensor, bits: int, value_group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KIVI's layout for full blocks ``k``, ``v`` ``[nb, G, Hkv, D]`` (``G`` tokens each).

    Returns ``(kq, k_scale, k_zero, vq, v_scale, v_zero)``: codes ``[nb, G, Hkv, D * bits / 8]``
    uint8 (packed for int4); key scale/zero ``[nb, Hkv, D]`` (per channel over the block's
    tokens); value scale/zero ``[nb, G, Hkv, D / value_group]`` (per token, per channel group).
    """
    kq, ks, kz = int_quantize(k, bits, dim=1)
    nb, g, h, d = v.shape
    vq, vs, vz = int_quantize(v.reshape(nb, g, h, d // value_group, value_group), bits, dim=-1)
    vq = vq.reshape(nb, g, h, d)
    if bits == 4:
        kq, vq = pack_int4(kq), pack_int4(vq)
    return kq, ks[:, 0], kz[:, 0], vq, vs[..., 0], vz[..., 0]


def kivi_dequantize_block(
    kq: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
    vq: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`kivi_quantize_block`: K and V ``[nb, G, Hkv, D]`` float32."""
    if bits == 4:
        kq, vq = unpack_int4(kq), unpack_int4(vq)
    k = int_dequantize(kq, k_scale[:, None], k_zero[:, None])
    nb, g, h, d = vq.shape
    groups = v_scale.shape[-1]
    v = int_dequantize(vq.reshape(nb, g, h, groups, d // groups), v_scale[..., None], v_zero[..., None])
    return k, v.reshape(nb, g, h, d)
