"""Measured quality of each strategy and KV budget, and the quality floor's definition.

Quality score = full-cache perplexity / perplexity under the strategy: 1.0 for a lossless strategy,
0.9 when perplexity is 11% above the full cache's. ``--quality-floor`` is a minimum of this score.
RULER needle accuracy is carried along for the advice's explanation but is not part of the floor.

Figures from ``docs/results/eviction_quality.json`` (2026-11-27, commit b4653f3) and
``docs/results/infinigen_quality.json`` (2026-11-27, commit 54f1e73): SmolLM2-135M, perplexity of
16 prose sequences of 256 tokens whose first 128 are the prompt (full cache 29.95), RULER
niah_single_1/2 at 4096 tokens, 20 samples (full cache 0.95). They are written here, not read from
those files, because ``docs/`` is not part of the installed package. Other models: the same scores
are used as the best available estimate, and the advice says so.
"""
from __future__ import annotations

from dataclasses import dataclass

QUALITY_MODEL = "smollm2-135m"
FULL_CACHE_PERPLEXITY = 29.95
FULL_CACHE_RULER = 0.95

# (strategy family, KV budget as a fraction of the prompt) -> (perplexity, RULER accuracy)
_MEASURED: dict[tuple[str, float], tuple[float, float]] = {
    ("h2o", 0.1): (45.22, 0.05),
    ("h2o", 0.2): (35.28, 0.05),
    ("h2o", 0.5): (30.55, 0.20),
    ("infinigen", 0.1): (43.69, 0.60),
    ("infinigen", 0.2): (37.29, 0.75),
    ("infinigen", 0.5): (35.77, 0.70),
}


@dataclass(frozen=True)
class QualityEstimate:
    """Quality of one strategy/budget.

    Attributes:
        score: full-cache perplexity / strategy perplexity (1 = lossless), or None if not measured.
        perplexity_ratio: strategy perplexity / full-cache perplexity, or None.
        ruler_accuracy: RULER needle accuracy (0-1), or None.
        source: ``lossless``, ``measured (<model>)`` or ``unknown``.
    """

    score: float | None
    perplexity_ratio: float | None
    ruler_accuracy: float | None
    source: str


def quality(family: str, budget_ratio: float | None, lossless: bool = False) -> QualityEstimate:
    """Quality estimate of strategy ``family`` (its registered name) at ``budget_ratio`` (None =
    full KV); ``lossless`` (the strategy's fact) needs no measurement."""
    if lossless or (budget_ratio is not None and budget_ratio >= 1.0):
        return QualityEstimate(1.0, 1.0, FULL_CACHE_RULER, "lossless")
    if budget_ratio is None:  # lossy with every token kept (a quantized cache): not measured here
        return QualityEstimate(None, None, None, "unknown")
    measured = _MEASURED.get((family, round(budget_ratio, 3)))
    if measured is None:
        return QualityEstimate(None, None, None, "unknown")
    ppl, ruler = measured
    return QualityEstimate(FULL_CACHE_PERPLEXITY / ppl, ppl / FULL_CACHE_PERPLEXITY, ruler,
                           f"measured ({QUALITY_MODEL})")
