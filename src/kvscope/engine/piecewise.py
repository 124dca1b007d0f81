"""Piecewise CUDA graphs: the steps decode graphs do not take, captured around attention.

A prefill chunk or a mixed prefill+decode step of a few hundred tokens is bound by the host just
as a decode step is: each layer launches a dozen kernels (norms, projections, RoPE, the MLP) that
take microseconds each on the device and about as long to launch. Under memory pressure such
steps are frequent (recomputed prefills after preemptions), and while requests arrive one by one
through a server, most early steps are such steps; run eagerly, an 8B model's step takes 16-23 ms
on an H200 where its decode graph takes 5-10 ms.

The work between two attentions is the same for every batch of N tokens, whatever their requests;
only attention depends on each request's context. So, as vLLM's piecewise compilation does, the
forward is split at each layer's attention: the pieces between attentions are captured once per
token bucket, and each step replays them in order, running the step's real attention eagerly in
between. A bucket of S tokens runs any step of N <= S tokens, padded: padding rows never reach
attention (it sees the first N rows), so they cost only their share of the GEMMs.

How the forward is cut without touching model code: while capturing, the model is given a
recording attention backend whose ``attend`` copies q/k/v into static buffers, ends the current
graph and begins the next one, and returns a static output buffer that the next piece reads. The
buffers are shared by every layer and bucket (one step runs at a time, in stream order), so the
graphs' memory pool holds only each piece's temporaries. Steps whose backend has a
``layer_input`` hook (offloading strategies start fetches there, inside a piece) run eagerly.

With ``capture=False`` the same static buffers, padding and eager attention run without graphs,
in one pass of the model: how the path is tested without a GPU.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from kvscope.errors import ConfigError
from kvscope.kv.backend import StepBatch
from kvscope.models.base import AttentionBackend, CausalLM


def default_piecewise_sizes(max_num_batched_tokens: int) -> list[int]:
    """Token buckets 16, 32, 64, 128, 256, 512, 768, 1024, capped at ``max_num_batched_tokens``
    (included when below 1,024). Larger steps are bound by their GEMMs, not by launches."""
    sizes = [s for s in (16, 32, 64, 128, 256, 512, 768, 1024) if s < max_num_batched_tokens]
    return sizes + [max_num_batched_tokens] if max_num_batched_tokens <= 1024 else sizes


def engine_piecewise_sizes(enforce_eager: bool, device: torch.device, sizes: list[int] | None,
                           max_num_batched_tokens: int) -> list[int] | None:
    """The engine's token buckets of piecewise graphs: None when eager (asked for, or not on
    CUDA) or when ``sizes`` is ``[]``, else ``sizes`` or :func:`default_piecewise_sizes`."""
    if enforce_eager or device.type != "cuda":
        return None
    return (default_piecewise_sizes(max_num_batched_tokens) if sizes is None else sizes) or None


@dataclass
class _Bucket:
    """The captured pieces of S-token steps: ``graphs[i]`` ends where attention ``layers[i]``
    begins; the last graph ends with the model's final hidden states."""

    input_ids: torch.Tensor  # [S] int64
    positions: torch.Tensor  # [S] int64
    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # [S, hidden], written by the last graph


