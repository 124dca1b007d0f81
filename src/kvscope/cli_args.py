"""Argument types and the engine options shared by the ``kvscope`` commands: every value is checked
where it is parsed, so a bad one is an argparse error naming its option."""
from __future__ import annotations

import argparse
import math
from typing import Any

from kvscope.constants import DEFAULT_STRATEGY
from kvscope.errors import KVScopeError


def _size(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"1000000"`` -> bytes (:func:`kvscope.units.parse_size`)."""
    from kvscope.units import parse_size

    try:
        return parse_size(text, "size")
    except KVScopeError as e:  # argparse names the option; the field prefix would say it twice
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None


def _finite(text: str) -> float:
    """A finite number: nan and inf mean nothing as a temperature, a probability or a bandwidth."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _rate(text: str) -> float:
    """Requests/s: a finite number, or ``inf`` for all at once (its range is the workload's to check)."""
    return math.inf if text.strip().lower() in ("inf", "infinity") else _finite(text)


def _positive_int(text: str) -> int:
    """An integer >= 1 (scheduler limits: 0 would admit or compute nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _sizes(text: str) -> list[int]:
    """``"16,32,64"`` -> ``[16, 32, 64]``; ``"none"`` -> ``[]``."""
    if text.strip().lower() == "none":
        return []
    try:
        return [_positive_int(x) for x in text.split(",")]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (a comma-separated list of token counts, or 'none')") from None


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model's engine and KV strategy options that `generate` and `serve` share."""
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, help="name[:key=value,...], e.g. h2o:heavy_ratio=0.1,recent_ratio=0.1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-memory", type=_size, default=None, help="KV pool size, e.g. 256MiB")
    p.add_argument("--max-model-len", type=_positive_int, default=None)
    p.add_argument("--max-num-seqs", type=_positive_int, default=64)
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048)
    p.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"])
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps (debugging)")
    p.add_argument("--piecewise-graph-sizes", type=_sizes, default=None, metavar="N,N,...|none",
                   help="token buckets of the prefill and mixed steps replayed as piecewise CUDA graphs "
                        "(default 16,32,...,1024; 'none': those steps run eagerly)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before the previous one's tokens reach the host (default: on for "
                        "CUDA where the strategy allows it)")
    p.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1,
                   help="split the model's heads and MLP over N processes (one GPU each on CUDA)")


def _llm_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~kvscope.LLM` arguments that :func:`_add_engine_args`' options (and ``args.model``) give."""
    return dict(model=args.model, strategy=args.strategy, kv_memory_bytes=args.kv_memory, device=args.device,
                dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, preemption_mode=args.preemption_mode,
                enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
                async_scheduling=args.async_scheduling, piecewise_graph_sizes=args.piecewise_graph_sizes)


def _llm(args: argparse.Namespace) -> Any:
    """The :class:`~kvscope.LLM` that :func:`_add_engine_args`' options (and ``args.model``) describe."""
    from kvscope import LLM

    return LLM(**_llm_args(args))
