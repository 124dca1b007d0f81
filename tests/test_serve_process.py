"""``kvscope serve`` with its engine in a process of its own: failures and aborts reach the core.

- A step that raises fails the requests in flight (500, or an error event on a stream already
  started), the core frees their KV and serves on with the same greedy text as before.
- Clients that go away, streamed or not, are aborted in the core, which frees their KV: its stats
  and /metrics show none held.
- The core's death (SIGKILL) fails the requests in flight with 500 / an error event, and the server
  reports itself unhealthy: /health and new requests answer 503.

The engine steps at least ``PACE_S`` apart (``serve_engines.paced_llm``), so that requests are
still running when a test acts.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from functools import partial
from typing import Any

import httpx
import pytest
from serve_engines import FAIL_STEP_PROMPT, paced_llm
from serve_helpers import ServerThread, served

from kvscope import LLM, SamplingParams

MODEL = "dummy:tiny-llama"
STRATEGY = "paged"
KV_MEMORY = 8 << 20
PACE_S = 0.005
LONG = 400  # tokens: at PACE_S a step, at least 2 s, far longer than any test waits
GOOD = {"model": MODEL, "prompt": "A good request", "max_tokens": 32, "temperature": 0, "ignore_eos": True}


def _server() -> ServerThread:
    return ServerThread(served("process", partial(paced_llm, MODEL, STRATEGY, KV_MEMORY, PACE_S)))


@pytest.fixture(scope="module")
def server():
    with _server() as s:
        yield s


@pytest.fixture(scope="module")
def good_text() -> str:
    params = SamplingParams(max_tokens=GOOD["max_tokens"], temperature=0.0, ignore_eos=True)
    return LLM(MODEL, strategy=STRATEGY, kv_memory_bytes=KV_MEMORY).generate([GOOD["prompt"]], params,
                                                                             use_tqdm=False)[0].text


def _data(lines: list[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


async def _stream_then(server: ServerThread, action: Any) -> tuple[Any, list[str]]:
    """Start a streamed GOOD request, wait for its first chunk, run ``action(client)``, then read the
    stream to its end; returns what ``action`` returned and the stream's data lines."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        async with client.stream("POST", "/v1/completions", json={**GOOD, "max_tokens": LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            seen = [await anext(lines)]
            result = await action(client)
            seen += [line async for line in lines]
    return result, _data(seen)


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_failing_step_fails_the_requests_in_flight_and_the_core_serves_on(server: ServerThread,
                                                                            good_text: str) -> None:
    before = server.metrics()
    failed, data = asyncio.run(_stream_then(server, lambda c: c.post(
        "/v1/completions", json={**GOOD, "prompt": FAIL_STEP_PROMPT})))
    assert failed.status_code == 500 and "injected step failure" in failed.json()["error"]["message"]
    assert data[-1] == "[DONE]" and "injected step failure" in json.loads(data[-2])["error"]["message"]
    stats = server.wait_idle()
    assert stats["kv_bytes_used"] == 0 and stats["num_running"] == 0
    m = server.metrics()
    assert m["kvscope:engine_step_errors_total"] == before.get("kvscope:engine_step_errors_total", 0) + 1
    errors = "vllm:request_success_total{finished_reason=error}"
    assert m[errors] == before.get(errors, 0) + 2
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    r = httpx.post(f"{server.base_url}/v1/completions", json=GOOD, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == good_text


def test_clients_that_go_away_are_aborted_and_their_kv_freed(server: ServerThread) -> None:
    aborts = "vllm:request_success_total{finished_reason=abort}"
    before = server.metrics().get(aborts, 0)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions",
                                     json={**GOOD, "max_tokens": LONG, "stream": True}) as r:
                lines = r.aiter_lines()
                for _ in range(3):
                    await anext(lines)
                assert server.serving.engine.stats["kv_bytes_used"] > 0  # held in the core while it runs
            # hung up mid-stream; now one that gives up before its answer
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json={**GOOD, "max_tokens": LONG}, timeout=0.5)

    asyncio.run(main())
    stats = server.wait_idle(timeout=1.5)  # well before the 2 s that either request would have run
    assert stats["kv_bytes_used"] == 0 and stats["kv_bytes_allocated"] == 0 and stats["num_running"] == 0
    m = server.metrics()
    assert m[aborts] == before + 2
    assert m["vllm:kv_cache_usage_perc"] == 0 and m["kvscope:num_requests_in_flight"] == 0


def test_the_core_reports_where_its_turns_go(server: ServerThread) -> None:
    """Each step here sleeps PACE_S: a request of 32 tokens takes at least 32 steps, so the core's
    step seconds and its turns grow by at least that much, and the turn histogram counts every turn."""
    before = server.metrics()
    r = httpx.post(f"{server.base_url}/v1/completions", json=GOOD, timeout=30)
    assert r.status_code == 200
    stats = server.wait_idle()
    m = server.metrics()

    def grew(name: str) -> float:
        return m[name] - before.get(name, 0)

    steps = GOOD["max_tokens"]
    assert grew("kvscope:engine_core_step_seconds_total") >= steps * PACE_S
    assert grew("kvscope:engine_core_turn_seconds_count") >= steps
    assert m["kvscope:engine_core_turn_seconds_count"] == m["kvscope:engine_core_turn_seconds_bucket{le=+Inf}"]
    assert m["kvscope:engine_core_turn_seconds_count"] == stats["core_turns"]
    parts = sum(stats[f"core_{p}_seconds"] for p in ("admit", "step", "output"))
    assert m["kvscope:engine_core_turn_seconds_sum"] == pytest.approx(parts) == stats["core_turn_seconds_sum"]
    # No turn here is shorter than a step's sleep but the ones without a step.
    short = grew("kvscope:engine_core_turn_seconds_bucket{le=0.0025}")
    assert short <= grew("kvscope:engine_core_turn_seconds_count") - steps


def test_a_dead_core_fails_the_requests_in_flight_and_the_server_reports_unhealthy() -> None:
    with _server() as server:
        engine = server.serving.engine

        async def kill_the_core(client: httpx.AsyncClient) -> httpx.Response:
            waiting = asyncio.ensure_future(client.post("/v1/completions", json={**GOOD, "max_tokens": LONG}))
            # Both requests in the core (its stats count them) before it dies.
            while engine.stats["num_running"] + engine.stats["num_waiting"] < 2:
                await asyncio.sleep(0.01)
            os.kill(engine.pid, signal.SIGKILL)
            return await waiting

        failed, data = asyncio.run(_stream_then(server, kill_the_core))
        assert failed.status_code == 500 and "engine process died" in failed.json()["error"]["message"]
        assert data[-1] == "[DONE]" and "engine process died" in json.loads(data[-2])["error"]["message"]
        _wait(lambda: not engine.is_running)
        assert httpx.get(f"{server.base_url}/health").status_code == 503
        r = httpx.post(f"{server.base_url}/v1/completions", json=GOOD, timeout=30)
        assert r.status_code == 503 and "engine process died" in r.json()["error"]["message"]
        m = server.metrics()
        assert m["vllm:request_success_total{finished_reason=error}"] == 2
        assert m["kvscope:num_requests_in_flight"] == 0
