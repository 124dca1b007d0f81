"""Pure-decode steps over the host KV pool with static shapes, run eagerly or replayed as CUDA graphs.

Shared by ``offload`` (every layer dense) and ``infinigen`` (dense below ``dense_layers``, then
speculative: ``kv/infinigen_decode.py`` extends :class:`HostDecode`). With ``B`` rows and contexts
padded to ``C`` earlier tokens, every tensor has a shape fixed by ``(B, C)``; which rows hold real
tokens is decided on the device (``lens``, ``real``), never read back by the host. The same code
runs eagerly (exact ``B`` and ``C``: the strategy's ``begin_step`` for a pure-decode batch) or is
captured once per ``(B, C)`` bucket by the engine's graph runner and replayed (:class:`HostGraphs`,
the strategies' :class:`~kvscope.kv.backend.GraphDecode`).

A dense layer is laid out ``[B, Cp]`` whole tokens, ``Cp = ceil16(C + 1)``: row ``i``'s ``c_i``
earlier tokens, then its new token (written in place after them), then padding. Its fetch is one
launch of the GPU-side gather from pinned host memory (``attention/triton_gather.py``) over all
``B * Cp`` places, on the transfer engine's copy stream, into the prefetch buffer of the layer's
parity: places past a row's length are masked (``valid``), so padding costs no PCIe traffic, and
the rows go in position order (no sort). The fetch of layer ``l + 1`` is queued when layer ``l``
starts (``layer_input``), so it runs while layer ``l`` computes; the two buffers keep it off the
rows layer ``l`` reads. A captured memcpy keeps the size and addresses it had at capture, so a bulk
copy per request (possible where its slots are contiguous) cannot serve a replay; the gather reads
2 KiB rows (Llama-3-8B) near the pinned copy's rate (``benchmarks/results/offload_decode.md``).

Attention over a layout is single-query decode over ``S`` sequences of ``P`` rows with per-sequence
lengths: the Triton paged decode kernel with 16-row blocks in order (CUDA, Triton backend) or
:func:`~kvscope.attention.torch_ref.attend_decode` (the torch path).

Rows of a graph bucket beyond the batch are padding: their slots point at the scratch slot the host
pool keeps past its last real one, and ``real`` masks them out of every count.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from kvscope.attention.torch_ref import attend_decode
from kvscope.device_copy import to_device
from kvscope.kv.backend import KVSetup, StepBatch
from kvscope.kv.graphs import bucket_for
from kvscope.kv.host_pool import HostKVPool
from kvscope.kv.transfer import Fetch, TransferEngine


class HostStrategy(Protocol):
    """What these decode steps need of a host-offloading strategy (``kv/offload_base.py``),
    declared here so that this module does not import it (no import cycle)."""

    setup: KVSetup
    pool: HostKVPool
    transfer: TransferEngine
    scale: float
    num_layers: int
    bytes_per_token: int

    def step_slots(self, batch: StepBatch) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def decode_step(self, b: int, c: int) -> HostDecode: ...


ROWS = 16  # rows per block of the padded layouts, as the paged decode kernel reads them


def ceil_rows(n: int, m: int = ROWS) -> int:
    return -(-n // m) * m


class Layout:
    """``S`` sequences of ``P`` padded rows with ``H`` KV heads each (see the module docstring)."""

    def __init__(self, s: int, p: int, h: int, triton: bool, device: torch.device) -> None:
        self.s, self.p, self.h = s, p, h
        self.triton = triton
        if triton:
            from kvscope.attention.decode_splits import default_num_splits
            from kvscope.attention.triton_decode import paged_decode_attention

            self._decode = paged_decode_attention
            self.tables = torch.arange(s * p // ROWS, dtype=torch.int32, device=device).view(s, p // ROWS)
            self.splits = default_num_splits(s, h, p, device)

    def attend(self, q: torch.Tensor, kv: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
        """``q`` ``[S, Hq_s, D]`` over ``kv`` ``[2, S * P, H, D]`` with ``lens`` ``[S]`` -> ``[S, Hq_s, D]``."""
        if self.triton:
            return self._decode(q, kv[0], kv[1], self.tables, lens.to(torch.int32), scale, ROWS, self.splits)
        d = kv.shape[-1]
        k = kv[0].view(self.s, self.p, self.h, d)
        v = kv[1].view(self.s, self.p, self.h, d)
        return attend_decode(q, k, v, lens, scale)


class HostDecode:
    """Static buffers and the attention backend of a dense decode step of ``b`` rows whose earlier
    tokens number at most ``c``. :meth:`load` fills the buffers for a batch; :meth:`begin` derives
    the step's device tensors and starts layer 0's fetch; the model then calls ``layer_input`` and
    ``attend`` per layer; :meth:`finish` joins the copy stream. Subclasses change how a layer is
    fetched (:meth:`fetch`) and attended (:meth:`attend_fetched`)."""

    def __init__(self, strategy: HostStrategy, b: int, c: int) -> None:
        g = self.g = strategy
        m = g.setup.model
        dev = g.setup.device
        self.b, self.c = b, c
        self.hkv, self.d = m.num_kv_heads, m.head_dim
        self.cp = ceil_rows(c + 1)
        self.triton = g.setup.attention_backend == "triton"
        self.dense_layout = Layout(b, self.cp, self.hkv, self.triton, dev)
        # Static inputs: earlier tokens' host slots, their count, the new token's slot and position,
        # and which rows are real.
        self.slots = torch.zeros(b, c, dtype=torch.long, device=dev)
        self.lens = torch.zeros(b, dtype=torch.long, device=dev)
        self.new_slots = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.real = torch.zeros(b, dtype=torch.bool, device=dev)
        self._cols = torch.arange(c, device=dev)
        self._rows = torch.arange(b, device=dev)
        self.fetches: dict[int, Fetch] = {}

    # ---- per step, on the host --------------------------------------------------------------------
    def load(self, prev: list[torch.Tensor], new_slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Fill the static inputs for ``len(prev) <= b`` real rows: ``prev[i]`` ``[c_i]`` host slots of
        row ``i``'s earlier tokens, ``new_slots`` / ``positions`` ``[n]``. The other rows are padding."""
        n = len(prev)
        lens = [p.numel() for p in prev]
        scratch = self.g.pool.scratch_slot
        self.slots.fill_(scratch)
        if n:
            self.slots[:n, : max(lens)] = torch.nn.utils.rnn.pad_sequence(prev, batch_first=True, padding_value=scratch)
        self.lens.copy_(to_device(lens + [1] * (self.b - n), self.lens.device, torch.long))
        self.new_slots.fill_(scratch)
        self.new_slots[:n] = new_slots
        self.positions.zero_()
        self.positions[:n] = positions
        self.real.copy_(self._rows < n)

    # ---- per step, on the device (captured) ------------------------------------------------------
    def begin(self) -> None:
        b, c, cp = self.b, self.c, self.cp
        valid = self._cols[None, :] < self.lens[:, None]  # [B, C]
        self.valid = valid
        self.dense_idx = F.pad(self.slots, (0, cp - c)).flatten()
        self.dense_valid = (F.pad(valid, (0, cp - c)) & self.real[:, None]).flatten()
        self.dense_new = torch.arange(b, device=valid.device) * cp + self.lens
        self.fetches[0] = self.fetch(0, None)

    def finish(self) -> None:
        self.g.transfer.join()

    def fetch_dense(self, layer: int) -> Fetch:
        """Queue layer ``layer``'s whole-token fetch into the ``[B, Cp]`` layout."""
        host = self.g.pool.layer_rows(layer, per_head=False)
        # Rows are in position order already; sorting them was measured slower (infinigen_breakdown).
        return self.g.transfer.fetch(host, self.dense_idx, slot=layer, valid=self.dense_valid, sort=False)

    def fetch(self, layer: int, x: torch.Tensor | None) -> Fetch:
        """Queue layer ``layer``'s fetch; ``x`` ``[B, hidden]`` is the previous layer's attention input
        (None for layer 0). Dense here."""
        return self.fetch_dense(layer)

    def layer_input(self, layer: int, x: torch.Tensor) -> None:
        """Start layer ``layer + 1``'s fetch while layer ``layer`` (input ``x`` ``[B, hidden]``) computes."""
        if layer + 1 < self.g.num_layers:
            self.fetches[layer + 1] = self.fetch(layer + 1, x)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B, Hq, D]``, ``k``/``v`` ``[B, Hkv, D]`` -> ``[B, Hq, D]``: the new K/V go to their
        host slots (padding rows to the scratch slot), then attention over the fetched rows."""
        g = self.g
        g.transfer.write(g.pool.layer_rows(layer, per_head=False), self.new_slots,
                         torch.stack((k, v)).view(2, self.b, -1))
        fetched = g.transfer.wait(self.fetches.pop(layer))
        return self.attend_fetched(layer, q, k, v, fetched)

    def attend_fetched(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       fetched: torch.Tensor) -> torch.Tensor:
        """Attention over layer ``layer``'s ``fetched`` rows (a prefetch buffer) plus the new token,
        written in place after each row's earlier tokens."""
        kv = fetched.view(2, self.b * self.cp, self.hkv, self.d)
        kv[0].index_copy_(0, self.dense_new, k)
        kv[1].index_copy_(0, self.dense_new, v)
        return self.dense_layout.attend(q, kv, self.lens + 1, self.g.scale)


