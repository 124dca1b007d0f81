"""RULER's scoring of a model's answer, as its ``eval/synthetic`` code scores: the prediction is
cleaned up, then matched against the expected answers (case-insensitive substrings), averaged over
them (``all``) or the best one (``part``) depending on the task."""
from __future__ import annotations

import re
from collections.abc import Sequence

from kvscope.errors import ConfigError

# Base task -> RULER metric (long_context_eval/eval/synthetic/constants.py): "all" averages over
# the expected answers, "part" takes the best one.
_METRICS = {
    "niah": "all",
    "variable_tracking": "all",
    "common_words_extraction": "all",
    "freq_words_extraction": "all",
    "qa": "part",
}
_BASE_TASK = {"vt": "variable_tracking", "cwe": "common_words_extraction",
              "fwe": "freq_words_extraction", "qa_1": "qa", "qa_2": "qa"}
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def base_task(task: str) -> str:
    """RULER's base task of a task name (``niah_single_2`` -> ``niah``, ``vt`` -> ``variable_tracking``)."""
    if task.startswith("niah"):
        return "niah"
    if task in _BASE_TASK:
        return _BASE_TASK[task]
    raise ConfigError(f"unknown RULER task {task!r}")


def postprocess_prediction(text: str | None) -> str:
    """RULER's clean-up of a prediction: strip, control characters to newlines, strip again."""
    if text is None:
        return ""
    return _CONTROL_CHARS.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``prediction`` (case-insensitive substring)."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 when any of ``references`` is found in ``prediction`` (case-insensitive substring)."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


def score_prediction(task: str, prediction: str, references: Sequence[str]) -> float:
    """RULER's per-sample score in [0, 1] (RULER reports 100 x the mean) of a raw model output."""
    if not references:
        raise ConfigError(f"task {task!r}: a sample needs at least one expected answer")
    match = string_match_all if _METRICS[base_task(task)] == "all" else string_match_part
    return match(postprocess_prediction(prediction), references)
