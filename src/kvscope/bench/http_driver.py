"""The HTTP serving driver: a workload sent to an OpenAI-compatible server on the wall clock.

The modes of the in-process driver (:func:`kvscope.bench.serve.run_workload`), for a server:

- ``"timed"``: open loop at the requests' ``arrival_time`` offsets (:mod:`kvscope.workload.arrivals`),
  optionally with at most ``max_concurrency`` requests in flight (vLLM's ``--max-concurrency``: a
  request that comes due while that many are in flight waits for one of them to end);
- ``"offline"``: every request due at offset 0;
- :class:`~kvscope.workload.arrivals.ClosedLoop`: ``clients`` users, each sending the next request
  (in workload order) when its previous one ended, plus the think time.

Every request streams (:func:`kvscope.bench.http_client.stream_request`) and becomes a
:class:`~kvscope.bench.serve.RequestRecord`, so :func:`kvscope.bench.metrics.serving_metrics`
computes the same metrics for a server as for the in-process engine. Times are seconds since the
start of the run. A record's ``arrival_time`` is when its request was sent, where vLLM's client
starts its clock too; the wait between the scheduled arrival and the send (the concurrency cap, or
an event loop too busy to send on time) is kept apart, as vLLM's ``queue_times``.

The run is bounded: ``max_duration_s`` after the start, requests still in flight are cancelled and
requests not yet sent are never sent; both are failed records whose error says so. A failed
request (HTTP error, refused connection, per-request timeout) is a failed record, never an
exception: the run goes on.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from kvscope.bench.endpoints import COMPLETIONS, api_url
from kvscope.bench.http_client import StreamedResponse, new_session, request_body, stream_request
from kvscope.bench.serve import RequestRecord
from kvscope.errors import ConfigError
from kvscope.workload.arrivals import ClosedLoop
from kvscope.workload.requests import WorkloadRequest


@dataclass
class HttpRun:
    """Result of :func:`run_http_workload`; every list is in workload order.

    Attributes:
        records: one per request; ``token_times`` are the arrivals of streamed chunks and
            ``output_tokens`` the server's count (``usage.completion_tokens``) when it gave one.
        texts: the generated text of each request ("" when nothing came back).
        queue_times: scheduled arrival -> send, in seconds (None for a request never sent).
        server_prompt_tokens: the server's ``usage.prompt_tokens`` (None when not reported).
        wall_time_s: start of the run to the end of its last request (or the deadline).
        deadline_reached: whether ``max_duration_s`` cut the run short.
    """

    records: list[RequestRecord]
    texts: list[str]
    queue_times: list[float | None]
    server_prompt_tokens: list[int | None]
    wall_time_s: float
    deadline_reached: bool


def check_run(requests: Sequence[WorkloadRequest], mode: str | ClosedLoop, max_concurrency: int | None,
              max_duration_s: float, request_timeout_s: float | None) -> None:
    """:class:`ConfigError` naming the first of :func:`run_http_workload`'s arguments out of range."""
    if not requests:
        raise ConfigError("run_http_workload needs at least one request")
    if not (mode in ("timed", "offline") or isinstance(mode, ClosedLoop)):
        raise ConfigError(f"mode must be 'timed', 'offline' or a ClosedLoop, got {mode!r}")
    if max_concurrency is not None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be an integer >= 1 or None, got {max_concurrency!r}")
        if isinstance(mode, ClosedLoop):
            raise ConfigError("max_concurrency applies to open-loop modes; a ClosedLoop's clients already cap it")
    if not (isinstance(max_duration_s, (int, float)) and 0 < max_duration_s < math.inf):
        raise ConfigError(f"max_duration_s must be a finite number of seconds > 0, got {max_duration_s!r}")
    if request_timeout_s is not None and not (isinstance(request_timeout_s, (int, float)) and request_timeout_s > 0):
        raise ConfigError(f"request_timeout_s must be a number of seconds > 0 or None, got {request_timeout_s!r}")


