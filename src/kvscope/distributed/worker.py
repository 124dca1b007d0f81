"""Ranks 1..N-1 of a tensor-parallel engine: load a shard, mirror rank 0's KV calls, run its steps.

A worker has no scheduler and no sampler. Each message from rank 0 carries the scheduler-side
calls made since the last one (:class:`~kvscope.distributed.mirror.Op`), replayed first, then
one command: ``step`` (run the batch through the same :class:`ModelRunner` path as rank 0, whose
row-parallel layers all-reduce with rank 0's, then move the counters and ``end_step``), ``stats``
(send the strategy's counters to rank 0) or ``stop``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kvscope.distributed.group import join_group, rank_device, receive, worker_store
from kvscope.distributed.mirror import BatchDesc, Mirror, Op
from kvscope.engine.model_runner import ModelRunner
from kvscope.kv import registry
from kvscope.kv.base import KVSetup
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
    """Rank 0 -> workers: the calls to replay, then ``kind`` (``step``, ``stats``, ``stop``)."""

    ops: list[Op]
    kind: str
    batch: BatchDesc | None = None


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
        _serve(rank, kv, ModelRunner(loaded.model, kv, device), Mirror(kv, device), device)
    finally:
        dist.destroy_process_group()


def _serve(rank: int, kv: Any, runner: ModelRunner, mirror: Mirror, device: torch.device) -> None:
    while True:
        msg: Message = receive(device)
        mirror.replay(msg.ops, rank)
        if msg.kind == "stop":
            return
        if msg.kind == "stats":
            dist.gather_object(kv.stats(), None, dst=0)
            continue
        assert msg.batch is not None
        batch = mirror.batch(msg.batch)
        runner.run(batch, msg.batch.sample_rows)  # logits are rank 0's to sample
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed_tokens += n
        kv.end_step(batch)
