"""KIVI's int8/int4 codes loaded in registers, shared by the kernels that read ``quant``'s KIVI
blocks (:mod:`kvscope.attention.triton_quant_decode`, :mod:`kvscope.attention.triton_kivi_prefill`).

Codes are stored as ``[..., D * bits / 8]`` uint8 rows; int4 packs two codes a byte, the even
channel in the low nibble (:func:`kvscope.kv.quant_codec.pack_int4`).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kivi_codes(ptr, rows, mask, D: tl.constexpr, BITS: tl.constexpr):
    """Codes ``[N, D]`` (int32) of the rows starting at ``ptr + rows`` (``[N]`` element offsets);
    int4 bytes are loaded once each, contiguous (vector loads), and split into their two nibbles."""
    if BITS == 4:
        byte = tl.load(ptr + rows[:, None] + tl.arange(0, D // 2)[None, :], mask=mask[:, None], other=0).to(tl.int32)
        return tl.interleave(byte & 15, byte >> 4)  # the even channel is the low nibble
    return tl.load(ptr + rows[:, None] + tl.arange(0, D)[None, :], mask=mask[:, None], other=0).to(tl.int32)
