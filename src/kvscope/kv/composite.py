"""Batch splitting for strategies made of children (``adaptive``): each child's rows of a step,
and one attention backend routing every layer's rows to the child that holds them."""
from __future__ import annotations

import dataclasses

import torch

from kvscope.device_copy import to_device
from kvscope.kv.base import StepBatch
from kvscope.models.base import AttentionBackend


class CompositeAttention:
    """Routes each child's query rows to that child's backend (``rows``: ``[n_i]`` indices)."""

    def __init__(self, parts: list[tuple[AttentionBackend, torch.Tensor]]) -> None:
        self.parts = parts
        # The hook only where a child has one: a backend with the hook makes the step run eagerly
        # (``engine/piecewise.py``), which children that never fetch should not cost.
        if any(getattr(backend, "layer_input", None) is not None for backend, _ in parts):
            self.layer_input = self._layer_input

    def _layer_input(self, layer: int, x: torch.Tensor) -> None:
        for backend, rows in self.parts:
            hook = getattr(backend, "layer_input", None)
            if hook is not None:
                hook(layer, x[rows])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for backend, rows in self.parts:
            out[rows] = backend.attend(layer, q[rows], k[rows], v[rows])
        return out


def requests_of(batch: StepBatch, members: list[int]) -> StepBatch:
    """``batch`` narrowed to requests ``members`` for the graph queries (``block_tables``,
    ``held_tokens``), which read only ``requests``: the tensors are shared, not sliced."""
    return dataclasses.replace(batch, requests=[batch.requests[i] for i in members])


def sub_batch(batch: StepBatch, members: list[int]) -> tuple[StepBatch, torch.Tensor]:
    """The part of ``batch`` made of requests ``members``, and its rows ``[n]`` in the full batch."""
    qs = batch.query_start
    rows = [r for i in members for r in range(qs[i], qs[i + 1])]
    index = to_device(rows, batch.input_ids.device, torch.long)
    starts = [0]
    for i in members:
        starts.append(starts[-1] + batch.num_new_tokens[i])
    sub = StepBatch(
        requests=[batch.requests[i] for i in members],
        num_new_tokens=[batch.num_new_tokens[i] for i in members],
        input_ids=batch.input_ids[index],
        positions=batch.positions[index],
        query_start=starts,
    )
    return sub, index
