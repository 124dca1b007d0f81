"""Text deltas and token logprobs from the engine's cumulative outputs.

Each engine output carries all of a completion's tokens so far; its text is the decode of all of
them (cut at a stop string once one is found). Streaming sends the difference since the last
chunk, holding back what could still change (see :class:`TextDeltas`), so that the deltas a client
concatenates equal the final text. Decoding the whole completion each time costs O(length) per
chunk, which is small next to a model step at the lengths served here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvscope.engine.outputs import CompletionOutput
from kvscope.engine.sampling_params import SamplingParams
from kvscope.models.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class TextDeltas:
    """The text of one growing completion, handed out in pieces that never need taking back.

    Held back while the completion runs: trailing U+FFFD (an incomplete UTF-8 sequence decodes as
    the replacement character until its last byte arrives), and, when stop strings are cut from the
    output, the last ``len(longest stop) - 1`` characters: the engine checks after every token, so
    a stop string it finds later must end in a later token and start at most that far back.
    """

    def __init__(self, params: SamplingParams) -> None:
        cut = params.stop and not params.include_stop_str_in_output
        self._hold = max(len(s) for s in params.stop) - 1 if cut else 0
        self._sent = 0

    def next(self, text: str, finished: bool) -> str:
        end = len(text) if finished else min(len(text.rstrip(_REPLACEMENT)), len(text) - self._hold)
        if end <= self._sent:
            return ""
        piece, self._sent = text[self._sent : end], end
        return piece


@dataclass
class TokenLogprob:
    """One output token: its text, its logprob under the model, and the ``top`` alternatives
    (token text, logprob), most likely first, when they were asked for."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


class Logprobs:
    """Logprob entries of a completion's tokens.

    The chosen token's logprob is the engine's (``SamplingParams(logprobs=True)``: log-softmax of
    the raw logits, before temperature and top-k/p, as vLLM reports it). The top-``k`` alternatives
    come from the logits rows the engine keeps with ``return_logits=True``.
    """

    def __init__(self, tokenizer: Tokenizer, k: int) -> None:
        self._tokenizer = tokenizer
        self.k = k

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def entries(self, completion: CompletionOutput, start: int = 0) -> list[TokenLogprob]:
        """Entries for ``completion.token_ids[start:]``."""
        out = []
        for i in range(start, len(completion.token_ids)):
            top: list[tuple[str, float]] = []
            if self.k:
                values, ids = torch.log_softmax(completion.logits[i].float(), -1).topk(self.k)
                top = [(self.token_text(t), v) for t, v in zip(ids.tolist(), values.tolist())]
            out.append(TokenLogprob(self.token_text(completion.token_ids[i]), completion.logprobs[i], top))
        return out


class ChoiceStream:
    """What one streamed choice has sent: its text so far and how many tokens' logprobs."""

    def __init__(self, params: SamplingParams, logprobs: Logprobs | None) -> None:
        self._text = TextDeltas(params)
        self._logprobs = logprobs
        self._num_tokens = 0
        self.done = False

    def update(self, completion: CompletionOutput) -> tuple[str, list[TokenLogprob] | None]:
        """The new text and (when asked for) the new tokens' logprobs since the last update."""
        text = self._text.next(completion.text, completion.finished)
        entries = None
        if self._logprobs is not None:
            entries = self._logprobs.entries(completion, self._num_tokens)
        self._num_tokens = len(completion.token_ids)
        self.done = completion.finished
        return text, entries
