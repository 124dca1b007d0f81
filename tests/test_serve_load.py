"""Load: 64 concurrent streaming clients on ``kvscope serve``, a fifth of them hanging up mid-stream.

Afterwards every surviving client has its whole answer (the tokens of an in-process greedy run),
the disconnected clients' requests were aborted and their KV freed (engine stats and /metrics
both show no KV held), /metrics' engine counters equal ``engine.stats()``, and the server still
answers. Once per strategy: ``paged``, an evicting one (``h2o``) and a host-offloading one
(``offload``), and ``paged`` with async scheduling (outputs one step late); each with the engine on
a thread of the server and in a process of its own.
"""
from __future__ import annotations

import asyncio
from functools import partial

import httpx
import pytest
from serve_engines import paced_llm
from serve_helpers import MODES, ServerThread, served

from kvscope import LLM, SamplingParams
from kvscope.serve.metrics import STAT_COUNTERS, STAT_GAUGES

openai = pytest.importorskip("openai")

MODEL = "dummy:tiny-llama"
NUM_CLIENTS = 64
DISCONNECT_EVERY = 5  # clients 0, 5, 10, ... (13 of 64, about 20%) hang up after a few chunks
DISCONNECT_AFTER_CHUNKS = 3
MAX_TOKENS = 24
HANG_UP_MAX_TOKENS = 460  # so that a client hanging up after a few chunks always leaves work to abort
STEP_PACE_S = 0.005  # a floor on a step's time, so those requests cannot finish before the hang-up lands
KV_MEMORY = 8 << 20


def _prompt(i: int) -> str:
    return f"Client {i} asks question number {i * 7 % 13}:"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("strategy", "active_counter", "overlap"), [
    ("paged", "kvscope:engine_steps_total", None),
    ("paged", "kvscope:engine_steps_total", True),
    ("h2o:heavy_ratio=0.2,recent_ratio=0.2", "kvscope:evicted_tokens_total", None),
    ("offload", "kvscope:transfer_h2d_bytes_total", None),
])
def test_64_streaming_clients_with_disconnects(strategy: str, active_counter: str, overlap: bool | None,
                                               mode: str) -> None:
    prompts = [_prompt(i) for i in range(NUM_CLIENTS)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    reference = LLM(MODEL, strategy=strategy, kv_memory_bytes=KV_MEMORY).generate(prompts, params, use_tqdm=False)

    build = partial(paced_llm, MODEL, strategy, KV_MEMORY, STEP_PACE_S, overlap)
    with ServerThread(served(mode, build)) as server:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=60)

        async def one(i: int) -> tuple[str, int | None, str | None] | None:
            hang_up = i % DISCONNECT_EVERY == 0
            stream = await client.completions.create(
                model=MODEL, prompt=prompts[i], max_tokens=HANG_UP_MAX_TOKENS if hang_up else MAX_TOKENS,
                temperature=0.0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, usage, reason, chunks = [], None, None, 0
            async for chunk in stream:
                chunks += 1
                if hang_up and chunks == DISCONNECT_AFTER_CHUNKS:
                    await stream.close()  # hang up mid-stream
                    return None
                if chunk.choices:
                    text.append(chunk.choices[0].text)
                    reason = chunk.choices[0].finish_reason or reason
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            return "".join(text), usage, reason

        async def run_all() -> list:
            try:
                return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(NUM_CLIENTS))), 60)
            finally:
                await client.close()

        results = asyncio.run(run_all())
        survivors = [i for i in range(NUM_CLIENTS) if i % DISCONNECT_EVERY]
        for i in survivors:
            assert results[i] == (reference[i].text, MAX_TOKENS, "length"), f"client {i}"

        stats = server.wait_idle()
        assert stats["kv_bytes_used"] == 0 and stats["kv_bytes_allocated"] in (0, stats["kv_bytes_reserved"])
        assert stats.get("host_kv_bytes", 0) == 0
        metrics = server.metrics()
        assert metrics["vllm:kv_cache_usage_perc"] == 0.0
        assert metrics["vllm:num_requests_running"] == 0 and metrics["vllm:num_requests_waiting"] == 0
        assert metrics["kvscope:num_requests_in_flight"] == 0
        disconnected = NUM_CLIENTS - len(survivors)
        assert metrics["vllm:request_success_total{finished_reason=abort}"] == disconnected
        assert metrics["vllm:request_success_total{finished_reason=length}"] == len(survivors)
        full = len(survivors) * MAX_TOKENS
        assert full < metrics["vllm:generation_tokens_total"] < full + disconnected * HANG_UP_MAX_TOKENS
        for key, (name, _, scale) in STAT_COUNTERS.items():
            if key in stats:
                assert metrics[f"{name}_total"] == pytest.approx(stats[key] * scale), name
        for key, (name, _) in STAT_GAUGES.items():
            if key in stats:
                assert metrics[name] == pytest.approx(stats[key]), name
        assert metrics[active_counter] > 0  # the strategy did its work (evicted, fetched from the host)

        # The server still answers, with the same tokens as before.
        r = httpx.post(f"{server.base_url}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": prompts[1], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[1].text
