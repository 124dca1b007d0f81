"""Workload descriptions for the advisor: request lengths (tokens) and arrivals (seconds).

A workload is the list of its requests' prompt and output lengths plus how they arrive: explicit
arrival times (a trace), or a rate, turned into evenly spaced arrivals (the cost model does not
model the extra queueing of Poisson bursts).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from kvscope.errors import ConfigError

# ShareGPT after vLLM's filters, Llama tokenizer: mean prompt 161 and mean output 338 tokens
# (Kwon et al., "Efficient Memory Management for LLM Serving with PagedAttention", SOSP 2023, Fig. 11).
SHAREGPT_MEAN_PROMPT = 161
SHAREGPT_MEAN_OUTPUT = 338
# Tokens per character of English text for trace prompts given as text without prompt_len
# (about 4 characters per token for BPE tokenizers on English).
TOKENS_PER_CHAR = 0.25
DEFAULT_NUM_REQUESTS = 200


@dataclass(frozen=True)
class Workload:
    """Requests to serve.

    Attributes:
        prompt_lens: prompt tokens per request, ``[num_requests]``.
        output_lens: output tokens per request, ``[num_requests]``.
        rate: mean arrival rate (requests/s); ``math.inf`` = all at once.
        arrival_times: arrival of each request (seconds after the start), ``[num_requests]``, or
            None to space arrivals evenly at ``rate``.
        name: label for the advice.
    """

    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    rate: float
    arrival_times: tuple[float, ...] | None = None
    name: str = "workload"

    def __post_init__(self) -> None:
        if not self.prompt_lens:
            raise ConfigError("workload: needs at least one request")
        if len(self.prompt_lens) != len(self.output_lens):
            raise ConfigError(f"workload: {len(self.prompt_lens)} prompt lengths but "
                              f"{len(self.output_lens)} output lengths")
        for field, values in (("prompt_len", self.prompt_lens), ("output_len", self.output_lens)):
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1]
            if bad:
                raise ConfigError(f"workload.{field}: must be integers >= 1, got {bad[0]!r}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not self.rate > 0 \
                or math.isnan(self.rate):
            raise ConfigError(f"workload.rate: must be > 0 requests/s or inf, got {self.rate!r}")
        if self.arrival_times is not None:
            if len(self.arrival_times) != len(self.prompt_lens):
                raise ConfigError("workload.arrival_times: one per request")
            bad = [t for t in self.arrival_times if isinstance(t, bool) or not isinstance(t, (int, float))
                   or not math.isfinite(t) or t < 0]
            if bad:
                raise ConfigError(f"workload.arrival_times: must be finite seconds >= 0, got {bad[0]!r}")

    @property
    def num_requests(self) -> int:
        return len(self.prompt_lens)

    def arrivals(self) -> list[float]:
        """Arrival time of each request (seconds), in request order."""
        if self.arrival_times is not None:
            return list(self.arrival_times)
        if math.isinf(self.rate):
            return [0.0] * self.num_requests
        return [i / self.rate for i in range(self.num_requests)]

    def summary(self) -> dict[str, float]:
        """Mean and p90 prompt/output lengths (tokens) and the rate (requests/s)."""
        p, o = np.asarray(self.prompt_lens), np.asarray(self.output_lens)
        return {"num_requests": self.num_requests, "mean_prompt_len": float(p.mean()),
                "p90_prompt_len": float(np.percentile(p, 90)), "mean_output_len": float(o.mean()),
                "p90_output_len": float(np.percentile(o, 90)), "rate": self.rate}


def fixed_workload(prompt_len: int, output_len: int, rate: float, num_requests: int = DEFAULT_NUM_REQUESTS,
                   name: str | None = None) -> Workload:
    """``num_requests`` requests of ``prompt_len`` + ``output_len`` tokens at ``rate`` requests/s."""
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise ConfigError(f"workload.num_requests: must be an integer >= 1, got {num_requests!r}")
    return Workload((prompt_len,) * num_requests, (output_len,) * num_requests, rate,
                    name=name or f"{prompt_len} + {output_len} tokens at {rate:g} req/s")


def sharegpt_workload(rate: float, num_requests: int = DEFAULT_NUM_REQUESTS) -> Workload:
    """ShareGPT's published mean lengths (:data:`SHAREGPT_MEAN_PROMPT`, :data:`SHAREGPT_MEAN_OUTPUT`).

    Means only: the spread of real conversations (long tails both ways) is not modelled.
    """
    return fixed_workload(SHAREGPT_MEAN_PROMPT, SHAREGPT_MEAN_OUTPUT, rate, num_requests,
                          name=f"sharegpt (mean lengths) at {rate:g} req/s")


def trace_workload(path: str | os.PathLike[str], rate: float | None = None) -> Workload:
    """A JSONL trace (:func:`kvscope.workload.requests.read_trace` format).

    Prompt lengths are ``prompt_len`` or, for text prompts without it, :data:`TOKENS_PER_CHAR` x
    characters. The trace's arrival times are kept unless ``rate`` is given (then even spacing).
    """
    from kvscope.workload.requests import read_trace

    requests = read_trace(path)
    if not requests:
        raise ConfigError(f"workload.trace: {os.fspath(path)} holds no requests")
    prompts = tuple(r.prompt_len if r.prompt_len is not None else max(1, round(len(r.prompt) * TOKENS_PER_CHAR))
                    for r in requests)
    outputs = tuple(r.output_len for r in requests)
    arrivals = sorted(r.arrival_time for r in requests)
    span = arrivals[-1] - arrivals[0]
    if rate is not None:
        return Workload(prompts, outputs, rate, name=f"trace {os.path.basename(path)} at {rate:g} req/s")
    trace_rate = (len(requests) - 1) / span if span > 0 else math.inf
    return Workload(prompts, outputs, trace_rate, tuple(r.arrival_time for r in requests),
                    name=f"trace {os.path.basename(path)}")
