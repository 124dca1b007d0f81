"""The requests of a study point's workload, built from its spec (every workload kind)."""
from __future__ import annotations

from typing import Any

from kvscope.errors import ConfigError
from kvscope.llm import LLM
from kvscope.study.spec import WorkloadSpec
from kvscope.workload.mixed import MixedWorkload, mix, num_long_requests
from kvscope.workload.requests import (
    WorkloadRequest,
    fixed_length_requests,
    read_trace,
    uniform_length_requests,
)
from kvscope.workload.ruler import ruler_samples
from kvscope.workload.sharegpt import sharegpt_requests


def workload_requests(llm: LLM, w: WorkloadSpec, seed: int) -> list[WorkloadRequest]:
    """The requests of workload ``w`` (prompts and output lengths; arrivals are added by the runner)."""
    tok = llm.tokenizer
    if w.kind == "sharegpt":
        extra = {"max_prompt_len": w.max_prompt_len} if w.max_prompt_len else {}
        return sharegpt_requests(tok, w.num_requests, seed=seed, output_len=w.output_len, **extra)
    if w.kind == "fixed":
        return fixed_length_requests(tok, w.num_requests, w.input_len, w.output_len, source=w.source or "britannica")
    if w.kind == "uniform":
        return uniform_length_requests(tok, w.num_requests, w.input_len, w.output_len, w.range_ratio or 0.0,
                                       seed=seed, source=w.source or "britannica")
    if w.kind == "trace":
        return read_trace(w.path)
    if w.kind == "ruler":
        return [WorkloadRequest(s["input"], w.output_len or int(s["tokens_to_generate"]))
                for s in workload_ruler_samples(llm, w, seed)]
    if w.kind == "mixed":
        return mixed_workload(llm, w, seed)[0].requests
    raise ConfigError(f"unknown workload kind {w.kind!r}")


def workload_ruler_samples(llm: LLM, w: WorkloadSpec, seed: int) -> list[dict[str, Any]]:
    """The RULER samples of a ``ruler`` workload (seeded from the point's seed)."""
    return ruler_samples(w.task, w.length, llm.tokenizer, num_samples=w.num_samples, seed=42 + seed)


def mixed_workload(llm: LLM, w: WorkloadSpec, seed: int) -> tuple[MixedWorkload, list[dict[str, Any]]]:
    """A mixed workload's requests and the RULER samples of its long ones (sample ``k`` is the
    ``k``-th long request), both seeded as the ``sharegpt`` and ``ruler`` kinds are."""
    n_long = num_long_requests(w.num_requests, w.long_fraction)
    extra = {"max_prompt_len": w.max_prompt_len} if w.max_prompt_len else {}
    short = sharegpt_requests(llm.tokenizer, w.num_requests - n_long, seed=seed, output_len=w.output_len, **extra)
    samples = ruler_samples(w.task, w.length, llm.tokenizer, num_samples=n_long, seed=42 + seed)
    long = [WorkloadRequest(s["input"], w.long_output_len or int(s["tokens_to_generate"])) for s in samples]
    return mix(short, long), samples
