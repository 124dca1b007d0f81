"""``adaptive``: admission thresholds, pressure rising and falling, compression instead of
preemption, and the invariant that every request holds KV in exactly one child."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope import LLM, SamplingParams
from kvscope.engine.request import Request
from kvscope.errors import ConfigError
from kvscope.kv.adaptive import AdaptiveStrategy
from kvscope.kv.base import KVSetup
from kvscope.models.dummy import preset_config

CFG = preset_config("tiny-llama")
BS = 4


def bound(num_blocks: int, **kw) -> AdaptiveStrategy:
    """An adaptive strategy over a shared pool of exactly ``num_blocks`` blocks of 4 tokens."""
    s = AdaptiveStrategy(block_size=BS, **kw)
    slot = CFG.kv_bytes_per_token(torch.float32) + s.long.extra_slot_bytes(CFG)
    s.bind(KVSetup(CFG, torch.device("cpu"), torch.float32, num_blocks * BS * slot, 512, 64, 0))
    assert s.full.pool.num_blocks == num_blocks
    return s


def req(rid: str, prompt: int, max_tokens: int) -> Request:
    return Request(rid, [1] * prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_threshold_edges():
    s = bound(64, long_threshold=100)
    below, at = req("below", 60, 39), req("at", 60, 40)  # 99 and 100 tokens requested
    assert s.allocate(below, 60) and s.allocate(at, 60)
    assert s.route["below"] is s.full and s.route["at"] is s.long
    assert s.stats()["adaptive_admitted_full"] == 1 and s.stats()["adaptive_admitted_long_length"] == 1
    # A prompt larger than the full child's pool goes long whatever its length threshold.
    assert s._choose(req("huge", 64 * BS + 1, 1))[1] == "admitted_long_length"


def test_pressure_rising_routes_new_requests_long_and_relief_lifts_budgets():
    s = bound(10, long_threshold=10_000, pressure=0.8, relief=0.5)
    a = req("a", 32, 4)  # 8 of 10 blocks: use 0.8 = pressure
    assert s.allocate(a, 32) and s.route["a"] is s.full
    b = req("b", 4, 4)
    assert s.allocate(b, 4) and s.route["b"] is s.long
    assert s.stats()["adaptive_admitted_long_pressure"] == 1
    s.free(a)
    s.free(b)
    assert s.full.pool.num_free == 10 and not s.route


def test_engine_compresses_instead_of_preempting_then_relieves():
    # 6 requests of 40 prompt tokens and 70 or 10 output tokens in a pool of 200 tokens: `paged`
    # preempts; the short ones finish early, so the pressure falls while long ones still run.
    prompts = [[(7 * i + j) % 200 + 4 for j in range(40)] for i in range(6)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (70, 10) * 3]
    paged = LLM("dummy:tiny-llama", strategy="paged:block_size=4", kv_memory_bytes=200 * 512, max_model_len=128)
    paged.generate(prompts, params, use_tqdm=False)
    assert paged.engine.stats()["num_preemptions"] > 0
    llm = LLM("dummy:tiny-llama", strategy="adaptive:block_size=4,long_threshold=10000,pressure=0.95,relief=0.5",
              kv_memory_bytes=200 * (512 + 2 * 2 * 12), max_model_len=128)
    outs = llm.generate(prompts, params, use_tqdm=False)
    st_ = llm.engine.stats()
    assert [len(o.outputs[0].token_ids) for o in outs] == [70, 10] * 3
    assert st_["adaptive_compressed_under_pressure"] > 0 and st_["num_evictions"] > 0
    assert st_["num_preemptions"] == 0
    assert st_["adaptive_relieved"] > 0  # the pool emptied as requests finished
    assert st_["blocks_used"] == 0 and st_["adaptive_requests_full"] == st_["adaptive_requests_long"] == 0


def test_full_requests_equal_paged():
    prompts = [[(3 * i + j) % 200 + 4 for j in range(n)] for i, n in enumerate((5, 17, 30))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = LLM("dummy:tiny-llama", strategy="paged", kv_memory_bytes=8 << 20).generate(prompts, params, use_tqdm=False)
    out = LLM("dummy:tiny-llama", strategy="adaptive", kv_memory_bytes=8 << 20).generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("adaptive:long=paged", "long must be one of"),
        ("adaptive:pressure=1.5", "pressure must be in"),
        ("adaptive:relief=0.95", "relief (0.95) must be below pressure"),
        ("adaptive:long_threshold=0", "long_threshold must be an integer >= 1"),
    ],
)
def test_bad_parameters(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM("dummy:tiny-llama", strategy=spec)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 40), st.integers(1, 30)), min_size=1, max_size=40))
def test_every_request_is_in_exactly_one_child(ops):
    s = bound(24, long_threshold=40, pressure=0.7, relief=0.3)
    live: dict[str, Request] = {}
    for slot, prompt, grow in ops:
        rid = f"r{slot}"
        if rid in live and grow % 3 == 0:
            s.free(live.pop(rid))
        elif rid in live:
            r = live[rid]
            target = min(r.num_computed_tokens + grow, r.num_prompt_tokens + 30)
            if s.allocate(r, target):  # as the scheduler does: room first, then the tokens
                r.num_computed_tokens = target
            else:
                s.free(live.pop(rid))  # preemption
        else:
            r = req(rid, prompt, 30)
            if s.allocate(r, prompt):
                r.num_computed_tokens = prompt
                live[rid] = r
        in_full = set(s.full.tables)
        in_long = set(s.long.tables)
        assert in_full.isdisjoint(in_long) and in_full | in_long == set(live) == set(s.route)
        held = sum(len(t) for t in s.full.tables.values()) + sum(len(t) for t in s.long.tables.values())
        assert held == s.full.pool.num_used
    for r in list(live.values()):
        s.free(r)
    assert s.full.pool.num_free == 24 and not s.route and not s.compressed
