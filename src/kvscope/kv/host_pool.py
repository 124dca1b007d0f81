"""The host KV pool of the offloading strategies: pinned memory, a capacity, per-request slots.

Storage is ``[num_layers, 2, num_slots, Hkv, D]`` in host memory, pinned when the engine runs on
CUDA so that the GPU can read it directly (see ``attention/triton_gather.py``). Slots are handed
out in blocks of ``block_size`` from a :class:`BlockPool`, so the pool's accounting and
fragmentation read like ``paged``'s; each request keeps the list of its slots in token order.

InfiniGen's pool limit: when the pool is full, a request that needs room for a new token can give
up one of its own tokens instead of being preempted. The victim is the token selected least often
by speculation (a per-slot counter the strategy bumps on every selection), among the older half of
the request's tokens, as in InfiniGen's counter policy; its slot takes the new token.
"""
from __future__ import annotations

import math

import torch

from kvscope.device_copy import to_device
from kvscope.errors import ConfigError
from kvscope.kv.block_pool import BlockPool, pool_stats
from kvscope.models.config import ModelConfig


class HostKVPool:
    """Host-resident KV with block allocation, per-request slot lists and selection counters."""

    def __init__(
        self, model: ModelConfig, capacity_bytes: int, dtype: torch.dtype, pin: bool, block_size: int,
        counter_device: torch.device,
    ) -> None:
        self.bytes_per_token = model.kv_bytes_per_token(dtype)
        self.block_size = block_size
        num_blocks = capacity_bytes // (self.bytes_per_token * block_size)
        if num_blocks < 1:
            raise ConfigError(
                f"host_kv_bytes={capacity_bytes} is smaller than one block "
                f"({block_size} tokens x {self.bytes_per_token} B/token)"
            )
        self.pool = BlockPool(num_blocks, enable_caching=False)
        self.num_slots = num_blocks * block_size
        # One slot past the real ones, never handed out: padding rows of a captured decode step
        # (kv/host_decode.py) read and write it instead of a request's token.
        self.scratch_slot = self.num_slots
        shape = (model.num_layers, 2, self.num_slots + 1, model.num_kv_heads, model.head_dim)
        # empty, not zeros: pages are touched only as slots fill, and pinning stays cheap.
        self.kv = torch.empty(shape, dtype=dtype, pin_memory=pin)
        # Padding rows read the scratch slot; attention gives them zero weight, but 0 * NaN is NaN,
        # and uninitialised memory may hold NaN.
        self.kv[:, :, self.scratch_slot] = 0
        self.counters = torch.zeros(self.num_slots + 1, dtype=torch.int32, device=counter_device)
        self.positions = torch.zeros(self.num_slots + 1, dtype=torch.int64, device=counter_device)
        self.blocks: dict[str, list[int]] = {}
        self._slots: dict[str, torch.Tensor] = {}  # per request, a growing device buffer of slot ids
        self._held: dict[str, int] = {}
        self.used_tokens = 0  # sum of _held, kept as it changes: admission reads it per request
        self.evicted_tokens = 0

    @property
    def capacity_tokens(self) -> int:
        return self.num_slots

    def layer_rows(self, layer: int, per_head: bool) -> torch.Tensor:
        """Layer ``layer``'s K/V planes as ``[2, slots, Hkv * D]`` rows, or ``[2, slots * Hkv, D]``
        (one row per token and KV head) when ``per_head``."""
        kv = self.kv[layer]
        return kv.view(2, -1, kv.shape[-1]) if per_head else kv.view(2, kv.shape[1], -1)

    def held(self, rid: str) -> int:
        """Tokens ``rid`` holds in the pool."""
        return self._held.get(rid, 0)

    def slots(self, rid: str) -> torch.Tensor:
        """``[held]`` int64 slots of ``rid``'s tokens. Token order until the first eviction; after it
        an evicted token's slot holds a newer token (decode attention is order-free)."""
        return self._slots[rid][: self.held(rid)]

    def can_append(self, rid: str, n: int) -> bool:
        room = len(self.blocks.get(rid, ())) * self.block_size - self.held(rid)
        return n <= room or math.ceil((n - room) / self.block_size) <= self.pool.num_free

    def append(self, rid: str, n: int, first_position: int) -> torch.Tensor:
        """Slots ``[n]`` for ``rid``'s next ``n`` tokens, at ``first_position`` onwards. Slots fill the
        request's blocks in order, so token ``i`` held sits at ``blocks[i // bs] * bs + i % bs``."""
        blocks = self.blocks.setdefault(rid, [])
        held = self.held(rid)
        bs = self.block_size
        missing = math.ceil(max(0, held + n - len(blocks) * bs) / bs)
        if missing:
            blocks.extend(self.pool.allocate(missing))
        first_block = held // bs
        idx = torch.arange(held - first_block * bs, held - first_block * bs + n, device=self.counters.device)
        table = to_device(blocks[first_block:], self.counters.device, torch.long)
        new = table[idx // bs] * bs + idx % bs
        buf = self._slots.get(rid)
        if buf is None or buf.numel() < held + n:
            grown = torch.empty(max(2 * (held + n), 64), dtype=torch.long, device=self.counters.device)
            if buf is not None:
                grown[:held] = buf[:held]
            self._slots[rid] = buf = grown
        buf[held : held + n] = new
        self._held[rid] = held + n
        self.used_tokens += n
        self._reset(new, first_position)
        return new

    def replace_least_selected(self, rid: str, position: int) -> torch.Tensor:
        """Evict the least-selected token of ``rid``'s older half; returns its slot ``[1]``, which now
        belongs to the token at ``position``."""
        slots = self.slots(rid)
        older = self.positions[slots] < position // 2
        counts = self.counters[slots].masked_fill(~older, torch.iinfo(torch.int32).max)
        victim = slots[counts.argmin()].reshape(1)
        self._reset(victim, position)
        self.evicted_tokens += 1
        return victim

    def _reset(self, slots: torch.Tensor, first_position: int) -> None:
        self.counters[slots] = 0
        self.positions[slots] = torch.arange(
            first_position, first_position + slots.numel(), device=self.counters.device
        )

    def free(self, rid: str) -> None:
        blocks = self.blocks.pop(rid, None)
        if blocks:
            self.pool.free(list(reversed(blocks)))
        self._slots.pop(rid, None)
        self.used_tokens -= self._held.pop(rid, 0)

    def stats(self) -> dict[str, int | float]:
        used = self.used_tokens
        s = pool_stats(self.pool, self.block_size, self.bytes_per_token, used)
        return {
            "host_num_blocks": s["num_blocks"],
            "host_blocks_used": s["blocks_used"],
            "host_kv_bytes_reserved": s["kv_bytes_reserved"],
            "host_kv_bytes_allocated": s["kv_bytes_allocated"],
            "host_kv_bytes": s["kv_bytes_used"],
            "host_internal_fragmentation": s["internal_fragmentation"],
            "host_evicted_tokens": self.evicted_tokens,
        }
