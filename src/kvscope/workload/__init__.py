"""Workload sources: real prose from pip packages and RULER needle-in-a-haystack samples."""
from kvscope.workload.ruler import niah_tasks, ruler_cache_dir, ruler_samples
from kvscope.workload.ruler_scoring import score_prediction
from kvscope.workload.text import PROSE_SOURCES, load_prose, token_sequences

__all__ = [
    "PROSE_SOURCES",
    "load_prose",
    "niah_tasks",
    "ruler_cache_dir",
    "ruler_samples",
    "score_prediction",
    "token_sequences",
]
