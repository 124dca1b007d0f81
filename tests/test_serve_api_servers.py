"""``kvscope serve --api-server-count 2``: two HTTP front-end processes on one port in front of one
engine core, each server a subprocess running ``kvscope.serve.frontends.serve_frontends`` as
``kvscope serve --api-server-count 2`` does.

- The ``openai`` SDK gets the greedy answers of an in-process engine (those the one-front-end
  server is tested against): completions and chat, streamed and not.
- 64 streaming clients, a fifth hanging up mid-stream: the survivors get their whole answer, and
  afterwards /metrics shows no KV held and nothing running, and request counters equal to the
  requests sent, summed over both front ends (each series once).
- A bad request gets the OpenAI-shaped 400.
- A front end killed mid-stream: the core aborts its request (its KV freed) and the other front
  end serves on; a core killed then: the front end left answers 503; Ctrl-C to the process group
  then stops everything, leaving no process behind.
- The command line refuses the option without the engine process, and a core that cannot start
  fails the start.

The engine steps at least ``PACE_S`` apart (``serve_engines.paced_llm``), so that requests are
still running when a test acts. Linux only: the tests find front ends and connections in /proc.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import httpx
import pytest
from serve_engines import chat_llm, paced_llm
from serve_helpers import scrape, sdk_completion
from serve_multi import ServerProcess, alive, free_port

from kvscope import LLM, SamplingParams

openai = pytest.importorskip("openai")
if not os.path.exists("/proc/net/tcp"):
    pytest.skip("finds processes and connections in /proc (Linux)", allow_module_level=True)

MODEL = "dummy:tiny-llama"
STRATEGY = "paged"
KV_MEMORY = 8 << 20
PACE_S = 0.005
BUILD = partial(paced_llm, MODEL, STRATEGY, KV_MEMORY, PACE_S, None, True)  # with a chat template
KILL_PACE_S = 0.01  # the killed-front-end test's engine: its long request runs for 4.8 s at least
DOOMED_TOKENS, SURVIVOR_TOKENS = 480, 100  # (dummy:tiny-llama holds 512 tokens)
NUM_CLIENTS, DISCONNECT_EVERY, DISCONNECT_AFTER_CHUNKS = 64, 5, 3
MAX_TOKENS, HANG_UP_MAX_TOKENS = 24, 460


@pytest.fixture(scope="module")
def reference() -> LLM:
    return chat_llm(MODEL, STRATEGY, KV_MEMORY)


@pytest.fixture(scope="module")
def server():
    """Two front ends; stopped at the end with SIGTERM to the parent, which must exit cleanly and
    leave none of its processes behind."""
    with ServerProcess.frontends(BUILD, 2) as s:
        yield s
        processes = s.descendants()
    assert s.proc.returncode == 0
    _wait_gone(processes)


def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pids):
        assert time.monotonic() < deadline, f"processes left behind: {alive(pids)}"
        time.sleep(0.05)


def _wait_idle(server: ServerProcess, timeout: float = 20.0) -> dict[str, float]:
    """/metrics once the server has nothing in flight."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(server.base_url)
        if m["kvscope:num_requests_in_flight"] == m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"still busy: {m}"
        time.sleep(0.05)


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_openai_sdk_matches_in_process_engine(server: ServerProcess, reference: LLM) -> None:
    prompts = [f"Question {i}: why?" for i in range(4)]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    expected = [o.text for o in reference.generate(prompts, greedy, use_tqdm=False)]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    expected_chat = [o.text for o in reference.chat(chats, greedy, use_tqdm=False)]

    async def main() -> tuple[list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0) as c:
            async def chat(i: int) -> str:
                kwargs = dict(model=MODEL, messages=chats[i], max_tokens=16, temperature=0,
                              extra_body={"ignore_eos": True})
                if i % 2:
                    return (await c.chat.completions.create(**kwargs)).choices[0].message.content
                stream = await c.chat.completions.create(stream=True, **kwargs)
                return "".join([x.choices[0].delta.content or "" async for x in stream if x.choices])

            return (await asyncio.gather(*(sdk_completion(c, MODEL, prompts[i], stream=not i % 2) for i in range(4))),
                    await asyncio.gather(*(chat(i) for i in range(4))))

    # Over several connections, so that both front ends answer some (the kernel picks one per connection).
    for _ in range(3):
        assert asyncio.run(main()) == (expected, expected_chat)


