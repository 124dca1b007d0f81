"""``benchmarks/gpu/generate_decode.py``: the decode step read off differenced generate calls."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "gpu"))
import generate_decode  # noqa: E402


def test_difference_recovers_the_step_and_cancels_the_fixed_part():
    """A run of ``m`` tokens costing 0.25 s of prefill plus 4 ms a token gives a 4 ms step; the
    medians take each length's middle run (one slow run of each is ignored)."""
    slow = {2: 1.0, 5: 1.0}  # one outlier per length: seed 2 (short), seed 5 (long)

    def run(max_tokens: int, seed: int) -> float:
        return 0.25 + 0.004 * max_tokens + slow.get(seed, 0.0)

    r = generate_decode.differenced_step_ms(run, n1=32, n2=160, repeats=3)
    assert r["step_ms"] == pytest.approx(4.0)
    assert r["n1_runs_s"][1] == pytest.approx(1.25 + 0.128)


def test_every_call_gets_prompts_of_its_own():
    """A prompt seen before would hit a prefix cache in one call of a pair only: the warm-up and
    every timed call must use different seeds (the bug behind a void H200 row)."""
    seeds = []
    generate_decode.differenced_step_ms(lambda m, s: seeds.append(s) or 1.0, repeats=3)
    assert len(seeds) == 7 and len(set(seeds)) == 7


def test_point_prompts_depend_on_seed_and_point():
    a = generate_decode.point_prompts(2, 16, 1000, seed=1)
    assert len(a) == 2 and all(len(p) == 16 for p in a)
    assert a == generate_decode.point_prompts(2, 16, 1000, seed=1)
    assert a != generate_decode.point_prompts(2, 16, 1000, seed=2)
    assert generate_decode.point_prompts(2, 16, 1000, seed=1)[0] != generate_decode.point_prompts(1, 16, 1000, seed=1)[0]


def test_engine_limits_hold_the_longest_call():
    lim = generate_decode.engine_limits([(1, 1024), (64, 2048)])
    assert lim["max_num_seqs"] == 64 and lim["max_model_len"] >= 2048 + generate_decode.N2
    assert generate_decode.kv_pool_bytes([(1, 1024), (64, 2048)], 10) == 64 * (2048 + generate_decode.N2 + 32) * 10
