"""One HTTP run sent from several client processes at once, merged into one run.

A single asyncio client spends about 0.35 ms of CPU per streamed request
(``benchmarks/results/http_client_cpu.md``): 256 requests due at once leave it over about 90 ms, so
a fast server sees them arrive staggered and the run measures the client as much as the server.
Spread over N processes, each sends a share and the arrival spread shrinks about N-fold
(``benchmarks/results/serve_overhead_h200.md``: 11-14 ms with 4 processes against 27-57 ms).

How: the requests are dealt round-robin to the workers, each running
:func:`kvscope.bench.http_driver.run_http_workload` on its share with the share's own arrival
offsets. The workers wait for one common start time on ``time.perf_counter`` (``CLOCK_MONOTONIC``
on Linux, one clock for every process of the machine), and each record's times are moved from its
worker's start to that common one, so the merged records measure one run. ``max_concurrency`` is
split: each worker caps ``ceil(max_concurrency / N)`` requests in flight, so the whole run caps at
most N - 1 more than asked. Closed-loop modes are not split (their clients share one order).
"""
from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from kvscope.bench.endpoints import COMPLETIONS
from kvscope.bench.http_driver import HttpRun, check_run, run_http_workload
from kvscope.bench.serve import RequestRecord
from kvscope.errors import ConfigError
from kvscope.workload.requests import WorkloadRequest


def _started(hold_s: float) -> int:
    """Run in a worker: holds it ``hold_s``; its pid (unpickling this function imported the module,
    and with it the HTTP driver)."""
    time.sleep(hold_s)
    return os.getpid()


def _share(url: str, requests: Sequence[WorkloadRequest], model: str, start_at: float,
           kwargs: dict[str, Any]) -> tuple[float, HttpRun]:
    time.sleep(max(0.0, start_at - time.perf_counter()))
    began = time.perf_counter()
    return began, run_http_workload(url, requests, model, **kwargs)


def _shifted(rec: RequestRecord, request_id: str, shift: float) -> RequestRecord:
    return replace(rec, request_id=request_id, arrival_time=rec.arrival_time + shift,
                   token_times=[t + shift for t in rec.token_times],
                   finished_time=None if rec.finished_time is None else rec.finished_time + shift)


class ClientProcesses:
    """``processes`` worker processes, spawned once and reused by every :meth:`run`; a context
    manager (leaving it shuts them down)."""

    def __init__(self, processes: int) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigError(f"client processes must be an integer >= 1, got {processes!r}")
        self.processes = processes
        # spawn: the parent may hold a CUDA context, which a forked child must not inherit
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        # Every worker started, its imports done, before any timing: a worker that imports the
        # HTTP stack during a run sends its share a second late. Each call holds its worker a
        # moment, so that the calls of one round land on different workers.
        seen: set[int] = set()
        for _ in range(20):
            seen |= set(self.pool.map(_started, [0.05] * processes))
            if len(seen) == processes:
                break

    def __enter__(self) -> ClientProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, base_url: str, requests: Sequence[WorkloadRequest], model: str, endpoint: str = COMPLETIONS,
            mode: str = "timed", max_concurrency: int | None = None, max_duration_s: float = 600.0,
            request_timeout_s: float | None = 300.0, extra_body: dict[str, Any] | None = None,
            use_tqdm: bool = False, lead_s: float = 0.5) -> HttpRun:
        """:func:`~kvscope.bench.http_driver.run_http_workload`'s run of ``requests`` (``mode``
        "timed" or "offline"), sent through the workers from ``lead_s`` from now; every list in
        workload order, times in seconds since the common start. The progress bar advances as
        each worker's share ends."""
        if mode not in ("timed", "offline"):
            raise ConfigError(f"client processes send open-loop modes ('timed' or 'offline'), got {mode!r}")
        check_run(requests, mode, max_concurrency, max_duration_s, request_timeout_s)  # here, not in a worker
        cap = None if max_concurrency is None else math.ceil(max_concurrency / self.processes)
        kwargs = {"endpoint": endpoint, "mode": mode, "max_concurrency": cap, "max_duration_s": max_duration_s,
                  "request_timeout_s": request_timeout_s, "extra_body": extra_body}
        start = time.perf_counter() + lead_s
        shares = [idx for idx in (list(range(i, len(requests), self.processes)) for i in range(self.processes)) if idx]
        futures = {self.pool.submit(_share, base_url, [requests[j] for j in idx], model, start, kwargs): idx
                   for idx in shares}
        n = len(requests)
        records: list[RequestRecord | None] = [None] * n
        texts, queue_times = [""] * n, [None] * n
        server_prompt_tokens: list[int | None] = [None] * n
        end, deadline = start, False
        with tqdm(total=n, desc="bench serve", unit="req", disable=not use_tqdm) as bar:
            for future in as_completed(futures):
                idx = futures[future]
                began, run = future.result()
                shift = began - start
                for k, j in enumerate(idx):
                    records[j] = _shifted(run.records[k], str(j), shift)
                    texts[j], queue_times[j] = run.texts[k], run.queue_times[k]
                    server_prompt_tokens[j] = run.server_prompt_tokens[k]
                end = max(end, began + run.wall_time_s)
                deadline |= run.deadline_reached
                bar.update(len(idx))
        return HttpRun(records=records, texts=texts, queue_times=queue_times,  # type: ignore[arg-type]
                       server_prompt_tokens=server_prompt_tokens, wall_time_s=end - start, deadline_reached=deadline)

    def close(self) -> None:
        self.pool.shutdown()
