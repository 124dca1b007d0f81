"""Run a study's points on Ray: ``kvscope study run SPEC --ray [ADDRESS]``.

An actor pool, not a task per point. Each actor (:class:`PointWorker`) is one worker slot with the
resources of one point (a GPU and ``cpus_per_point`` CPUs, or the CPUs alone) and a
:class:`~kvscope.study.runner.PointCache` of its own, so the points it runs share their model's
loaded weights as they do in the in-process runner. It runs one point at a time: points are timed,
and two on one slot would skew each other's latencies. The driver hands each actor the next point
when it returns a row.

Only the driver writes the results file: it appends each row as its point finishes (completion
order; the rows carry their ids) through :func:`~kvscope.study.results_io.append_row`, under the
folder lock that :func:`~kvscope.study.runner.run_study` holds. A point that raises is an error
row built on the worker by :func:`~kvscope.study.runner.point_row`, as in-process. A worker that
dies (its process killed, out of memory, its node lost) takes its point with it; the driver drops
that actor, starts a fresh one and runs the point again, at most ``max_retries`` more times, then
records an error row saying the worker died. Ray's own actor restarts are off, so the bound holds
per point, and a point never runs on a worker whose state a crash may have left behind.

Before each point the worker checks that it can run it (:func:`~kvscope.study.preflight.check_point`:
the model resolves, the data packages are installed), so a worker that lacks them fails the point
with an error that names the worker and what is missing.
"""
from __future__ import annotations

import os
import platform
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvscope.errors import ConfigError, KVScopeError
from kvscope.study.preflight import check_point
from kvscope.study.results_io import append_row
from kvscope.study.runner import PointCache, environment, point_row
from kvscope.study.spec import Point, StudySpec

if TYPE_CHECKING:
    from tqdm import tqdm

RAY_MISSING = "kvscope study run --ray needs the ray extra: pip install 'kvscope[ray]'"
RunPointFn = Callable[[Point, PointCache], dict[str, Any]]


@dataclass(frozen=True)
class RayOptions:
    """How a study runs on Ray.

    ``address``: ``"local"`` starts a Ray instance on this machine for the run; anything else goes
    to ``ray.init(address=...)`` (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``). A process already
    connected to Ray uses that connection and leaves it open. ``cpus_per_point``: CPUs each point
    asks for (a point on ``device: cuda`` asks for one GPU as well). ``max_retries``: how many more
    times a point runs after its worker died.
    """

    address: str = "local"
    cpus_per_point: float = 1.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        if not self.cpus_per_point > 0:
            raise ConfigError(f"Ray CPUs per point: must be > 0, got {self.cpus_per_point}")
        if self.max_retries < 0:
            raise ConfigError(f"Ray retries of a point whose worker died: must be >= 0, got {self.max_retries}")


class PointWorker:
    """One worker slot (a Ray actor): runs points one at a time, on weights it keeps between them."""

    def __init__(self, device: str, cpus: float, run_point_fn: RunPointFn) -> None:
        import torch

        if not device.startswith("cuda"):
            # torch would use every core of the node, and the points beside this one would slow it down.
            torch.set_num_threads(max(1, int(cpus)))
        self._run_point_fn = run_point_fn
        self._cache = PointCache()
        self._env = environment(device)
        self._host, self._pid = platform.node(), os.getpid()

    def run(self, point: Point, study: str, attempt: int) -> dict[str, Any]:
        """The point's row (see :func:`~kvscope.study.runner.point_row`), with where it ran."""
        row = point_row(point, study, self._cache, self._checked_run, self._env)
        row["worker"] = {"host": self._host, "pid": self._pid, "attempt": attempt}
        return row

    def _checked_run(self, point: Point, cache: PointCache) -> dict[str, Any]:
        try:
            check_point(point)
        except KVScopeError as e:
            # The driver checked the spec on its own machine; say that this one differs.
            raise type(e)(f"on Ray worker {self._host} (pid {self._pid}): {e}") from None
        return self._run_point_fn(point, cache)


def run_points(spec: StudySpec, todo: list[Point], path: Path, bar: tqdm, options: RayOptions,
               run_point_fn: RunPointFn) -> list[dict[str, Any]]:
    """Run ``todo`` on Ray workers, appending each row to ``path`` as it arrives (the caller holds
    the results lock); return the new rows. Connects to Ray as ``options`` says and, when it
    started the connection, closes it at the end."""
    try:
        import ray
    except ImportError:
        raise KVScopeError(RAY_MISSING) from None
    resources = _resources(spec.device, options.cpus_per_point)
    if not todo:
        return []
    started = not ray.is_initialized()
    if started:
        # A dashboard is of no use to a run that ends with its instance; it only slows the start.
        extra = {"include_dashboard": False} if options.address == "local" else {}
        ray.init(address=options.address, **extra)
    try:
        return _run_pool(ray, spec, todo, path, bar, options, resources, run_point_fn)
    finally:
        if started:
            ray.shutdown()


