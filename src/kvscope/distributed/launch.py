"""Rank 0 of a tensor-parallel engine: the engine itself, driving the workers through its runner.

:func:`tensor_parallel_engine` starts ranks 1..N-1, loads rank 0's shard, agrees on the KV pool
(the same bytes per rank, so the same tokens), binds every rank's strategy with one
:class:`KVSetup` (its ``tensor_parallel`` the group), and returns an ordinary :class:`LLMEngine`
given a :class:`StepExecutor`: its scheduler sees rank 0's strategy through a
:class:`RecordingManager`, and its runner is a :class:`TensorParallelRunner`, which before
computing each step broadcasts the recorded scheduler calls and the batch, so every rank runs the
same step and the row-parallel layers' all-reduces (and the strategies' own reductions) meet. Sampling stays on rank 0 (the LM head is
replicated, so its logits are the whole vocabulary's).

On CUDA every rank captures its strategy's pure-decode steps as CUDA graphs, with the engine's
graph sizes (``enforce_eager`` and ``cuda_graph_sizes`` as on one GPU): the all-reduces then run
inside the graphs (NCCL can be captured). Rank 0 decides per step which static step runs, if any,
and sends its key with the batch (see :mod:`kvscope.distributed.worker`). On a CPU (gloo cannot be
captured) steps run eagerly, unless ``static_steps`` asks every rank to run its static steps
without capture, which is how the lockstep is tested without GPUs.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch

from kvscope.config import DEFAULT_CPU_KV_BYTES, EngineConfig
from kvscope.distributed.group import EngineGroup, WorkerGroup, rank_device
from kvscope.distributed.mirror import RecordingManager
from kvscope.distributed.worker import Message, WorkerSpec, rank_graphs, worker_main
from kvscope.engine.cuda_graph import default_graph_sizes, engine_graph_sizes
from kvscope.engine.engine import LLMEngine
from kvscope.engine.executor import StepExecutor
from kvscope.engine.model_runner import ModelRunner
from kvscope.errors import ConfigError
from kvscope.kv import registry
from kvscope.kv.backend import KVBackend, KVSetup, StepBatch
from kvscope.models.base import CausalLM
from kvscope.models.parallel import full_config, load_shard, shard_config


class TensorParallelRunner(ModelRunner):
    """Rank 0's :class:`ModelRunner` of its strategy ``kv``: each step is first sent to the
    workers with the calls ``recorder`` logged since the last, and with the key of the static step
    that runs it on every rank (``graphs``' plan; None: eagerly). ``graphs`` is set once ``kv`` is
    bound. A step that fails midway leaves the workers inside it, so the group is stopped and every
    later step raises."""

    def __init__(self, model: CausalLM, kv: KVBackend, device: torch.device, group: WorkerGroup,
                 recorder: RecordingManager) -> None:
        super().__init__(model, kv, device)
        self.recorder = recorder
        self.group = group
        self._finalizer = weakref.finalize(self, _stop, group)

    def run(self, batch: StepBatch, sample_rows: list[int]) -> torch.Tensor:
        graphs = self.graphs
        key = None if graphs is None else graphs.plan(batch, sample_rows)
        self._send(Message(self.recorder.take_ops(), "step", self.recorder.describe(batch, sample_rows), key))
        try:
            if graphs is None or key is None:
                return super().run(batch, sample_rows)  # the graphs' own plan is None again: eager
            self.graph_replays += 1
            return graphs.replay(batch, key)
        except BaseException as exc:
            self._fail(exc)
            raise

    def rank_stats(self) -> list[dict[str, Any]]:
        """Every rank's ``kv.stats()`` plus its ``cuda_graph_replays`` (steps it ran through a
        static step), rank 0's first (the workers first replay the pending calls)."""
        self._send(Message(self.recorder.take_ops(), "stats"))
        return self.group.gather({**self.recorder.inner.stats(), "cuda_graph_replays": self.graph_replays})

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        self._finalizer()

    def _send(self, msg: Message) -> None:
        if self.group.closed:
            raise RuntimeError("the tensor-parallel workers are stopped (closed, or a failed step)")
        self.group.raise_if_dead()
        try:
            self.group.send(msg)
        except BaseException as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: BaseException) -> None:
        """After a failure mid-collective: a dead worker's error replaces ``exc``; either way the
        group stops, since the ranks are no longer in step."""
        self._finalizer.detach()  # the workers wait inside the step: no "stop" can reach them
        try:
            self.group.raise_if_dead()
        except RuntimeError as dead:
            raise dead from exc
        finally:
            self.group.close()


