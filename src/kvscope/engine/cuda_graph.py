"""The engine's graph runner: captures a strategy's static decode steps as CUDA graphs and replays them.

A decode step of a small model, or of any model at small batch, is bound by the host: every layer
launches a dozen kernels, each costing microseconds of Python and driver time, so the GPU waits
between them (an 8B model at batch 1 ran 6x slower than its weight-read floor eagerly). A CUDA
graph records the whole step's launches once and replays them with one call.

The strategy describes its steps (:class:`~kvscope.kv.backend.GraphDecode`): which static step runs a pure-decode
batch, and how to fill its buffers. This runner is the one place that warms a step up on a side
stream, captures it into a memory pool shared by every step (as vLLM does), and replays it. Only
steps where every request decodes one sampled token run as graphs; prefill chunks, mixed steps,
batches above the largest bucket and steps the strategy declines run eagerly. With
``capture=False`` the runner runs the same static steps eagerly: how they are tested without a GPU.
"""
from __future__ import annotations

from collections.abc import Hashable

import torch

from kvscope.kv.backend import GraphDecode, GraphStep, StepBatch
from kvscope.models.base import CausalLM


def default_graph_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's buckets: 1, 2, 4, then every multiple of 8, up to ``max_num_seqs`` (included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


def pure_decode(num_new_tokens: list[int], sample_rows: list[int]) -> bool:
    """Whether a step is pure decode: one new token per request, each sampled."""
    return all(k == 1 for k in num_new_tokens) and sample_rows == list(range(len(num_new_tokens)))


class GraphRunner:
    """Captured decode steps of one engine.

    Args:
        model: the served model.
        decode: the strategy's :class:`~kvscope.kv.graphs.GraphDecode`.
        device: where the model runs.
        capture: record CUDA graphs (False: run the static steps eagerly, for tests).
    """

    def __init__(self, model: CausalLM, decode: GraphDecode, device: torch.device, capture: bool = True) -> None:
        self.model, self.decode, self.capture = model, decode, capture
        self._steps: dict[Hashable, tuple[GraphStep, torch.cuda.CUDAGraph | None]] = {}
        # One logits buffer shared by every step: per-step outputs would stay allocated (2 GB of
        # float32 logits over the buckets of 256 sequences at a 128k vocabulary).
        self._out = torch.empty(decode.max_batch, model.config.vocab_size, dtype=torch.float32, device=device)
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        for key in decode.keys_at_start():
            self._add(key)

    def _forward(self, step: GraphStep) -> None:
        step.begin()
        hidden = self.model(step.input_ids, step.positions, step.attention)
        self._out[: step.batch_size].copy_(self.model.compute_logits(hidden))
        step.finish()

    @torch.inference_mode()
    def _add(self, key: Hashable) -> tuple[GraphStep, torch.cuda.CUDAGraph | None]:
        step = self.decode.step(key)
        graph = None
        if self.capture:
            # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels), as capture needs.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(step)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._forward(step)
            step.captured()
        self._steps[key] = (step, graph)
        return step, graph

    def plan(self, batch: StepBatch, sample_rows: list[int]) -> Hashable | None:
        """The key of the static step that runs ``batch``, or None when it must run eagerly (not
        pure decode, above the largest bucket, or declined by the strategy). No side effects, so a
        tensor-parallel rank 0 can decide here and send the key to the other ranks."""
        if len(batch.requests) > self.decode.max_batch or not pure_decode(batch.num_new_tokens, sample_rows):
            return None
        return self.decode.key(batch)

    @torch.inference_mode()
    def replay(self, batch: StepBatch, key: Hashable) -> torch.Tensor:
        """Float32 logits ``[B, vocab]`` of ``batch`` from static step ``key`` (captured first if new)."""
        step, graph = self._steps.get(key) or self._add(key)
        step.load(batch)
        if batch.input_patch is not None:  # ordered after load's copy on the stream
            rows, ids = batch.input_patch
            step.input_ids.index_copy_(0, rows, ids.to(step.input_ids.dtype))
        if graph is not None:
            graph.replay()
            step.replayed(batch)
        else:
            self._forward(step)
        return self._out[: len(batch.requests)].clone()

    def run(self, batch: StepBatch, sample_rows: list[int]) -> torch.Tensor | None:
        """Float32 logits ``[B, vocab]`` of the pure-decode ``batch`` from its static step, or
        None when the step must run eagerly."""
        key = self.plan(batch, sample_rows)
        return None if key is None else self.replay(batch, key)


def engine_graph_sizes(enforce_eager: bool, device: torch.device, sizes: list[int] | None,
                       max_num_seqs: int) -> list[int] | None:
    """The engine's batch-size buckets of captured decode steps: None when eager (asked for, or
    not on CUDA), else ``sizes`` or :func:`default_graph_sizes`."""
    if enforce_eager or device.type != "cuda":
        return None
    return sizes or default_graph_sizes(max_num_seqs)
