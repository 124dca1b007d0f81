"""A Triton kernel compiled for an H100 (sm_90) with no GPU present, and ptxas's resource usage of
it, for the tests that check a kernel's default launch spills no registers."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def sm90_usage(fn, const: dict, ptrs: dict, options: dict, tmp_path: Path, odd: frozenset = frozenset()) -> str:
    """cuobjdump's ``-res-usage`` of ``fn`` compiled for sm_90 with constexprs ``const``.

    Pointer arguments get the types in ``ptrs`` (others ``*bf16``), other non-constexpr arguments
    ``i32`` (``qk_scale``: ``fp32``); every non-constexpr argument not in ``odd`` is specialized as
    divisible by 16, as the launcher specializes pointers and strides at real shapes. Skips where
    Triton has no NVIDIA backend or ships no cuobjdump.
    """
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this Triton ships no cuobjdump")
    names = fn.arg_names
    sig = {n: "constexpr" if n in const else ptrs.get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in names}
    sig["qk_scale"] = "fp32"
    odd = odd | {"qk_scale"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in const and n not in odd}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    return subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
