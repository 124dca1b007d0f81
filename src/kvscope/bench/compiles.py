"""Triton kernels compiled (or loaded from Triton's disk cache) while a block runs.

A kernel specialisation seen for the first time in a process stops the step that launches it for
tens of milliseconds (a disk-cache load) up to seconds (a compile). Inside a timed run that is a
stall the warm-up missed, typically a new specialisation of an integer argument (Triton
specialises integers on being 1 or divisible by 16) that only the timed run's batches produce.
Benchmarks and the study record what compiled in their timed spans, so that a row measured
through such a stall says so.
"""
from __future__ import annotations

from typing import Any


class TritonCompiles:
    """Context manager: ``seen`` lists each kernel specialisation first launched in the block, as
    ``name[options](arg: type, ...)`` (the types carry the integer specialisation). ``seen`` stays
    None where Triton is missing or has no post-compile hook (then nothing can be said)."""

    def __init__(self) -> None:
        self.seen: list[str] | None = None
        self._knobs: Any = None
        self._prev: Any = None

    def __enter__(self) -> TritonCompiles:
        try:
            from triton import knobs
        except ImportError:
            return self
        runtime = getattr(knobs, "runtime", None)
        if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
            return self
        self._knobs, self._prev, self.seen = runtime, runtime.jit_post_compile_hook, []
        seen = self.seen

        def hook(*, repr: str, **_: Any) -> None:  # noqa: A002 - Triton's keyword
            seen.append(repr)
            if self._prev is not None:  # a hook installed before ours still runs
                self._prev(repr=repr, **_)

        runtime.jit_post_compile_hook = hook
        return self

    def __exit__(self, *exc: object) -> None:
        if self._knobs is not None:
            self._knobs.jit_post_compile_hook = self._prev
