"""Serving workloads: what each request asks for and when it arrives, and how to build or store them.

- :func:`fixed_length_requests` / :func:`uniform_length_requests`: prompts cut from real prose
  (:func:`kvscope.workload.text.token_sequences`) at exact token lengths, the way vLLM's
  ``random`` dataset sizes its requests, but with text instead of random ids.
- :func:`with_arrivals`: attach offsets from :mod:`kvscope.workload.arrivals`.
- :func:`write_trace` / :func:`read_trace`: JSONL trace files, one request per line:
  ``{"arrival_time": 0.25, "prompt": "text" or [ids], "output_len": 128}`` (``prompt_len``
  optional).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kvscope.errors import ConfigError, DatasetError
from kvscope.workload.text import TextTokenizer, token_sequences


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload.

    Attributes:
        prompt: text (tokenized by the engine's tokenizer) or prompt token ids.
        output_len: tokens to generate (the driver sets ``max_tokens`` to it and ignores EOS).
        arrival_time: seconds after the start of the run (open-loop modes only).
        prompt_len: prompt tokens when known (always for token ids), else None.
    """

    prompt: str | list[int]
    output_len: int
    arrival_time: float = 0.0
    prompt_len: int | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ConfigError("a workload request needs a non-empty prompt")
        if isinstance(self.output_len, bool) or not isinstance(self.output_len, int) or self.output_len < 1:
            raise ConfigError(f"output_len must be an integer >= 1, got {self.output_len!r}")
        if not (isinstance(self.arrival_time, (int, float)) and self.arrival_time >= 0
                and math.isfinite(self.arrival_time)):
            raise ConfigError(f"arrival_time must be a finite number of seconds >= 0, got {self.arrival_time!r}")
        if self.prompt_len is None and not isinstance(self.prompt, str):
            object.__setattr__(self, "prompt_len", len(self.prompt))


def with_arrivals(
    requests: Sequence[WorkloadRequest], offsets: Sequence[float] | np.ndarray
) -> list[WorkloadRequest]:
    """Copies of ``requests`` whose ``arrival_time`` is ``offsets[i]`` (seconds, ``[len(requests)]``)."""
    if len(offsets) != len(requests):
        raise ConfigError(f"got {len(offsets)} arrival offsets for {len(requests)} requests")
    return [replace(r, arrival_time=float(t)) for r, t in zip(requests, offsets)]


# ---- prompts cut from prose ------------------------------------------------------------------------
def _prose_requests(
    tokenizer: TextTokenizer, input_lens: Sequence[int], output_lens: Sequence[int], source: str
) -> list[WorkloadRequest]:
    # One consecutive run of the text, cut into the requested lengths: no two prompts share text,
    # so prefix caching finds nothing to reuse between them.
    (ids,) = token_sequences(tokenizer, 1, max(2, sum(input_lens)), source)
    requests, start = [], 0
    for n_in, n_out in zip(input_lens, output_lens):
        requests.append(WorkloadRequest(ids[start : start + n_in], int(n_out)))
        start += n_in
    return requests


def fixed_length_requests(
    tokenizer: TextTokenizer, num_requests: int, input_len: int, output_len: int, source: str = "britannica"
) -> list[WorkloadRequest]:
    """``num_requests`` prompts of exactly ``input_len`` prose tokens (token ids, no special
    tokens), each asking for ``output_len`` tokens; arrivals at 0 (see :func:`with_arrivals`)."""
    return uniform_length_requests(tokenizer, num_requests, input_len, output_len, 0.0, source=source)


def uniform_length_requests(
    tokenizer: TextTokenizer,
    num_requests: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int = 0,
    source: str = "britannica",
) -> list[WorkloadRequest]:
    """Prompt and output lengths drawn uniformly from ``[int(L * (1 - r)), int(L * (1 + r))]``
    (integers, both ends included; vLLM's ``--random-range-ratio``), prompts cut from prose.

    ``range_ratio`` is in ``[0, 1)``; lengths below 1 are raised to 1. Raises
    :class:`DatasetError` when ``source`` holds fewer tokens than the prompts need in total.
    """
    if not isinstance(num_requests, int) or num_requests < 1:
        raise ConfigError(f"num_requests must be an integer >= 1, got {num_requests!r}")
    for name, value in (("input_len", input_len), ("output_len", output_len)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 <= range_ratio < 1.0:
        raise ConfigError(f"range_ratio must be in [0, 1), got {range_ratio!r}")
    rng = np.random.default_rng(seed)

    def lengths(mean: int) -> list[int]:
        low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return [int(x) for x in rng.integers(low, high + 1, size=num_requests)]

    return _prose_requests(tokenizer, lengths(input_len), lengths(output_len), source)


# ---- trace files ---------------------------------------------------------------------------------
def write_trace(path: str | os.PathLike[str], requests: Iterable[WorkloadRequest]) -> None:
    """Write ``requests`` as JSONL (``arrival_time``, ``prompt``, ``output_len``, ``prompt_len`` if known)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            row: dict[str, Any] = {"arrival_time": r.arrival_time, "prompt": r.prompt, "output_len": r.output_len}
            if r.prompt_len is not None:
                row["prompt_len"] = r.prompt_len
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _row_error(where: str, problem: str) -> DatasetError:
    return DatasetError(
        f"{where}: {problem} (each line must be a JSON object with arrival_time (seconds >= 0), "
        'prompt (non-empty text or list of token ids) and output_len (integer >= 1))'
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count


def _parse_row(row: Any, where: str) -> WorkloadRequest:
    if not isinstance(row, dict):
        raise _row_error(where, f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("arrival_time", "prompt", "output_len") if k not in row]
    if missing:
        raise _row_error(where, f"missing {', '.join(missing)}")
    prompt, arrival, prompt_len = row["prompt"], row["arrival_time"], row.get("prompt_len")
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(_is_int(t) for t in prompt))):
        raise _row_error(where, f"prompt must be text or a list of integer token ids, got {prompt!r:.80}")
    if not (_is_int(arrival) or isinstance(arrival, float)):
        raise _row_error(where, f"arrival_time must be a number, got {arrival!r}")
    if prompt_len is not None and not (_is_int(prompt_len) and prompt_len >= 1):
        raise _row_error(where, f"prompt_len must be an integer >= 1, got {prompt_len!r}")
    try:
        return WorkloadRequest(prompt, row["output_len"], float(arrival), prompt_len)
    except ConfigError as e:
        raise _row_error(where, str(e)) from None


def read_trace(path: str | os.PathLike[str]) -> list[WorkloadRequest]:
    """Requests of a JSONL trace in file order; blank lines are skipped.

    Raises :class:`DatasetError` naming the file and line of the first bad row.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: unreadable trace ({type(e).__name__}: {e})") from e
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _row_error(where, f"not valid JSON ({e.msg} at column {e.colno})") from None
        requests.append(_parse_row(row, where))
    return requests
