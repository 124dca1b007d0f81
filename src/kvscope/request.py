"""Per-request state as the scheduler and the KV strategies see it (vLLM v1's counter model)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvscope.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, KV freed (recompute) or on the host (swap)
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence being generated.

    ``num_computed_tokens`` counts the tokens of ``all_token_ids`` whose KV is in the cache; the
    scheduler only ever moves this counter forward (chunked prefill, decode) or back to zero
    (preemption by recompute). Everything else about a step follows from it.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    swapped: bool = False
    num_preemptions: int = 0
    num_prefix_cached_tokens: int = 0
    parent_id: str | None = None
    child_index: int = 0
    # Wall-clock time (perf_counter) at which each output token was produced.
    token_times: list[float] = field(default_factory=list)
    first_scheduled_time: float | None = None
    finished_time: float | None = None
    # Where a matched stop string cuts the decoded text (None: no cut).
    text_end: int | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def group_id(self) -> str:
        """The id of the user's request this sample belongs to (its own id, or its parent's)."""
        return self.parent_id or self.request_id

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]
