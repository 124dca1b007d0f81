"""User-facing sampling parameters, validated on construction."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvscope import checks
from kvscope.errors import ConfigError

#: Temperatures below this sample greedily (vLLM's ``_SAMPLING_EPS``): dividing logits by a smaller
#: one overflows float32 (``1e-40`` makes every logit +-inf, and softmax NaN), and the distribution
#: is already an argmax to float precision.
GREEDY_TEMPERATURE = 1e-5
_INT64 = (-(1 << 63), (1 << 63) - 1)


class RequestOutputKind(enum.Enum):
    """Which outputs ``LLMEngine.step`` returns for a request (vLLM's names): every step's
    cumulative output (``CUMULATIVE``, for streaming), or only the final one (``FINAL_ONLY``, what
    ``LLM.generate`` asks for: no per-step copies of a growing output)."""

    CUMULATIVE = "cumulative"
    FINAL_ONLY = "final_only"


@dataclass
class SamplingParams:
    """How to pick output tokens, with vLLM's names and meanings.

    ``temperature`` below ``GREEDY_TEMPERATURE`` (1e-5; 0 included) is greedy. ``top_k <= 0`` and
    ``top_p == 1`` disable those filters.
    ``seed`` (an int64) makes a sampled request reproducible on its own, independent of batch
    composition; sample ``k`` of ``n`` uses ``seed + k``.
    ``n > 1`` forks the request after its prompt is computed: the children share the prompt's KV
    (copy-on-write for the shared last block) and each samples its own continuation.
    ``return_logits`` keeps every step's float32 logits row (for tests and agreement checks).
    ``logprobs`` records the log-probability of each output token under the model.
    ``forced_token_ids`` is teacher forcing: output token ``i`` is ``forced_token_ids[i]``
    whatever the model predicts (with ``logprobs``, this scores a text; used for perplexity).
    ``output_kind`` (a :class:`RequestOutputKind` or its value) says whether ``step`` reports the
    request after every step or only when it finishes.

    Every field is checked for its type as well as its range (``ConfigError`` naming the field): a
    bool or a float is not an integer, and strings are not numbers.
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
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self.max_tokens = checks.integer(self.max_tokens, "max_tokens", minimum=1)
        self.temperature = checks.real(self.temperature, "temperature")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = checks.real(self.top_p, "top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = checks.integer(self.top_k, "top_k", minimum=0)
        if self.seed is not None:
            self.seed = checks.integer(self.seed, "seed", *_INT64)
        self.n = checks.integer(self.n, "n", minimum=1)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")
        self.stop_token_ids = checks.int_list(self.stop_token_ids, "stop_token_ids", minimum=0)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "return_logits", "logprobs"):
            checks.boolean(getattr(self, name), name)
        if self.forced_token_ids is not None:
            self.forced_token_ids = checks.int_list(self.forced_token_ids, "forced_token_ids", minimum=0)
            if not self.forced_token_ids:
                raise ConfigError("forced_token_ids must not be empty")
            self.max_tokens = min(self.max_tokens, len(self.forced_token_ids))
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            kinds = [k.value for k in RequestOutputKind]
            raise ConfigError(f"output_kind must be one of {kinds}, got {self.output_kind!r}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