def dense_layer_fits(strategy: HostStrategy, b: int, c: int) -> bool:
    """Whether a dense layer of ``b`` rows padded to ``c`` earlier tokens fits one prefetch buffer."""
    m = strategy.setup.model
    return b * ceil_rows(c + 1) * m.num_kv_heads * m.head_dim <= strategy.transfer.buffer_elems


def context_bucket(tokens: int) -> int:
    """Padded context of a captured step: the next of 256, 384, 512, 768, 1024, 1536, ... (powers of
    two and 1.5 times them), so padding wastes at most a third and few buckets cover long contexts."""
    c = 256
    while c < tokens:
        c = c * 3 // 2 if c & (c - 1) == 0 else c * 4 // 3
    return c


class HostGraphStep:
    """Decode bucket ``(b, c)`` as a :class:`~kvscope.kv.backend.GraphStep`, captured at first use.
    It is built with every row padding, so the warm-up writes and counts nothing real; a replay
    counts its host writes itself (captured copies are not seen by the transfer engine's host-side
    counter; its fetched bytes are counted on the device, inside the graph)."""

    def __init__(self, strategy: HostStrategy, b: int, c: int) -> None:
        self.g = strategy
        self.dec = strategy.decode_step(b, c)
        self.dec.load([], self.dec.new_slots[:0], self.dec.positions[:0])
        self.batch_size = b
        self.input_ids = torch.zeros(b, dtype=torch.long, device=self.dec.slots.device)
        self.positions = self.dec.positions
        self.attention = self.dec
        self._written = strategy.transfer.bytes_d2h

    def load(self, batch: StepBatch) -> None:
        prev, new = self.g.step_slots(batch)
        self.dec.load(prev, new, batch.positions)
        self.input_ids.zero_()
        self.input_ids[: len(prev)] = batch.input_ids

    def begin(self) -> None:
        self.dec.begin()

    def finish(self) -> None:
        self.dec.finish()

    def replayed(self, batch: StepBatch) -> None:
        self.g.transfer.bytes_d2h += len(batch.requests) * self.g.bytes_per_token

    def captured(self) -> None:
        self.g.transfer.bytes_d2h = self._written  # the warm-up wrote only padding rows


class HostGraphs:
    """The :class:`~kvscope.kv.backend.GraphDecode` of the host-offloading strategies: decode steps
    (the strategy's :meth:`decode_step`) keyed by ``(batch bucket, context bucket)``, captured at
    first use by the engine's graph runner."""

    def __init__(self, strategy: HostStrategy, sizes: list[int]) -> None:
        self.g = strategy
        self.sizes = sorted(sizes)
        self.max_batch = self.sizes[-1]

    def key(self, batch: StepBatch) -> tuple[int, int] | None:
        # A decode row's earlier tokens are all it holds but the new one (or but the victim, which
        # takes it): read before step_slots, which consumes the step's eviction victims.
        earlier = [self.g.pool.held(r.request_id) - 1 for r in batch.requests]
        if min(earlier) < 1:
            return None
        b = bucket_for(self.sizes, len(earlier))
        c = context_bucket(max(earlier))
        return (b, c) if b is not None and dense_layer_fits(self.g, b, c) else None

    def step(self, key: tuple[int, int]) -> HostGraphStep:
        return HostGraphStep(self.g, *key)

    def keys_at_start(self) -> list[tuple[int, int]]:
        return []