def _resources(device: str, cpus: float) -> dict[str, float]:
    """What one point asks Ray for: one GPU on a CUDA device, and ``cpus`` CPUs."""
    if not device.startswith("cuda"):
        return {"num_cpus": cpus, "num_gpus": 0}
    if device != "cuda":
        raise ConfigError(f"device: {device!r} names one GPU, but on Ray each point gets a GPU of its own "
                          "(Ray sets CUDA_VISIBLE_DEVICES); write device: cuda")
    return {"num_cpus": cpus, "num_gpus": 1}


def _slots(cluster: dict[str, float], resources: dict[str, float], points: int) -> int:
    """How many points run at once: as many as the cluster's resources hold, at most ``points``."""
    needs = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"]}
    fit = min(int(cluster.get(name, 0) // need) for name, need in needs.items() if need)
    if fit < 1:
        have = ", ".join(f"{cluster.get(name, 0):g} {name}" for name in needs)
        ask = ", ".join(f"{need:g} {name}" for name, need in needs.items() if need)
        raise ConfigError(f"the Ray cluster ({have}) cannot hold one point, which asks for {ask}"
                          f"{'; lower --ray-cpus-per-point' if cluster.get('CPU', 0) < needs['CPU'] else ''}")
    return min(fit, points)


def _run_pool(ray: Any, spec: StudySpec, todo: list[Point], path: Path, bar: tqdm, options: RayOptions,
              resources: dict[str, float], run_point_fn: RunPointFn) -> list[dict[str, Any]]:
    """The driver's loop: keep every slot busy, write each row as it arrives, retry dead workers' points."""
    deaths = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
              ray.exceptions.OutOfMemoryError)
    worker_class = ray.remote(PointWorker).options(max_restarts=0, **resources)
    queue = deque(todo)
    attempts: dict[str, int] = {}
    running: dict[Any, tuple[Any, Point]] = {}  # call in flight -> (its actor, its point)
    new_rows: list[dict[str, Any]] = []
    failed = retried = 0

    def submit(actor: Any) -> None:
        point = queue.popleft()
        attempts[point.id] = attempts.get(point.id, 0) + 1
        running[actor.run.remote(point, spec.name, attempts[point.id])] = (actor, point)

    def new_actor() -> Any:
        return worker_class.remote(spec.device, resources["num_cpus"], run_point_fn)

    for _ in range(_slots(ray.cluster_resources(), resources, len(todo))):
        submit(new_actor())
    bar.set_postfix_str(f"running {len(running)}")
    try:
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, point = running.pop(ref)
            row = None
            try:
                row = ray.get(ref)
            except deaths as e:
                ray.kill(actor)  # never reused: a crash may have left it half dead
                actor = None
                if attempts[point.id] <= options.max_retries:
                    queue.appendleft(point)
                    retried += 1
                else:
                    row = _died_row(point, spec.name, attempts[point.id], e)
            except ray.exceptions.RayError as e:  # e.g. the point could not be sent to the worker
                row = {"id": point.id, "study": spec.name, "config": point.config, "status": "error",
                       "error": f"{type(e).__name__}: {e}", "worker": {"attempt": attempts[point.id]}}
            if row is not None:
                append_row(path, row)
                new_rows.append(row)
                failed += row["status"] != "ok"
                bar.update(1)
            if queue:
                submit(actor or new_actor())
            elif actor is not None:
                ray.kill(actor)  # its slot's resources go back to the cluster
            bar.set_postfix_str(f"running {len(running)}, failed {failed}" + (f", retried {retried}" if retried else ""))
    finally:
        for actor, _ in running.values():  # an interrupted run: the driver is gone, so are its rows
            ray.kill(actor)
    return new_rows


def _died_row(point: Point, study: str, attempts: int, error: Exception) -> dict[str, Any]:
    """The error row of a point whose worker died on every attempt."""
    # Ray's message runs to many lines (ids, log hints); its first line and the worker's exit
    # detail say what happened (killed, out of memory, a crash on start-up).
    text = str(error)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = re.search(r"Worker exit detail: (.+?\.)(?:\s|$)", text)
    why = "; ".join(part for part in (first.rstrip("."), detail and detail.group(1)) if part)
    when = f"on each of its {attempts} attempts" if attempts > 1 else "(no retries)"
    return {"id": point.id, "study": study, "config": point.config, "status": "error",
            "error": f"worker died: the Ray worker running this point died {when} ({type(error).__name__}: {why})",
            "traceback": text, "worker": {"attempt": attempts}}
