"""Device KV storage addressed by slot ids, and the attention backends that read it.

Both ``paged`` and ``contiguous`` keep KV in one preallocated tensor of token slots per layer
(``slot = block_id * block_size + offset``, as in vLLM/nano-vllm); they differ only in how slots
are handed to requests. A backend writes each step's new K/V by slot mapping, then attends per
request over that request's slots. :class:`SlotAttention` takes any slot table and gathers it
through the reference torch path; :class:`TritonSlotAttention` reads whole blocks through block
tables with the Triton kernels. :func:`block_table_attention` builds either for a strategy whose
slots are whole blocks.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kvscope.attention.torch_ref import attend_causal, attend_decode
from kvscope.device_copy import to_device
from kvscope.models.config import ModelConfig


def table_slots(table: list[int], num_tokens: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Slot ids ``[num_tokens]`` of the first tokens of a request whose blocks are ``table``."""
    blocks = to_device(table[: -(-num_tokens // block_size)], device, torch.long)
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
            self.decode_lens = to_device(lens, device, torch.long)
            self.decode_q_index = to_device([query_start[i] for i in self.decode_rows], device, torch.long)

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


def block_table_attention(
    cache: SlotKVCache,
    block_tables: list[list[int]],
    block_size: int,
    num_computed: list[int],
    query_start: list[int],
    scale: float,
    backend: str,
) -> SlotAttention | TritonSlotAttention:
    """The step's attention for requests whose tokens fill whole blocks in order.

    Args:
        block_tables: per request, its block ids (at least enough for its tokens after the step).
        block_size: tokens per block (``contiguous`` passes its slab as one block).
        num_computed: per request, tokens cached before this step.
        query_start: ``[B + 1]`` row offsets of each request's new tokens in the flattened batch.
        backend: ``"torch"`` (:class:`SlotAttention`) or ``"triton"`` (:class:`TritonSlotAttention`).
    """
    if backend == "triton":
        return TritonSlotAttention(cache, block_tables, block_size, num_computed, query_start, scale)
    device = cache.kv.device
    tables, new_slots = [], []
    for i, (table, done) in enumerate(zip(block_tables, num_computed)):
        slots = table_slots(table, done + query_start[i + 1] - query_start[i], block_size, device)
        tables.append(slots)
        new_slots.append(slots[done:])
    return SlotAttention(cache, torch.cat(new_slots), tables, query_start, scale)


def rows_index(ranges: list[tuple[int, int]], device: torch.device) -> slice | torch.Tensor:
    """Index of the query rows of ``ranges`` (``[start, end)`` each, ascending): a slice (a view, no
    copy) when they form one run, else the row ids ``[rows]``."""
    if all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])):
        return slice(ranges[0][0], ranges[-1][1])
    return to_device(torch.cat([torch.arange(s, e) for s, e in ranges]), device)


@dataclass
class StepRows:
    """A step's requests split as the Triton kernels take them: decode rows (one new token each)
    and prefill chunks, each group's query rows (:func:`rows_index`; None for an empty group), and
    the chunks' ``[P + 1]`` int32 row offsets and longest chunk (None and 0 without chunks)."""

    decode: list[int]
    prefill: list[int]
    decode_q: slice | torch.Tensor | None
    prefill_q: slice | torch.Tensor | None
    prefill_cu: torch.Tensor | None
    prefill_max_len: int

    @classmethod
    def of(cls, query_start: list[int], device: torch.device) -> StepRows:
        """From the ``[B + 1]`` row offsets of each request's new tokens (host ints: no sync)."""
        q_lens = [query_start[i + 1] - query_start[i] for i in range(len(query_start) - 1)]
        decode = [i for i, n in enumerate(q_lens) if n == 1]
        prefill = [i for i, n in enumerate(q_lens) if n > 1]
        decode_q = rows_index([(query_start[i], query_start[i] + 1) for i in decode], device) if decode else None
        if not prefill:
            return cls(decode, prefill, decode_q, None, None, 0)
        cu = list(itertools.accumulate((q_lens[i] for i in prefill), initial=0))
        return cls(decode, prefill, decode_q, rows_index([(query_start[i], query_start[i + 1]) for i in prefill], device),
                   to_device(cu, device, torch.int32), max(q_lens[i] for i in prefill))


