"""The worker side of a KV strategy: the memory it owns and the attention of each step.

The model runner (``engine/model_runner.py``) sees a strategy only as a :class:`KVBackend`:
``bind`` allocates its memory once, ``begin_step`` turns a scheduled :class:`StepBatch` into the
:class:`~kvscope.models.base.AttentionBackend` the model calls layer by layer (it knows where each
request's KV lives), and ``end_step`` runs after the step's tokens are computed (prefix-cache
registration, eviction).

``decode_graphs`` is the one optional graph protocol. A decode step of a small model, or of any
model at small batch, is bound by the host (a dozen kernel launches per layer); a CUDA graph records
the step's launches once and replays them with one call. A graph replays fixed addresses and
shapes, so a strategy that supports it describes its decode steps as :class:`GraphStep` objects over
static buffers, one per key (a batch-size bucket, or InfiniGen's batch and context buckets), and
the engine's graph runner (``engine/cuda_graph.py``) warms each up, captures it, and replays it for
every pure-decode step the strategy's :class:`GraphDecode` maps to that key. The runner is the only
place that captures. Block-table strategies get theirs from :mod:`kvscope.kv.graphs`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Hashable
from typing import TYPE_CHECKING, Protocol

import torch

from kvscope.models.base import AttentionBackend
from kvscope.models.config import ModelConfig
from kvscope.request import Request

if TYPE_CHECKING:
    from kvscope.models.loader import LoadedModel


class TensorParallel(Protocol):
    """The tensor-parallel group whose rank holds this strategy's KV heads (``KVSetup.tensor_parallel``).

    A rank's strategy sees only its ``num_kv_heads / size`` heads. A decision taken per KV head
    needs nothing more; a statistic taken *across* heads (a mean count over a request's heads, a
    token's best score over all heads) must be reduced over the group, so that every rank decides
    as one rank holding every head would. Every rank runs the same steps in lockstep, so a reduction
    made by the worker side (``begin_step``, the step's attention, ``end_step``) meets its peers';
    never make one from the scheduler side, which only rank 0 runs live.
    """

    size: int

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``t`` elementwise over the ranks (``op`` ``"sum"`` or ``"max"``), in place; returns ``t``."""


@dataclass(frozen=True)
class KVSetup:
    """Everything a strategy needs to size and place its memory."""

    model: ModelConfig
    device: torch.device
    dtype: torch.dtype
    kv_memory_bytes: int
    max_model_len: int
    max_num_seqs: int
    swap_space_bytes: int
    #: ``"torch"`` or ``"triton"`` (resolved from ``EngineConfig.attention_backend``).
    attention_backend: str = "torch"
    #: Batch-size buckets of captured decode graphs (CUDA, ``enforce_eager=False``), else None.
    cuda_graph_sizes: list[int] | None = None
    #: The group this rank's heads are a share of (``model`` is then the shard's config); None on one rank.
    tensor_parallel: TensorParallel | None = None


@dataclass
class StepBatch:
    """The scheduled work of one step, flattened like vLLM's varlen batches.

    Request ``i`` computes ``num_new_tokens[i]`` tokens starting at its ``num_computed_tokens``;
    its query rows are ``query_start[i]:query_start[i+1]`` of the flattened ``[N]`` tensors.
    """

    requests: list[Request]
    num_new_tokens: list[int]
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    query_start: list[int]  # [B + 1]
    #: ``(rows [P], ids [P])`` int64 on the device: input ids the host does not know yet (sampled
    #: by the step still in flight, async scheduling), written into ``input_ids`` (or a captured
    #: step's static ids) on the device before the forward; the host-side ids there are 0.
    input_patch: tuple[torch.Tensor, torch.Tensor] | None = None


class GraphStep(Protocol):
    """One capturable decode step of ``batch_size`` rows over static buffers.

    The runner calls, eagerly, :meth:`load` before each replay and :meth:`replayed` after it; the
    captured forward is ``begin(); model(input_ids, positions, attention); finish()``, so the Python
    of ``begin``/``finish`` runs only while warming up and capturing. Rows beyond the batch are
    padding whose outputs are dropped.
    """

    batch_size: int
    input_ids: torch.Tensor  # [batch_size] static token ids
    positions: torch.Tensor  # [batch_size] static positions
    attention: AttentionBackend

    def load(self, batch: StepBatch) -> None:
        """Fill the static inputs for ``batch`` (``len(batch.requests) <= batch_size`` decode rows)."""

    def begin(self) -> None:
        """Captured before the forward: device work that derives the step's metadata."""

    def finish(self) -> None:
        """Captured after the forward: joins side streams."""

    def replayed(self, batch: StepBatch) -> None:
        """After a replay: host-side counters the captured work could not move."""

    def captured(self) -> None:
        """Once, after the warm-up and the capture: undo what the warm-up pass counted."""


class GraphDecode(Protocol):
    """A strategy's capturable decode steps (:meth:`KVBackend.decode_graphs`)."""

    #: The largest batch any step holds; the runner asks :meth:`key` only for batches up to it.
    max_batch: int

    def key(self, batch: StepBatch) -> Hashable | None:
        """The step that runs the pure-decode ``batch`` (one sampled token per request), or None
        to run it eagerly. No side effects: the step's :meth:`GraphStep.load` may have some."""

    def step(self, key: Hashable) -> GraphStep:
        """A new static step for ``key``, which the runner then captures."""

    def keys_at_start(self) -> list[Hashable]:
        """Keys captured when the engine starts (largest first: the memory pool then fits the
        smaller ones), so that no step pays a capture; others are captured at first use."""


class KVBackend(ABC):
    """What the model runner may ask of a KV strategy."""

    @abstractmethod
    def bind(self, setup: KVSetup) -> None:
        """Allocate the strategy's memory for ``setup``. Called once by the engine."""

    def attach_model(self, loaded: "LoadedModel") -> None:
        """Called once after :meth:`bind` with the model being served. Strategies that read the
        weights (InfiniGen's speculation and skewing) keep what they need; others ignore it."""

    @abstractmethod
    def begin_step(self, batch: StepBatch) -> AttentionBackend:
        """Return the attention backend the model uses for this step."""

    def end_step(self, batch: StepBatch) -> None:
        """Called after the step's tokens are computed and the counters moved forward."""

    def decode_graphs(self) -> GraphDecode | None:
        """The static decode steps the engine may capture as CUDA graphs (after :meth:`bind`, on a
        CUDA device with graph sizes set); None (the default): every step runs eagerly."""
        return None
