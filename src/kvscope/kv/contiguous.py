"""``contiguous``: per-request preallocation of max-length KV (the HF / FasterTransformer baseline).

Each admitted request takes one slab of ``slot_tokens`` tokens (by default the engine's
``max_model_len``), whatever it will actually use; the pool holds as many slabs as fit in
``kv_memory_bytes``. The unused tail of every slab is the waste that paged KV removes, reported as
``internal_fragmentation`` and ``kv_bytes_allocated - kv_bytes_used``.
"""
from __future__ import annotations

from typing import Any

from kvscope.errors import ConfigError
from kvscope.kv.base import BlockTableLayout, KVSetup, KVStrategy, KVUsage, StepBatch
from kvscope.kv.graphs import BlockTableDecode
from kvscope.kv.registry import register
from kvscope.kv.slot_cache import SlotKVCache, block_table_attention
from kvscope.models.base import AttentionBackend
from kvscope.request import Request


@register
class ContiguousStrategy(BlockTableDecode, KVStrategy):
    """One fixed, contiguous slab per request; admission waits for a free slab."""

    name = "contiguous"
    reserves_context = True

    def __init__(self, slot_tokens: int | None = None) -> None:
        super().__init__()
        if slot_tokens is not None and (not isinstance(slot_tokens, int) or slot_tokens <= 0):
            raise ConfigError(f"contiguous: slot_tokens must be a positive integer, got {slot_tokens!r}")
        self._slot_tokens_arg = slot_tokens
        self.slab_of: dict[str, int] = {}
        self._held_tokens: dict[str, int] = {}

    def bind(self, setup: KVSetup) -> None:
        self.setup = setup
        self.slot_tokens = self._slot_tokens_arg or setup.max_model_len
        self.bytes_per_token = setup.model.kv_bytes_per_token(setup.dtype)
        slab_bytes = self.slot_tokens * self.bytes_per_token
        self.num_slabs = setup.kv_memory_bytes // slab_bytes
        if self.num_slabs < 1:
            raise ConfigError(
                f"contiguous: kv_memory_bytes={setup.kv_memory_bytes} is smaller than one "
                f"{self.slot_tokens}-token slab ({slab_bytes} bytes); lower max_model_len or slot_tokens"
            )
        self._free = list(range(self.num_slabs))
        self.cache = SlotKVCache(setup.model, self.num_slabs * self.slot_tokens, setup.device, setup.dtype)
        self.scale = setup.model.head_dim**-0.5

    def max_request_tokens(self) -> int:
        return self.slot_tokens

    def allocate(self, request: Request, num_tokens: int) -> bool:
        if num_tokens > self.slot_tokens:
            return False
        rid = request.request_id
        if rid not in self.slab_of:
            if not self._free:
                return False
            self.slab_of[rid] = self._free.pop(0)
            self._held_tokens[rid] = 0
        return True

    def free(self, request: Request) -> None:
        slab = self.slab_of.pop(request.request_id, None)
        if slab is not None:
            self._free.append(slab)
            self._free.sort()
        self._held_tokens.pop(request.request_id, None)

    def usage(self) -> KVUsage:
        bpt = self.bytes_per_token
        return KVUsage(sum(self._held_tokens.values()) * bpt, len(self.slab_of) * self.slot_tokens * bpt)

    def stats(self) -> dict[str, Any]:
        used = sum(self._held_tokens.values())
        allocated = len(self.slab_of) * self.slot_tokens
        bpt = self.bytes_per_token
        return {
            "slot_tokens": self.slot_tokens,
            "num_slabs": self.num_slabs,
            "slabs_used": len(self.slab_of),
            "slabs_free": len(self._free),
            "kv_bytes_reserved": self.num_slabs * self.slot_tokens * bpt,
            "kv_bytes_allocated": allocated * bpt,
            "kv_bytes_used": used * bpt,
            "internal_fragmentation": (1 - used / allocated) if allocated else 0.0,
        }

    def begin_step(self, batch: StepBatch) -> AttentionBackend:
        # A slab is one block of slot_tokens tokens, so the block-table kernels read it as is.
        return block_table_attention(
            self.cache,
            [[self.slab_of[req.request_id]] for req in batch.requests],
            self.slot_tokens,
            [req.num_computed_tokens for req in batch.requests],
            batch.query_start,
            self.scale,
            self.setup.attention_backend,
        )

    def block_table_layout(self) -> BlockTableLayout | None:
        # A slab is one block of slot_tokens tokens.
        return BlockTableLayout(self.cache, self.slot_tokens) if self.setup.attention_backend == "triton" else None

    def block_tables(self, batch: StepBatch) -> list[list[int]]:
        return [[self.slab_of[req.request_id]] for req in batch.requests]

    def end_step(self, batch: StepBatch) -> None:
        for req in batch.requests:
            if req.request_id in self.slab_of:
                self._held_tokens[req.request_id] = req.num_computed_tokens
