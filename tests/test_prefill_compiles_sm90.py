"""The quantized prefill kernels compiled for an H100 (no GPU needed), at Llama-3-8B head shapes in
bfloat16 with their default launches: they compile, and ptxas spills no registers (to the stack)."""
from __future__ import annotations

import pytest
from sm90_usage import sm90_usage


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 64)])
def test_kivi_prefill_compiles_without_spills(bits, group, tmp_path):
    from kvscope.attention.triton_kivi_prefill import _kivi_prefill_kernel

    # kivi_paged_prefill_attention's 16-bit defaults: 128 rows (32 tokens x 4 heads), 64 keys, 8 warps, 2 stages.
    const = {"D": 128, "GROUP": 4, "TOKENS": 32, "BS": group, "BITS": bits, "VGROUP": group, "BLOCK_M": 128,
             "BLOCK_N": 64, "DOT_PRECISION": "tf32"}
    ptrs = {"kq_ptr": "*u8", "vq_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*fp16", "vs_ptr": "*fp16",
            "vz_ptr": "*fp16", "tables_ptr": "*i32", "slots_ptr": "*i32", "cu_ptr": "*i32", "lens_ptr": "*i32"}
    usage = sm90_usage(_kivi_prefill_kernel, const, ptrs, {"num_warps": 8, "num_stages": 2}, tmp_path)
    assert " STACK:0 " in usage and " LOCAL:0 " in usage, usage


def test_fp8_prefill_compiles_without_spills(tmp_path):
    from kvscope.attention.triton_prefill import _prefill_kernel

    # The paged prefill's 16-bit defaults (128 x 128 tiles, 8 warps, 3 stages), which fp8 uses.
    const = {"HEAD_DIM": 128, "D_PAD": 128, "GROUP": 4, "TOKENS": 32, "PAGE": 16, "BLOCK_M": 128, "BLOCK_N": 128,
             "FP8": True, "DOT_PRECISION": "tf32"}
    ptrs = {"k_ptr": "*u8", "v_ptr": "*u8", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "tables_ptr": "*i32",
            "cu_ptr": "*i32", "lens_ptr": "*i32"}
    usage = sm90_usage(_prefill_kernel, const, ptrs, {"num_warps": 8, "num_stages": 3}, tmp_path)
    assert " STACK:0 " in usage and " LOCAL:0 " in usage, usage
