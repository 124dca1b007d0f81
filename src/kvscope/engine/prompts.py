"""A request's prompt, text or token ids, checked and tokenized before it reaches the scheduler."""
from __future__ import annotations

import operator
from typing import Protocol

from kvscope.errors import RequestError


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def prompt_token_ids(prompt: object, tokenizer: Encoder, rid: str) -> tuple[str | None, list[int]]:
    """``prompt`` -> (its text, or None for token ids; its token ids), or :class:`RequestError`
    saying why not: neither text nor a list of integers, text that is not valid Unicode (a lone
    surrogate, which the tokenizer cannot encode), or empty."""
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(
                f"request {rid}: the prompt is not valid text ({e.reason} at character {e.start}: "
                f"{prompt[e.start:e.end]!r})"
            ) from None
        text, token_ids = prompt, tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        text, token_ids = None, [_token_id(t, rid) for t in prompt]
    else:
        raise RequestError(
            f"request {rid}: the prompt must be a string or a list of token ids, got {type(prompt).__name__}"
        )
    if not token_ids:
        raise RequestError(f"request {rid}: the prompt is empty")
    return text, token_ids


def _token_id(t: object, rid: str) -> int:
    """A prompt token id as an int: ints, numpy and 0-d torch integers; never a bool or a float."""
    try:
        if not isinstance(t, bool):
            return operator.index(t)
    except TypeError:
        pass
    raise RequestError(f"request {rid}: prompt token ids must be integers, got {t!r}")
