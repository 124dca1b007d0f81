"""Eviction with a budget per layer, and memory that follows the sum of those budgets.

The shared mechanism (:mod:`kvscope.kv.eviction`) keeps the same number of slots in every layer: a
block id covers all ``L`` layers of the pool tensor ``[L, 2, num_slots, Hkv, D]``. Here a request
still takes whole blocks from the same :class:`~kvscope.kv.block_pool.BlockPool` (so the pool, its
accounting and ``adaptive``'s shared pool are unchanged), but it splits each one into ``L``
*layer-blocks* and hands them to its layers independently: layer-block ``c = p * num_blocks + b``
is block ``b``'s storage in physical layer ``p``, and layer ``l`` may keep its tokens in a layer-block
of any physical layer. A request then holds ``ceil(sum_l ceil(n_l / block_size) / L)`` blocks
when its layers hold ``n_l`` tokens each: the sum of its per-layer budgets, not ``L`` times the
largest.

Addresses: token ``o`` of layer-block ``c`` is *layer-slot* ``u = c * block_size + o``, which
indexes the per-slot scores and positions viewed as ``[L * num_slots, Hkv]``; its K is row
``u + p * num_slots`` of the KV tensor viewed as ``[L * 2 * num_slots, Hkv, D]`` and its V lies
``num_slots`` rows further (:func:`kv_rows`).

Until a request is compressed each layer holds its tokens in its own physical layer, in the order
of the request's blocks: exactly the shared mechanism's layout. Scope: prompt compression once,
when the prompt is in (SnapKV's schedule; decode keeps every new token), for statistics that do not
observe decode rows or every prefill row; decode runs the torch path (no CUDA graphs, no Triton
decode kernel), see :mod:`kvscope.kv.eviction_layered_attention`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from kvscope.kv.base import Adoption, BlockTableLayout, Handover, KVUsage, StepBatch, StrategyFacts
from kvscope.kv.block_pool import pool_stats
from kvscope.kv.eviction import EvictionStrategy
from kvscope.kv.eviction_budget import Budget
from kvscope.kv.eviction_layered_attention import LayeredEvictionAttention, kv_rows
from kvscope.request import Request


class LayeredEvictionStrategy(EvictionStrategy):
    """Base class of a prompt-compressing policy whose budget differs by layer.

    A subclass gives :meth:`layer_budgets`; everything else (scores, statistic, ``resolve_budget``,
    ``selection_scores``) is the shared mechanism's. Per request: ``tables`` (its blocks from the
    pool), ``layer_tables`` (per layer, its layer-blocks in token order), ``layer_resident`` (per
    layer, tokens held) and ``spare`` (layer-blocks of its blocks that no layer uses yet).
    """

    evict_in_decode = False

    def __init__(self, **kwargs: Any) -> None:
        stat = self.statistic
        if stat.observes_decode or stat.observes_every_prefill_row or self.keyed_initial_scores:
            # The layered attention folds only a prefill window and writes zero initial scores.
            raise TypeError(f"{type(self).__name__}: per-layer budgets support prompt-window statistics only")
        super().__init__(**kwargs)
        self.layer_tables: dict[str, list[list[int]]] = {}
        self.layer_resident: dict[str, list[int]] = {}
        self.spare: dict[str, list[int]] = {}

    def layer_budgets(self, budget: Budget, num_tokens: int) -> list[int]:
        """Per layer, bottom first, the tokens a request with ``budget`` keeps after compressing a
        ``num_tokens``-token prompt; the shared mechanism's is ``budget.total`` in every layer."""
        return [budget.total] * self.setup.model.num_layers

    # ---- facts: no captured decode (one block table cannot describe per-layer tables) ----------
    @property
    def captured_decode(self) -> str | None:
        return None

    def facts(self) -> StrategyFacts:
        return dataclasses.replace(super().facts(), graph_decode=False)

    def block_table_layout(self) -> BlockTableLayout | None:
        return None

    # ---- scheduler side ------------------------------------------------------------------------
    def allocate(self, request: Request, num_tokens: int) -> bool:
        rid = request.request_id
        L, bs = self.setup.model.num_layers, self.block_size
        new = num_tokens - request.num_computed_tokens
        tables = self.layer_tables.get(rid, [[] for _ in range(L)])
        held = self.layer_resident.get(rid, [0] * L)
        spare = self.spare.get(rid, [])
        need = [max(0, math.ceil((n + new) / bs) - len(t)) for n, t in zip(held, tables)]
        whole = math.ceil(max(0, sum(need) - len(spare)) / L)
        if whole > self.pool.num_free:
            return False
        if rid not in self.tables:
            self.tables[rid], self.layer_tables[rid], self.layer_resident[rid], self.spare[rid] = [], tables, held, spare
            self.budgets[rid] = self.resolve_budget(request.num_prompt_tokens)
        blocks = self.pool.allocate(whole)
        self.tables[rid].extend(blocks)
        nb = self.pool.num_blocks
        spare.extend(p * nb + b for b in blocks for p in range(L))
        for layer, k in enumerate(need):
            for _ in range(k):
                # Its own physical layer first: before compression the layout is the shared mechanism's.
                own = next((i for i, c in enumerate(spare) if c // nb == layer), 0)
                tables[layer].append(spare.pop(own))
        return True

    def free(self, request: Request) -> None:
        super().free(request)
        for d in (self.layer_tables, self.layer_resident, self.spare):
            d.pop(request.request_id, None)

    def layer_tokens(self) -> int:
        """Tokens resident over every request and layer, per KV head (a token of one layer counts once)."""
        return sum(sum(n) for n in self.layer_resident.values())

    def num_held_tokens(self) -> int:
        """Whole-model tokens held (:meth:`layer_tokens` over ``L``, rounded down), as the shared
        mechanism counts them (``adaptive`` adds them to its full child's)."""
        return self.layer_tokens() // self.setup.model.num_layers

    def stats(self) -> dict[str, Any]:
        L = self.setup.model.num_layers
        # Counted in layer-slots of a layer's bytes, so that a layer's token counts for 1/L of a token.
        out = pool_stats(self.pool, self.block_size * L, self.bytes_per_token // L, self.layer_tokens())
        out["block_size"] = self.block_size
        out.update(num_evictions=self.num_evictions, evicted_tokens=self.evicted_tokens, freed_blocks=self.freed_blocks)
        out["layer_blocks_used"] = sum(sum(len(t) for t in ts) for ts in self.layer_tables.values())
        return out

    def usage(self) -> KVUsage:
        L, bpt = self.setup.model.num_layers, self.bytes_per_token
        return KVUsage(self.layer_tokens() * (bpt // L), self.pool.num_used * self.block_size * bpt)

    def adopt(self, handover: Handover) -> Adoption:
        """As the shared mechanism (:meth:`EvictionStrategy.adopt`): the blocks hold ``held`` tokens
        in the shared layout, with zero scores; compressed to the per-layer budgets at once."""
        request, held = handover.request, handover.held
        rid = request.request_id
        L, nb = self.setup.model.num_layers, self.pool.num_blocks
        used = math.ceil(held / self.block_size)
        self.tables[rid] = handover.blocks
        self.layer_tables[rid] = [[p * nb + b for b in handover.blocks[:used]] for p in range(L)]
        self.spare[rid] = [p * nb + b for b in handover.blocks[used:] for p in range(L)]
        self.layer_resident[rid] = [held] * L
        self.budgets[rid] = self.resolve_budget(request.num_prompt_tokens)
        u = self._layer_slots(rid)
        self._flat_scores()[u] = 0.0
        self._flat_positions()[u] = torch.arange(held, device=u.device).repeat(L)[:, None]
        self._evict(request)
        return Adoption.TOOK_BLOCKS

    def resident_positions(self, request: Request) -> list[torch.Tensor]:
        """Per layer, the positions its KV heads keep: ``[Hkv, n_l]`` each, sorted."""
        rid = request.request_id
        pos = self._flat_positions()
        return [pos[self._slots(t, n)].T.sort(dim=-1).values
                for t, n in zip(self.layer_tables[rid], self.layer_resident[rid])]

    # ---- model side ----------------------------------------------------------------------------
    def begin_step(self, batch: StepBatch) -> LayeredEvictionAttention:
        L = self.setup.model.num_layers
        tables: list[list[torch.Tensor]] = [[] for _ in range(L)]
        for req, n in zip(batch.requests, batch.num_new_tokens):
            rid = req.request_id
            for layer, (t, r) in enumerate(zip(self.layer_tables[rid], self.layer_resident[rid])):
                tables[layer].append(self._slots(t, r + n))
        new = [torch.cat([t[-n:] for t, n in zip(ts, batch.num_new_tokens)]) for ts in tables]
        window_first = [max(0, req.num_prompt_tokens - self.window - req.num_computed_tokens) for req in batch.requests]
        return LayeredEvictionAttention(self, new, tables, batch.query_start, batch.positions, window_first)

    def end_step(self, batch: StepBatch) -> None:
        for req, n in zip(batch.requests, batch.num_new_tokens):
            rid = req.request_id
            if rid not in self.tables:
                continue
            self.layer_resident[rid] = [r + n for r in self.layer_resident[rid]]
            if req.num_computed_tokens == req.num_prompt_tokens:  # the prompt is in: compress it, once
                self._evict(req)

    # ---- eviction ------------------------------------------------------------------------------
    def _flat_scores(self) -> torch.Tensor:
        return self.scores.view(-1, self.scores.shape[-1])  # [L * num_slots, Hkv]

    def _flat_positions(self) -> torch.Tensor:
        return self.positions.view(-1, self.positions.shape[-1])

    def _layer_slots(self, rid: str) -> torch.Tensor:
        """Layer-slots of every layer's resident tokens, layer after layer: ``[sum_l n_l]``."""
        return torch.cat([self._slots(t, n) for t, n in zip(self.layer_tables[rid], self.layer_resident[rid])])

    def _evict(self, req: Request) -> None:
        """Keep, in every layer and KV head, its budget's recent window and top-scoring older tokens,
        packed into as few of the request's blocks as they need; free the rest."""
        rid = req.request_id
        held = self.layer_resident[rid]
        r = held[0]
        # Compression happens once, over the prompt (or a hand-over): every layer holds the same tokens.
        assert all(n == r for n in held), held
        budget = self.budgets[rid]
        keep_n = [min(b, r) for b in self.layer_budgets(budget, r)]
        if min(keep_n) == r:
            return
        H = self.setup.model.num_kv_heads
        u = torch.stack([self._slots(t, r) for t in self.layer_tables[rid]])  # [L, r]
        pos = self._flat_positions()[u]  # [L, r, Hkv]
        rank = self.selection_scores(self._flat_scores()[u], pos, req).clone()
        rank[pos >= req.num_computed_tokens - budget.recent] = float("inf")
        # Descending, so a layer's top n is the first n: with equal budgets this is the shared
        # mechanism's selection, ties broken alike.
        top = rank.topk(max(keep_n), dim=1).indices  # [L, max_n, Hkv]
        heads = torch.arange(H, device=u.device)[None, :]
        kvf = self.cache.kv.view(-1, *self.cache.kv.shape[-2:])  # [L * 2 * num_slots, Hkv, D]
        S = self.cache.num_slots
        scores, positions = self._flat_scores(), self._flat_positions()
        moved = []  # everything kept is read before anything is written: old and new places overlap
        for layer, n in enumerate(keep_n):
            src = u[layer][top[layer, :n].sort(dim=0).values]  # [n, Hkv] layer-slots
            rows = kv_rows(src, S)
            moved.append((kvf[rows, heads], kvf[rows + S, heads], scores[src, heads], positions[src, heads]))
        self._pack(rid, keep_n)
        for layer, (k, v, sc, ps) in enumerate(moved):
            dst = self._slots(self.layer_tables[rid][layer], keep_n[layer])[:, None]
            rows = kv_rows(dst, S)
            kvf[rows, heads] = k
            kvf[rows + S, heads] = v
            scores[dst, heads] = sc
            positions[dst, heads] = ps
        self.evicted_tokens += sum(r - n for n in keep_n) * H
        self.num_evictions += 1

    def _pack(self, rid: str, keep_n: list[int]) -> None:
        """New layer tables for ``keep_n`` tokens per layer in the request's first blocks (each layer
        in its own physical layer as far as it fits, the larger layers in the others' room); frees
        the blocks left over."""
        L, bs, nb = len(keep_n), self.block_size, self.pool.num_blocks
        table = self.tables[rid]
        need = [math.ceil(n / bs) for n in keep_n]
        whole = math.ceil(sum(need) / L)
        own = [min(k, whole) for k in need]
        tables = [[p * nb + b for b in table[:k]] for p, k in enumerate(own)]
        spare = [p * nb + b for p, k in enumerate(own) for b in table[k:whole]]
        for layer, k in enumerate(need):
            tables[layer].extend(spare[: k - own[layer]])
            del spare[: k - own[layer]]
        self.layer_tables[rid], self.spare[rid], self.layer_resident[rid] = tables, spare, list(keep_n)
        if whole < len(table):
            self.pool.free(list(reversed(table[whole:])))
            self.freed_blocks += len(table) - whole
            del table[whole:]
