"""A request's prompt, text or token ids, checked and tokenized before it reaches the scheduler,
and checked against what the model and the KV strategy can serve."""
from __future__ import annotations

import math
import operator
from collections.abc import Container
from typing import Protocol

from kvscope.errors import RequestError
from kvscope.kv.manager import KVManager
from kvscope.sampling_params import SamplingParams


def check_fields(rid: object, params: object, arrival_time: object, in_use: Container[str]) -> None:
    """:class:`RequestError` unless the request id (a string without '#', not ``in_use``), the
    sampling parameters and the arrival time are as ``add_request`` takes them."""
    if not isinstance(rid, str) or "#" in rid:
        raise RequestError(f"request_id must be a string without '#' (it marks the samples of n > 1), got {rid!r}")
    if rid in in_use:
        raise RequestError(f"request id {rid!r} is already in use")
    if not isinstance(params, SamplingParams):
        raise RequestError(f"request {rid}: params must be a SamplingParams, got {type(params).__name__}")
    if arrival_time is not None and (isinstance(arrival_time, bool) or not isinstance(arrival_time, (int, float))
                                     or not math.isfinite(arrival_time)):
        raise RequestError(f"request {rid}: arrival_time must be a finite number, got {arrival_time!r}")


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


def check_fits(rid: str, token_ids: list[int], params: SamplingParams, vocab: int, max_model_len: int,
               kv: KVManager, kv_memory_bytes: int, max_num_seqs: int) -> None:
    """:class:`RequestError` naming what the model or the strategy ``kv`` cannot serve: token ids
    outside the vocabulary, a prompt longer than the context or than one request may hold in the
    pool, ``n`` samples without forking or above ``max_num_seqs``."""
    if min(token_ids) < 0 or max(token_ids) >= vocab:
        raise RequestError(f"request {rid}: prompt token ids must be in [0, {vocab})")
    n = len(token_ids)
    if n > max_model_len:
        raise RequestError(
            f"request {rid}: prompt has {n} tokens, more than the model's context (max_model_len={max_model_len})"
        )
    if n > kv.max_request_tokens():
        raise RequestError(
            f"request {rid}: prompt has {n} tokens but strategy {kv.name!r} serves prompts of at most "
            f"{kv.max_request_tokens()} tokens in its KV pool (kv_memory_bytes={kv_memory_bytes})"
        )
    forced = params.forced_token_ids or []
    if forced and max(forced) >= vocab:
        raise RequestError(f"request {rid}: forced_token_ids must be in [0, {vocab})")
    if params.n > 1 and not kv.supports_fork:
        raise RequestError(f"request {rid}: n={params.n} needs a strategy that can fork KV")
    if params.n > max_num_seqs:
        raise RequestError(f"request {rid}: n={params.n} samples run together, more than max_num_seqs={max_num_seqs}")