class TritonSlotAttention:
    """AttentionBackend over a :class:`SlotKVCache` through block tables, with Triton kernels.

    One launch writes the step's new K and V (:mod:`kvscope.attention.triton_kv_write`); requests
    with one new token (decode) are attended together by the split-K decode kernel
    (:mod:`kvscope.attention.triton_decode`), the others (prefill chunks) together by the varlen
    causal kernel (:mod:`kvscope.attention.triton_prefill`). Arguments as in
    :func:`block_table_attention`.
    """

    def __init__(
        self,
        cache: SlotKVCache,
        block_tables: list[list[int]],
        block_size: int,
        num_computed: list[int],
        query_start: list[int],
        scale: float,
    ) -> None:
        # Imported here: the torch path must work where triton is not installed.
        from kvscope.attention.triton_decode import paged_decode_attention
        from kvscope.attention.triton_kv_write import write_kv
        from kvscope.attention.triton_prefill import paged_prefill_attention

        self._decode, self._prefill, self._write = paged_decode_attention, paged_prefill_attention, write_kv
        self.cache = cache
        self.block_size = block_size
        self.scale = scale
        device = cache.kv.device
        batch = len(block_tables)
        q_lens = [query_start[i + 1] - query_start[i] for i in range(batch)]
        ctx = [done + n for done, n in zip(num_computed, q_lens)]
        # Built on the host and copied once each: per-token Python loops would cost more than the step.
        width = max(-(-t // block_size) for t in ctx)
        # Columns past a request's last block are padding that the kernels never read.
        tables = torch.tensor([(t[:width] + [0] * width)[:width] for t in block_tables], dtype=torch.int32)
        rows = torch.repeat_interleave(torch.arange(batch), torch.tensor(q_lens))
        pos = torch.tensor(num_computed)[rows] + torch.arange(len(rows)) - torch.tensor(query_start[:-1])[rows]
        slots = tables[rows, pos // block_size].long() * block_size + pos % block_size
        self.slot_mapping = to_device(slots, device)
        tables, lens = to_device(tables, device), to_device(ctx, device, torch.int32)

        split = StepRows.of(query_start, device)
        self.decode_q, self.prefill_q = split.decode_q, split.prefill_q
        self.prefill_cu, self.prefill_max_len = split.prefill_cu, split.prefill_max_len
        if split.decode:
            whole = len(split.decode) == batch
            at = None if whole else to_device(split.decode, device, torch.long)  # a list index would sync
            self.decode_tables = tables if whole else tables[at]
            self.decode_lens = lens if whole else lens[at]
        if split.prefill:
            whole = len(split.prefill) == batch
            at = None if whole else to_device(split.prefill, device, torch.long)
            self.prefill_tables = tables if whole else tables[at]
            self.prefill_lens = lens if whole else lens[at]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.write(layer_idx, k, v)
        return self.attend_cached(layer_idx, q)

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new keys/values ``[N, Hkv, D]`` at their slots (one launch)."""
        self._write(k, v, self.cache.kv[layer_idx, 0], self.cache.kv[layer_idx, 1], self.slot_mapping)

    def attend_cached(self, layer_idx: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of ``q`` ``[N, Hq, D]`` over the cached (already written) slots."""
        k_cache, v_cache = self.cache.kv[layer_idx, 0], self.cache.kv[layer_idx, 1]
        bs = self.block_size
        if self.prefill_q is None:  # every row is a decode row, in order
            return self._decode(q, k_cache, v_cache, self.decode_tables, self.decode_lens, self.scale, bs)
        out = torch.empty_like(q)
        if self.decode_q is not None:
            out[self.decode_q] = self._decode(
                q[self.decode_q], k_cache, v_cache, self.decode_tables, self.decode_lens, self.scale, bs
            )
        args = (k_cache, v_cache, self.prefill_tables, self.prefill_cu, self.prefill_lens, self.scale, bs,
                self.prefill_max_len)
        if isinstance(self.prefill_q, slice):  # written in place through a view of out
            self._prefill(q[self.prefill_q], *args, out=out[self.prefill_q])
        else:
            out[self.prefill_q] = self._prefill(q[self.prefill_q], *args)
        return out
