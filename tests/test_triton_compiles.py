"""``TritonCompiles`` against Triton's post-compile hook: what the block records, that a hook set
before it still runs, and that the previous hook is back afterwards. The hook is called as Triton's
JIT calls it (keyword arguments, ``repr`` among them); compiling needs a GPU, calling it does not."""
from __future__ import annotations

import pytest

knobs = pytest.importorskip("triton.knobs")

from kvscope.bench.compiles import TritonCompiles  # noqa: E402


def _fire(name: str) -> None:
    hook = knobs.runtime.jit_post_compile_hook
    if hook is not None:
        hook(key=None, repr=f"{name}[num_warps=4](x: i32)", fn=None, compile={}, is_manual_warmup=False,
             already_compiled=False)


def test_records_the_kernels_first_launched_in_the_block_and_restores_the_previous_hook(monkeypatch):
    earlier: list[str] = []
    previous = lambda **kw: earlier.append(kw["repr"])  # noqa: E731
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", previous)
    _fire("before")
    with TritonCompiles() as compiles:
        assert compiles.seen == []
        _fire("_colsum_kernel")
        _fire("_prefill_kernel")
    _fire("after")
    assert compiles.seen == ["_colsum_kernel[num_warps=4](x: i32)", "_prefill_kernel[num_warps=4](x: i32)"]
    assert earlier == [f"{n}[num_warps=4](x: i32)" for n in ("before", "_colsum_kernel", "_prefill_kernel", "after")]
    assert knobs.runtime.jit_post_compile_hook is previous


def test_without_a_previous_hook_none_is_restored(monkeypatch):
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    with TritonCompiles() as compiles:
        _fire("k")
    assert compiles.seen == ["k[num_warps=4](x: i32)"]
    assert knobs.runtime.jit_post_compile_hook is None
