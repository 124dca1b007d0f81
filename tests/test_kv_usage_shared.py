"""``usage()`` against ``stats()`` while blocks are shared (prefix-cache hits, forks), and across the
switch between shared and unshared (``tests/test_kv_usage.py`` covers every strategy unshared).

`paged` (and the strategies built on it) add up held tokens per request while no block is shared
and walk the blocks otherwise; the reference is :meth:`KVManager.usage`, which reads :meth:`stats`.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvscope import LLM, SamplingParams
from kvscope.kv.manager import KVManager

_LLMS: dict[str, LLM] = {}


def _llm(strategy: str) -> LLM:
    if strategy not in _LLMS:
        _LLMS[strategy] = LLM("dummy:tiny-llama", strategy=strategy, kv_memory_bytes=4 << 20, enforce_eager=True)
    return _LLMS[strategy]


# quant cannot fork (n > 1): its requests share only prefix blocks.
@pytest.mark.parametrize("strategy, max_n", [("paged", 2), ("quest:budget_ratio=0.5", 2), ("quant:dtype=fp8", 1)])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_usage_equals_the_stats_accounting_after_every_step(strategy: str, max_n: int, data: st.DataObject) -> None:
    engine = _llm(strategy).engine
    shared = data.draw(st.lists(st.integers(3, 200), min_size=1, max_size=40), label="shared prefix")
    for i in range(data.draw(st.integers(1, 5), label="requests")):
        tail = data.draw(st.lists(st.integers(3, 200), max_size=30), label=f"tail {i}")
        params = SamplingParams(max_tokens=data.draw(st.integers(1, 24), label=f"max_tokens {i}"),
                                n=data.draw(st.integers(1, max_n), label=f"n {i}"), temperature=1.0, seed=i,
                                ignore_eos=True)
        engine.add_request(shared + tail, params)
    while engine.has_unfinished_requests():
        engine.step()
        assert engine.kv.usage() == KVManager.usage(engine.kv)
    assert engine.kv.usage().kv_bytes_used == 0


def test_a_shared_prefix_and_a_fork_share_blocks_and_usage_still_agrees() -> None:
    """The regime the shortcut hands to the walk does occur: two requests with one 48-token prefix
    (3 full blocks of 16) and a fork of two samples hold shared blocks while they run."""
    engine = _llm("paged").engine
    prefix = [(7 * j) % 190 + 5 for j in range(48)]
    engine.add_request(prefix + [9, 8, 7], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()  # the first request's prefix blocks are computed and cached
    engine.add_request(prefix + [1, 2], SamplingParams(max_tokens=20, n=2, temperature=1.0, seed=0, ignore_eos=True))
    shared_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        shared_steps += engine.kv.pool.num_shared > 0
        assert engine.kv.usage() == KVManager.usage(engine.kv)
    assert shared_steps > 0
    assert engine.kv.pool.num_shared == 0
