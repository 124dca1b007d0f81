"""User-facing sampling parameters, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvscope.errors import ConfigError


@dataclass
class SamplingParams:
    """How to pick output tokens, with vLLM's names and meanings.

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those filters.
    ``seed`` makes a sampled request reproducible on its own, independent of batch composition.
    ``n > 1`` forks the request after its prompt is computed: the children share the prompt's KV
    (copy-on-write for the shared last block) and each samples its own continuation.
    ``return_logits`` keeps every step's float32 logits row (for tests and agreement checks).
    ``logprobs`` records the log-probability of each output token under the model.
    ``forced_token_ids`` is teacher forcing: output token ``i`` is ``forced_token_ids[i]``
    whatever the model predicts (with ``logprobs``, this scores a text; used for perplexity).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_logits: bool = False
    logprobs: bool = False
    forced_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.forced_token_ids is not None:
            if not self.forced_token_ids:
                raise ConfigError("forced_token_ids must not be empty")
            self.max_tokens = min(self.max_tokens, len(self.forced_token_ids))
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
