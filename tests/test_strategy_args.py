"""Strategy arguments, from a ``name:key=value`` spec or a ``strategy_args`` dict, are checked
against the constructor's annotations before it runs: ``false`` is False (it used to be the truthy
string "false"), and a wrong type raises ConfigError naming the strategy and the argument."""
from __future__ import annotations

import math

import pytest

from kvscope import LLM, SamplingParams
from kvscope.errors import ConfigError
from kvscope.kv import registry
from kvscope.models.loader import load_model

MODEL = "dummy:tiny-llama"


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


@pytest.mark.parametrize("option", ["paged:enable_prefix_caching", "h2o:compress_prompt", "offload:overlap",
                                    "infinigen:pool_eviction", "adaptive:compress_under_pressure"])
def test_false_in_a_strategy_spec_is_false(option):
    name, key = option.split(":")
    attribute = {"pool_eviction": "evicts_on_full"}.get(key, key)
    for text, value in (("false", False), ("False", False), ("FALSE", False), ("true", True), ("True", True)):
        strategy = registry.create(f"{name}:{key}={text}")
        assert getattr(strategy, attribute) is value, (option, text)


def test_prefix_caching_off_from_a_spec_computes_every_token(loaded):
    prompt = list(range(4, 68))  # four full blocks
    llm = LLM(MODEL, strategy="paged:enable_prefix_caching=false", kv_memory_bytes=4 << 20, loaded_model=loaded)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.metrics.num_prefix_cached_tokens == 0 and llm.engine.stats()["prefix_cache_hit_tokens"] == 0


@pytest.mark.parametrize(
    "spec, args, match",
    [
        ("paged:enable_prefix_caching=0", None, "strategy 'paged': enable_prefix_caching must be true or false, got 0"),
        ("paged:enable_prefix_caching=yes", None, "enable_prefix_caching must be true or false, got 'yes'"),
        ("paged", {"enable_prefix_caching": "false"}, "enable_prefix_caching must be true or false, got 'false'"),
        ("paged:block_size=2.5", None, "strategy 'paged': block_size must be a 64-bit integer, got 2.5"),
        ("paged:block_size=x", None, "block_size must be a 64-bit integer, got 'x'"),
        ("paged:block_size=true", None, "block_size must be a 64-bit integer, got True"),
        ("h2o:heavy_ratio=nan", None, "strategy 'h2o': heavy_ratio must be a finite number, got 'nan'"),
        ("h2o:heavy_ratio=1e999", None, "heavy_ratio must be a finite number, got inf"),
        ("h2o:budget=None,heavy_ratio=None", None, "heavy_ratio must be a finite number, got None"),
        ("snapkv:pooling=3", None, "strategy 'snapkv': pooling must be a string, got 3"),
        ("random:seed=1.5", None, "strategy 'random': seed must be a 64-bit integer"),
        ("random:seed=36893488147419103232", None, "strategy 'random': seed must be a 64-bit integer"),
        ("streaming:sinks=18446744073709551616", None, "strategy 'streaming': sinks must be a 64-bit integer"),
        ("adaptive:long_args=[1]", None, "strategy 'adaptive': long_args must be dict or None"),
        ("adaptive", {"long_args": {"compress_prompt": 1}},
         "adaptive: long_args of the long child 'h2o': compress_prompt must be true or false, got 1"),
        ("adaptive", {"long": "offload", "long_args": {"bogus": 1}},
         "unknown argument\\(s\\) \\['bogus'\\] for adaptive: long_args of the long child 'offload'"),
        ("h2o:budget=4,budget=8", None, "strategy argument 'budget' is given twice"),
        ("paged", ["block_size"], "strategy_args must be a dict"),
        (None, None, "a strategy is a name or a 'name:key=value,...' spec, got None"),
    ],
)
def test_strategy_arguments_are_type_checked(spec, args, match):
    with pytest.raises(ConfigError, match=match):
        registry.create(spec, args)


def test_strategy_arguments_keep_their_literal_types():
    assert registry.parse_spec("h2o:budget=8,heavy_ratio=0.1,compress_prompt=TRUE,note=a b") == (
        "h2o", {"budget": 8, "heavy_ratio": 0.1, "compress_prompt": True, "note": "a b"})
    s = registry.create("snapkv:budget=32,window=8,pooling=avg")
    assert (s.budget, s.window, s.pooling) == (32, 8, "avg")
    # An int where a float is expected is a number, as in Python.
    assert registry.create("tova:budget_ratio=1").budget_ratio == 1
    assert math.isclose(registry.create("h2o", {"heavy_ratio": 0.25}).heavy_ratio, 0.25)
