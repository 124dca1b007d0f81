"""The KV strategy contract: what the scheduler and the model may ask of a KV-cache manager.

Scheduler side (no tensors): ``lookup_prefix`` / ``allocate`` (admit and grow) / ``free`` /
``swap_out`` / ``swap_in`` / ``fork`` / ``stats``. ``allocate`` returning False means "no room":
the scheduler preempts (or, for strategies that evict, the strategy has already made room).

Model side: ``begin_step`` turns the scheduled batch into an :class:`AttentionBackend` that knows
where each request's KV lives; ``end_step`` lets the strategy update its bookkeeping (prefix-cache
registration, eviction) once the step's tokens are computed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch

from kvscope.errors import ConfigError
from kvscope.models.base import AttentionBackend
from kvscope.models.config import ModelConfig
from kvscope.request import Request

if TYPE_CHECKING:
    from kvscope.kv.slot_cache import SlotKVCache
    from kvscope.models.loader import LoadedModel


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


@dataclass(frozen=True)
class BlockTableLayout:
    """Where a strategy's decode attention reads KV when every request's tokens fill whole blocks
    of ``cache`` in order: what a captured CUDA graph needs (``engine/cuda_graph.py``)."""

    cache: "SlotKVCache"
    block_size: int


class GraphStatistics(Protocol):
    """Per-token state of a captured decode step: positions of the new tokens, and H2O's
    accumulated column sums."""

    def begin(self, new_slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Before a replay, eagerly: register the step's new tokens (``[n]`` slots and positions)."""

    def layer_scores(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s per-slot scores ``[num_slots, Hkv]`` float32, into which the captured
        decode kernel adds each held token's column sum (``fold_scores``); None to fold nothing."""


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


@dataclass(frozen=True)
class KVUsage:
    """The KV memory the engine tracks peaks of after every step: cheap to produce (no dict, no
    device sync). Bytes; ``host_kv_bytes`` None when the strategy keeps no KV on the host."""

    kv_bytes_used: int
    kv_bytes_allocated: int
    host_kv_bytes: int | None = None


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


class KVStrategy(ABC):
    """Base class of every KV-cache management strategy (one subclass per file)."""

    name: ClassVar[str]
    #: Produces exactly the attention of a full cache (so outputs equal HF transformers').
    lossless: ClassVar[bool] = True
    #: Where a request's KV lives between steps (see :class:`StrategyFacts`).
    residence: ClassVar[Literal["device", "host"]] = "device"
    #: Admission reserves a whole context per request (``contiguous``'s slab).
    reserves_context: ClassVar[bool] = False
    #: Decode steps may replay CUDA graphs; instances may refine it (:meth:`facts`).
    graph_decode: ClassVar[bool] = True
    #: A lossy strategy that may drop tokens when the pool is full (so its quality depends on the
    #: pool); a budget-only policy says False. Ignored when lossless.
    drops_under_pressure: ClassVar[bool] = True
    #: Keeps all KV resident and reads a selected share per decode step (see :class:`StrategyFacts`).
    selects_per_step: ClassVar[bool] = False
    supports_prefix_caching: ClassVar[bool] = False
    supports_swap: ClassVar[bool] = False
    supports_fork: ClassVar[bool] = False

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

    # ---- lifecycle -------------------------------------------------------------------------
    @abstractmethod
    def bind(self, setup: KVSetup) -> None:
        """Allocate the strategy's memory for ``setup``. Called once by the engine."""

    def attach_model(self, loaded: "LoadedModel") -> None:
        """Called once after :meth:`bind` with the model being served. Strategies that read the
        weights (InfiniGen's speculation and skewing) keep what they need; others ignore it."""

    # ---- scheduler side --------------------------------------------------------------------
    @abstractmethod
    def max_request_tokens(self) -> int:
        """The longest prompt a request may have: what one request can hold (the whole pool, or
        one slot), less any room the strategy needs beside the prompt before it can evict."""

    def max_sequence_tokens(self) -> int:
        """The longest sequence a request may reach; strategies that evict can exceed what they hold."""
        return self.max_request_tokens()

    def lookup_prefix(self, request: Request) -> int:
        """Leading tokens of a not-yet-admitted request already cached. No side effects."""
        return 0

    @abstractmethod
    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Make ``request`` hold room for ``num_tokens`` tokens in total.

        For a request that holds nothing yet this admits it (taking prefix-cache hits first,
        which the scheduler then counts as computed). Returns False, changing nothing, when the
        pool cannot provide the room.
        """

    @abstractmethod
    def free(self, request: Request) -> None:
        """Release everything ``request`` holds (finish, abort, preemption by recompute)."""

    def swap_out(self, request: Request) -> int:
        """Move ``request``'s KV to host memory and free its device memory; returns bytes moved."""
        raise ConfigError(f"strategy {self.name!r} does not support swap preemption")

    def swap_in(self, request: Request) -> int | None:
        """Bring a swapped request back; returns bytes moved, or None if there is no room."""
        raise ConfigError(f"strategy {self.name!r} does not support swap preemption")

    def fork(self, parent: Request, child: Request) -> None:
        """Make ``child`` share all of ``parent``'s KV (copy-on-write)."""
        raise ConfigError(f"strategy {self.name!r} does not support forking (n > 1)")

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Accounting counters; see ``docs/architecture.md`` for their meaning."""

    def usage(self) -> KVUsage:
        """What :meth:`stats` says of the KV memory, read after every step: strategies whose
        ``stats`` is costly (or syncs with the device) override it with running counters."""
        s = self.stats()
        return KVUsage(s["kv_bytes_used"], s["kv_bytes_allocated"], s.get("host_kv_bytes"))

    # ---- model side ------------------------------------------------------------------------
    @abstractmethod
    def begin_step(self, batch: StepBatch) -> AttentionBackend:
        """Return the attention backend the model uses for this step."""

    def end_step(self, batch: StepBatch) -> None:
        """Called after the step's tokens are computed and the counters moved forward."""

    # ---- CUDA-graph decode -----------------------------------------------------------------------
    def block_table_layout(self) -> BlockTableLayout | None:
        """The layout when decode steps may replay a captured graph, which runs the paged Triton
        kernels over static block tables; None (the default) keeps the strategy's own backend."""
        return None

    def graph_ready(self, batch: StepBatch) -> bool:
        """Whether this decode ``batch`` may replay the captured graphs (a strategy with rows its
        layout does not cover says no, and the step runs eagerly)."""
        return True

    def held_tokens(self, batch: StepBatch) -> list[int]:
        """Per request, the tokens it holds before the step's new one (with
        :meth:`block_table_layout`): the new token goes to that index of its block table."""
        return [req.num_computed_tokens for req in batch.requests]

    def graph_statistics(self) -> GraphStatistics | None:
        """For a policy that scores tokens by attention: the hooks a captured decode step calls
        (see :class:`GraphStatistics`). None: no statistics."""
        return None

    def replay_decode(self, batch: StepBatch, sample_rows: list[int]) -> torch.Tensor | None:
        """Run ``batch`` from a graph the strategy captured itself and return the logits of
        ``sample_rows`` (``[len(sample_rows), vocab]`` float32), or None to run it eagerly."""
        return None

    def block_tables(self, batch: StepBatch) -> list[list[int]]:
        """Per request of ``batch``, its block ids in token order (with :meth:`block_table_layout`)."""
        raise NotImplementedError(f"strategy {self.name!r} has no block tables")