def test_64_streaming_clients_with_disconnects(server: ServerProcess, reference: LLM) -> None:
    prompts = [f"Client {i} asks question number {i * 7 % 13}:" for i in range(NUM_CLIENTS)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = reference.generate(prompts, params, use_tqdm=False)
    before = _wait_idle(server)
    holders: set[int] = set()

    async def one(client, i: int) -> tuple[str, str | None] | None:
        hang_up = i % DISCONNECT_EVERY == 0
        stream = await client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=HANG_UP_MAX_TOKENS if hang_up else MAX_TOKENS,
            temperature=0.0, stream=True, extra_body={"ignore_eos": True})
        text, reason, chunks = [], None, 0
        async for chunk in stream:
            chunks += 1
            if hang_up and chunks == DISCONNECT_AFTER_CHUNKS:
                await stream.close()  # hang up mid-stream
                return None
            text.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return "".join(text), reason

    async def run_all() -> list:
        # One connection per client, as 64 separate clients would have.
        clients = [openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=60)
                   for _ in range(NUM_CLIENTS)]
        try:
            tasks = [asyncio.ensure_future(one(c, i)) for i, c in enumerate(clients)]
            while len(holders) < 2 and not all(t.done() for t in tasks):  # which front ends hold connections
                holders.update(server.frontends_connected())
                await asyncio.sleep(0.05)
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            for c in clients:
                await c.close()

    results = asyncio.run(run_all())
    survivors = [i for i in range(NUM_CLIENTS) if i % DISCONNECT_EVERY]
    for i in survivors:
        assert results[i] == (expected[i].text, "length"), f"client {i}"
    assert len(holders) == 2  # both front ends served some of the clients

    after = _wait_idle(server)
    assert after["vllm:kv_cache_usage_perc"] == 0 and after["kvscope:kv_bytes_used"] == 0
    disconnected = NUM_CLIENTS - len(survivors)
    # Counted by whichever front end served each request, summed by whichever answers /metrics.
    assert _delta(after, before, "vllm:request_success_total{finished_reason=abort}") == disconnected
    assert _delta(after, before, "vllm:request_success_total{finished_reason=length}") == len(survivors)
    assert _delta(after, before, "vllm:e2e_request_latency_seconds_count") == len(survivors)
    every_prompt = sum(len(o.prompt_token_ids) for o in expected)  # every request started generating
    assert _delta(after, before, "vllm:prompt_tokens_total") == every_prompt
    full = len(survivors) * MAX_TOKENS
    assert full < _delta(after, before, "vllm:generation_tokens_total") < full + disconnected * HANG_UP_MAX_TOKENS
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": prompts[1], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[1].text


def test_a_bad_request_gets_an_openai_400(server: ServerProcess) -> None:
    before = scrape(server.base_url)
    r = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens"
    assert _delta(scrape(server.base_url), before, "kvscope:requests_rejected_total{status=400}") == 1


async def _connect(server: ServerProcess) -> tuple[httpx.AsyncClient, int]:
    """A client with one connection open (kept alive for its next requests), and the front end
    at its other end."""
    client = httpx.AsyncClient(base_url=server.base_url, timeout=60)
    r = await client.get("/health")
    assert r.status_code == 200
    return client, server.frontend_of(r.extensions["network_stream"].get_extra_info("client_addr")[1])


