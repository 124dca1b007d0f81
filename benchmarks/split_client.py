"""One offline HTTP run sent by several client processes at once, so that the load generator is not
what delays the requests' arrival (one asyncio process spends about 0.35 ms of CPU per streamed
request: ``results/http_client_cpu.md``).

The requests are dealt round-robin to ``processes`` workers, each running
:func:`kvscope.bench.http_driver.run_http_workload` on its share in ``offline`` mode. The workers
wait for one common start time on ``time.perf_counter`` (``CLOCK_MONOTONIC`` on Linux, the same
clock in every process of the machine), and each record's times are moved from its worker's start to
that common one, so the merged records measure one run.
"""
from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from kvscope.bench.http_driver import run_http_workload
from kvscope.bench.serve import RequestRecord
from kvscope.workload.requests import WorkloadRequest


def _share(url: str, requests: Sequence[WorkloadRequest], model: str, start_at: float
           ) -> tuple[float, list[RequestRecord], list[str]]:
    time.sleep(max(0.0, start_at - time.perf_counter()))
    began = time.perf_counter()
    run = run_http_workload(url, requests, model, mode="offline")
    return began, run.records, run.texts


class SplitClient:
    """``processes`` worker processes (spawned once, reused by every :meth:`run`)."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.processes = processes
        # spawn: the parent may hold a CUDA context, which a forked child must not inherit
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        list(self.pool.map(time.sleep, [0.0] * processes))  # start the workers before any timing

    def run(self, url: str, requests: Sequence[WorkloadRequest], model: str, lead_s: float = 0.5
            ) -> tuple[list[RequestRecord], list[str]]:
        """Send ``requests`` all at once through the workers, starting ``lead_s`` from now; the
        records and texts in workload order, times in seconds since the common start."""
        start = time.perf_counter() + lead_s
        shares = [list(range(i, len(requests), self.processes)) for i in range(self.processes)]
        futures = [self.pool.submit(_share, url, [requests[j] for j in idx], model, start)
                   for idx in shares if idx]
        records: list[RequestRecord | None] = [None] * len(requests)
        texts = [""] * len(requests)
        for idx, future in zip(shares, futures):
            began, recs, outs = future.result()
            shift = began - start
            for j, rec, text in zip(idx, recs, outs):
                records[j] = replace(
                    rec, request_id=str(j), arrival_time=rec.arrival_time + shift,
                    token_times=[t + shift for t in rec.token_times],
                    finished_time=None if rec.finished_time is None else rec.finished_time + shift)
                texts[j] = text
        return records, texts  # type: ignore[return-value]

    def close(self) -> None:
        self.pool.shutdown()
