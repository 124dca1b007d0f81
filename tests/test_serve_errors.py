"""Bad requests get an OpenAI-shaped error naming the field, and never disturb the others.

Every rule is checked while another (good, streamed) request is in flight on the same server, and
that request must still finish with the text of an in-process greedy run. The server runs
``contiguous`` (which cannot fork KV, so ``n > 1`` is refused) with ``--max-queue 2``, with the
engine on a thread and in a process of its own. The tests that patch the engine's ``step`` need it
on the server's thread; ``test_serve_process.py`` checks the same behaviour of an engine process.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import pytest
from serve_helpers import MODES, ServerThread, served

from kvscope import LLM, SamplingParams

MODEL = "dummy:tiny-llama"
STRATEGY = "contiguous"
KV_MEMORY = 8 << 20
MAX_QUEUE = 2
GOOD = {"model": MODEL, "prompt": "A good request", "max_tokens": 32, "temperature": 0, "ignore_eos": True,
        "stream": True}

BadCall = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, strategy=STRATEGY, kv_memory_bytes=KV_MEMORY)


@pytest.fixture(scope="module")
def thread_server(llm: LLM):
    with ServerThread(llm, max_queue=MAX_QUEUE) as s:
        yield s


@pytest.fixture(scope="module", params=MODES)
def server(request: pytest.FixtureRequest):
    if request.param == "thread":
        yield request.getfixturevalue("thread_server")
        return
    with ServerThread(served("process", partial(LLM, MODEL, strategy=STRATEGY, kv_memory_bytes=KV_MEMORY)),
                      max_queue=MAX_QUEUE) as s:
        yield s


def _reference_text(max_tokens: int) -> str:
    reference = LLM(MODEL, strategy=STRATEGY, kv_memory_bytes=KV_MEMORY)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return reference.generate([GOOD["prompt"]], params, use_tqdm=False)[0].text


@pytest.fixture(scope="module")
def good_text() -> str:
    return _reference_text(GOOD["max_tokens"])


def _events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def during_good_requests(server: ServerThread, bad: BadCall, num_good: int = 1,
                         good: dict[str, Any] = GOOD) -> tuple[httpx.Response, list[str]]:
    """Start ``num_good`` streamed ``good`` requests, wait for a first chunk of each, send ``bad``,
    then read the good ones to their end. Returns the bad response and the good texts."""

    async def main() -> tuple[httpx.Response, list[str]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client, contextlib.AsyncExitStack() as es:
            goods = [await es.enter_async_context(client.stream("POST", "/v1/completions", json=good))
                     for _ in range(num_good)]
            lines, its = [], []
            for r in goods:
                assert r.status_code == 200
                its.append(r.aiter_lines())
                lines.append([await anext(its[-1])])
            bad_response = await bad(client)
            for it, seen in zip(its, lines):
                seen.extend([line async for line in it])
            texts = ["".join(e["choices"][0]["text"] for e in _events(seen)) for seen in lines]
            return bad_response, texts

    return asyncio.run(main())


def post(path: str, body: dict[str, Any] | bytes, **kwargs: Any) -> BadCall:
    if isinstance(body, bytes):
        return lambda c: c.post(path, content=body, headers={"content-type": "application/json"}, **kwargs)
    return lambda c: c.post(path, json=body, **kwargs)


def assert_error(r: httpx.Response, status: int, param: str | None, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    for w in words:
        assert w in error["message"], error["message"]
    return error


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": {"text": "x"}}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
])
def test_wrong_type_names_the_field(server: ServerThread, good_text: str, path: str, body: dict, param: str) -> None:
    bad, [text] = during_good_requests(server, post(path, {"model": MODEL, **body}))
    assert_error(bad, 400, param, param.split(".")[-1].split("[")[0])
    assert text == good_text


def test_prompt_longer_than_the_context(server: ServerThread, good_text: str) -> None:
    bad, [text] = during_good_requests(server, post("/v1/completions", {"model": MODEL, "prompt": "x" * 600}))
    assert_error(bad, 400, "prompt", "600 tokens", "max_model_len=512")
    assert text == good_text


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_max_tokens_below_one(server: ServerThread, good_text: str, max_tokens: int) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": max_tokens}
    bad, [text] = during_good_requests(server, post("/v1/completions", body))
    assert_error(bad, 400, "max_tokens", "greater than or equal to 1")
    assert text == good_text


def test_prompt_plus_max_tokens_beyond_the_context(server: ServerThread, good_text: str) -> None:
    body = {"model": MODEL, "prompt": "x" * 500, "max_tokens": 100}
    bad, [text] = during_good_requests(server, post("/v1/completions", body))
    assert_error(bad, 400, "max_tokens", "512", "600")
    assert text == good_text


def test_n_the_strategy_cannot_serve(server: ServerThread, good_text: str) -> None:
    bad, [text] = during_good_requests(server, post("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}))
    assert_error(bad, 400, "n", "n=2", "fork", STRATEGY)
    assert text == good_text


def test_full_queue_is_503_with_retry_after(server: ServerThread) -> None:
    # Long good requests, so that the first is still in flight when the third arrives.
    long_good = {**GOOD, "max_tokens": 400}
    bad, texts = during_good_requests(server, post("/v1/completions", {"model": MODEL, "prompt": "x"}),
                                      num_good=MAX_QUEUE, good=long_good)
    error = assert_error(bad, 503, None, "--max-queue 2")
    assert error["code"] == "queue_full" and bad.headers["retry-after"] == "1"
    assert texts == [_reference_text(long_good["max_tokens"])] * MAX_QUEUE
    assert server.metrics()["vllm:admission_rejections_total{reason=max_num_queued_reqs}"] == 1


def test_unknown_model_is_404(server: ServerThread, good_text: str) -> None:
    bad, [text] = during_good_requests(server, post("/v1/completions", {"model": "gpt-9", "prompt": "x"}))
    assert assert_error(bad, 404, "model", "gpt-9", MODEL)["code"] == "model_not_found"
    assert text == good_text


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/v1/completions", b'{"prompt": "x",', None, ("not valid JSON",)),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo", ("not supported",)),
    ("/v1/completions", {"prompt": "x", "stop": ""}, "stop", ("non-empty",)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages", ("chat template",)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs",
     ("logprobs",)),
])
def test_other_bad_requests(server: ServerThread, good_text: str, path: str, body: Any, param: str | None,
                            words: tuple[str, ...]) -> None:
    if isinstance(body, dict):
        body = {"model": MODEL, **body}
    bad, [text] = during_good_requests(server, post(path, body))
    assert_error(bad, 400, param, *words)
    assert text == good_text


def test_unknown_fields_are_ignored(server: ServerThread) -> None:
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "x", "max_tokens": 2, "not_an_openai_field": [1, 2]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_non_streaming_client_that_hangs_up_is_aborted(thread_server: ServerThread, llm: LLM,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    server = thread_server
    real_step = llm.engine.step

    def slow_step() -> list:  # 400 tokens take 4 s: the client gives up long before
        time.sleep(0.01)
        return real_step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    before = server.metrics().get("vllm:request_success_total{finished_reason=abort}", 0)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=0.5)
    stats = server.wait_idle(timeout=2)  # well before the 4 s the request would have run
    assert stats["kv_bytes_used"] == 0 and stats["num_running"] == 0
    assert server.metrics()["vllm:request_success_total{finished_reason=abort}"] == before + 1


def test_a_failing_engine_step_fails_only_the_requests_in_flight(thread_server: ServerThread, llm: LLM,
                                                                 good_text: str) -> None:
    server = thread_server
    real_step = llm.engine.step

    def step_that_fails_once() -> list:
        stats = llm.engine.stats()
        if stats["num_running"] + stats["num_waiting"] < 2:  # until the second request is in
            return real_step()
        llm.engine.step = real_step  # the engine thread is the only caller
        raise RuntimeError("injected step failure")

    async def main() -> tuple[httpx.Response, list[str]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json=GOOD) as streamed:
                it = streamed.aiter_lines()
                first = await anext(it)
                llm.engine.step = step_that_fails_once
                failed = await client.post("/v1/completions", json={**GOOD, "stream": False})
                return failed, [first] + [line async for line in it]

    failed, lines = asyncio.run(main())
    assert_error(failed, 500, None, "injected step failure")
    *_, error_event, done = [line for line in lines if line]  # the streamed one ends with an error event
    assert done == "data: [DONE]" and "injected step failure" in json.loads(error_event[6:])["error"]["message"]
    assert server.wait_idle()["kv_bytes_used"] == 0
    m = server.metrics()
    assert m["kvscope:engine_step_errors_total"] == 1 and m["vllm:request_success_total{finished_reason=error}"] == 2
    # The engine loop survived.
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    r = httpx.post(f"{server.base_url}/v1/completions", json={**GOOD, "stream": False}, timeout=30)
    assert r.json()["choices"][0]["text"] == good_text
