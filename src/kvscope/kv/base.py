"""The KV strategy contract: the two sides a strategy implements, and the facts it declares.

A strategy is one class (one file) that implements both sides of the contract:

* :class:`~kvscope.kv.manager.KVManager`, the scheduler side, with no tensors: ``lookup_prefix``,
  ``allocate`` (admit and grow; False means "no room"), ``free``, ``swap_out``/``swap_in``,
  ``fork``, ``usage`` and ``stats``;
* :class:`~kvscope.kv.backend.KVBackend`, the worker side: ``bind`` (its memory), ``begin_step``
  (the step's attention), ``end_step`` (bookkeeping once the step's tokens are computed), and the
  optional graph protocol ``decode_graphs`` (:class:`~kvscope.kv.backend.GraphDecode`).

The engine hands the scheduler the first view and the model runner the second. Beside them a
strategy declares its :class:`StrategyFacts` (where its KV lives, whether it is lossless, what
share of a prompt it keeps) and, to serve as ``adaptive``'s long child, a typed hand-over
(:meth:`KVStrategy.adopt`). This module re-exports the types a strategy author needs.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from kvscope.kv.backend import KVBackend, KVSetup, StepBatch, TensorParallel
from kvscope.kv.graphs import BlockTableLayout, GraphStatistics
from kvscope.kv.manager import KVManager, KVUsage
from kvscope.request import Request

__all__ = [
    "Adoption", "BlockTableLayout", "GraphStatistics", "Handover", "KVBackend", "KVManager", "KVSetup",
    "KVStrategy", "KVUsage", "StepBatch", "StrategyFacts", "TensorParallel",
]


@dataclass(frozen=True)
class StrategyFacts:
    """What the report, the advisor, the cost model and ``adaptive`` may know about a configured
    strategy: read from the strategy itself (:meth:`KVStrategy.facts`), never from its name.

    Attributes:
        name: the registered name.
        residence: where a request's KV lives between steps, ``"device"`` or ``"host"``.
        lossless: attention equals a full cache's.
        kept_share: share of a prompt's KV kept (device) or read per decode step (host), for the
            arguments given; 1.0 when lossless; None when no fixed share exists (an absolute budget
            in tokens with no prompt length given, a per-request choice).
        long_child: may serve as ``adaptive``'s long child (implements :meth:`KVStrategy.adopt`).
        reserves_context: admission reserves a whole context per request (a slab), not blocks.
        graph_decode: decode steps may replay CUDA graphs (on a GPU with the Triton backend).
        pool_independent: what a lone sequence sees cannot depend on the KV pool's size (lossless,
            or lossy by a budget only), so quality measured with one pool holds for another.
        kv_bits: bits a stored K/V element takes, scales included (amortised); None: the model's
            dtype (a strategy that quantizes its cache says how much it packs).
        selects_per_step: keeps every token resident and reads only ``kept_share`` of them per
            decode step (query-aware selection over a resident cache): saves bandwidth, not memory.
    """

    name: str
    residence: Literal["device", "host"]
    lossless: bool
    kept_share: float | None
    long_child: bool
    reserves_context: bool
    graph_decode: bool
    pool_independent: bool
    kv_bits: float | None = None
    selects_per_step: bool = False


class Adoption(enum.Enum):
    """What :meth:`KVStrategy.adopt` did with a hand-over."""

    #: Nothing changed; the donor keeps the request.
    REFUSED = "refused"
    #: The adopter now owns the hand-over's blocks (same pool): the donor forgets them, unfreed.
    TOOK_BLOCKS = "took_blocks"
    #: The adopter copied the K/V into its own memory: the donor frees the request as usual.
    COPIED = "copied"


@dataclass(frozen=True)
class Handover:
    """A running request moved from ``adaptive``'s full child to its long child.

    Attributes:
        request: the request; its first ``held`` tokens are computed.
        held: tokens whose K/V move.
        blocks: the donor's blocks holding them in token order (same pool as the donor's cache).
        read_kv: returns their K/V, ``[L, 2, held, Hkv, D]`` on the donor's device (read on demand:
            a strategy drawing from the shared pool never needs the copy).
    """

    request: Request
    held: int
    blocks: list[int]
    read_kv: Callable[[], torch.Tensor]


class KVStrategy(KVManager, KVBackend):
    """Base class of every KV-cache management strategy (one subclass per file): both sides, and
    the facts the report, the advisor and ``adaptive`` read."""

    #: Produces exactly the attention of a full cache (so outputs equal HF transformers').
    lossless: ClassVar[bool] = True
    #: Where a request's KV lives between steps (see :class:`StrategyFacts`).
    residence: ClassVar[Literal["device", "host"]] = "device"
    #: Admission reserves a whole context per request (``contiguous``'s slab).
    reserves_context: ClassVar[bool] = False
    #: Decode steps may replay CUDA graphs (:meth:`decode_graphs`); instances may refine it (:meth:`facts`).
    graph_decode: ClassVar[bool] = True
    #: A lossy strategy that may drop tokens when the pool is full (so its quality depends on the
    #: pool); a budget-only policy says False. Ignored when lossless.
    drops_under_pressure: ClassVar[bool] = True
    #: Keeps all KV resident and reads a selected share per decode step (see :class:`StrategyFacts`).
    selects_per_step: ClassVar[bool] = False
    #: The engine may schedule and launch step t+1 before step t's tokens reach the host
    #: (``EngineConfig.async_scheduling``). Requires that neither side reads the ids of a request's
    #: pending tokens (``Request.num_pending_tokens``; ``all_token_ids`` holds the known ones) and
    #: that memory freed while a step is in flight is reused only by work the device runs after
    #: it: true of device memory on one stream, and of host memory that only stream-ordered copies
    #: write (a CPU write to it must first wait for the device, as ``HostOffloadStrategy.adopt`` does).
    async_scheduling: ClassVar[bool] = True
    #: As ``adaptive``'s long child, draws from the full child's block pool and KV tensor (an
    #: eviction policy: ``extra_slot_bytes``, ``bind_shared``, ``num_held_tokens``, ``lift_budget``);
    #: otherwise it is bound with its own share of the memory (``adaptive``'s ``long_share``).
    shares_pool: ClassVar[bool] = False

    def __init__(self) -> None:
        self.setup: KVSetup | None = None

    # ---- facts -------------------------------------------------------------------------------------
    def kept_share(self, prompt_tokens: int | None = None) -> float | None:
        """Share of a ``prompt_tokens``-token prompt's KV this configuration keeps (or reads per
        step, for a host strategy): 1.0 when lossless, None when it has no fixed share (an absolute
        budget and no prompt length). Budget-driven strategies override it."""
        return 1.0 if self.lossless else None

    def kv_bits(self) -> float | None:
        """Bits per stored K/V element, scales included; None (the default): the model's dtype."""
        return None

    def decode_read_bytes(self, context: int) -> int | None:
        """Device bytes of KV and KV metadata that one decode row with ``context`` tokens (the new one
        included) must read per step, all layers (a bound strategy); None (the default): not stated.
        A memory roofline of the decode step adds the model's weight bytes."""
        return None

    @classmethod
    def args_for_share(cls, share: float) -> dict[str, Any] | None:
        """Constructor arguments that make this strategy keep ``share`` of a prompt (``adaptive``'s
        ``long_budget_ratio``); ``{}`` for a lossless strategy, None when it has no budget."""
        return {} if cls.lossless else None

    def adopt(self, handover: Handover) -> Adoption:
        """Take over a running request from ``adaptive``'s full child (a long child's contract,
        see :class:`Handover`); the default refuses. A strategy that implements it is a long child."""
        return Adoption.REFUSED

    def facts(self) -> StrategyFacts:
        """This configuration's :class:`StrategyFacts`."""
        return StrategyFacts(
            name=self.name, residence=self.residence, lossless=self.lossless, kept_share=self.kept_share(),
            long_child=type(self).adopt is not KVStrategy.adopt, reserves_context=self.reserves_context,
            graph_decode=self.graph_decode, pool_independent=self.lossless or not self.drops_under_pressure,
            kv_bits=self.kv_bits(), selects_per_step=self.selects_per_step,
        )
