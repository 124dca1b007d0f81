"""Measured quality of each strategy and KV budget, per model, and the quality floor's definition.

Quality score = full-cache perplexity / perplexity under the strategy: 1.0 for a lossless strategy,
0.9 when perplexity is 11% above the full cache's. ``--quality-floor`` is a minimum of this score.
RULER needle accuracy (the mean over niah_single_1 and niah_single_2 at 4,096 tokens) is carried
along for the advice's explanation but is not part of the floor.

Figures, written here because ``docs/`` is not part of the installed package, both models from
the ``h200-quality`` study (``docs/results/h200-quality/``, bf16, 2026-12-06): perplexity over 8,192
scored tokens (16 sequences of 1,024, scored after a 512-token prefix), RULER over 50 samples per
task at 4,096 tokens.
- SmolLM2-135M: commit 11011cc, full cache 22.10.
- Qwen2.5-0.5B: commit 9a08cf8, full cache 35.36. Its ``infinigen`` at InfiniGen's alpha of 4
  retrieves nothing there, where SmolLM2's keeps most needles: the reason a model's own figures
  are used when they exist. The figures are those of each strategy's default arguments,
  which are what the advisor proposes: with ``alpha=12`` (commit b2dbad7) Qwen2.5's ``infinigen``
  at 0.2 measured perplexity 36.85 and RULER 1.00, which this table does not hold.

Other models: SmolLM2's scores are used as the best available estimate, and the advice says so.
"""
from __future__ import annotations

from dataclasses import dataclass

QUALITY_MODEL = "smollm2-135m"  # whose figures stand in for a model without its own

# model -> (full-cache perplexity, full-cache RULER accuracy,
#           {(strategy family, KV budget as a fraction of the prompt): (perplexity, RULER accuracy)})
_MEASURED: dict[str, tuple[float, float, dict[tuple[str, float], tuple[float, float]]]] = {
    "smollm2-135m": (22.10, 0.93, {
        ("h2o", 0.1): (32.20, 0.07),
        ("h2o", 0.2): (26.65, 0.12),
        ("h2o", 0.3): (24.83, 0.19),
        ("h2o", 0.4): (24.06, 0.24),
        ("h2o", 0.5): (23.64, 0.29),
        ("streaming", 0.2): (27.92, 0.25),
        ("snapkv", 0.2): (23.57, 0.58),
        ("infinigen", 0.1): (32.88, 0.51),
        ("infinigen", 0.2): (32.09, 0.62),
        ("infinigen", 0.3): (31.92, 0.66),
        ("infinigen", 0.4): (31.72, 0.70),
        ("infinigen", 0.5): (31.76, 0.67),
    }),
    "qwen2.5-0.5b": (35.36, 1.00, {
        ("h2o", 0.1): (48.23, 0.07),
        ("h2o", 0.2): (42.25, 0.12),
        ("h2o", 0.3): (39.24, 0.20),
        ("h2o", 0.4): (37.78, 0.25),
        ("h2o", 0.5): (37.12, 0.30),
        ("streaming", 0.2): (44.54, 0.25),
        ("snapkv", 0.2): (37.63, 1.00),
        ("infinigen", 0.2): (46.77, 0.00),
    }),
}


@dataclass(frozen=True)
class QualityEstimate:
    """Quality of one strategy/budget.

    Attributes:
        score: full-cache perplexity / strategy perplexity (1 = lossless), or None if not measured.
        perplexity_ratio: strategy perplexity / full-cache perplexity, or None.
        ruler_accuracy: RULER needle accuracy (0-1), or None.
        source: ``lossless``, ``measured (<model>)`` or ``unknown``.
        measured_on: the model whose figures these are (None: lossless or unknown).
    """

    score: float | None
    perplexity_ratio: float | None
    ruler_accuracy: float | None
    source: str
    measured_on: str | None = None


def quality(family: str, budget_ratio: float | None, lossless: bool = False, model: str | None = None
            ) -> QualityEstimate:
    """Quality estimate of strategy ``family`` (its registered name) at ``budget_ratio`` (None =
    full KV) on ``model`` (a model name; its own figures when measured, else SmolLM2's; a
    ``dummy:`` model's name stands for the real one's); ``lossless`` (the strategy's fact) needs no
    measurement."""
    key = (model or "").removeprefix("dummy:")
    name = key if key in _MEASURED else QUALITY_MODEL
    full_ppl, full_ruler, table = _MEASURED[name]
    if lossless or (budget_ratio is not None and budget_ratio >= 1.0):
        return QualityEstimate(1.0, 1.0, full_ruler, "lossless")
    if budget_ratio is None:  # lossy with every token kept (a quantized cache): not measured here
        return QualityEstimate(None, None, None, "unknown")
    measured = table.get((family, round(budget_ratio, 3)))
    if measured is None:
        return QualityEstimate(None, None, None, "unknown")
    ppl, ruler = measured
    return QualityEstimate(full_ppl / ppl, ppl / full_ppl, ruler, f"measured ({name})", name)
