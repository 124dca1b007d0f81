"""``paged``: vLLM's PagedAttention memory manager (the vLLM row of the study).

KV lives in fixed-size blocks drawn from one pool; each request has a block table. Blocks are
reference-counted: full prompt blocks are shared through the prefix cache (chained hashes, token
ids re-checked), and forked requests share everything, copying a shared block only when one of
them writes into it. When the pool is exhausted the scheduler preempts by recompute (free the
blocks) or by swap (copy them to host memory and back).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvscope.errors import ConfigError
from kvscope.kv.base import BlockTableLayout, KVSetup, KVStrategy, StepBatch
from kvscope.kv.block_pool import BlockHash, BlockPool, hash_block, pool_stats
from kvscope.kv.graphs import BlockTableDecode
from kvscope.kv.manager import KVUsage
from kvscope.kv.registry import register
from kvscope.kv.slot_cache import SlotKVCache, block_table_attention, table_slots
from kvscope.models.base import AttentionBackend
from kvscope.request import Request


@dataclass
class _PagedRequest:
    """What ``paged`` keeps about one request besides its block table (one record, so that the
    pieces cannot drift apart)."""

    hashes: list[BlockHash] = field(default_factory=list)  # chained hashes of its full blocks (memo)
    held: int = 0  # tokens written to its blocks
    registered: int = 0  # full blocks already offered to the prefix cache
    host: torch.Tensor | None = None  # its K/V while swapped out, [L, 2, n, Hkv, D] on the host


@register
class PagedStrategy(BlockTableDecode, KVStrategy):
    """Block-table KV with prefix caching, copy-on-write and swap."""

    name = "paged"
    supports_prefix_caching = True
    supports_swap = True
    supports_fork = True

    def __init__(self, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        super().__init__()
        if not isinstance(block_size, int) or block_size <= 0:
            raise ConfigError(f"paged: block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        # Block tables stay their own dict: every step reads them (engine, graphs, adaptive).
        self.tables: dict[str, list[int]] = {}
        self._reqs: dict[str, _PagedRequest] = {}
        self.host_bytes = 0
        self.swapped_out_bytes = 0
        self.swapped_in_bytes = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.cow_copies = 0

    def bind(self, setup: KVSetup) -> None:
        self.setup = setup
        self.bytes_per_token = setup.model.kv_bytes_per_token(setup.dtype)
        block_bytes = self.bytes_per_token * self.block_size
        num_blocks = setup.kv_memory_bytes // block_bytes
        if num_blocks < 1:
            raise ConfigError(
                f"paged: kv_memory_bytes={setup.kv_memory_bytes} is smaller than one block "
                f"({block_bytes} bytes = {self.block_size} tokens x {self.bytes_per_token} B/token)"
            )
        pool = BlockPool(num_blocks, enable_caching=self.enable_prefix_caching)
        self.bind_shared(setup, pool, SlotKVCache(setup.model, num_blocks * self.block_size, setup.device, setup.dtype))

    def bind_shared(self, setup: KVSetup, pool: BlockPool, cache: SlotKVCache) -> None:
        """Use a block pool and KV tensor that another strategy may draw from too (``adaptive``)."""
        self.setup = setup
        self.bytes_per_token = setup.model.kv_bytes_per_token(setup.dtype)
        self.pool = pool
        self.cache = cache
        self.scale = setup.model.head_dim**-0.5

    # ---- scheduler side ------------------------------------------------------------------------
    def max_request_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def _num_blocks(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """Chained hashes of the request's first ``num_blocks`` full blocks (memoised)."""
        hashes = self._reqs.setdefault(request.request_id, _PagedRequest()).hashes
        if len(hashes) >= num_blocks:
            return hashes[:num_blocks]
        tokens = request.all_token_ids  # a copy of the whole sequence: only when a block is new
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def _prefix_hits(self, request: Request) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        # The last token is always recomputed: its logits are needed to sample.
        max_blocks = (request.num_tokens - 1) // self.block_size
        tokens = request.all_token_ids
        hits = []
        for i, h in enumerate(self._block_hashes(request, max_blocks)):
            block = self.pool.lookup(h, tokens[i * self.block_size : (i + 1) * self.block_size])
            if block is None:
                break
            hits.append(block)
        return hits

    def lookup_prefix(self, request: Request) -> int:
        return len(self._prefix_hits(request)) * self.block_size

    def allocate(self, request: Request, num_tokens: int) -> bool:
        rid = request.request_id
        table = self.tables.get(rid)
        if table is None:
            hits = self._prefix_hits(request)
            need = self._num_blocks(num_tokens) - len(hits)
            revived = sum(1 for b in hits if self.pool.ref_cnt[b] == 0)
            if need > self.pool.num_free - revived:
                return False
            self.pool.share(hits)
            self.tables[rid] = hits + self.pool.allocate(max(need, 0))
            self._reqs.setdefault(rid, _PagedRequest()).held = len(hits) * self.block_size
            self.prefix_queried_tokens += request.num_tokens
            self.prefix_hit_tokens += len(hits) * self.block_size
            return True
        need = max(self._num_blocks(num_tokens) - len(table), 0)
        write_block = request.num_computed_tokens // self.block_size
        cow = write_block < len(table) and self.pool.ref_cnt[table[write_block]] > 1
        if need + cow > self.pool.num_free:
            return False
        if cow:
            self._copy_on_write(table, write_block)
        table.extend(self.pool.allocate(need))
        return True

    def _copy_on_write(self, table: list[int], index: int) -> None:
        old = table[index]
        new = self.pool.allocate(1)[0]
        offsets = torch.arange(self.block_size, device=self.cache.kv.device)
        self.cache.copy(old * self.block_size + offsets, new * self.block_size + offsets)
        self.pool.free([old])
        table[index] = new
        self.cow_copies += 1

    def free(self, request: Request) -> None:
        rid = request.request_id
        table = self.tables.pop(rid, None)
        if table is not None:
            # Tail first, so that the LRU queue evicts a prefix's end before its start.
            self.pool.free(list(reversed(table)))
        rec = self._reqs.pop(rid, None)
        if rec is not None and rec.host is not None:
            self.host_bytes -= rec.host.numel() * rec.host.element_size()

    def release(self, request: Request) -> list[int]:
        """Hand ``request``'s blocks, in order, to another strategy drawing from the same pool
        (``adaptive``), without freeing them. Needs prefix caching off: no block may be shared."""
        rid = request.request_id
        self._reqs.pop(rid, None)
        return self.tables.pop(rid)

    def read_kv(self, request: Request, num_tokens: int) -> torch.Tensor:
        """The K/V of ``request``'s first ``num_tokens`` tokens, ``[L, 2, num_tokens, Hkv, D]``."""
        return self.cache.read(self._slots(self.tables[request.request_id], num_tokens))

    def num_held_tokens(self) -> int:
        """Tokens written over every request (a forked block counted once per request)."""
        return sum(rec.held for rec in self._reqs.values())

    def fork(self, parent: Request, child: Request) -> None:
        table = self.tables[parent.request_id]
        self.pool.share(table)
        self.tables[child.request_id] = list(table)
        rec = self._reqs[parent.request_id]
        self._reqs[child.request_id] = _PagedRequest(list(rec.hashes), rec.held, rec.registered)

    def _slots(self, table: list[int], num_tokens: int) -> torch.Tensor:
        return table_slots(table, num_tokens, self.block_size, self.cache.kv.device)

    def swap_out(self, request: Request) -> int | None:
        """Copy the computed KV to host memory and free the blocks; None if swap space is full."""
        rid = request.request_id
        n = request.num_computed_tokens
        nbytes = n * self.bytes_per_token
        if self.host_bytes + nbytes > self.setup.swap_space_bytes:
            return None
        data = self.cache.read(self._slots(self.tables[rid], n))
        host = torch.empty(data.shape, dtype=data.dtype, pin_memory=data.is_cuda)
        host.copy_(data)
        self.pool.free(list(reversed(self.tables.pop(rid))))
        rec = self._reqs.setdefault(rid, _PagedRequest())  # the hashes stay: the tokens are the same
        rec.host, rec.held, rec.registered = host, 0, 0
        self.host_bytes += nbytes
        self.swapped_out_bytes += nbytes
        return nbytes

    def swap_in(self, request: Request) -> int | None:
        rid = request.request_id
        rec = self._reqs[rid]
        host = rec.host
        n = host.shape[2]
        need = self._num_blocks(n)
        if need > self.pool.num_free:
            return None
        table = self.pool.allocate(need)
        self.tables[rid] = table
        self.cache.write(self._slots(table, n), host)
        rec.host = None
        nbytes = n * self.bytes_per_token
        self.host_bytes -= nbytes
        self.swapped_in_bytes += nbytes
        rec.held = n
        return nbytes

    def stats(self) -> dict[str, Any]:
        bs, bpt = self.block_size, self.bytes_per_token
        # A block shared by several requests holds as many tokens as its fullest user wrote. The
        # engine reads this every step: full blocks go in through dict.fromkeys (C speed), and only
        # each request's partial last block through Python.
        filled: dict[int, int] = {}
        partial: list[tuple[int, int]] = []
        for rid, table in self.tables.items():
            rec = self._reqs.get(rid)
            held = rec.held if rec is not None else 0
            full = min(held // bs, len(table))
            filled.update(dict.fromkeys(table[:full], bs))
            if full < len(table) and held > full * bs:
                partial.append((table[full], held - full * bs))
        for b, n in partial:
            filled[b] = max(filled.get(b, 0), n)
        return {
            **pool_stats(self.pool, bs, bpt, sum(filled.values())),
            "blocks_cached": self.pool.num_cached,
            "host_kv_bytes": self.host_bytes,
            "swapped_out_bytes": self.swapped_out_bytes,
            "swapped_in_bytes": self.swapped_in_bytes,
            "prefix_cache_queried_tokens": self.prefix_queried_tokens,
            "prefix_cache_hit_tokens": self.prefix_hit_tokens,
            "cow_copies": self.cow_copies,
        }

    def usage(self) -> KVUsage:
        """:meth:`stats`' KV bytes without its walk over every block (the engine reads this after
        every step): while no block is shared, each held token lies in its own request's blocks, so
        the held counts add up exactly; with shared blocks (prefix hits, forks), the walk."""
        if self.pool.num_shared:
            return super().usage()
        bs, bpt = self.block_size, self.bytes_per_token
        reqs = self._reqs
        used = sum(min(reqs[rid].held, len(t) * bs) for rid, t in self.tables.items() if rid in reqs)
        return KVUsage(used * bpt, self.pool.num_used * bs * bpt, self.host_bytes)

    # ---- model side ------------------------------------------------------------------------------
    def begin_step(self, batch: StepBatch) -> AttentionBackend:
        return block_table_attention(
            self.cache,
            [self.tables[req.request_id] for req in batch.requests],
            self.block_size,
            [req.num_computed_tokens for req in batch.requests],
            batch.query_start,
            self.scale,
            self.setup.attention_backend,
        )

    def decode_read_bytes(self, context: int) -> int | None:
        """Every token's K and V: ``context`` rows of ``cache.kv`` in every layer."""
        kv = self.cache.kv
        return context * kv[:, :, 0].numel() * kv.element_size()

    def block_table_layout(self) -> BlockTableLayout | None:
        return BlockTableLayout(self.cache, self.block_size) if self.setup.attention_backend == "triton" else None

    def block_tables(self, batch: StepBatch) -> list[list[int]]:
        return [self.tables[req.request_id] for req in batch.requests]

    def end_step(self, batch: StepBatch) -> None:
        bs = self.block_size
        for req in batch.requests:
            rid = req.request_id
            if rid not in self.tables:
                continue
            rec = self._reqs.setdefault(rid, _PagedRequest())
            rec.held = req.num_computed_tokens
            if not self.enable_prefix_caching:
                continue
            # Only blocks whose ids the host knows: a pending token (async scheduling) is computed
            # before it is read back; its block is registered at a later step.
            full = min(req.num_computed_tokens, req.num_known_tokens) // bs
            if full <= rec.registered:
                continue  # no block filled up this step (most decode steps)
            table = self.tables[rid]
            tokens = req.all_token_ids
            hashes = self._block_hashes(req, full)
            for i in range(rec.registered, full):
                self.pool.cache(table[i], hashes[i], tokens[i * bs : (i + 1) * bs])
            rec.registered = full
