"""Measurements of KV strategies: quality (perplexity, RULER accuracy, agreement with the full cache)."""
from kvscope.bench.quality import agreement, perplexity, ruler_accuracy

__all__ = ["agreement", "perplexity", "ruler_accuracy"]
