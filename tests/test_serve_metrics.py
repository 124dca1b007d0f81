"""``/metrics``: vLLM's names and kvscope's own, with values that match the requests served and
``engine.stats()``.

The KV pool holds 128 tokens, so six concurrent 60-token requests force preemptions, and the
preemption counter has something to match. The engine runs on a thread of the server and in a
process of its own (where the per-request metrics come from the outputs rebuilt from its messages).
"""
from __future__ import annotations

import asyncio
from functools import partial

import httpx
import pytest
from serve_helpers import MODES, ServerThread, served

from kvscope import LLM

MODEL = "dummy:tiny-llama"
MAX_TOKENS = 40
NUM_REQUESTS = 6

VLLM_NAMES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
    "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
    "vllm:request_queue_time_seconds_count", "vllm:request_prompt_tokens_count",
    "vllm:request_generation_tokens_count", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:request_time_per_output_token_seconds_count", "vllm:request_inference_time_seconds_count",
    "vllm:request_prefill_time_seconds_count", "vllm:request_decode_time_seconds_count",
]
KVSCOPE_NAMES = [
    "kvscope:kv_bytes_reserved", "kvscope:kv_bytes_allocated", "kvscope:kv_bytes_used", "kvscope:kv_blocks_used",
    "kvscope:engine_steps_total", "kvscope:computed_tokens_total", "kvscope:num_requests_in_flight",
    "kvscope:engine_step_errors_total",
]


@pytest.fixture(scope="module", params=MODES)
def server(request: pytest.FixtureRequest):
    with ServerThread(served(request.param, partial(LLM, MODEL, kv_memory_bytes=64 << 10))) as s:  # 128 tokens of KV
        yield s


def test_metrics_match_requests_and_engine_stats(server: ServerThread) -> None:
    async def main() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as c:
            async def one(i: int) -> dict:
                body = {"model": MODEL, "prompt": f"Request number {i} says hi", "max_tokens": MAX_TOKENS,
                        "temperature": 0, "ignore_eos": True}
                if i % 2:
                    return (await c.post("/v1/completions", json=body)).json()["usage"]
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: {")]
                return httpx.Response(200, content=lines[-1][6:]).json()["usage"]
            return await asyncio.gather(*(one(i) for i in range(NUM_REQUESTS)))

    usages = asyncio.run(main())
    stats = server.wait_idle()
    r = httpx.get(f"{server.base_url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m = server.metrics()
    missing = [n for n in VLLM_NAMES + KVSCOPE_NAMES if n not in m]
    assert not missing

    completion = sum(u["completion_tokens"] for u in usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    assert completion == NUM_REQUESTS * MAX_TOKENS
    assert m["vllm:generation_tokens_total"] == completion
    assert m["vllm:prompt_tokens_total"] == prompt
    assert m["vllm:request_generation_tokens_sum"] == completion
    assert m["vllm:request_prompt_tokens_sum"] == prompt
    assert m["vllm:request_success_total{finished_reason=length}"] == NUM_REQUESTS
    for hist in ("time_to_first_token", "e2e_request_latency", "request_time_per_output_token",
                 "request_queue_time", "request_inference_time", "request_prefill_time", "request_decode_time"):
        assert m[f"vllm:{hist}_seconds_count"] == NUM_REQUESTS
    for hist in ("time_per_output_token", "inter_token_latency"):  # one observation per token after the first
        assert m[f"vllm:{hist}_seconds_count"] == NUM_REQUESTS * (MAX_TOKENS - 1)
    assert m["vllm:e2e_request_latency_seconds_sum"] >= m["vllm:request_decode_time_seconds_sum"] > 0

    assert stats["num_preemptions"] > 0
    assert m["vllm:num_preemptions_total"] == stats["num_preemptions"]
    assert m["kvscope:engine_steps_total"] == stats["num_steps"]
    assert m["kvscope:computed_tokens_total"] == stats["num_computed_tokens"]
    assert m["kvscope:kv_bytes_reserved"] == stats["kv_bytes_reserved"] == 64 << 10
    assert m["vllm:prefix_cache_queries_total"] == stats["prefix_cache_queried_tokens"]
    # Idle: nothing held.
    assert m["vllm:kv_cache_usage_perc"] == 0 and m["kvscope:kv_bytes_used"] == 0 == stats["kv_bytes_used"]
    assert m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == m["kvscope:num_requests_in_flight"] == 0


def test_gauges_move_while_a_request_runs(server: ServerThread) -> None:
    # As long as the 128-token pool allows, so that the request still runs at the scrape.
    body = {"model": MODEL, "prompt": "Still running", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        m = server.metrics()
        assert m["vllm:num_requests_running"] == 1 and m["kvscope:num_requests_in_flight"] == 1
        assert 0 < m["vllm:kv_cache_usage_perc"] <= 1 and m["kvscope:kv_bytes_used"] > 0
        list(lines)


def test_adaptive_decisions_are_exported() -> None:
    with ServerThread(LLM(MODEL, strategy="adaptive", kv_memory_bytes=1 << 20)) as server:
        r = httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        stats = server.wait_idle()
        m = server.metrics()
    assert m["kvscope:adaptive_decisions_total{decision=admitted_full}"] == stats["adaptive_admitted_full"] == 1
