"""Device KV storage addressed by slot ids, and the attention backend that reads it.

Both ``paged`` and ``contiguous`` keep KV in one preallocated tensor of token slots per layer
(``slot = block_id * block_size + offset``, as in vLLM/nano-vllm); they differ only in how slots
are handed to requests. The backend writes each step's new K/V by slot mapping, then attends per
request over the slots listed in its table, gathering them through the reference torch path.
"""
from __future__ import annotations

import torch

from kvscope.attention.torch_ref import attend_causal, attend_decode
from kvscope.models.config import ModelConfig


def table_slots(table: list[int], num_tokens: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Slot ids ``[num_tokens]`` of the first tokens of a request whose blocks are ``table``."""
    blocks = torch.tensor(table[: -(-num_tokens // block_size)], dtype=torch.long, device=device)
    offsets = torch.arange(block_size, dtype=torch.long, device=device)
    return (blocks[:, None] * block_size + offsets).flatten()[:num_tokens]


class SlotKVCache:
    """``kv``: ``[num_layers, 2, num_slots, num_kv_heads, head_dim]``, allocated once."""

    def __init__(self, model: ModelConfig, num_slots: int, device: torch.device, dtype: torch.dtype):
        self.kv = torch.zeros(
            model.num_layers, 2, num_slots, model.num_kv_heads, model.head_dim, device=device, dtype=dtype
        )
        self.num_slots = num_slots

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """All layers' K/V at ``slots`` ``[n]`` -> ``[num_layers, 2, n, Hkv, D]``."""
        return self.kv[:, :, slots]

    def write(self, slots: torch.Tensor, data: torch.Tensor) -> None:
        """Inverse of :meth:`read`."""
        self.kv[:, :, slots] = data.to(self.kv.device, non_blocking=True)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots ``src`` to ``dst`` (``[n]`` each) in every layer (copy-on-write)."""
        self.kv[:, :, dst] = self.kv[:, :, src]


class SlotAttention:
    """AttentionBackend over a :class:`SlotKVCache` for one step.

    Args:
        slot_mapping: ``[N]`` destination slot of each new token.
        tables: per request, ``[context_len]`` slots of all its tokens in order (new ones included).
        query_start: ``[B + 1]`` row offsets of each request's new tokens in the flattened batch.
    Requests with a single new token (decode) are attended together over padded tables; longer
    chunks (prefill) one by one, causally.
    """

    def __init__(
        self,
        cache: SlotKVCache,
        slot_mapping: torch.Tensor,
        tables: list[torch.Tensor],
        query_start: list[int],
        scale: float,
    ) -> None:
        self.cache = cache
        self.slot_mapping = slot_mapping
        self.tables = tables
        self.query_start = query_start
        self.scale = scale
        device = cache.kv.device
        q_lens = [query_start[i + 1] - query_start[i] for i in range(len(tables))]
        self.decode_rows = [i for i, n in enumerate(q_lens) if n == 1]
        self.prefill_rows = [i for i, n in enumerate(q_lens) if n > 1]
        if self.decode_rows:
            lens = [tables[i].numel() for i in self.decode_rows]
            padded = torch.zeros(len(lens), max(lens), dtype=torch.long, device=device)
            for j, i in enumerate(self.decode_rows):
                padded[j, : lens[j]] = tables[i]
            self.decode_slots = padded
            self.decode_lens = torch.tensor(lens, device=device)
            self.decode_q_index = torch.tensor([query_start[i] for i in self.decode_rows], device=device)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.write(layer_idx, k, v)
        return self.attend_cached(layer_idx, q)

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new keys/values ``[N, Hkv, D]`` at their slots."""
        k_cache, v_cache = self.cache.kv[layer_idx, 0], self.cache.kv[layer_idx, 1]
        k_cache.index_copy_(0, self.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, self.slot_mapping, v.to(v_cache.dtype))

    def attend_cached(self, layer_idx: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of ``q`` ``[N, Hq, D]`` over the cached (already written) slots."""
        k_cache, v_cache = self.cache.kv[layer_idx, 0], self.cache.kv[layer_idx, 1]
        out = torch.empty_like(q)
        if self.decode_rows:
            out[self.decode_q_index] = attend_decode(
                q[self.decode_q_index],
                k_cache[self.decode_slots],
                v_cache[self.decode_slots],
                self.decode_lens,
                self.scale,
            )
        for i in self.prefill_rows:
            s, e = self.query_start[i], self.query_start[i + 1]
            table = self.tables[i]
            out[s:e] = attend_causal(q[s:e], k_cache[table], v_cache[table], self.scale)
        return out
