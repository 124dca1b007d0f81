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

    ``num_computed_tokens`` counts the tokens of the sequence whose KV is in the cache; the
    scheduler only ever moves this counter forward (chunked prefill, decode) or back to zero
    (preemption by recompute). Everything else about a step follows from it.

    With async scheduling a step's sampled tokens stay on the device while the next step is
    scheduled: ``num_pending_tokens`` (at most 2: the step being read back and the one just
    launched) count toward ``num_tokens``, which the scheduler and the batch see, but not toward
    ``output_token_ids`` or ``all_token_ids``, which hold only tokens known on the host.
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
    num_pending_tokens: int = 0
    # prompt + max_tokens, capped by the engine's token limit: the length at which it stops.
    max_total_tokens: int = 1 << 62

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, pending ones included (what the scheduler computes against)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host knows: ``num_tokens`` without the pending ones."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_pending(self) -> bool:
        """Whether the newest pending token is its last (length reached): no step needs to
        compute it, it only waits to be read back (async scheduling)."""
        return self.num_pending_tokens > 0 and self.num_tokens >= self.max_total_tokens

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

    def sample(self, k: int, generator: torch.Generator) -> Request:
        """Sample ``k`` of this parent (``n > 1``), forked before its first token: where it is,
        with its own generator."""
        return Request(
            request_id=f"{self.request_id}#{k}", prompt_token_ids=self.prompt_token_ids, params=self.params,
            eos_token_ids=self.eos_token_ids, prompt=self.prompt, arrival_time=self.arrival_time,
            num_computed_tokens=self.num_computed_tokens, parent_id=self.request_id, child_index=k,
            first_scheduled_time=self.first_scheduled_time, generator=generator,
            max_total_tokens=self.max_total_tokens,
        )

    def token_at(self, i: int) -> int:
        """Token ``i``; 0 for a pending one (its id is written on the device, see ``StepBatch``)."""
        p = len(self.prompt_token_ids)
        if i < p:
            return self.prompt_token_ids[i]
        return self.output_token_ids[i - p] if i - p < len(self.output_token_ids) else 0
