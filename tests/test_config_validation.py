"""SamplingParams and EngineConfig check every field for its type as well as its range, and a bad
one raises kvscope's ConfigError naming the field (never a raw TypeError later, never a float
silently truncated to an int); sizes may be written as strings such as "64MiB"."""
from __future__ import annotations

import pytest

from kvscope import LLM, SamplingParams
from kvscope.config import EngineConfig
from kvscope.engine.sampling_params import GREEDY_TEMPERATURE
from kvscope.errors import ConfigError
from kvscope.models.loader import load_model

MODEL = "dummy:tiny-llama"


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": 10**400}, "temperature must be a finite number"),
        ({"temperature": "0.5"}, "temperature must be a number, got '0.5'"),
        ({"temperature": True}, "temperature must be a number"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"top_p": "1"}, "top_p must be a number"),
        ({"top_p": 0}, "top_p must be in \\(0, 1\\]"),
        ({"top_k": 1.5}, "top_k must be an integer, got 1.5"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"n": 2.5}, "n must be an integer, got 2.5"),
        ({"n": 0}, "n must be >= 1"),
        ({"max_tokens": 4.0}, "max_tokens must be an integer"),
        ({"max_tokens": False}, "max_tokens must be an integer"),
        ({"seed": "a"}, "seed must be an integer, got 'a'"),
        ({"seed": 2**70}, "seed must be <= 9223372036854775807"),
        ({"seed": -(2**64)}, "seed must be >= -9223372036854775808"),
        ({"seed": 1.0}, "seed must be an integer"),
        ({"stop": None}, "stop must be a string or a list of strings, got None"),
        ({"stop": ["ok", 3]}, "stop must be a string or a list of strings"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        ({"stop_token_ids": [1, 2.5]}, "stop_token_ids\\[1\\] must be an integer"),
        ({"stop_token_ids": 5}, "stop_token_ids must be a list of integers"),
        ({"forced_token_ids": [1, -1]}, "forced_token_ids\\[1\\] must be >= 0"),
        ({"forced_token_ids": []}, "forced_token_ids must not be empty"),
        ({"ignore_eos": "false"}, "ignore_eos must be True or False, got 'false'"),
        ({"logprobs": 1}, "logprobs must be True or False"),
        ({"return_logits": None}, "return_logits must be True or False"),
    ],
)
def test_sampling_params_reject_wrong_types_and_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_accepted_values():
    p = SamplingParams(temperature=1, top_p=1, stop="end", stop_token_ids=(3, 4), seed=-5)
    assert (p.temperature, p.top_p, p.stop, p.stop_token_ids, p.seed) == (1.0, 1.0, ["end"], [3, 4], -5)
    assert isinstance(p.temperature, float)
    # Below GREEDY_TEMPERATURE, logits / temperature would overflow float32: those are greedy.
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy


def test_tiny_temperatures_give_greedy_tokens(loaded):
    llm = LLM(MODEL, kv_memory_bytes=4 << 20, loaded_model=loaded)
    ref = llm.generate(["abc"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for t in (1e-40, 5e-324, 9e-6):
        out = llm.generate(["abc"], SamplingParams(max_tokens=6, temperature=t, ignore_eos=True, seed=3),
                           use_tqdm=False)
        assert out[0].token_ids == ref[0].token_ids and out[0].finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kv_memory_bytes": 1e6}, "kv_memory_bytes: must be a size in bytes \\(an integer, or text like 512MiB\\)"),
        ({"kv_memory_bytes": "lots"}, "kv_memory_bytes: not a size: 'lots'"),
        ({"kv_memory_bytes": "inf"}, "kv_memory_bytes: not a size"),
        ({"kv_memory_bytes": "-64MiB"}, "kv_memory_bytes: must be at least 1 byte"),
        ({"kv_memory_bytes": 0}, "kv_memory_bytes: must be at least 1 byte"),
        ({"kv_memory_bytes": True}, "kv_memory_bytes: must be a size in bytes"),
        ({"max_model_len": "512"}, "max_model_len must be an integer, got '512'"),
        ({"max_model_len": 0}, "max_model_len must be >= 1"),
        ({"max_num_seqs": "four"}, "max_num_seqs must be an integer, got 'four'"),
        ({"max_num_seqs": 2.5}, "max_num_seqs must be an integer, got 2.5"),
        ({"max_num_seqs": True}, "max_num_seqs must be an integer"),
        ({"max_num_batched_tokens": 2048.0}, "max_num_batched_tokens must be an integer"),
        ({"swap_space_bytes": -1}, "swap_space_bytes must be >= 0"),
        ({"swap_space_bytes": 1.5}, "swap_space_bytes must be an integer"),
        ({"seed": 2**64}, "seed must be <= "),
        ({"seed": "0"}, "seed must be an integer"),
        ({"kv_memory_fraction": float("nan")}, "kv_memory_fraction must be a finite number"),
        ({"kv_memory_fraction": "0.5"}, "kv_memory_fraction must be a number"),
        ({"preemption_mode": ["swap"]}, "unknown preemption_mode \\['swap'\\]"),
        ({"attention_backend": None}, "unknown attention_backend None"),
        ({"enforce_eager": "yes"}, "enforce_eager must be True or False"),
        ({"dtype": ["float32"]}, "unknown dtype \\['float32'\\]"),
        ({"device": 0}, "device must be a string"),
        ({"model": None}, "model must be a name or a path"),
        ({"strategy_args": [("block_size", 8)]}, "strategy_args must be a dict"),
        ({"cuda_graph_sizes": 4}, "cuda_graph_sizes must be a non-empty list"),
        ({"cuda_graph_sizes": [1, 2.0]}, "cuda_graph_sizes\\[1\\] must be an integer"),
    ],
)
def test_engine_config_rejects_wrong_types_naming_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kwargs)


def test_sizes_are_parsed_once_for_the_api(loaded):
    cfg = EngineConfig(kv_memory_bytes="64MiB", swap_space_bytes="1.5GiB")
    assert (cfg.kv_memory_bytes, cfg.swap_space_bytes) == (64 << 20, 3 << 29)
    assert EngineConfig(swap_space_bytes=0).swap_space_bytes == 0
    llm = LLM(MODEL, kv_memory_bytes="1MiB", loaded_model=loaded)
    assert llm.engine.kv.setup.kv_memory_bytes == 1 << 20
    with pytest.raises(ConfigError, match="kv_memory_bytes: must be a size in bytes"):
        LLM(MODEL, kv_memory_bytes=1e6, loaded_model=loaded)