def run_http_workload(
    base_url: str,
    requests: Sequence[WorkloadRequest],
    model: str,
    endpoint: str = COMPLETIONS,
    mode: str | ClosedLoop = "timed",
    max_concurrency: int | None = None,
    max_duration_s: float = 600.0,
    request_timeout_s: float | None = 300.0,
    extra_body: dict[str, Any] | None = None,
    use_tqdm: bool = False,
) -> HttpRun:
    """Send ``requests`` to ``base_url`` + ``endpoint`` in ``mode`` (see the module docstring).

    Args:
        base_url: the server, already checked (:func:`kvscope.bench.http_client.check_base_url`).
        model: the ``model`` field of every request.
        extra_body: fields added to (or replacing) each request body's defaults.
        request_timeout_s: bound on each request, from its send to its last byte.

    A request's prompt length is the workload's ``prompt_len`` when known, else the server's
    ``usage.prompt_tokens``, else 0. Runs its own event loop (``asyncio.run``), so call it from
    synchronous code.
    """
    check_run(requests, mode, max_concurrency, max_duration_s, request_timeout_s)
    bodies = [request_body(endpoint, model, r.prompt, r.output_len, extra_body) for r in requests]
    return asyncio.run(_drive(api_url(base_url, endpoint), requests, bodies, mode, max_concurrency,
                              float(max_duration_s), request_timeout_s, use_tqdm))


async def _drive(url: str, requests: Sequence[WorkloadRequest], bodies: list[dict[str, Any]],
                 mode: str | ClosedLoop, max_concurrency: int | None, max_duration_s: float,
                 request_timeout_s: float | None, use_tqdm: bool) -> HttpRun:
    n = len(requests)
    responses: list[StreamedResponse | None] = [None] * n
    due: list[float | None] = [None] * n  # scheduled arrival (perf_counter)
    sent: list[float | None] = [None] * n
    bar = tqdm(total=n, desc="bench serve", unit="req", disable=not use_tqdm)
    cap = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with new_session() as session:

        async def send(i: int) -> None:
            sent[i] = time.perf_counter()
            responses[i] = await stream_request(session, url, bodies[i], request_timeout_s)
            bar.update(1)

        async def open_loop(i: int, offset: float) -> None:
            due[i] = start + offset
            await asyncio.sleep(max(0.0, due[i] - time.perf_counter()))
            if cap is None:
                await send(i)
            else:
                async with cap:
                    await send(i)

        async def client(order: Any, think_time_s: float) -> None:
            for i in order:  # one iterator shared by the clients: each request goes to one of them
                due[i] = time.perf_counter()
                await send(i)
                await asyncio.sleep(think_time_s)

        start = time.perf_counter()
        if isinstance(mode, ClosedLoop):
            order = iter(range(n))
            tasks = [asyncio.create_task(client(order, mode.think_time_s)) for _ in range(min(mode.clients, n))]
        else:
            tasks = [asyncio.create_task(open_loop(i, 0.0 if mode == "offline" else r.arrival_time))
                     for i, r in enumerate(requests)]
        done, pending = await asyncio.wait(tasks, timeout=max_duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        end = time.perf_counter()
    bar.close()
    for task in done:
        if task.exception() is not None:  # a bug, not a failed request (those are records)
            raise task.exception()  # type: ignore[misc]

    records, texts = [], []
    for i, (req, resp) in enumerate(zip(requests, responses)):
        if resp is None:
            what = "still running" if sent[i] is not None else "not sent"
            resp = StreamedResponse(sent=sent[i] or due[i] or start + req.arrival_time, ended=end,
                                    error=f"{what} at the run's deadline (max_duration_s={max_duration_s:g})")
        records.append(_record(i, req, resp, start))
        texts.append(resp.text)
    return HttpRun(
        records=records,
        texts=texts,
        queue_times=[None if s is None or d is None else max(0.0, s - d) for s, d in zip(sent, due)],
        server_prompt_tokens=[None if r is None else r.prompt_tokens for r in responses],
        wall_time_s=end - start,
        deadline_reached=bool(pending),
    )


def _record(i: int, req: WorkloadRequest, resp: StreamedResponse, start: float) -> RequestRecord:
    prompt_len = req.prompt_len if req.prompt_len is not None else (resp.prompt_tokens or 0)
    return RequestRecord(
        request_id=str(i),
        prompt_len=prompt_len,
        expected_output_len=req.output_len,
        arrival_time=resp.sent - start,
        token_times=[t - start for t in resp.chunk_times],
        finished_time=None if resp.ended is None else resp.ended - start,
        finish_reason=resp.finish_reason,
        error=resp.error,
        output_tokens=resp.output_tokens,
    )
