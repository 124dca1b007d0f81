"""The process group of a tensor-parallel engine: one process per rank, rendezvous on localhost.

Rank 0 is the caller's process (it runs the engine); ranks 1..N-1 are started with
``torch.multiprocessing`` (spawn). Rank 0 opens a ``TCPStore`` on a free localhost port before
starting them; each worker loads its shard, then reports on the store (an empty string, or its
error) and only then joins the process group. Rank 0 polls those reports and the workers'
liveness, so a worker that fails while loading is a clear error at once instead of a rendezvous
that waits for its timeout. Later failures surface through the collectives: gloo raises when a
peer's connection closes, and every collective has ``COLLECTIVE_TIMEOUT_S`` as its bound.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvscope.errors import ConfigError

#: Bound on any collective (a step, a model load's end): a rank that stops answering fails rank 0
#: after this long instead of hanging it. Loading a large shard happens before the group exists.
COLLECTIVE_TIMEOUT_S = 300
#: How long rank 0 waits for the workers to load their shards.
LOAD_TIMEOUT_S = 3600
_POLL_S = 0.2
_JOIN_S = 10.0


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: ``cuda:(index + rank)`` for a CUDA ``device``, the CPU otherwise."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


@dataclass(frozen=True)
class EngineGroup:
    """Every rank's ``KVSetup.tensor_parallel``: reductions over the engine's process group (the
    default group; one tensor-parallel engine per process). Plain data, so it travels in the
    broadcast setup and compares equal on every rank."""

    size: int

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dist.all_reduce(t, op=_OPS[op])
        return t


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class WorkerGroup:
    """Ranks 1..``world - 1`` running ``target(rank, port, world, *args)``, and rank 0's membership."""

    def __init__(self, world: int, device: torch.device, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        if dist.is_initialized():
            raise ConfigError("tensor_parallel_size > 1: this process already runs a tensor-parallel engine "
                              "(close it first with LLM.close())")
        self.world = world
        self.device = device
        self.backend = backend_for(device)
        self.store = dist.TCPStore("127.0.0.1", 0, world, is_master=True,
                                   timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S), wait_for_workers=False)
        self.context = mp.start_processes(_run_worker, args=(target, self.store.port, world, args), nprocs=world - 1,
                                          join=False, daemon=True, start_method="spawn")
        self.closed = False

    def wait_ready(self) -> list[str]:
        """Wait until every worker has loaded its shard; returns what each reported after loading
        (an empty string, or its own information such as free memory). Raises RuntimeError
        naming the worker that failed or died."""
        keys = [f"ready{r}" for r in range(1, self.world)]
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not self.store.check(keys):
            self.raise_if_dead()
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not load their shards within {LOAD_TIMEOUT_S} s")
            time.sleep(_POLL_S)
        reports = [self.store.get(k).decode() for k in keys]
        for rank, report in enumerate(reports, 1):
            if report.startswith("error:"):
                self.close()
                raise RuntimeError(f"tensor-parallel rank {rank} failed while loading: {report[6:]}")
        dist.init_process_group(self.backend, store=self.store, rank=0, world_size=self.world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        return reports

    def raise_if_dead(self) -> None:
        """RuntimeError with the worker's own traceback when one has exited."""
        dead = [r for r, p in enumerate(self.context.processes, 1) if not p.is_alive()]
        if not dead:
            return
        detail = ""
        try:
            self.context.join(timeout=_JOIN_S)  # raises with the worker's traceback when it raised
        except Exception as e:  # noqa: BLE001 - its message is what the user needs to see
            detail = f": {e}"
        self.close()
        raise RuntimeError(f"tensor-parallel rank {dead[0]} exited{detail}")

    def send(self, message: Any) -> None:
        """Broadcast ``message`` (any picklable object) from rank 0 to every worker."""
        dist.broadcast_object_list([message], src=0, device=self.device)

    def gather(self, mine: Any) -> list[Any]:
        """Every rank's ``mine``, in rank order (rank 0's first)."""
        out: list[Any] = [None] * self.world
        dist.gather_object(mine, out, dst=0)
        return out

    def close(self) -> None:
        """Leave the group and stop the workers (those that do not exit within 10 s are killed)."""
        if self.closed:
            return
        self.closed = True
        if dist.is_initialized():
            dist.destroy_process_group()
        deadline = time.monotonic() + _JOIN_S
        for p in self.context.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.context.processes:
            if p.is_alive():
                p.kill()
                p.join()


def _run_worker(index: int, target: Callable[..., None], port: int, world: int, args: tuple[Any, ...]) -> None:
    target(index + 1, port, world, *args)


def worker_store(port: int, world: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def join_group(store: dist.TCPStore, rank: int, world: int, device: torch.device) -> None:
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def receive(device: torch.device) -> Any:
    """A worker's side of :meth:`WorkerGroup.send`."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]
