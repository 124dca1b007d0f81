"""The attention statistic an eviction policy's scores read, as an object.

A policy declares one (``EvictionStrategy.statistic``); the attention of an evicting strategy
(:mod:`kvscope.kv.eviction_attention`) asks it which query rows to observe, how to reduce their
probabilities to one value per token and KV head, and how to fold that into the per-slot scores;
the strategy asks it whether its decode steps can be captured in a CUDA graph. Four kinds:

* :data:`NO_STATISTIC`: scores come from the token at write time (``initial_scores`` from its
  key, ``reset_scores`` from its position) or at selection time; attention is never materialised.
* :data:`ACCUMULATED` (H2O): every query row's attention, summed over the rows and the query heads
  of the KV group, added to the score: O(T) per decode step.
* :data:`LAST_ROW` (TOVA): the newest query's attention, averaged over every query head of the
  layer, replacing the score.
* :data:`OBSERVATION_WINDOW` (SnapKV): the prompt's last ``window`` rows (the strategy's
  ``window``), summed; decode rows are never observed.

Shapes: ``probs`` ``[B, Hkv, G, n, T]`` float32 (B sequences, G query heads per KV head, n rows,
T tokens); a reduced statistic is ``[B, Hkv, T]``; ``scores`` of one layer ``[num_slots, Hkv]``.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

#: How the Triton paged decode kernel serves a statistic's decode rows: it adds the column sums to
#: the scores itself ("fold"), returns them ("colsum", reduced and folded by the statistic), or
#: decode rows are not observed (None: plain decode).
KernelMode = Literal["fold", "colsum"] | None


class ScoreStatistic:
    """No statistic (the base): nothing is observed, decode can be captured as plain paged decode
    unless the policy re-ranks its tokens at selection time while evicting in decode."""

    #: Whether attention probabilities are needed at all (else the fused attention runs alone).
    reads_attention: ClassVar[bool] = False
    #: Whether decode rows feed the statistic.
    observes_decode: ClassVar[bool] = False
    #: Whether every prefill row feeds it (the chunk's output then comes from the same probabilities).
    observes_every_prefill_row: ClassVar[bool] = False
    kernel_mode: ClassVar[KernelMode] = None

    def prefill_first_row(self, n: int, window_first: int) -> int | None:
        """The first row of an ``n``-row prefill chunk that feeds the statistic (``window_first``:
        the chunk's first row inside the observation window); None: no row of this chunk does."""
        return None

    def reduce(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``[B, Hkv, G, n, T]`` -> the statistic ``[B, Hkv, T]``."""
        return probs.sum((2, 3))  # over the group's query heads and the rows

    def reduce_colsum(self, colsum: torch.Tensor, hkv: int, group: int, width: int) -> torch.Tensor:
        """The decode kernel's column sums ``[B, Hkv, >= width]`` -> the statistic ``[B, Hkv, width]``
        (for ``kernel_mode == "colsum"``)."""
        raise NotImplementedError(f"{type(self).__name__} takes no column sums from the kernel")

    def fold(self, scores: torch.Tensor, slots: torch.Tensor, stat: torch.Tensor) -> None:
        """Fold ``stat`` ``[M, Hkv]`` into rows ``slots`` ``[M]`` of ``scores`` ``[num_slots, Hkv]``."""
        scores.index_add_(0, slots, stat)

    def capture(self, ranks_by_score: bool, evicts_in_decode: bool) -> str | None:
        """How a decode step can be captured: ``"statistic"`` (the kernel folds the statistic inside
        the graph), ``"plain"`` (decode observes nothing; a policy that evicts in decode ranks by
        the scores its tokens got when written, after the replay), or None (eager).
        ``ranks_by_score``: the policy ranks by the raw score (no ``selection_scores``)."""
        return "plain" if ranks_by_score or not evicts_in_decode else None


class AccumulatedAttention(ScoreStatistic):
    """Every row's attention, accumulated (H2O)."""

    reads_attention = True
    observes_decode = True
    observes_every_prefill_row = True
    kernel_mode = "fold"

    def prefill_first_row(self, n: int, window_first: int) -> int | None:
        return 0

    def capture(self, ranks_by_score: bool, evicts_in_decode: bool) -> str | None:
        # The kernel adds the column sums inside the graph; a policy that re-ranks at selection
        # time would need them in eager code, so it is not captured.
        return "statistic" if ranks_by_score else None


class LastRowAttention(ScoreStatistic):
    """The newest query's attention, averaged over the layer's query heads, replacing (TOVA)."""

    reads_attention = True
    observes_decode = True
    kernel_mode = "colsum"

    def prefill_first_row(self, n: int, window_first: int) -> int | None:
        return n - 1

    def reduce(self, probs: torch.Tensor) -> torch.Tensor:
        hkv = probs.shape[1]
        return probs[:, :, :, -1].mean((1, 2))[:, None, :].expand(-1, hkv, -1)

    def reduce_colsum(self, colsum: torch.Tensor, hkv: int, group: int, width: int) -> torch.Tensor:
        return (colsum[:, :, :width].sum(1, keepdim=True) / (hkv * group)).expand(-1, hkv, -1)

    def fold(self, scores: torch.Tensor, slots: torch.Tensor, stat: torch.Tensor) -> None:
        scores.index_copy_(0, slots, stat)

    def capture(self, ranks_by_score: bool, evicts_in_decode: bool) -> str | None:
        return None  # the replacement happens in eager code after the kernel


class ObservationWindow(ScoreStatistic):
    """The prompt's last rows (the strategy's ``window``), summed (SnapKV)."""

    reads_attention = True

    def prefill_first_row(self, n: int, window_first: int) -> int | None:
        return window_first if window_first < n else None


NO_STATISTIC = ScoreStatistic()
ACCUMULATED = AccumulatedAttention()
LAST_ROW = LastRowAttention()
OBSERVATION_WINDOW = ObservationWindow()