def _stop(group: WorkerGroup) -> None:
    if not group.closed:
        try:
            group.send(Message([], "stop"))
        except Exception:  # noqa: BLE001 - the group is going away; close() kills what is left
            pass
        group.close()


def tensor_parallel_engine(config: EngineConfig, static_steps: bool = False) -> LLMEngine:
    """The engine of ``config`` over ``config.tensor_parallel_size`` ranks (this process is rank 0).

    ``static_steps`` (CPU only, for tests): every rank runs the pure-decode steps through its
    strategy's static steps without capture (``GraphRunner(capture=False)``), with graph sizes
    ``config.cuda_graph_sizes`` or the default ones, as CUDA would capture them."""
    world = config.tensor_parallel_size
    if not isinstance(config.strategy, str):
        raise ConfigError("strategy: tensor_parallel_size > 1 needs a strategy name or spec string (each rank "
                          f"builds its own instance), got a {type(config.strategy).__name__} instance")
    shard_config(full_config(config.model), world)  # refuse before any process starts
    if static_steps and config.torch_device.type == "cuda":
        raise ConfigError("static_steps: only for a CPU engine (CUDA captures the static steps itself)")
    kv = registry.create(config.strategy, config.strategy_args)
    device = rank_device(config.torch_device, 0)
    spec = WorkerSpec(config.model, str(config.torch_device), config.torch_dtype, config.seed, config.strategy,
                      config.strategy_args, config.kv_memory_fraction)
    group = WorkerGroup(world, device, worker_main, (spec,))
    try:
        loaded = load_shard(config.model, device, config.torch_dtype, config.seed, 0, world)
        reports = group.wait_ready()
        kv_bytes = config.kv_memory_bytes
        if kv_bytes is None and device.type == "cuda":
            mine = int(torch.cuda.mem_get_info(device)[0] * config.kv_memory_fraction)
            kv_bytes = min([mine, *map(int, reports)])  # equal pools in tokens: the tightest rank's
        elif kv_bytes is None:
            kv_bytes = DEFAULT_CPU_KV_BYTES
        # Rank 0's device with its index ("cuda" is cuda:0), as the setup the workers get names it.
        cfg = dataclasses.replace(config, device=str(device), kv_memory_bytes=kv_bytes)
        # The engine's own choice for rank 0's setup, so that the check below holds.
        sizes = engine_graph_sizes(cfg.enforce_eager, device, cfg.cuda_graph_sizes, cfg.max_num_seqs)
        if static_steps:
            sizes = cfg.cuda_graph_sizes or default_graph_sizes(cfg.max_num_seqs)
        mpe = loaded.config.max_position_embeddings
        tp = EngineGroup(world)
        setup = KVSetup(model=loaded.config, device=device, dtype=cfg.torch_dtype, kv_memory_bytes=kv_bytes,
                        max_model_len=min(cfg.max_model_len or mpe, mpe), max_num_seqs=cfg.max_num_seqs,
                        swap_space_bytes=cfg.swap_space_bytes, attention_backend=cfg.resolved_attention_backend,
                        cuda_graph_sizes=sizes, tensor_parallel=tp)
        group.send(setup)
        recorder = RecordingManager(kv)
        runner = TensorParallelRunner(loaded.model, kv, device, group, recorder)
        engine = LLMEngine(loaded, kv, cfg, StepExecutor(recorder, runner, tp))
        if static_steps:
            # The engine leaves graph sizes out of a CPU setup; no strategy reads them in bind
            # (only decode_graphs does), so they are added before the graphs are built.
            kv.setup = dataclasses.replace(kv.setup, cuda_graph_sizes=sizes)
        if kv.setup != setup:
            raise RuntimeError(f"rank 0's KV setup {kv.setup} differs from the workers' {setup}")
        # After bind, as on every worker: the graphs captured at start, in the same order everywhere.
        runner.graphs = rank_graphs(loaded.model, kv, device)
    except BaseException:
        _stop(group)
        raise
    return engine