class Stream:
    """A streamed completion's text, read chunk by chunk."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200
        self._lines = response.aiter_lines()
        self.texts: list[str] = []

    @classmethod
    async def start(cls, client: httpx.AsyncClient, max_tokens: int) -> Stream:
        """A streamed request on ``client``'s connection, its first chunk read."""
        stream = cls(await client.send(client.build_request("POST", "/v1/completions", json={
            "model": MODEL, "prompt": "A long request", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}), stream=True))
        await stream.read(1)
        return stream

    async def read(self, chunks: int | None = None) -> None:
        """Read ``chunks`` more chunks (None: to the end)."""
        async for line in self._lines:
            if line.startswith("data: {"):
                self.texts.append(json.loads(line[len("data: "):])["choices"][0]["text"])
                if chunks is not None and len(self.texts) >= chunks:
                    return


def test_a_killed_frontend_is_dropped_then_a_killed_core_fails_the_server(reference: LLM) -> None:
    expected = reference.generate(["A long request"], SamplingParams(
        max_tokens=SURVIVOR_TOKENS, temperature=0.0, ignore_eos=True), use_tqdm=False)[0].text
    with ServerProcess.frontends(partial(paced_llm, MODEL, STRATEGY, KV_MEMORY, KILL_PACE_S), 2) as server:
        processes = server.descendants()

        async def main() -> str:
            clients = [await _connect(server)]
            victim = clients[0][1]
            while clients[-1][1] == victim:  # each new connection lands on either front end
                assert len(clients) < 50, "every connection went to the same front end"
                clients.append(await _connect(server))
            doomed = await Stream.start(clients[0][0], DOOMED_TOKENS)
            survivor = await Stream.start(clients[-1][0], SURVIVOR_TOKENS)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            # The core drops the dead front end's request at once (it would run for seconds more):
            # the survivor's is left running alone.
            while scrape(server.base_url)["vllm:num_requests_running"] != 1:
                assert time.monotonic() - killed < 1.0, "the killed front end's request still runs"
                await asyncio.sleep(0.02)
            with pytest.raises(httpx.TransportError):
                await doomed.read()
            await survivor.read()
            for client, _ in clients:
                await client.aclose()
            return "".join(survivor.texts)

        assert asyncio.run(main()) == expected
        m = _wait_idle(server)  # the dead front end's requests no longer count as in flight
        assert m["kvscope:kv_bytes_used"] == 0 and m["kvscope:kv_bytes_allocated"] == 0
        r = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        # Now the core dies: the front end left reports the server unhealthy.
        os.kill(server.core_pid(), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.base_url}/health").status_code != 503:
            assert time.monotonic() < deadline, "the server still reports itself healthy"
            time.sleep(0.05)
        r = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4})
        assert r.status_code == 503 and "engine process died" in r.json()["error"]["message"]
        os.killpg(server.proc.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches every process of the group
        assert server.proc.wait(30) == 0
    _wait_gone(processes)


def test_front_ends_and_core_exit_when_the_parent_is_killed() -> None:
    """The parent killed outright (no graceful shutdown of its own) as soon as both front ends
    exist, whether or not they serve yet: they notice, shut down, and the core follows them."""
    server = ServerProcess.frontends(BUILD, 2)
    deadline = time.monotonic() + 90
    while len(server.frontend_pids()) < 2:
        assert server.proc.poll() is None and time.monotonic() < deadline, "the front ends did not start"
        time.sleep(0.02)
    processes = server.descendants()  # two front ends, the core, multiprocessing's resource tracker
    server.proc.kill()
    server.proc.wait(10)
    _wait_gone(processes, timeout=30)


def test_the_command_line() -> None:
    cli = [sys.executable, "-m", "kvscope.cli", "serve", MODEL, "--api-server-count", "2", "--port", str(free_port())]
    r = subprocess.run([*cli, "--no-engine-process"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--api-server-count" in r.stderr and "--no-engine-process" in r.stderr
    cli[cli.index(MODEL)] = "dummy:no-such-model"  # the engine process fails to build it
    r = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "kvscope: error: unknown dummy preset 'no-such-model'" in r.stderr
