"""The pure-decode step of ``infinigen`` with static shapes, run eagerly or replayed as a CUDA graph.

A decode step of ``infinigen`` issues tens of small kernels per layer (speculation, the gather,
attention over the fetched rows); run eagerly it is bound by the host, not
by PCIe or HBM (on an H100 host at batch 1: 140 ms of launches for 21 ms of GPU work). It extends
the dense static step shared with ``offload`` (:class:`~kvscope.kv.host_decode.HostDecode`: ``B``
rows, contexts padded to ``C``, one graph per ``(B, C)`` bucket through
:class:`~kvscope.kv.host_decode.HostGraphs`): layers below ``dense_layers`` are its dense layers,
and the number of tokens each KV head keeps above them (InfiniGen's ``k``, decided on the device)
only masks rows.

Speculative layers are laid out ``[B * Hkv, Kp]`` rows of one KV head (``select=head``) or
``[B, Kp]`` whole tokens (``select=token``), ``Kp = ceil16(k_max + 1)``, the kept rows first (in
position order, as :func:`~kvscope.attention.triton_speculate.speculate_rows` writes them), the new
token right after them, attended like the dense layout.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from kvscope.device_copy import to_device
from kvscope.kv.host_decode import HostDecode, HostStrategy, Layout, ceil_rows
from kvscope.kv.transfer import Fetch


class InfiniGenStrategy(HostStrategy, Protocol):
    """What these decode steps need of ``kv/infinigen.py``'s strategy besides the host pool,
    declared here so that this module does not import it (no import cycle)."""

    model: Any  # the served CausalLM (its ``attention_query``, layers)
    spec_stream: torch.cuda.Stream | None
    select: str  # "head" or "token"
    dense_layers: int
    candidate_tokens: torch.Tensor  # [L] float64: tokens speculation chose among, per layer

    def k_cap(self, context: int) -> float: ...

    def select_rows(self, layer: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    lens: torch.Tensor, real: torch.Tensor, cap: torch.Tensor, kp: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def write_partial_keys(self, layer: int, slots: torch.Tensor, k: torch.Tensor) -> None: ...


class InfiniGenDecode(HostDecode):
    """Static buffers and the attention backend of ``infinigen`` decode steps of ``b`` rows whose
    earlier tokens number at most ``c`` (see :class:`~kvscope.kv.host_decode.HostDecode`)."""

    g: InfiniGenStrategy

    def __init__(self, strategy: InfiniGenStrategy, b: int, c: int) -> None:
        super().__init__(strategy, b, c)
        g = strategy
        dev = g.setup.device
        self.per_head = g.select == "head"
        self.k_max = min(c, g.k_cap(c))
        self.kp = ceil_rows(self.k_max + 1)
        self.spec_layout = (Layout(b * self.hkv, self.kp, 1, self.triton, dev) if self.per_head
                            else Layout(b, self.kp, self.hkv, self.triton, dev))
        self.cap = torch.ones(b, dtype=torch.float32, device=dev)  # each row's cap on k
        self._seq = torch.arange(self.spec_layout.s, device=dev)
        self.selected: dict[int, torch.Tensor] = {}
        self._held: list[torch.Tensor] = []

    def load(self, prev: list[torch.Tensor], new_slots: torch.Tensor, positions: torch.Tensor) -> None:
        super().load(prev, new_slots, positions)
        g, n = self.g, len(prev)
        lens = [p.numel() for p in prev]
        self.cap.copy_(to_device([float(g.k_cap(n_i)) for n_i in lens] + [1.0] * (self.b - n), self.cap.device,
                                 torch.float32))
        for layer in range(g.dense_layers, g.num_layers):
            g.candidate_tokens[layer] += sum(lens)

    def finish(self) -> None:
        stream = self.g.spec_stream
        # Only a step that speculated forked the stream (one of dense layers only, such as a model
        # with no more layers than dense_layers, did not): joining a stream that was not forked
        # from a capture is an error inside it.
        if stream is not None and self._held:
            torch.cuda.current_stream(stream.device).wait_stream(stream)
        super().finish()
        self._held.clear()

    def fetch(self, layer: int, x: torch.Tensor | None) -> Fetch:
        """Layer ``layer``'s fetch: dense below ``dense_layers``, else the rows speculated from the
        previous layer's attention input ``x`` ``[B, hidden]``.

        On CUDA the speculation runs on the strategy's ``spec_stream``, beside the previous layer's
        own attention and MLP, and the fetch is queued behind it: the copy then waits for the
        speculation only, not for the compute stream, and the speculation's small kernels (a few
        programs each) fill SMs the compute leaves idle."""
        if layer < self.g.dense_layers:
            return self.fetch_dense(layer)
        host = self.g.pool.layer_rows(layer, per_head=self.per_head)
        stream = self.g.spec_stream
        if stream is None:
            rows, valid = self.speculate(layer, x)
            return self.g.transfer.fetch(host, rows, slot=layer, valid=valid, sort=False)
        # The speculation stream starts after everything queued so far: x is ready, and the buffer
        # the fetch fills was last read by layer - 2's attention, already queued.
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            rows, valid = self.speculate(layer, x)
            # Each head's rows are in position order (speculate_rows): no sort needed.
            fetch = self.g.transfer.fetch(host, rows, slot=layer, valid=valid, sort=False)
        # x (from the compute stream) and the kept counts (read by it) cross streams: kept alive
        # until the step is joined, as freed memory is reused without events inside a capture.
        self._held += [x, self.selected[layer]]
        return fetch

    def speculate(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Select layer ``layer``'s rows from the previous layer's attention input ``x`` ``[B, hidden]``;
        returns host row ids and their validity, both ``[S * Kp]`` in the speculative layout."""
        rows, valid, kept = self.g.select_rows(layer, x, self.positions, self.slots, self.lens, self.real, self.cap,
                                               self.kp)
        self.selected[layer] = kept.flatten()  # [S] rows kept per sequence
        return rows.flatten(), valid.flatten()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B, Hq, D]``, ``k``/``v`` ``[B, Hkv, D]`` -> ``[B, Hq, D]``."""
        self.g.write_partial_keys(layer, self.new_slots, k)
        return super().attend(layer, q, k, v)

    def attend_fetched(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       fetched: torch.Tensor) -> torch.Tensor:
        if layer < self.g.dense_layers:
            return super().attend_fetched(layer, q, k, v, fetched)
        lay = self.spec_layout
        kept = self.selected.pop(layer)
        new_rows = self._seq * self.kp + kept.long()
        kv = fetched.view(2, lay.s * self.kp, lay.h, self.d)
        kv[0].index_copy_(0, new_rows, k.reshape(lay.s, lay.h, self.d))
        kv[1].index_copy_(0, new_rows, v.reshape(lay.s, lay.h, self.d))
        out = lay.attend(q.reshape(lay.s, -1, self.d), kv, kept + 1, self.g.scale)
        return out.view(q.shape)
