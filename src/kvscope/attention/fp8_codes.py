"""float8_e4m3fn codes decoded in registers, shared by the kernels that read ``quant``'s fp8 cache
(:mod:`kvscope.attention.triton_quant_decode`, :mod:`kvscope.attention.triton_prefill`).

The codes are stored as uint8 (no float8 type in Triton before sm_89, and none in its
interpreter); decoding with integer operations gives the same values everywhere.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fp8_to_f16(code):
    """float8_e4m3fn bits (int32 in 0..255) -> float16, exactly. The sign, exponent and mantissa
    bits moved to float16's places read as the value times 2^-8: float16's exponent bias is 8 more
    than e4m3's, and e4m3's subnormals land on float16's subnormals, scaled alike. Fewer integer
    operations than building float32 bits, and no branch for subnormals. Every e4m3 value (3
    mantissa bits, magnitudes 2^-9 .. 448) is also exact in bfloat16 and float32."""
    bits = ((code & 0x80) << 8) | ((code & 0x7F) << 7)
    return bits.to(tl.int16).to(tl.float16, bitcast=True) * 256.0
