"""What the engine returns: vLLM-shaped request outputs with per-request timing."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from kvscope.request import Request


class Decoder(Protocol):
    """What turns token ids back into text (the tokenizer)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class RequestMetrics:
    """Wall-clock (``time.perf_counter``) timestamps of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None
    token_times: list[float]
    finished_time: float | None
    num_prompt_tokens: int
    num_prefix_cached_tokens: int
    num_preemptions: int

    @property
    def ttft(self) -> float | None:
        """Arrival -> first output token, seconds."""
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def e2e_latency(self) -> float | None:
        return self.token_times[-1] - self.arrival_time if self.token_times else None


@dataclass
class CompletionOutput:
    """One generated sequence (``index`` distinguishes the ``n`` samples of a request)."""

    index: int
    token_ids: list[int]
    finish_reason: str | None
    _decode: Callable[[list[int]], str] = field(repr=False)
    text_end: int | None = None
    error: str | None = None
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)
    logprobs: list[float] = field(default_factory=list, repr=False)

    @property
    def text(self) -> str:
        """Decoded lazily: streaming callers that only count tokens pay nothing."""
        text = self._decode(self.token_ids)
        return text if self.text_end is None else text[: self.text_end]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def error(self) -> str | None:
        return self.outputs[0].error


def build_output(group: list[Request], tokenizer: Decoder) -> RequestOutput:
    """The output of one request: ``group`` is its samples, the parent first. It is ``finished``
    once every sample is: a parent that finished before forking (aborted, failed) never forks."""
    head = group[0]
    skip = head.params.skip_special_tokens
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip)  # noqa: E731
    completions = [
        CompletionOutput(
            index=r.child_index,
            token_ids=list(r.output_token_ids),
            finish_reason=r.finish_reason,
            _decode=decode,
            text_end=r.text_end,
            error=r.error,
            logits=list(r.logits),
            logprobs=list(r.logprobs),
        )
        for r in group
    ]
    return RequestOutput(
        request_id=head.request_id,
        prompt=head.prompt,
        prompt_token_ids=head.prompt_token_ids,
        outputs=completions,
        finished=all(r.is_finished for r in group),
        metrics=RequestMetrics(
            arrival_time=head.arrival_time,
            first_scheduled_time=head.first_scheduled_time,
            token_times=list(head.token_times),
            finished_time=head.finished_time,
            num_prompt_tokens=head.num_prompt_tokens,
            num_prefix_cached_tokens=head.num_prefix_cached_tokens,
            num_preemptions=head.num_preemptions,
        ),
    )
