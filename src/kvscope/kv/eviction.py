"""The shared eviction mechanism behind ``h2o``, ``streaming``, ``tova``, ``snapkv``, ``knorm`` and
``random``: a budget, a recent window, top-k selection per layer and KV head, and real memory freed.

Storage is the paged block pool. Each request holds ``resident`` slots (the same count in every
layer and KV head), but slot ``j`` of head ``h`` may hold a different token than slot ``j`` of head
``h'``: after RoPE, attention needs no positions, so heads can keep different tokens in one table.
Two more per-slot tensors live beside the KV: the policy's score and the token position.

A step writes the new tokens after the resident ones and attends over ``resident + new`` slots
(computing attention statistics when the policy needs them: column sums, never a T x T matrix in
decode). ``end_step`` then evicts: in every layer and KV head it keeps the recent window plus the
top-scoring older tokens, compacts them into the first ``budget`` slots, and returns the emptied
blocks to the pool. A policy is a subclass that declares its attention statistic (an object of
:mod:`kvscope.kv.statistics`) and how scores are initialised or read at selection time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from kvscope.device_copy import to_device
from kvscope.constants import DEFAULT_BUDGET_RATIO
from kvscope.errors import ConfigError
from kvscope.kv.base import (
    Adoption, BlockTableLayout, Handover, KVSetup, KVStrategy, KVUsage, StepBatch, StrategyFacts,
)
from kvscope.kv.block_pool import BlockPool, pool_stats
from kvscope.kv.eviction_attention import CapturedColumnSums, EvictionAttention
from kvscope.kv.eviction_budget import Budget, check_budget_args, resolve_budget
from kvscope.kv.evict_one import pack_tables, replace_one_torch, replace_one_triton, unpack
from kvscope.kv.graphs import BlockTableDecode
from kvscope.kv.slot_cache import SlotKVCache, table_slots
from kvscope.kv.statistics import NO_STATISTIC, ScoreStatistic
from kvscope.models.config import ModelConfig
from kvscope.request import Request


#: Largest logits buffer a captured decode step may hold for the column sums (bytes).
_GRAPH_LOGITS_BYTES = 2 << 30


class EvictionStrategy(BlockTableDecode, KVStrategy):
    """Base class: budget resolution, the block pool, eviction and compaction.

    The budget is absolute (``budget`` tokens, ``recent`` of them the recent window) or a ratio of
    the prompt length (``budget_ratio``, ``recent_ratio``). ``compress_prompt`` also evicts at the
    end of every prefill step (the "real drop" of the prompt); otherwise the prompt is kept whole
    until the first decode step.
    """

    lossless = False
    drops_under_pressure = False  # keeps what its budget says whatever the pool holds
    shares_pool = True
    #: The attention statistic the scores read (:mod:`kvscope.kv.statistics`): none, accumulated,
    #: last row or observation window. It owns its fold and says whether decode can be captured.
    statistic: ClassVar[ScoreStatistic] = NO_STATISTIC
    #: Whether the cache is kept at budget during decode (SnapKV only compresses the prompt).
    evict_in_decode: ClassVar[bool] = True
    #: Share of the budget given to the recent window when only a total budget is given.
    default_recent_fraction: ClassVar[float] = 0.5
    #: For :data:`~kvscope.kv.statistics.OBSERVATION_WINDOW`: how many final prompt rows are observed.
    window: int = 0
    #: Budget when neither ``budget`` nor ``budget_ratio`` is given (the H2O paper's 20%).
    default_budget_ratio: ClassVar[float] = DEFAULT_BUDGET_RATIO

    def __init__(
        self,
        budget_ratio: float | None = None,
        recent_ratio: float | None = None,
        budget: int | None = None,
        recent: int | None = None,
        compress_prompt: bool = False,
        block_size: int = 16,
    ) -> None:
        super().__init__()
        check_budget_args(self.name, budget_ratio, recent_ratio, budget, recent, block_size)
        if budget is None and budget_ratio is None:
            budget_ratio = self.default_budget_ratio
        self.budget_ratio = budget_ratio
        self.recent_ratio = recent_ratio
        self.budget = budget
        self.recent = recent
        self.compress_prompt = bool(compress_prompt)
        self.block_size = block_size
        self.tables: dict[str, list[int]] = {}
        self.resident: dict[str, int] = {}
        self.budgets: dict[str, Budget] = {}
        self.evicted_tokens = 0
        self.freed_blocks = 0
        self.num_evictions = 0

    # ---- facts -----------------------------------------------------------------------------------
    def kept_share(self, prompt_tokens: int | None = None) -> float | None:
        """The ratio budget; for a budget in tokens ``total / prompt_tokens`` (capped at 1), or None
        when no prompt length is given (the share depends on it)."""
        if self.budget is None:
            return self.budget_ratio
        if not prompt_tokens:
            return None
        return min(1.0, self.resolve_budget(prompt_tokens).total / prompt_tokens)

    @classmethod
    def args_for_share(cls, share: float) -> dict[str, Any] | None:
        return {"budget_ratio": share}

    def facts(self) -> StrategyFacts:
        return dataclasses.replace(super().facts(), graph_decode=self.captured_decode is not None)

    # ---- policy hooks ----------------------------------------------------------------------------
    def initial_scores(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Score of freshly written tokens. ``k``: ``[N, Hkv, D]``; returns ``[N, Hkv]`` float32."""
        return torch.zeros(k.shape[:2], dtype=torch.float32, device=k.device)

    def reset_scores(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Score freshly written tokens before any statistic folds into them: zero. ``slots``,
        ``positions``: ``[N]`` on the device. A policy that pins tokens by position overrides it."""
        # index_fill_, not `scores[:, slots] = 0.0`: item assignment of a Python number copies it
        # to the device from pageable memory, which synchronizes with the GPU.
        self.scores.index_fill_(1, slots.long(), 0.0)

    def selection_scores(self, scores: torch.Tensor, positions: torch.Tensor, request: Request) -> torch.Tensor:
        """Scores used to rank tokens. ``scores``/``positions``: ``[L, r, Hkv]``; higher is kept."""
        return scores

    def resolve_budget(self, num_prompt_tokens: int) -> Budget:
        """The budget of a request with a ``num_prompt_tokens``-token prompt."""
        return resolve_budget(num_prompt_tokens, self.budget, self.recent, self.budget_ratio, self.recent_ratio,
                              self.default_recent_fraction)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def bind(self, setup: KVSetup) -> None:
        m = setup.model
        slot_bytes = m.kv_bytes_per_token(setup.dtype) + self.extra_slot_bytes(m)
        num_blocks = setup.kv_memory_bytes // (slot_bytes * self.block_size)
        if num_blocks < 1:
            raise ConfigError(
                f"{self.name}: kv_memory_bytes={setup.kv_memory_bytes} is smaller than one block "
                f"({slot_bytes * self.block_size} bytes)"
            )
        cache = SlotKVCache(m, num_blocks * self.block_size, setup.device, setup.dtype)
        self.bind_shared(setup, BlockPool(num_blocks, enable_caching=False), cache)

    #: Device bytes per slot besides K/V: a float32 score and an int64 position per layer and KV head.
    @staticmethod
    def extra_slot_bytes(m: ModelConfig) -> int:
        return m.num_layers * m.num_kv_heads * (4 + 8)

    def bind_shared(self, setup: KVSetup, pool: BlockPool, cache: SlotKVCache) -> None:
        """Use a block pool and KV tensor that another strategy may draw from too (``adaptive``);
        the per-slot scores and positions are allocated here, for every slot of ``cache``."""
        self.setup = setup
        m = setup.model
        self.bytes_per_token = m.kv_bytes_per_token(setup.dtype)
        self.pool = pool
        self.cache = cache
        shape = (m.num_layers, cache.num_slots, m.num_kv_heads)
        self.scores = torch.zeros(shape, dtype=torch.float32, device=setup.device)
        self.positions = torch.zeros(shape, dtype=torch.long, device=setup.device)
        self.scale = m.head_dim**-0.5

    # ---- scheduler side --------------------------------------------------------------------------------
    def max_request_tokens(self) -> int:
        # A prompt is kept whole until its first decode step, whose token takes a slot more (eviction
        # follows the step). A pool-sized prompt is served if allocate can evict it first (its budget
        # is below the pool) or if it never decodes (a budget covering the pool caps sequences there).
        pool = self.pool.num_blocks * self.block_size
        return pool if self._budget_covers_pool() or self.resolve_budget(pool).total < pool else pool - 1

    def max_sequence_tokens(self) -> int:
        # Decode keeps a request at its budget, so sequences may outgrow the pool, unless that budget
        # covers the pool: then nothing is ever evicted and the pool is the limit, as for paged.
        return self.pool.num_blocks * self.block_size if self._budget_covers_pool() else 1 << 62

    def _budget_covers_pool(self) -> bool:
        return self.budget is not None and self.budget >= self.pool.num_blocks * self.block_size

    def allocate(self, request: Request, num_tokens: int) -> bool:
        rid = request.request_id
        new = num_tokens - request.num_computed_tokens
        table = self.tables.get(rid)
        resident = self.resident.get(rid, 0)
        if self.evict_in_decode and table is not None and resident + new > self.pool.num_blocks * self.block_size:
            # Alone it would overflow the pool (a pool-sized prompt's first decode step): evict now, not after.
            self._evict(request)
            resident = self.resident[rid]
        need = math.ceil((resident + new) / self.block_size) - (len(table) if table else 0)
        if need > self.pool.num_free:
            return False
        if table is None:
            self.tables[rid] = table = []
            self.resident[rid] = 0
            self.budgets[rid] = self.resolve_budget(request.num_prompt_tokens)
        table.extend(self.pool.allocate(max(need, 0)))
        return True

    def free(self, request: Request) -> None:
        table = self.tables.pop(request.request_id, None)
        if table is not None:
            self.pool.free(list(reversed(table)))
        self.resident.pop(request.request_id, None)
        self.budgets.pop(request.request_id, None)

    def num_held_tokens(self) -> int:
        """Tokens resident over every request (per layer and KV head)."""
        return sum(self.resident.values())

    def adopt(self, handover: Handover) -> Adoption:
        """Take over the hand-over's blocks (``adaptive``'s full child draws from the same pool,
        see :meth:`bind_shared`) and evict the request down to its budget at once, freeing blocks.

        Its attention history is unknown, so scores start at zero: this first eviction keeps the
        oldest tokens beside the recent window (StreamingLLM's choice); the policy's own statistics
        decide from the next step on.
        """
        request, blocks, held = handover.request, handover.blocks, handover.held
        rid = request.request_id
        self.tables[rid] = blocks
        self.resident[rid] = held
        self.budgets[rid] = self.resolve_budget(request.num_prompt_tokens)
        slots = self._slots(blocks, held)
        self.scores[:, slots] = 0.0
        self.positions[:, slots] = torch.arange(held, device=slots.device)[None, :, None]
        self._evict(request)
        return Adoption.TOOK_BLOCKS

    def lift_budget(self, request: Request) -> None:
        """Stop evicting ``request``: from now on it keeps every new token."""
        rid = request.request_id
        self.budgets[rid] = Budget(total=1 << 62, recent=self.budgets[rid].recent)

    def _slots(self, table: list[int], n: int) -> torch.Tensor:
        return table_slots(table, n, self.block_size, self.cache.kv.device)

    def resident_positions(self, request: Request) -> torch.Tensor:
        """Positions of the tokens each layer and KV head keeps: ``[L, Hkv, resident]``, sorted."""
        slots = self._slots(self.tables[request.request_id], self.resident[request.request_id])
        return self.positions[:, slots].transpose(1, 2).sort(dim=-1).values

    def stats(self) -> dict[str, Any]:
        return {
            **pool_stats(self.pool, self.block_size, self.bytes_per_token, sum(self.resident.values())),
            "num_evictions": self.num_evictions,
            "evicted_tokens": self.evicted_tokens,
            "freed_blocks": self.freed_blocks,
        }

    def usage(self) -> KVUsage:
        bpt = self.bytes_per_token
        return KVUsage(self.num_held_tokens() * bpt, self.pool.num_used * self.block_size * bpt)

    # ---- model side ---------------------------------------------------------------------------------
    def begin_step(self, batch: StepBatch) -> EvictionAttention:
        tables, new_slots = [], []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            r = self.resident[req.request_id]
            slots = self._slots(self.tables[req.request_id], r + n)
            tables.append(slots)
            new_slots.append(slots[r:])
        # The first row of each request's chunk inside SnapKV's observation window (the chunk starts
        # at position num_computed_tokens), on the host: no device sync per layer to find it.
        window_first = [max(0, req.num_prompt_tokens - self.window - req.num_computed_tokens) for req in batch.requests]
        return EvictionAttention(
            self, torch.cat(new_slots), tables, batch.query_start, batch.positions, window_first,
            [self.tables[req.request_id] for req in batch.requests],
        )

    # ---- CUDA-graph decode ---------------------------------------------------------------------
    @property
    def captured_decode(self) -> str | None:
        """How a decode step of this policy can be captured: ``"statistic"`` (accumulated attention
        ranked by raw score, ``h2o``: the kernel folds the statistic inside the graph), ``"plain"``
        (decode needs nothing from attention: ``snapkv``, which evicts nothing in decode, and
        ``streaming``, whose scores are fixed when a token is written; plain paged decode over the
        resident tokens, any eviction after the replay), or None (eager)."""
        if self.keyed_initial_scores:  # a key-dependent score is computed in eager code
            return None
        return self.statistic.capture(self._ranks_by_score, self.evict_in_decode)

    def block_table_layout(self) -> BlockTableLayout | None:
        """Captured decode on the Triton backend (see :attr:`captured_decode`); with the statistic,
        only while the kernel's per-row logits buffer (``Hq x max_model_len`` float32) stays small."""
        s, m = self.setup, self.setup.model
        kind = self.captured_decode
        logits = max(s.cuda_graph_sizes or [0]) * m.num_heads * s.max_model_len * 4
        if s.attention_backend != "triton" or kind is None or (kind == "statistic" and logits > _GRAPH_LOGITS_BYTES):
            return None
        return BlockTableLayout(self.cache, self.block_size)

    def block_tables(self, batch: StepBatch) -> list[list[int]]:
        return [self.tables[req.request_id] for req in batch.requests]

    def held_tokens(self, batch: StepBatch) -> list[int]:
        return [self.resident[req.request_id] for req in batch.requests]

    def graph_statistics(self) -> CapturedColumnSums | None:
        kind = self.captured_decode
        return None if kind is None else CapturedColumnSums(self, fold=kind == "statistic")

    def end_step(self, batch: StepBatch) -> None:
        one_over = []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            rid = req.request_id
            if rid not in self.tables:
                continue
            self.resident[rid] += n
            if req.num_computed_tokens > req.num_prompt_tokens:
                evict = self.evict_in_decode
            elif self.evict_in_decode:
                evict = self.compress_prompt  # every prefill chunk, so memory stays bounded
            else:
                evict = req.num_computed_tokens == req.num_prompt_tokens  # once, when the prompt is in
            if not evict:
                continue
            if self._ranks_by_score and n == 1 and self.resident[rid] == self.budgets[rid].total + 1:
                one_over.append(req)
            else:
                self._evict(req)
        if one_over:
            self._replace_one(one_over)

    @property
    def keyed_initial_scores(self) -> bool:
        """Whether a new token's initial score depends on its key (K-norm, random), not just zero."""
        return type(self).initial_scores is not EvictionStrategy.initial_scores

    @property
    def _ranks_by_score(self) -> bool:
        """Whether tokens rank by their raw score (no policy-specific ``selection_scores``)."""
        return type(self).selection_scores is EvictionStrategy.selection_scores

    def _replace_one(self, reqs: list[Request]) -> None:
        """Decode steps one token over budget, all requests at once: in every layer and KV head the
        lowest-scoring token outside the recent window gives its slot to the newest token
        (:mod:`kvscope.kv.evict_one`: one fused kernel on the Triton backend)."""
        bs = self.block_size
        lens = [self.resident[r.request_id] for r in reqs]
        # Whole blocks, their slots computed on the device: a per-token list would cost more host
        # time than the step (64 requests x 1k tokens). One copy for the tables, lengths and windows.
        tables = [self.tables[r.request_id][: -(-n // bs)] for r, n in zip(reqs, lens)]
        packed = to_device(torch.from_numpy(pack_tables(
            tables, lens, [r.num_computed_tokens - self.budgets[r.request_id].recent for r in reqs])),
            self.cache.kv.device)
        replace = replace_one_triton if self.setup.attention_backend == "triton" else replace_one_torch
        replace(self.cache.kv, self.scores, self.positions, *unpack(packed, max(map(len, tables))), bs)
        m = self.setup.model
        for r in reqs:
            rid = r.request_id
            total = self.budgets[rid].total
            self.resident[rid] = total
            table = self.tables[rid]
            nb = math.ceil(total / bs)
            if nb < len(table):
                self.pool.free(list(reversed(table[nb:])))
                self.freed_blocks += len(table) - nb
                del table[nb:]
            self.evicted_tokens += m.num_layers * m.num_kv_heads
            self.num_evictions += 1

    def _evict(self, req: Request) -> None:
        """Keep the recent window and the top-scoring older tokens in every layer and KV head."""
        rid = req.request_id
        budget = self.budgets[rid]
        r = self.resident[rid]
        if r <= budget.total:
            return
        table = self.tables[rid]
        slots = self._slots(table, r)
        pos = self.positions[:, slots]  # [L, r, Hkv]
        rank = self.selection_scores(self.scores[:, slots], pos, req).clone()
        rank[pos >= req.num_computed_tokens - budget.recent] = float("inf")
        keep = rank.topk(budget.total, dim=1).indices.sort(dim=1).values  # [L, B, Hkv]
        self._compact(slots, keep)
        self.resident[rid] = budget.total
        nb = math.ceil(budget.total / self.block_size)
        if nb < len(table):
            self.pool.free(list(reversed(table[nb:])))
            self.freed_blocks += len(table) - nb
            del table[nb:]
        m = self.setup.model
        self.evicted_tokens += (r - budget.total) * m.num_layers * m.num_kv_heads
        self.num_evictions += 1

    def _compact(self, slots: torch.Tensor, keep: torch.Tensor) -> None:
        """Move the kept tokens ``keep`` (``[L, B, Hkv]`` indices into ``slots``) to ``slots[:B]``."""
        L, B, H = keep.shape
        dst = slots[:B]
        kv = self.cache.kv[:, :, slots]  # [L, 2, r, Hkv, D]
        idx = keep[:, None, :, :, None].expand(L, 2, B, H, kv.shape[-1])
        self.cache.kv[:, :, dst] = kv.gather(2, idx)
        self.scores[:, dst] = self.scores[:, slots].gather(1, keep)
        self.positions[:, dst] = self.positions[:, slots].gather(1, keep)
