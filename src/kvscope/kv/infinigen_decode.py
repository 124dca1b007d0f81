"""The pure-decode step of ``infinigen`` with static shapes, run eagerly or replayed as a CUDA graph.

A decode step of ``infinigen`` issues tens of small kernels per layer (speculation, the gather,
attention over the fetched rows); run eagerly it is bound by the host, not
by PCIe or HBM (on an H100 host at batch 1: 140 ms of launches for 21 ms of GPU work). This module
lays the step out so that no shape depends on data: with ``B`` rows and contexts padded to ``C``
tokens, every tensor has a shape fixed by ``(B, C)``, and the number of tokens each KV head keeps
(InfiniGen's ``k``, decided on the device) only masks rows. The same code runs eagerly (exact
``B`` and ``C``) or is captured once per ``(B, C)`` bucket by the engine's graph runner and
replayed (:class:`InfiniGenGraphs`, the strategy's :class:`~kvscope.kv.backend.GraphDecode`).

Layouts, all padded so that a row's new token can be written in place after its fetched rows:

* dense layers (below ``dense_layers``): ``[B, Cp]`` whole tokens, ``Cp = ceil16(C + 1)``;
* speculative layers: ``[B * Hkv, Kp]`` rows of one KV head (``select=head``) or ``[B, Kp]`` whole
  tokens (``select=token``), ``Kp = ceil16(k_max + 1)``, the kept rows first (in position order,
  as :func:`~kvscope.attention.triton_speculate.speculate_rows` writes them), the new token right
  after them.

Attention over a layout is single-query decode over ``S`` sequences of ``P`` rows with per-sequence
lengths: the Triton paged decode kernel with 16-row blocks in order (CUDA, Triton backend) or
:func:`~kvscope.attention.torch_ref.attend_decode` (the torch path).

Rows of a graph bucket beyond the batch are padding: their slots point at the scratch slot the host
pool keeps past its last real one, and ``real`` masks them out of every count.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from kvscope.attention.torch_ref import attend_decode
from kvscope.kv.backend import KVSetup, StepBatch
from kvscope.kv.graphs import bucket_for
from kvscope.kv.host_pool import HostKVPool
from kvscope.kv.transfer import TransferEngine


class InfiniGenStrategy(Protocol):
    """What these decode steps need of ``kv/infinigen.py``'s strategy, declared here so that this
    module does not import it (no import cycle)."""

    setup: KVSetup
    pool: HostKVPool
    transfer: TransferEngine
    model: Any  # the served CausalLM (its ``attention_query``, layers)
    spec_stream: torch.cuda.Stream | None
    select: str  # "head" or "token"
    scale: float
    num_layers: int
    dense_layers: int
    bytes_per_token: int
    candidate_tokens: torch.Tensor  # [L] float64: tokens speculation chose among, per layer

    def k_cap(self, context: int) -> float: ...

    def step_slots(self, batch: StepBatch) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def select_rows(self, layer: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    lens: torch.Tensor, real: torch.Tensor, cap: torch.Tensor, kp: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def write_partial_keys(self, layer: int, slots: torch.Tensor, k: torch.Tensor) -> None: ...

_ROWS = 16  # rows per block of the padded layouts, as the paged decode kernel reads them


def _ceil(n: int, m: int = _ROWS) -> int:
    return -(-n // m) * m


class _Layout:
    """``S`` sequences of ``P`` padded rows with ``H`` KV heads each (see the module docstring)."""

    def __init__(self, s: int, p: int, h: int, triton: bool, device: torch.device) -> None:
        self.s, self.p, self.h = s, p, h
        self.triton = triton
        if triton:
            from kvscope.attention.decode_splits import default_num_splits
            from kvscope.attention.triton_decode import paged_decode_attention

            self._decode = paged_decode_attention
            self.tables = torch.arange(s * p // _ROWS, dtype=torch.int32, device=device).view(s, p // _ROWS)
            self.splits = default_num_splits(s, h, p, device)

    def attend(self, q: torch.Tensor, kv: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
        """``q`` ``[S, Hq_s, D]`` over ``kv`` ``[2, S * P, H, D]`` with ``lens`` ``[S]`` -> ``[S, Hq_s, D]``."""
        if self.triton:
            return self._decode(q, kv[0], kv[1], self.tables, lens.to(torch.int32), scale, _ROWS, self.splits)
        d = kv.shape[-1]
        k = kv[0].view(self.s, self.p, self.h, d)
        v = kv[1].view(self.s, self.p, self.h, d)
        return attend_decode(q, k, v, lens, scale)


class InfiniGenDecode:
    """Static buffers and the attention backend of ``infinigen`` decode steps of ``b`` rows whose
    earlier tokens number at most ``c``. :meth:`load` fills the buffers for a batch; :meth:`begin`
    derives the step's device tensors and starts layer 0's fetch; the model then calls
    ``layer_input`` and ``attend`` per layer; :meth:`finish` joins the copy stream."""

    def __init__(self, strategy: InfiniGenStrategy, b: int, c: int) -> None:
        g = self.g = strategy
        m = g.setup.model
        dev = g.setup.device
        self.b, self.c = b, c
        self.hkv, self.d = m.num_kv_heads, m.head_dim
        self.per_head = g.select == "head"
        self.k_max = min(c, g.k_cap(c))
        self.kp = _ceil(self.k_max + 1)
        self.cp = _ceil(c + 1)
        triton = g.setup.attention_backend == "triton"
        self.dense_layout = _Layout(b, self.cp, self.hkv, triton, dev)
        self.spec_layout = (_Layout(b * self.hkv, self.kp, 1, triton, dev) if self.per_head
                            else _Layout(b, self.kp, self.hkv, triton, dev))
        # Static inputs: earlier tokens' host slots, their count, the new token's slot and position,
        # which rows are real, and each row's cap on k (its budget of its own context).
        self.slots = torch.zeros(b, c, dtype=torch.long, device=dev)
        self.lens = torch.zeros(b, dtype=torch.long, device=dev)
        self.new_slots = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.real = torch.zeros(b, dtype=torch.bool, device=dev)
        self.cap = torch.ones(b, dtype=torch.float32, device=dev)
        self._cols = torch.arange(c, device=dev)
        self._seq = torch.arange(self.spec_layout.s, device=dev)
        self.fetches: dict[int, object] = {}
        self.selected: dict[int, torch.Tensor] = {}
        self._held: list[torch.Tensor] = []

    # ---- per step, on the host --------------------------------------------------------------------
    def load(self, prev: list[torch.Tensor], new_slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Fill the static inputs for ``len(prev) <= b`` real rows: ``prev[i]`` ``[c_i]`` host slots of
        row ``i``'s earlier tokens, ``new_slots`` / ``positions`` ``[n]``. The other rows are padding."""
        g, n = self.g, len(prev)
        lens = [p.numel() for p in prev]
        scratch = g.pool.scratch_slot
        self.slots.fill_(scratch)
        if n:
            self.slots[:n, : max(lens)] = torch.nn.utils.rnn.pad_sequence(prev, batch_first=True, padding_value=scratch)
        self.lens.copy_(torch.tensor(lens + [1] * (self.b - n)))
        self.new_slots.fill_(scratch)
        self.new_slots[:n] = new_slots
        self.positions.zero_()
        self.positions[:n] = positions
        self.real.copy_(torch.arange(self.b) < n)
        self.cap.copy_(torch.tensor([float(g.k_cap(n_i)) for n_i in lens] + [1.0] * (self.b - n)))
        for layer in range(g.dense_layers, g.num_layers):
            g.candidate_tokens[layer] += sum(lens)

    # ---- per step, on the device (captured) ------------------------------------------------------
    def begin(self) -> None:
        b, c, cp = self.b, self.c, self.cp
        valid = self._cols[None, :] < self.lens[:, None]  # [B, C]
        self.valid = valid
        self.dense_idx = F.pad(self.slots, (0, cp - c)).flatten()
        self.dense_valid = (F.pad(valid, (0, cp - c)) & self.real[:, None]).flatten()
        self.dense_new = torch.arange(b, device=valid.device) * cp + self.lens
        self.fetches[0] = self._fetch_dense(0)

    def finish(self) -> None:
        stream = self.g.spec_stream
        if stream is not None:
            torch.cuda.current_stream(stream.device).wait_stream(stream)
        self.g.transfer.join()
        self._held.clear()

    def _fetch_dense(self, layer: int):
        host = self.g.pool.layer_rows(layer, per_head=False)
        # Rows are in position order already; sorting them was measured slower (infinigen_breakdown).
        return self.g.transfer.fetch(host, self.dense_idx, slot=layer, valid=self.dense_valid, sort=False)

    def layer_input(self, layer: int, x: torch.Tensor) -> None:
        """Start layer ``layer + 1``'s fetch from layer ``layer``'s attention input ``x`` ``[B, hidden]``.

        On CUDA the speculation runs on the strategy's ``spec_stream``, beside layer ``layer``'s own
        attention and MLP, and the fetch is queued behind it: the copy then waits for the
        speculation only, not for the compute stream, and the speculation's small kernels (a few
        programs each) fill SMs the compute leaves idle."""
        nxt = layer + 1
        if nxt >= self.g.num_layers:
            return
        if nxt < self.g.dense_layers:
            self.fetches[nxt] = self._fetch_dense(nxt)
            return
        host = self.g.pool.layer_rows(nxt, per_head=self.per_head)
        stream = self.g.spec_stream
        if stream is None:
            rows, valid = self.speculate(nxt, x)
            self.fetches[nxt] = self.g.transfer.fetch(host, rows, slot=nxt, valid=valid, sort=False)
            return
        # The speculation stream starts after everything queued so far: x is ready, and the buffer
        # the fetch fills was last read by layer nxt - 2's attention, already queued.
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            rows, valid = self.speculate(nxt, x)
            # Each head's rows are in position order (speculate_rows): no sort needed.
            self.fetches[nxt] = self.g.transfer.fetch(host, rows, slot=nxt, valid=valid, sort=False)
        # x (from the compute stream) and the kept counts (read by it) cross streams: kept alive
        # until the step is joined, as freed memory is reused without events inside a capture.
        self._held += [x, self.selected[nxt]]

    def speculate(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Select layer ``layer``'s rows from the previous layer's attention input ``x`` ``[B, hidden]``;
        returns host row ids and their validity, both ``[S * Kp]`` in the speculative layout."""
        rows, valid, kept = self.g.select_rows(layer, x, self.positions, self.slots, self.lens, self.real, self.cap,
                                               self.kp)
        self.selected[layer] = kept.flatten()  # [S] rows kept per sequence
        return rows.flatten(), valid.flatten()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B, Hq, D]``, ``k``/``v`` ``[B, Hkv, D]`` -> ``[B, Hq, D]``."""
        g = self.g
        g.write_partial_keys(layer, self.new_slots, k)
        g.transfer.write(g.pool.layer_rows(layer, per_head=False), self.new_slots,
                         torch.stack((k, v)).view(2, self.b, -1))
        fetched = g.transfer.wait(self.fetches.pop(layer))
        if layer < g.dense_layers:
            kv = fetched.view(2, self.b * self.cp, self.hkv, self.d)
            kv[0].index_copy_(0, self.dense_new, k)
            kv[1].index_copy_(0, self.dense_new, v)
            return self.dense_layout.attend(q, kv, self.lens + 1, g.scale)
        lay = self.spec_layout
        kept = self.selected.pop(layer)
        new_rows = self._seq * self.kp + kept.long()
        kv = fetched.view(2, lay.s * self.kp, lay.h, self.d)
        kv[0].index_copy_(0, new_rows, k.reshape(lay.s, lay.h, self.d))
        kv[1].index_copy_(0, new_rows, v.reshape(lay.s, lay.h, self.d))
        out = lay.attend(q.reshape(lay.s, -1, self.d), kv, kept + 1, g.scale)
        return out.view(q.shape)


def dense_layer_fits(strategy: InfiniGenStrategy, b: int, c: int) -> bool:
    """Whether a dense layer of ``b`` rows padded to ``c`` earlier tokens fits one prefetch buffer."""
    m = strategy.setup.model
    return b * _ceil(c + 1) * m.num_kv_heads * m.head_dim <= strategy.transfer.buffer_elems


def context_bucket(tokens: int) -> int:
    """Padded context of a captured step: the next of 256, 384, 512, 768, 1024, 1536, ... (powers of
    two and 1.5 times them), so padding wastes at most a third and few buckets cover long contexts."""
    c = 256
    while c < tokens:
        c = c * 3 // 2 if c & (c - 1) == 0 else c * 4 // 3
    return c


class InfiniGenGraphStep:
    """Decode bucket ``(b, c)`` as a :class:`~kvscope.kv.backend.GraphStep`, captured at first use.
    It is built with every row padding, so the warm-up writes and counts nothing real; a replay
    counts its host writes itself (captured copies are not seen by the transfer engine's host-side
    counter)."""

    def __init__(self, strategy: InfiniGenStrategy, b: int, c: int) -> None:
        self.g = strategy
        self.dec = InfiniGenDecode(strategy, b, c)
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


class InfiniGenGraphs:
    """The :class:`~kvscope.kv.backend.GraphDecode` of ``infinigen``: decode steps keyed by
    ``(batch bucket, context bucket)``, captured at first use by the engine's graph runner."""

    def __init__(self, strategy: InfiniGenStrategy, sizes: list[int]) -> None:
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

    def step(self, key: tuple[int, int]) -> InfiniGenGraphStep:
        return InfiniGenGraphStep(self.g, *key)

    def keys_at_start(self) -> list[tuple[int, int]]:
        return []
