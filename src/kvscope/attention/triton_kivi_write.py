"""KIVI's decode-step write in Triton, one launch per layer: the captured-graph form of
:meth:`KiviCache.write <kvscope.kv.quant_cache.KiviCache.write>` for one new token per row.

Every row of a captured step runs the same program, so the work is static: one program per (row,
KV head) reads its row's slot and, on the device, takes the branch its position calls for:

* the token is not the last of its group (``slot % G < G - 1``): it goes to the row's residual
  slot at offset ``slot % G``, as the eager write stores it;
* it completes its group: the group (the residual's ``G - 1`` earlier tokens, then this one) is
  quantized as :func:`~kvscope.kv.quant_codec.kivi_quantize_block` does (keys per channel, values
  per token over ``VG`` channels, float16 scale and zero, int4 two codes a byte) and stored in
  block ``slot // G``; the residual is not written (the slot is reused from offset 0);
* a padding row (slot -1) writes nothing.

So the quantization runs inside the graph, masked by the row's own position, rather than eagerly
around the replay: the step's attention must read the block it quantizes (a row that fills its
block reads all its tokens quantized, as the eager step does), and one program per row costs a
group's worth of work only in the rows that fill their block (1 step in ``G`` per row).

Bit-identical to the torch codec: bounds by min/max, scale ``(hi - lo) / levels`` and codes
``(x - zero) / scale`` by IEEE division (``div_rn``; the codec divides by a tensor for the same
reason, see :func:`~kvscope.kv.quant_codec.int_quantize`), float16 conversions round to nearest
even, codes rounded half to even (as ``torch.round``). No product feeds a sum but exact ones, so
floating-point contraction cannot change a result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvscope.kv.quant_cache import KiviCache
from kvscope.kv.quant_codec import MIN_SCALE

_MIN_SCALE = tl.constexpr(MIN_SCALE)


@triton.jit
def _scale_zero(lo, hi, LEVELS: tl.constexpr):
    """float16 scale and zero of groups with float32 bounds ``lo``/``hi`` (:func:`int_quantize`)."""
    scale = tl.maximum(tl.math.div_rn(hi - lo, tl.full(lo.shape, LEVELS, tl.float32)), _MIN_SCALE)
    return scale.to(tl.float16), lo.to(tl.float16)


@triton.jit
def _codes(x, scale, zero, LEVELS: tl.constexpr):
    """int32 codes of float32 ``x`` at float16 ``scale``/``zero`` (broadcast), as :func:`int_quantize`."""
    q = tl.math.div_rn(x - zero.to(tl.float32), scale.to(tl.float32))
    # Half to even, as torch.round, from floor alone (every step exact; Triton's interpreter has no
    # libdevice): up past the half, or at the half when the floor is odd.
    f = tl.floor(q)
    frac = q - f
    up = (frac > 0.5) | ((frac == 0.5) & (f - 2.0 * tl.floor(f * 0.5) == 1.0))
    return tl.minimum(tl.maximum(tl.where(up, f + 1.0, f), 0.0), LEVELS).to(tl.int32)


@triton.jit
def _group(new_ptr, res_ptr, rows, t, ch, G: tl.constexpr):
    """Channels ``ch`` ``[W]`` of a full group, ``[G, W]`` float32: tokens ``0..G-2`` from the residual
    (``rows``: their ``[G, 1]`` offsets), token ``G - 1`` the new one, first cast to the residual's
    dtype as the eager write casts it."""
    old = tl.load(res_ptr + rows + ch[None, :], mask=(t < G - 1)[:, None], other=0.0)
    new = tl.load(new_ptr + ch).to(res_ptr.dtype.element_ty)
    return tl.where((t == G - 1)[:, None], new[None, :], old).to(tl.float32)


@triton.jit
def _key_codes(new_ptr, res_ptr, rows, t, ch, scale_ptr, zero_ptr, G: tl.constexpr, LEVELS: tl.constexpr):
    """Keys of channels ``ch``, quantized per channel over the group: stores the channels' scale
    and zero at ``scale_ptr + ch`` / ``zero_ptr + ch``, returns the codes ``[G, W]``."""
    x = _group(new_ptr, res_ptr, rows, t, ch, G)
    scale, zero = _scale_zero(tl.min(x, axis=0), tl.max(x, axis=0), LEVELS)
    tl.store(scale_ptr + ch, scale)
    tl.store(zero_ptr + ch, zero)
    return _codes(x, scale[None, :], zero[None, :], LEVELS)


@triton.jit
def _kivi_write_kernel(k_ptr, v_ptr, slots_ptr, res_slots_ptr, res_ptr, kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr,
                       vz_ptr, stride_kn, stride_kh, stride_vn, stride_vh, stride_r2, stride_rs, stride_rt, stride_rh,
                       stride_cb, stride_ct, stride_ch, stride_kb, stride_kh2, stride_vb, stride_vt, stride_vh2,
                       G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, VG: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    if slot >= 0:
        pos = slot % G
        r = tl.load(res_slots_ptr + i).to(tl.int64)
        k_new = k_ptr + i * stride_kn + h * stride_kh
        v_new = v_ptr + i * stride_vn + h * stride_vh
        if pos < G - 1:
            d = tl.arange(0, D)
            off = r * stride_rs + pos * stride_rt + h * stride_rh + d
            tl.store(res_ptr + off, tl.load(k_new + d).to(res_ptr.dtype.element_ty))
            tl.store(res_ptr + stride_r2 + off, tl.load(v_new + d).to(res_ptr.dtype.element_ty))
        else:
            LEVELS: tl.constexpr = (1 << BITS) - 1
            W: tl.constexpr = VG // 2
            block = slot // G
            t = tl.arange(0, G)
            j = tl.arange(0, W)
            rows = r * stride_rs + t[:, None] * stride_rt + h * stride_rh
            codes = block * stride_cb + t[:, None] * stride_ct + h * stride_ch
            k_sz = block * stride_kb + h * stride_kh2
            v_sz = block * stride_vb + t * stride_vt + h * stride_vh2
            # A value group's VG channels as two lanes of W: int4's even and odd channels (the two
            # nibbles of a byte), int8's two halves; keys are per channel, so lanes are independent.
            for c in tl.static_range(D // VG):
                ch0 = c * VG + j * 2 if BITS == 4 else c * VG + j
                ch1 = ch0 + 1 if BITS == 4 else ch0 + W
                kc0 = _key_codes(k_new, res_ptr, rows, t, ch0, ks_ptr + k_sz, kz_ptr + k_sz, G, LEVELS)
                kc1 = _key_codes(k_new, res_ptr, rows, t, ch1, ks_ptr + k_sz, kz_ptr + k_sz, G, LEVELS)
                v0 = _group(v_new, res_ptr + stride_r2, rows, t, ch0, G)
                v1 = _group(v_new, res_ptr + stride_r2, rows, t, ch1, G)
                vs, vz = _scale_zero(tl.minimum(tl.min(v0, axis=1), tl.min(v1, axis=1)),
                                     tl.maximum(tl.max(v0, axis=1), tl.max(v1, axis=1)), LEVELS)
                tl.store(vs_ptr + v_sz + c, vs)
                tl.store(vz_ptr + v_sz + c, vz)
                vc0 = _codes(v0, vs[:, None], vz[:, None], LEVELS)
                vc1 = _codes(v1, vs[:, None], vz[:, None], LEVELS)
                if BITS == 4:
                    byte = c * W + j
                    tl.store(kq_ptr + codes + byte[None, :], (kc0 | (kc1 << 4)).to(tl.uint8))
                    tl.store(vq_ptr + codes + byte[None, :], (vc0 | (vc1 << 4)).to(tl.uint8))
                else:
                    tl.store(kq_ptr + codes + ch0[None, :], kc0.to(tl.uint8))
                    tl.store(kq_ptr + codes + ch1[None, :], kc1.to(tl.uint8))
                    tl.store(vq_ptr + codes + ch0[None, :], vc0.to(tl.uint8))
                    tl.store(vq_ptr + codes + ch1[None, :], vc1.to(tl.uint8))


def kivi_write(k: torch.Tensor, v: torch.Tensor, cache: KiviCache, layer: int, slots: torch.Tensor,
               res_slots: torch.Tensor) -> None:
    """Store one new token per row into layer ``layer`` of ``cache``, in place (see the module docstring).

    Args:
        k, v: ``[b, Hkv, D]`` the rows' new keys and values (``D`` a power of two; last dim dense).
        slots: ``[b]`` int32 ``block * G + offset`` of each row's new token; -1 for a padding row.
        res_slots: ``[b]`` int32 residual slot of each row (any valid slot for a padding row).
    """
    b, H, D = k.shape
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    res, kq, ks, vs = cache.residual[layer], cache.kq[layer], cache.k_scale[layer], cache.v_scale[layer]
    _kivi_write_kernel[(b, H)](
        k, v, slots, res_slots, res, kq, cache.vq[layer], ks, cache.k_zero[layer], vs, cache.v_zero[layer],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), res.stride(0), res.stride(1), res.stride(2), res.stride(3),
        kq.stride(0), kq.stride(1), kq.stride(2), ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1), vs.stride(2),
        G=cache.block_size, D=D, BITS=cache.bits, VG=cache.value_group, num_warps=4,
    )
