"""A pool of fixed-size KV blocks with reference counts and a prefix cache (vLLM-style).

Block ids index the physical storage. A block is *free* when nobody references it; free blocks
that still hold a registered prefix hash stay findable until they are handed out again, so a
finished request's prompt can be reused. The free queue is LRU: blocks are handed out from its
head, freed blocks go to its tail (a request's blocks are freed last-block-first, so the tail of a
prefix is evicted before its head).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from typing import Any

from kvscope.errors import ConfigError

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of a full block: it identifies the block's tokens *and* everything before."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(",".join(map(str, token_ids)).encode())
    return h.digest()


class BlockPool:
    """Reference-counted allocator over ``num_blocks`` block ids ``0..num_blocks-1``."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ConfigError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.num_shared = 0  # blocks with two or more references: while none, no two tables overlap
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_of: dict[int, BlockHash] = {}
        self._tokens_of: dict[int, tuple[int, ...]] = {}
        self._cached: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached-but-unreferenced blocks included)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the head of the free queue (dropping their cached hashes)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._uncache(block)
            self.ref_cnt[block] = 1
            out.append(block)
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """Add a reference to each block (prefix-cache hit or fork); revives free cached blocks."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self._free[b]
            elif self.ref_cnt[b] == 1:
                self.num_shared += 1
            self.ref_cnt[b] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block, in the given order; zero-ref blocks become free."""
        for b in blocks:
            if self.ref_cnt[b] <= 0:
                raise RuntimeError(f"double free of block {b}")
            if self.ref_cnt[b] == 2:
                self.num_shared -= 1
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self._free[b] = None

    # ---- prefix cache ------------------------------------------------------------------------
    def cache(self, block: int, block_hash: BlockHash, token_ids: Sequence[int]) -> None:
        """Register a full, computed block under its chained hash (first writer wins)."""
        if not self.enable_caching or block_hash in self._cached or block in self._hash_of:
            return
        self._cached[block_hash] = block
        self._hash_of[block] = block_hash
        self._tokens_of[block] = tuple(token_ids)

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> int | None:
        """Cached block for this hash, with its token ids re-checked (a hash collision is a miss)."""
        block = self._cached.get(block_hash)
        if block is None or self._tokens_of[block] != tuple(token_ids):
            return None
        return block

    def _uncache(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._cached[h]
            del self._tokens_of[block]


def pool_stats(pool: BlockPool, block_size: int, bytes_per_token: int, used_tokens: int) -> dict[str, Any]:
    """The accounting every block-pool strategy reports (see docs/architecture.md)."""
    allocated = pool.num_used * block_size
    return {
        "block_size": block_size,
        "num_blocks": pool.num_blocks,
        "blocks_used": pool.num_used,
        "blocks_free": pool.num_free,
        "kv_bytes_reserved": pool.num_blocks * block_size * bytes_per_token,
        "kv_bytes_allocated": allocated * bytes_per_token,
        "kv_bytes_used": used_tokens * bytes_per_token,
        "internal_fragmentation": (1 - used_tokens / allocated) if allocated else 0.0,
    }
