"""Ranks 1..N-1 of a tensor-parallel engine: load a shard, mirror rank 0's KV calls, run its steps.

A worker has no scheduler and no sampler. Each message from rank 0 carries the scheduler-side
calls made since the last one (:class:`~kvscope.distributed.mirror.Op`), replayed first, then
one command: ``step`` (run the batch through the same :class:`ModelRunner` path as rank 0, whose
row-parallel layers all-reduce with rank 0's, then move the counters and ``end_step``), ``stats``
(send the strategy's counters to rank 0) or ``stop``.

CUDA graphs per rank: every rank builds its own :class:`GraphRunner` over its own strategy's
``decode_graphs()`` right after binding it (:func:`rank_graphs`), so the keys captured at start are
captured in the same order on every rank, their warm-up all-reduces meeting. Which static step a
``step`` runs, if any, is rank 0's decision, sent with the batch (``Message.graph_key``): a rank
replays exactly when rank 0 does, and a key first seen mid-run (InfiniGen's context buckets) is
captured by every rank at the same step. Each worker checks the decision against its own
``plan`` (keys read only counts that are equal on every rank: batch size, tokens held per request,
the shard's heads and buffer sizes), and raises "diverged" on a mismatch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Hashable
from typing import Any

import torch
import torch.distributed as dist

from kvscope.distributed.group import join_group, rank_device, receive, worker_store
from kvscope.distributed.mirror import BatchDesc, Mirror, Op
from kvscope.engine.cuda_graph import GraphRunner
from kvscope.engine.model_runner import ModelRunner
from kvscope.kv import registry
from kvscope.kv.backend import KVBackend, StepBatch
from kvscope.kv.base import KVSetup
from kvscope.models.base import CausalLM
from kvscope.models.parallel import load_shard


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker is started with (pickled into the spawned process)."""

    model: str
    device: str
    dtype: torch.dtype
    seed: int
    strategy: str
    strategy_args: dict[str, Any] | None
    kv_memory_fraction: float


@dataclass(frozen=True)
class Message:
    """Rank 0 -> workers: the calls to replay, then ``kind`` (``step``, ``stats``, ``stop``); a
    ``step``'s ``graph_key`` is the static step every rank runs it through (None: eagerly)."""

    ops: list[Op]
    kind: str
    batch: BatchDesc | None = None
    graph_key: Hashable | None = None


def rank_graphs(model: CausalLM, kv: KVBackend, device: torch.device) -> GraphRunner | None:
    """This rank's runner of ``kv``'s static decode steps (``kv`` bound), or None when its setup
    has no graph sizes. Captured on CUDA, where NCCL records the all-reduces into the graphs; run
    eagerly elsewhere (gloo cannot be captured; only the CPU test mode sets sizes there)."""
    decode = kv.decode_graphs()
    return None if decode is None else GraphRunner(model, decode, device, capture=device.type == "cuda")


def worker_main(rank: int, port: int, world: int, spec: WorkerSpec) -> None:
    """Entry point of rank ``rank`` (spawned; see :class:`~kvscope.distributed.group.WorkerGroup`)."""
    torch.set_grad_enabled(False)
    store = worker_store(port, world)
    device = rank_device(torch.device(spec.device), rank)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        loaded = load_shard(spec.model, device, spec.dtype, spec.seed, rank, world)
        kv = registry.create(spec.strategy, spec.strategy_args)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    except BaseException as e:
        store.set(f"ready{rank}", f"error:{type(e).__name__}: {e}")
        raise
    store.set(f"ready{rank}", str(int(free * spec.kv_memory_fraction)))
    join_group(store, rank, world, device)
    try:
        setup: KVSetup = receive(device)
        kv.bind(dataclasses.replace(setup, model=loaded.config, device=device))
        kv.attach_model(loaded)
        runner = ModelRunner(loaded.model, kv, device, rank_graphs(loaded.model, kv, device))
        _serve(rank, kv, runner, Mirror(kv, device), device)
    finally:
        dist.destroy_process_group()


def _serve(rank: int, kv: Any, runner: ModelRunner, mirror: Mirror, device: torch.device) -> None:
    while True:
        msg: Message = receive(device)
        mirror.replay(msg.ops, rank)
        if msg.kind == "stop":
            return
        if msg.kind == "stats":
            dist.gather_object({**kv.stats(), "cuda_graph_replays": runner.graph_replays}, None, dst=0)
            continue
        assert msg.batch is not None
        batch = mirror.batch(msg.batch)
        run_as_planned(rank, runner, batch, msg.batch.sample_rows, msg.graph_key)  # logits are rank 0's
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed_tokens += n
        kv.end_step(batch)


def run_as_planned(rank: int, runner: ModelRunner, batch: StepBatch, sample_rows: list[int],
                    key: Hashable | None) -> None:
    """Run ``batch`` through static step ``key`` as rank 0 does, or eagerly when ``key`` is None."""
    graphs = runner.graphs
    mine = None if graphs is None else graphs.plan(batch, sample_rows)
    if mine != key:
        raise RuntimeError(f"tensor-parallel rank {rank} diverged from rank 0: its static step for a batch of "
                           f"{len(batch.requests)} requests is {mine!r} here and {key!r} on rank 0")
    if graphs is None or key is None:
        runner.run(batch, sample_rows)  # its own plan is None too: eager
        return
    runner.graph_replays += 1
    graphs.replay(batch, key)