class _Buffers:
    """q/k/v in, attention out: ``[S_max, heads, head_dim]`` each, shared by all layers and buckets."""

    def __init__(self, model: CausalLM, size: int, dtype: torch.dtype, device: torch.device) -> None:
        c = model.config
        self.q = torch.zeros(size, c.num_heads, c.head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(size, c.num_kv_heads, c.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.out = torch.zeros_like(self.q)

    def take(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Copy a piece's ``q``/``k``/``v`` (``[S, heads, head_dim]``) in; the ``[S, Hq, D]`` output view."""
        n = q.shape[0]
        self.q[:n].copy_(q)
        self.k[:n].copy_(k)
        self.v[:n].copy_(v)
        return self.out[:n]

    def attend(self, attn: AttentionBackend, layer: int, n: int) -> None:
        """The step's real attention of layer ``layer`` over the first ``n`` rows, into ``out``."""
        self.out[:n].copy_(attn.attend(layer, self.q[:n], self.k[:n], self.v[:n]))


class _Recorder:
    """The attention backend of a warm-up (``graph`` None) or of a capture: at each ``attend`` the
    current piece ends and the next one begins."""

    def __init__(self, buffers: _Buffers, bucket: _Bucket | None = None,
                 pool: tuple[int, int] | None = None, stream: torch.cuda.Stream | None = None) -> None:
        self.buffers, self.bucket, self.pool, self.stream = buffers, bucket, pool, stream
        self._capture: torch.cuda.graph | None = None
        if bucket is not None:
            self._begin()

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        self.bucket.graphs.append(graph)
        self._capture = torch.cuda.graph(graph, pool=self.pool, stream=self.stream)
        self._capture.__enter__()

    def end(self) -> None:
        """Close the open piece (after the model returns, or at an attention)."""
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.buffers.take(q, k, v)
        if self.bucket is not None:
            self.end()
            self.bucket.layers.append(layer_idx)
            self._begin()
        return out


class _Through:
    """The attention backend of an uncaptured run (``capture=False``): the static buffers, then
    the step's attention over the first ``n`` rows, in one pass."""

    def __init__(self, buffers: _Buffers, attn: AttentionBackend, n: int) -> None:
        self.buffers, self.attn, self.n = buffers, attn, n

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.buffers.take(q, k, v)
        self.buffers.attend(self.attn, layer_idx, self.n)
        return out


class PiecewiseRunner:
    """Captured pieces of one engine's model, per token bucket.

    Args:
        model: the served model.
        sizes: token buckets (each captured when the runner is built, largest first, so that the
            shared memory pool fits the smaller ones).
        dtype: the model's activation dtype.
        device: where the model runs.
        capture: record CUDA graphs (False: run through the static buffers eagerly, for tests).
    """

    def __init__(self, model: CausalLM, sizes: list[int], dtype: torch.dtype, device: torch.device,
                 capture: bool = True) -> None:
        if not sizes:
            raise ValueError("PiecewiseRunner needs at least one token bucket")
        self.model, self.capture, self.device = model, capture, device
        self.sizes = sorted(set(sizes))
        self.buffers = _Buffers(model, self.sizes[-1], dtype, device)
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._buckets: dict[int, _Bucket] = {}
        for size in reversed(self.sizes):
            self._buckets[size] = self._capture(size) if capture else self._bucket(size)

    def _bucket(self, size: int) -> _Bucket:
        return _Bucket(torch.zeros(size, dtype=torch.long, device=self.device),
                       torch.zeros(size, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def _capture(self, size: int) -> _Bucket:
        bucket = self._bucket(size)
        side = torch.cuda.Stream()
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels), as capture needs.
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model(bucket.input_ids, bucket.positions, _Recorder(self.buffers))
        torch.cuda.current_stream().wait_stream(side)
        recorder = _Recorder(self.buffers, bucket, self._pool, side)
        try:
            bucket.hidden = self.model(bucket.input_ids, bucket.positions, recorder)
        finally:
            recorder.end()
        return bucket

    def bucket_for(self, num_tokens: int) -> int | None:
        """The smallest bucket holding ``num_tokens`` tokens, or None above the largest."""
        i = bisect.bisect_left(self.sizes, num_tokens)
        return self.sizes[i] if i < len(self.sizes) else None

    @torch.inference_mode()
    def run(self, batch: StepBatch, attn: AttentionBackend) -> torch.Tensor | None:
        """Final hidden states ``[N, hidden]`` of ``batch`` (its ``input_ids`` final: patched),
        attending through ``attn`` (the strategy's ``begin_step(batch)``); None when the step must
        run eagerly (above the largest bucket, or a backend with a ``layer_input`` hook)."""
        n = batch.input_ids.shape[0]
        size = self.bucket_for(n)
        if size is None or getattr(attn, "layer_input", None) is not None:
            return None
        bucket = self._buckets[size]
        # Padding rows keep the last ids and positions they held: valid inputs whose rows are dropped.
        bucket.input_ids[:n].copy_(batch.input_ids)
        bucket.positions[:n].copy_(batch.positions)
        if not self.capture:
            return self.model(bucket.input_ids, bucket.positions, _Through(self.buffers, attn, n))[:n]
        for graph, layer in zip(bucket.graphs, bucket.layers):
            graph.replay()
            self.buffers.attend(attn, layer, n)
        bucket.graphs[-1].replay()
        return bucket.hidden[:n]


def build_pieces(model: CausalLM, sizes: list[int] | None, dtype: torch.dtype,
                 device: torch.device) -> PiecewiseRunner | None:
    """The engine's captured pieces for ``sizes`` (:func:`engine_piecewise_sizes`; None: none)."""
    if sizes is None:
        return None
    try:
        return PiecewiseRunner(model, sizes, dtype, device)
    except torch.OutOfMemoryError as e:  # the KV pool took the memory the pieces' activations need
        raise ConfigError(
            f"capturing piecewise graphs for {max(sizes)}-token steps ran out of device memory ({e}); "
            "lower kv_memory_fraction or kv_memory_bytes, give smaller piecewise_graph_sizes, or [] for none"
        ) from None
