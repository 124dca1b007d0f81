"""Text deltas and token logprobs from the engine's cumulative outputs.

Each engine output carries all of a completion's tokens so far. Streaming decodes only the new
tokens, with a few tokens of context before them (the incremental detokenization of HF TGI and
vLLM: decoding ``ids[prefix:]`` minus ``ids[prefix:read]`` gets word-boundary spaces right), so a
chunk costs O(new tokens), not O(length). When the completion finishes, its final text (one full
decode, cut at a stop string by the engine) supplies whatever was still held back, so the deltas a
client concatenates equal the final text.
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

    Held back while the completion runs: an incomplete UTF-8 sequence (it decodes as U+FFFD until
    its last byte arrives), and, when stop strings are cut from the output, the last
    ``len(longest stop) - 1`` characters: the engine checks after every token, so a stop string it
    finds later must end in a later token and start at most that far back.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        cut = params.stop and not params.include_stop_str_in_output
        self._hold = max(len(s) for s in params.stop) - 1 if cut else 0
        self._text = ""  # decoded so far
        self._prefix = self._read = 0  # token offsets: context start, end of the settled tokens
        self._taken = 0  # characters of the unsettled tokens (after _read) already in _text
        self._sent = 0

    def next(self, completion: CompletionOutput) -> str:
        if completion.finished:
            text, end = completion.text, len(completion.text)
        else:
            text = self._advance(completion.token_ids)
            end = len(text) - self._hold
        if end <= self._sent:
            return ""
        piece, self._sent = text[self._sent : end], end
        return piece

    def _advance(self, ids: list[int]) -> str:
        decode = self._tokenizer.decode
        before = decode(ids[self._prefix : self._read], skip_special_tokens=self._skip_special)
        after = decode(ids[self._prefix :], skip_special_tokens=self._skip_special)
        complete = not after.endswith(_REPLACEMENT)
        new = (after if complete else after.rstrip(_REPLACEMENT))[len(before) + self._taken :]
        self._text += new
        self._taken += len(new)
        if complete and len(after) > len(before):  # settle: the next window starts here
            self._prefix, self._read, self._taken = self._read, len(ids), 0
        return self._text


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

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, logprobs: Logprobs | None) -> None:
        self._text = TextDeltas(tokenizer, params)
        self._logprobs = logprobs
        self._num_tokens = 0
        self.new_tokens = 0  # of the last update: a token may add no text (held back, or decodes to nothing)
        self.done = False

    def update(self, completion: CompletionOutput) -> tuple[str, list[TokenLogprob] | None]:
        """The new text and (when asked for) the new tokens' logprobs since the last update; see
        :attr:`new_tokens` for how many tokens the update brought."""
        self.new_tokens = len(completion.token_ids) - self._num_tokens
        text = self._text.next(completion)
        entries = None
        if self._logprobs is not None:
            entries = self._logprobs.entries(completion, self._num_tokens)
        self._num_tokens = len(completion.token_ids)
        self.done = completion.finished
        return text, entries
