"""What ``offload`` and ``infinigen`` share: KV in a host pool, fetched per layer through the
transfer engine.

Memory: every token's K/V lives in the :class:`HostKVPool` (capacity ``host_kv_bytes``; by default
as many tokens as the device budget can serve, capped by the engine's ``swap_space_bytes``). The device holds no KV between steps, only the two prefetch
buffers of the :class:`TransferEngine` (sized from the engine's ``kv_memory_bytes``, the device KV
budget) plus whatever a subclass keeps resident (InfiniGen's partial keys). A layer's dense fetch
brings every held token of the scheduled requests, so admission also checks that the tokens held
fit one prefetch buffer.

Each step: ``allocate`` gives the new tokens host slots; ``begin_step`` returns the attention
backend, which starts fetching layer 0; the model's ``layer_input`` hook at layer ``l`` starts
fetching layer ``l + 1`` (on the copy stream, overlapped with layer ``l``); ``attend`` waits for its
layer's rows, writes the new K/V to the host pool and attends over fetched + new rows. A
pure-decode step runs the strategy's static decode step (``decode_step``, ``kv/host_decode.py``) at
its exact shape, the same code the engine's graph runner captures per ``(batch, context)`` bucket
(``decode_graphs``); other steps (prefill chunks, mixed) run the ragged ``attention_class``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from kvscope.errors import ConfigError
from kvscope.kv.base import Adoption, Handover, KVSetup, KVStrategy, KVUsage, StepBatch
from kvscope.kv.host_decode import HostDecode, HostGraphs, dense_layer_fits
from kvscope.kv.host_pool import HostKVPool
from kvscope.kv.slot_cache import SlotAttention
from kvscope.kv.transfer import TransferEngine
from kvscope.request import Request


class _Staged:
    """A per-layer ``kv`` ``[1, 2, M + N, Hkv, D]`` view that :class:`SlotAttention` can read."""

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv


class OffloadAttention:
    """The attention backend of one step of a :class:`HostOffloadStrategy`.

    Every request's earlier tokens are fetched per layer (dense) and laid out, together with the
    step's new K/V, in one staged buffer of ``M + N`` rows: request ``i``'s table lists its ``c_i``
    fetched rows then its ``n_i`` new rows, so prefill chunks stay causal and decode rows batch.
    """

    def __init__(self, strategy: "HostOffloadStrategy", batch: StepBatch, prev: list[torch.Tensor],
                 new_slots: torch.Tensor) -> None:
        self.s = strategy
        self.batch = batch
        self.new_slots = new_slots  # [N] host slots of the step's new tokens
        self.prev = prev  # per request, [c_i] host slots of its earlier tokens
        self.fetch_idx = torch.cat(prev) if prev else new_slots[:0]
        m = self.fetch_idx.numel()
        device = new_slots.device
        tables, off = [], 0
        qs = batch.query_start
        for i, p in enumerate(prev):
            fetched = torch.arange(off, off + p.numel(), device=device)
            tables.append(torch.cat((fetched, torch.arange(m + qs[i], m + qs[i + 1], device=device))))
            off += p.numel()
        self.num_fetched = m
        self.dense = SlotAttention(_Staged(new_slots.new_empty(0)), new_slots, tables, qs, strategy.scale)
        self.fetches: dict[int, Any] = {}
        self.start_fetch(0)

    def start_fetch(self, layer: int) -> None:
        """Queue layer ``layer``'s fetch (dense: all earlier tokens of every request)."""
        rows = self.s.pool.layer_rows(layer, per_head=False)
        self.fetches[layer] = self.s.transfer.fetch(rows, self.fetch_idx, slot=layer,
                                                    spare_rows=self.new_slots.numel())

    def layer_input(self, layer: int, x: torch.Tensor) -> None:
        if layer + 1 < self.s.num_layers:
            self.start_fetch(layer + 1)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the step's new K/V ``[N, Hkv, D]`` to their host slots."""
        n = k.shape[0]
        rows = torch.stack((k, v)).view(2, n, -1)
        self.s.transfer.write(self.s.pool.layer_rows(layer, per_head=False), self.new_slots, rows)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        fetched = self.s.transfer.wait(self.fetches.pop(layer))
        self.store(layer, k, v)
        return self.attend_dense(q, fetched, k, v)

    def attend_dense(self, q: torch.Tensor, fetched: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention over the fetched rows and the new ``k``/``v`` ``[N, Hkv, D]``, written in place
        after them (``fetched`` is ``[2, M + N, Hkv * D]``)."""
        m, hkv, d = self.num_fetched, k.shape[1], k.shape[2]
        staged = fetched.view(2, m + k.shape[0], hkv, d)
        staged[0, m:] = k
        staged[1, m:] = v
        self.dense.cache = _Staged(staged[None])
        return self.dense.attend_cached(0, q)


class HostOffloadStrategy(KVStrategy):
    """Base of the strategies whose KV lives in host memory (one subclass per file)."""

    residence = "host"

    #: Whether a full host pool evicts the request's least-selected token instead of preempting.
    evicts_on_full: ClassVar[bool] = False

    def __init__(self, host_kv_bytes: int | None = None, block_size: int = 16, overlap: bool = True) -> None:
        super().__init__()
        if host_kv_bytes is not None and (not isinstance(host_kv_bytes, int) or host_kv_bytes <= 0):
            raise ConfigError(f"{self.name}: host_kv_bytes must be a positive integer, got {host_kv_bytes!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ConfigError(f"{self.name}: block_size must be a positive integer, got {block_size!r}")
        self.host_kv_bytes = host_kv_bytes
        self.block_size = block_size
        self.overlap = bool(overlap)
        self._length: dict[str, int] = {}  # tokens each request has been given room for
        self._replaced: dict[str, torch.Tensor] = {}  # this step's slot reused by an eviction

    # ---- sizing ----------------------------------------------------------------------------------
    def resident_bytes_per_token(self, setup: KVSetup) -> int:
        """Device bytes kept per host token besides the prefetch buffers (none for ``offload``)."""
        return 0

    def min_device_bytes(self, setup: KVSetup) -> int:
        """The smallest device budget that serves one request of ``max_model_len`` tokens: its rows
        in both prefetch buffers (K and V of one layer) and its resident bytes."""
        m = setup.model
        elem = torch.empty(0, dtype=setup.dtype).element_size()
        return setup.max_model_len * (self.resident_bytes_per_token(setup) + 4 * m.num_kv_heads * m.head_dim * elem)

    def bind(self, setup: KVSetup) -> None:
        self.setup = setup
        m = setup.model
        self.num_layers = m.num_layers
        self.scale = m.head_dim**-0.5
        self.bytes_per_token = m.kv_bytes_per_token(setup.dtype)
        row = m.num_kv_heads * m.head_dim  # elements of one token of one layer, K or V
        elem = torch.empty(0, dtype=setup.dtype).element_size()
        resident = self.resident_bytes_per_token(setup)
        capacity = self.host_kv_bytes
        if capacity is None:
            # As many host tokens as the device budget can serve: each needs its resident bytes and
            # room in both prefetch buffers (K and V of one layer), capped by the host allowance.
            serve = setup.kv_memory_bytes // (resident + 4 * row * elem)
            capacity = min(setup.swap_space_bytes, serve * self.bytes_per_token)
            self._check_derived_capacity(setup, capacity, resident + 4 * row * elem)
        self.pool = HostKVPool(m, capacity, setup.dtype, setup.device.type == "cuda", self.block_size, setup.device)
        if self.pool.capacity_tokens < setup.max_model_len and not self.evicts_on_full:
            raise ConfigError(
                f"{self.name}: the host pool ({capacity} bytes = {self.pool.capacity_tokens} tokens at "
                f"{self.bytes_per_token} B/token) is smaller than one request of max_model_len="
                f"{setup.max_model_len} tokens; raise host_kv_bytes or lower max_model_len"
            )
        resident_total = resident * self.pool.num_slots
        buffer_elems = min((setup.kv_memory_bytes - resident_total) // (2 * 2 * elem), self.pool.num_slots * row)
        need = min(setup.max_model_len, self.pool.num_slots)
        if buffer_elems < row * need:
            raise ConfigError(
                f"{self.name}: kv_memory_bytes={setup.kv_memory_bytes} leaves room to prefetch "
                f"{max(buffer_elems, 0) // row} tokens per layer, fewer than one request of {need} tokens; "
                f"the device needs two buffers of {2 * row * elem} B per token plus {resident} B per host "
                f"token ({self.pool.num_slots} host tokens)"
            )
        self.transfer = TransferEngine(setup.device, setup.dtype, buffer_elems, overlap=self.overlap)
        self.buffer_tokens = buffer_elems // row

    def _check_derived_capacity(self, setup: KVSetup, capacity: int, device_bytes_per_token: int) -> None:
        """Without ``host_kv_bytes`` the host pool follows ``kv_memory_bytes`` (and
        ``swap_space_bytes``): when it is too small, say which of the two the user should raise."""
        bs, bpt = self.block_size, self.bytes_per_token
        need = bs if self.evicts_on_full else -(-setup.max_model_len // bs) * bs
        if capacity >= need * bpt:
            return
        what = "one block" if self.evicts_on_full else f"one request of max_model_len={setup.max_model_len}"
        if capacity < setup.swap_space_bytes:
            raise ConfigError(
                f"{self.name}: kv_memory_bytes={setup.kv_memory_bytes} serves {capacity // bpt} host tokens "
                f"({device_bytes_per_token} device bytes each), fewer than the {need} "
                f"of {what}; raise kv_memory_bytes to at least {need * device_bytes_per_token}"
                + ("" if self.evicts_on_full else " or lower max_model_len")
            )
        raise ConfigError(
            f"{self.name}: swap_space_bytes={setup.swap_space_bytes} caps the host pool at {capacity // bpt} "
            f"tokens ({bpt} B each), fewer than the {need} of {what}; raise swap_space_bytes to at least "
            f"{need * bpt} or give host_kv_bytes"
        )

    # ---- scheduler side --------------------------------------------------------------------------
    def max_request_tokens(self) -> int:
        return min(self.pool.capacity_tokens, self.buffer_tokens)

    def max_sequence_tokens(self) -> int:
        return self.setup.max_model_len if self.evicts_on_full else self.max_request_tokens()

    def allocate(self, request: Request, num_tokens: int) -> bool:
        rid = request.request_id
        length = self._length.get(rid, 0)
        new = num_tokens - length
        if new <= 0:
            return True
        if self.pool.can_append(rid, new) and self.pool.used_tokens + new <= self.buffer_tokens:
            self.pool.append(rid, new, length)
        elif self.evicts_on_full and new == 1 and self.pool.held(rid) > 1:
            self._replaced[rid] = self.pool.replace_least_selected(rid, length)
        else:
            return False
        self._length[rid] = num_tokens
        return True

    def adopt(self, handover: Handover) -> Adoption:
        """Take over a running request from another strategy's device cache (``adaptive``): copy
        its K/V (``[L, 2, n, Hkv, D]``) into host slots. REFUSED, changing nothing, when the pool
        cannot hold them."""
        rid, n = handover.request.request_id, handover.held
        if not (self.pool.can_append(rid, n) and self.pool.used_tokens + n <= self.buffer_tokens):
            return Adoption.REFUSED
        kv = handover.read_kv()
        slots = self.pool.append(rid, n, 0)
        if self.setup.device.type == "cuda":
            # The CPU writes these slots itself, unordered with the device: a step still in flight
            # (async scheduling) may write them yet for the request that held them before.
            torch.cuda.synchronize(self.setup.device)
        self.pool.kv[:, :, slots.to(self.pool.kv.device)] = kv.to(self.pool.kv.device)
        self.transfer.bytes_d2h += kv.numel() * kv.element_size()
        self._length[rid] = n
        self.adopted(slots, kv)
        return Adoption.COPIED

    def adopted(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Device-side state a subclass keeps for adopted tokens (InfiniGen's partial keys)."""

    def free(self, request: Request) -> None:
        self.pool.free(request.request_id)
        self._length.pop(request.request_id, None)
        self._replaced.pop(request.request_id, None)

    # ---- model side ------------------------------------------------------------------------------
    def step_slots(self, batch: StepBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per request the host slots of its earlier tokens ``[c_i]``, and the new tokens' ``[N]``."""
        prev, new = [], []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            slots = self.pool.slots(req.request_id)
            victim = self._replaced.pop(req.request_id, None)
            if victim is None:
                prev.append(slots[: slots.numel() - n])
                new.append(slots[slots.numel() - n :])
            else:
                prev.append(slots[slots != victim])
                new.append(victim)
        return prev, torch.cat(new)

    #: The ragged step (any mix of prefill chunks and decode rows) and the static pure-decode step.
    attention_class: ClassVar[type[OffloadAttention]] = OffloadAttention
    decode_class: ClassVar[type[HostDecode]] = HostDecode

    def decode_step(self, b: int, c: int) -> HostDecode:
        """A static decode step of ``b`` rows of at most ``c`` earlier tokens (not yet loaded)."""
        return self.decode_class(self, b, c)

    def begin_step(self, batch: StepBatch) -> OffloadAttention | HostDecode:
        prev, new = self.step_slots(batch)
        return self.step_attention(batch, prev, new)

    def step_attention(self, batch: StepBatch, prev: list[torch.Tensor], new: torch.Tensor
                       ) -> OffloadAttention | HostDecode:
        """The backend of ``batch`` given its slots (:meth:`step_slots`): a pure-decode batch whose
        dense layout fits a prefetch buffer runs the static decode step at its exact shape (the
        step the graphs replay), anything else the ragged step."""
        if all(n == 1 for n in batch.num_new_tokens) and all(p.numel() > 0 for p in prev):
            longest = max(p.numel() for p in prev)
            if dense_layer_fits(self, len(prev), longest):
                dec = self.decode_step(len(prev), longest)
                dec.load(prev, new, batch.positions)
                dec.begin()
                return dec
        return self.attention_class(self, batch, prev, new)

    def decode_graphs(self) -> HostGraphs | None:
        sizes = self.setup.cuda_graph_sizes
        return HostGraphs(self, sizes) if sizes else None

    def end_step(self, batch: StepBatch) -> None:
        self.transfer.finish_step()

    def usage(self) -> KVUsage:
        return KVUsage(0, self.transfer.nbytes, self.host_kv_bytes_used())

    def host_kv_bytes_used(self) -> int:
        """Bytes of K/V held in the host pool (its ``host_kv_bytes`` stat)."""
        return self.pool.used_tokens * self.pool.bytes_per_token

    def stats(self) -> dict[str, Any]:
        host = self.pool.stats()
        return {
            **host,
            "kv_bytes_reserved": self.transfer.nbytes,
            "kv_bytes_allocated": self.transfer.nbytes,
            # Nothing stays on the device between steps: the buffers are staging, refilled per layer.
            "kv_bytes_used": 0,
            **self.transfer.stats(),
        }
