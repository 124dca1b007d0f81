"""``adaptive``: each request's KV treatment chosen at admission, inside one engine.

The study's guidance is "no universal optimal strategy: full cache for short requests, compression
or offload for long ones". ``adaptive`` does that per request with two children:

* ``full``: ``paged`` (prefix caching off: blocks may change owner, see below);
* ``long``: any strategy implementing the hand-over (:meth:`KVStrategy.adopt`), chosen by its
  facts, never its name: one whose KV lives on the device (an eviction policy; ``h2o`` by default,
  at ``long_budget_ratio``) draws from the *same* block pool and KV tensor as ``full``
  (``extra_slot_bytes``, ``bind_shared``, ``num_held_tokens``, ``lift_budget``: it declares
  ``shares_pool``); any other gets ``long_share`` of the device budget for its own memory (a host
  child: as little as ``min_device_bytes`` when derived; ``quant``: a quantized pool of its own).

Decisions, each counted in ``stats()``:

1. **Admission.** A request whose prompt plus requested output reaches ``long_threshold`` tokens
   (never when it is None, as a derivation may find), or whose prompt cannot fit the full child at
   all, goes to ``long``; so does any request admitted while the pool's use is at or above
   ``pressure``, if it is at least ``pressure_min_length`` tokens long. Everything else gets full
   paged KV (a shorter request waits for it, as under ``paged``).
2. **Pressure.** When a running full request of at least ``pressure_min_length`` tokens cannot grow
   because the pool is exhausted, it is compressed or offloaded instead of preempted. With an eviction child its blocks move to that
   child, which evicts it down to its budget at once and frees the rest; with ``offload`` /
   ``infinigen`` its computed K/V is copied into the host child's pool (InfiniGen also computes
   their partial keys), with ``quant`` quantized into its pool, and its blocks are freed. Offloaded requests stay on the host until they end.
3. **Relief.** When the pool's use falls below ``relief``, requests compressed under pressure stop
   evicting and keep every new token again (the tokens already evicted stay gone).

Every request is in exactly one child from admission to ``free``; the scheduler sees one strategy.

**Thresholds from a study.** ``thresholds_from`` names a study's ``results.jsonl``;
:mod:`kvscope.study.adaptive_derivation` (imported only then: kv never imports study) derives ``long_threshold`` (the request length at which a
long-context child beats full paged KV on the measured goodput while keeping quality at or above
``quality_floor`` of paged's) and the long child with its measured arguments. Arguments given
explicitly win over derived ones. What was used, and where it came from, is in ``stats()``
(``adaptive_long_threshold``, ``adaptive_long``, ``adaptive_long_budget_ratio``,
``adaptive_thresholds_source``, ``adaptive_thresholds_derived``). When no measured scenario gains
from a long child, ``pressure`` is derived too, as 1.0: the long child then takes only requests
that full KV cannot hold (a full pool, or a prompt too long for it), as the measurements advise.
A host child then gets only the device bytes it needs to serve one request of ``max_model_len``
(``long_share`` derived too): the device pool stays with full KV, which the measurements favour.

**CUDA graphs.** With an eviction child that supports captured decode (``h2o``), every decode step
replays one graph over the shared pool. With any other long child, decode steps whose rows are all
full replay the full child's graphs, and steps with a long row run eagerly.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from kvscope.constants import DEFAULT_BUDGET_RATIO, DEFAULT_LONG_CHILD, QUALITY_FLOOR
from kvscope.errors import ConfigError
from kvscope.kv.base import (
    Adoption, BlockTableLayout, GraphStatistics, Handover, KVSetup, KVStrategy, KVUsage, StepBatch,
)
from kvscope.kv.block_pool import BlockPool, pool_stats
from kvscope.kv.composite import CompositeAttention, requests_of, sub_batch
from kvscope.kv.graphs import BlockTableDecode, block_table_layout_of
from kvscope.kv.paged import PagedStrategy
from kvscope.kv.registry import accepted_args, available, check_args, long_children, register
from kvscope.kv.slot_cache import SlotKVCache
from kvscope.models.base import AttentionBackend
from kvscope.request import Request

#: The full child (lossless, the reference a derivation compares long children with).
FULL_CHILD = PagedStrategy


@register
class AdaptiveStrategy(BlockTableDecode, KVStrategy):
    """Per-request choice between full paged KV and a long-context strategy. Args: ``long``
    (an eviction policy, ``offload`` or ``infinigen``; default ``h2o``), ``long_budget_ratio``
    (0.2), ``long_args`` (other arguments of the long child, a dict), ``long_threshold`` (tokens,
    prompt + max_tokens; 2048), ``pressure`` (0.9), ``relief`` (0.6), ``compress_under_pressure``
    (True), ``pressure_min_length`` (prompt + max_tokens below which pressure never sends a request
    long; None: any), ``long_share`` (device budget share of a host strategy, 0.25; derived as the
    least it needs when a derivation finds no gain), ``block_size`` (16),
    ``thresholds_from`` (a study's results.jsonl: derive ``long_threshold`` and the long child from
    it, see :mod:`kvscope.study.adaptive_derivation`) and ``quality_floor`` (``QUALITY_FLOOR``, for that derivation).
    Arguments left at None take the derived value when ``thresholds_from`` is given, else the
    default above."""

    name = "adaptive"
    lossless = False

    def __init__(
        self,
        long: str | None = None,
        long_budget_ratio: float | None = None,
        long_threshold: int | None = None,
        pressure: float | None = None,
        pressure_min_length: int | None = None,
        relief: float = 0.6,
        compress_under_pressure: bool = True,
        long_share: float | None = None,
        block_size: int = 16,
        long_args: dict[str, Any] | None = None,
        thresholds_from: str | None = None,
        quality_floor: float = QUALITY_FLOOR,
    ) -> None:
        super().__init__()
        choices = long_children()
        if long is not None and long not in choices:
            raise ConfigError(f"adaptive: long must be one of {choices}, got {long!r}")
        for key, val in (("long_budget_ratio", long_budget_ratio), ("pressure", pressure), ("relief", relief),
                         ("long_share", long_share)):
            if val is None and key in ("long_budget_ratio", "pressure", "long_share"):
                continue
            if not isinstance(val, (int, float)) or not 0.0 < val <= 1.0:
                raise ConfigError(f"adaptive: {key} must be in (0, 1], got {val!r}")
        if long_threshold is not None and (not isinstance(long_threshold, int) or isinstance(long_threshold, bool)
                                           or long_threshold < 1):
            raise ConfigError(f"adaptive: long_threshold must be an integer >= 1, got {long_threshold!r}")
        if pressure_min_length is not None and (not isinstance(pressure_min_length, int)
                                                or isinstance(pressure_min_length, bool) or pressure_min_length < 1):
            raise ConfigError(f"adaptive: pressure_min_length must be an integer >= 1, got {pressure_min_length!r}")
        if long_args is not None and not isinstance(long_args, dict):
            raise ConfigError(f"adaptive: long_args must be a dict of the long child's arguments, got {long_args!r}")
        if thresholds_from is not None and not isinstance(thresholds_from, str):
            raise ConfigError(f"adaptive: thresholds_from must be a path, got {thresholds_from!r}")

        derived = None
        if thresholds_from:
            # Imported here: the derivation reads study results (a layer above kv).
            from kvscope.study.adaptive_derivation import derive_thresholds

            derived = derive_thresholds(thresholds_from, quality_floor, long=long)
        self.thresholds = derived
        self.derived_keys: list[str] = []
        if long_threshold is None and derived is not None:
            self.long_threshold: int | None = derived.long_threshold
            self.derived_keys.append("long_threshold")
        else:
            self.long_threshold = 2048 if long_threshold is None else long_threshold
        use_derived_child = derived is not None and derived.long is not None
        long_given = long is not None
        long = long or (derived.long if use_derived_child else None) or DEFAULT_LONG_CHILD
        child = available()[long]
        if use_derived_child and long_budget_ratio is None:
            args = dict(derived.long_args)
            self.derived_keys += ([] if long_given else ["long"]) + ["long_args"]
        else:
            ratio = DEFAULT_BUDGET_RATIO if long_budget_ratio is None else long_budget_ratio
            shared_args = child.args_for_share(ratio)
            if shared_args is None and long_budget_ratio is not None:
                raise ConfigError(f"adaptive: the long child {long!r} has no budget for long_budget_ratio")
            args = dict(shared_args or {})  # a child without a budget (quant) keeps its defaults
        args.update(long_args or {})
        self.long_name = long
        on_host = child.residence == "host"
        no_gain = derived is not None and not any(sc.verdict == "long" for sc in derived.scenarios)
        # None: the host child gets the least device memory that serves it (set at bind).
        self.long_share: float | None = 0.25 if long_share is None else float(long_share)
        if pressure is None and no_gain:
            # No measured scenario gains from the long child: it takes only what full KV cannot hold.
            self.pressure = 1.0
            self.derived_keys.append("pressure")
            if long_share is None and on_host:
                self.long_share = None
                self.derived_keys.append("long_share")
        else:
            self.pressure = 0.9 if pressure is None else float(pressure)
            if relief >= self.pressure:
                raise ConfigError(f"adaptive: relief ({relief}) must be below pressure ({self.pressure})")
        self.relief = float(relief)
        if pressure_min_length is None and use_derived_child and derived.pressure_min_length is not None:
            self.pressure_min_length: int | None = derived.pressure_min_length
            self.derived_keys.append("pressure_min_length")
        else:
            self.pressure_min_length = pressure_min_length
        self.compress_under_pressure = bool(compress_under_pressure)
        self.block_size = block_size
        self.full = PagedStrategy(block_size=block_size, enable_prefix_caching=False)
        # A child drawing from the full child's pool must share its blocks; one with memory of its
        # own takes the block size where it has one, else keeps its layout (quant's KIVI groups).
        own = {"block_size": block_size} if child.shares_pool or "block_size" in accepted_args(child) else {}
        check_args(child, {**own, **args}, owner=f"adaptive: long_args of the long child {long!r}")
        try:
            self.long = child(**own, **args)
        except TypeError as e:
            raise ConfigError(f"adaptive: bad arguments {args} for the long child {long!r}: {e}") from None
        # Share of a prompt's KV the child keeps (1 = lossless; None for a budget in tokens).
        self.long_budget_ratio = self.long.kept_share()
        # An eviction child draws from the full child's pool; any other has its own share of memory.
        self.shared = child.shares_pool
        self.route: dict[str, KVStrategy] = {}
        self.compressed: dict[str, Request] = {}
        self.counts = {"admitted_full": 0, "admitted_long_length": 0, "admitted_long_pressure": 0,
                       "compressed_under_pressure": 0, "offloaded_under_pressure": 0, "relieved": 0}

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def async_scheduling(self) -> bool:  # type: ignore[override]
        """Whether the engine may schedule asynchronously (see :class:`KVStrategy`): as both
        children allow (a host child's hand-over waits for the device before the CPU writes its pool)."""
        return self.full.async_scheduling and self.long.async_scheduling

    def bind(self, setup: KVSetup) -> None:
        self.setup = setup
        m = setup.model
        self.bytes_per_token = m.kv_bytes_per_token(setup.dtype)
        if self.shared:
            # One pool for both children; every slot carries the eviction child's score/position.
            slot_bytes = self.bytes_per_token + self.long.extra_slot_bytes(m)
            num_blocks = setup.kv_memory_bytes // (slot_bytes * self.block_size)
            if num_blocks < 1:
                raise ConfigError(f"adaptive: kv_memory_bytes={setup.kv_memory_bytes} is smaller than one block "
                                  f"({slot_bytes * self.block_size} bytes)")
            pool = BlockPool(num_blocks, enable_caching=False)
            cache = SlotKVCache(m, num_blocks * self.block_size, setup.device, setup.dtype)
            self.full.bind_shared(setup, pool, cache)
            self.long.bind_shared(setup, pool, cache)
        else:
            if self.long_share is None:
                long_bytes = self.long.min_device_bytes(setup)
                if long_bytes >= setup.kv_memory_bytes:
                    raise ConfigError(
                        f"adaptive: the long child {self.long_name!r} needs {long_bytes} device bytes to serve one "
                        f"request of max_model_len={setup.max_model_len}, the whole kv_memory_bytes="
                        f"{setup.kv_memory_bytes} or more; give long_share explicitly or raise kv_memory_bytes")
                self.long_share = long_bytes / setup.kv_memory_bytes
            else:
                long_bytes = int(setup.kv_memory_bytes * self.long_share)
            self.long.bind(dataclasses.replace(setup, kv_memory_bytes=long_bytes))
            self.full.bind(dataclasses.replace(setup, kv_memory_bytes=setup.kv_memory_bytes - long_bytes))

    def attach_model(self, loaded) -> None:
        self.long.attach_model(loaded)

    # ---- decisions -------------------------------------------------------------------------------
    def pool_use(self) -> float:
        """Share of the full child's block pool in use (shared with an eviction child)."""
        pool = self.full.pool
        return pool.num_used / pool.num_blocks

    def _choose(self, request: Request) -> tuple[KVStrategy, str]:
        total = request.num_prompt_tokens + request.params.max_tokens
        by_length = self.long_threshold is not None and total >= self.long_threshold
        if by_length or request.num_prompt_tokens > self.full.max_request_tokens():
            return self.long, "admitted_long_length"
        if self.pool_use() >= self.pressure and self._may_go_long_under_pressure(request):
            return self.long, "admitted_long_pressure"
        return self.full, "admitted_full"

    def _may_go_long_under_pressure(self, request: Request) -> bool:
        total = request.num_prompt_tokens + request.params.max_tokens
        return self.pressure_min_length is None or total >= self.pressure_min_length

    # ---- scheduler side --------------------------------------------------------------------------
    def max_request_tokens(self) -> int:
        return max(self.full.max_request_tokens(), self.long.max_request_tokens())

    def max_sequence_tokens(self) -> int:
        return max(self.full.max_sequence_tokens(), self.long.max_sequence_tokens())

    def allocate(self, request: Request, num_tokens: int) -> bool:
        rid = request.request_id
        child = self.route.get(rid)
        if child is None:
            child, reason = self._choose(request)
            if not child.allocate(request, num_tokens):
                return False
            self.route[rid] = child
            self.counts[reason] += 1
            return True
        if child.allocate(request, num_tokens):
            return True
        if (child is not self.full or not self.compress_under_pressure or not request.num_computed_tokens
                or not self._may_go_long_under_pressure(request)):
            return False
        n = request.num_computed_tokens
        handover = Handover(request, n, self.full.tables[rid], lambda: self.full.read_kv(request, n))
        adoption = self.long.adopt(handover)
        if adoption is Adoption.REFUSED:
            return False
        if adoption is Adoption.TOOK_BLOCKS:  # same pool: the blocks now belong to the long child
            self.full.release(request)
            self.compressed[rid] = request
            self.counts["compressed_under_pressure"] += 1
        else:  # copied (offloaded): the full child's blocks are freed
            self.full.free(request)
            self.counts["offloaded_under_pressure"] += 1
        self.route[rid] = self.long
        return self.long.allocate(request, num_tokens)

    def free(self, request: Request) -> None:
        child = self.route.pop(request.request_id, None)
        if child is not None:
            child.free(request)
        self.compressed.pop(request.request_id, None)

    def stats(self) -> dict[str, Any]:
        long = self.long.stats()
        out: dict[str, Any] = {f"adaptive_{k}": v for k, v in self.counts.items()}
        out["adaptive_requests_full"] = sum(1 for c in self.route.values() if c is self.full)
        out["adaptive_requests_long"] = sum(1 for c in self.route.values() if c is self.long)
        out["adaptive_long_threshold"] = self.long_threshold
        out["adaptive_long"] = self.long_name
        out["adaptive_long_budget_ratio"] = self.long_budget_ratio
        out["adaptive_pressure"] = self.pressure
        out["adaptive_pressure_min_length"] = self.pressure_min_length
        if not self.shared:
            out["adaptive_long_share"] = self.long_share
        out["adaptive_thresholds_source"] = self.thresholds.describe() if self.thresholds else "arguments"
        out["adaptive_thresholds_derived"] = list(self.derived_keys)
        if self.shared:
            used = self.full.num_held_tokens() + self.long.num_held_tokens()
            out.update(pool_stats(self.full.pool, self.block_size, self.bytes_per_token, used))
            out.update({k: long[k] for k in ("num_evictions", "evicted_tokens", "freed_blocks")})
        else:
            full = self.full.stats()
            out.update({k: full[k] for k in ("block_size", "num_blocks", "blocks_used", "blocks_free")})
            for key in ("kv_bytes_reserved", "kv_bytes_allocated", "kv_bytes_used"):
                out[key] = full[key] + long[key]
            out["internal_fragmentation"] = full["internal_fragmentation"]
            out.update({k: v for k, v in long.items() if k.startswith(("host_", "transfer_", "selected_"))})
        return out

    def usage(self) -> KVUsage:
        if self.shared:
            bpt = self.bytes_per_token
            used = self.full.num_held_tokens() + self.long.num_held_tokens()
            return KVUsage(used * bpt, self.full.pool.num_used * self.block_size * bpt)
        full, long = self.full.usage(), self.long.usage()
        return KVUsage(full.kv_bytes_used + long.kv_bytes_used, full.kv_bytes_allocated + long.kv_bytes_allocated,
                       long.host_kv_bytes)

    # ---- model side ------------------------------------------------------------------------------
    def _groups(self, batch: StepBatch) -> list[tuple[KVStrategy, list[int]]]:
        """Each child with requests in ``batch``, and their indices in it."""
        members: dict[int, list[int]] = {}
        for i, req in enumerate(batch.requests):
            members.setdefault(id(self.route[req.request_id]), []).append(i)
        return [(child, members[id(child)]) for child in (self.full, self.long) if id(child) in members]

    def begin_step(self, batch: StepBatch) -> AttentionBackend:
        groups = self._groups(batch)
        if len(groups) == 1:
            return groups[0][0].begin_step(batch)
        parts = []
        for child, members in groups:
            sub, rows = sub_batch(batch, members)
            parts.append((child.begin_step(sub), rows))
        return CompositeAttention(parts)

    # ---- CUDA-graph decode ----------------------------------------------------------------------
    # With an eviction child whose decode steps can be captured: one pool, one cache, one kernel for
    # every row. Otherwise the full child's graphs, replayed only for steps without long rows.
    def _long_in_graphs(self) -> bool:
        return self.shared and block_table_layout_of(self.long) is not None

    def block_table_layout(self) -> BlockTableLayout | None:
        return block_table_layout_of(self.long if self._long_in_graphs() else self.full)

    def graph_ready(self, batch: StepBatch) -> bool:
        return self._long_in_graphs() or all(self._owner(r) is self.full for r in batch.requests)

    def block_tables(self, batch: StepBatch) -> list[list[int]]:
        return self._per_request(batch, lambda child, sub: child.block_tables(sub))

    def held_tokens(self, batch: StepBatch) -> list[int]:
        # A full request holds every computed token; an eviction one its resident tokens.
        return self._per_request(batch, lambda child, sub: child.held_tokens(sub))

    def _per_request(self, batch: StepBatch, query: Callable[[KVStrategy, StepBatch], list[Any]]) -> list[Any]:
        """``query`` asked of each child about its requests of ``batch`` (once per child, not per
        request: this runs on the CUDA-graph decode path), answers back in batch order."""
        out: list[Any] = [None] * len(batch.requests)
        for child, members in self._groups(batch):
            for i, value in zip(members, query(child, requests_of(batch, members))):
                out[i] = value
        return out

    def graph_statistics(self) -> GraphStatistics | None:
        # Folded for every row: a full request's slots carry scores nobody reads until it is
        # compressed, and adopting it resets them.
        return self.long.graph_statistics() if self._long_in_graphs() else None

    def _owner(self, request: Request) -> KVStrategy:
        return self.route[request.request_id]

    def end_step(self, batch: StepBatch) -> None:
        # Split again rather than kept from begin_step: a step replayed from a graph has none.
        for child, members in self._groups(batch):
            child.end_step(batch if len(members) == len(batch.requests) else sub_batch(batch, members)[0])
        if self.compressed and self.pool_use() < self.relief:
            for req in self.compressed.values():
                self.long.lift_budget(req)
                self.counts["relieved"] += 1
            self.compressed.clear()
