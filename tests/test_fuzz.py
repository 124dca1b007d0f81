"""Property-based fuzzing of what a user configures: ``SamplingParams``, ``EngineConfig`` fields (through
``LLM``) and strategy arguments (through ``registry.create`` and ``LLM``). Every input is either
rejected with a kvscope error that names the field (``ConfigError``; ``RequestError`` for a request
that this configuration cannot serve, naming the parameter or the prompt), or runs to completion;
afterwards the engine holds no KV and still gives a good request the greedy tokens it gave before.

Bounded for CPU: the tiny dummy model is loaded once, engines get small pools and ``max_model_len=64``.
"""
from __future__ import annotations

import re
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvscope import LLM, SamplingParams
from kvscope.errors import ConfigError, RequestError
from kvscope.kv import registry
from kvscope.kv.random_policy import RandomStrategy
from kvscope.models.loader import load_model

MODEL = "dummy:tiny-llama"
GOOD_PROMPT = [(5 * j) % 200 + 4 for j in range(20)]
OTHER_PROMPT = [(11 * j) % 300 + 4 for j in range(41)]
GOOD = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
ENGINE_FIELDS = ("kv_memory_bytes", "max_model_len", "swap_space_bytes")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values of the wrong type or out of range for most fields. Positive ints stay small: a valid huge
# kv_memory_bytes would really be allocated.
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 0), st.integers(2**62, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.sampled_from(["false", "1", "64MiB"]),
    st.lists(st.integers(-3, 600), max_size=3),
)


@st.composite
def fields_with_junk(draw: st.DrawFn, values: dict[str, st.SearchStrategy],
                     junk: dict[str, st.SearchStrategy] | None = None) -> dict[str, Any]:
    """Some fields with valid values; in half the examples one of them gets a junk value instead."""
    kwargs = draw(st.fixed_dictionaries({}, optional=values))
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(values)))
        kwargs[key] = draw((junk or {}).get(key, JUNK))
        event(f"junk {key}")
    return kwargs


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def reference(loaded):
    """The paged engine every SamplingParams example runs on, and the good request's tokens."""
    llm = LLM(MODEL, kv_memory_bytes=2 << 20, max_model_len=48, max_num_seqs=8, loaded_model=loaded)
    return llm, llm.generate([GOOD_PROMPT], GOOD, use_tqdm=False)[0].token_ids


def names_a_field(error: Exception, fields: typing.Iterable[str]) -> bool:
    return any(re.search(rf"\b{re.escape(f)}\b", str(error)) for f in fields)


def holds_nothing(llm: LLM) -> bool:
    s = llm.engine.stats()
    return (not llm.engine.requests and not llm.engine.has_unfinished_requests()
            and all(s[k] == 0 for k in ("blocks_used", "host_blocks_used", "kv_bytes_used") if k in s))


def good_tokens(llm: LLM) -> list[int]:
    return llm.generate([GOOD_PROMPT], GOOD, use_tqdm=False)[0].token_ids


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, fields: typing.Iterable[str]) -> bool:
    """Generate to the end: every request finishes without error (True), or the batch is refused
    with a RequestError naming the field at fault, a sampling parameter or the prompt (False)."""
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    except RequestError as e:
        assert names_a_field(e, [*fields, "prompt"]), e
        return False
    for out in outs:
        assert out.finished and len(out.outputs) == params.n
        assert all(c.error is None and c.finish_reason in ("stop", "length") for c in out.outputs), out
    return True


# ---- SamplingParams -----------------------------------------------------------------------------
SAMPLING_FIELDS = {
    "max_tokens": st.integers(1, 6),
    "temperature": st.one_of(st.just(0.0), st.floats(0, 5.0), st.floats(1e-45, 1e-4)),
    "top_k": st.integers(0, 600),
    "top_p": st.floats(1e-9, 1.0),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "n": st.integers(1, 3),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
    "stop_token_ids": st.lists(st.integers(0, 600), max_size=3),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "return_logits": st.booleans(),
    "logprobs": st.booleans(),
    "forced_token_ids": st.one_of(st.none(), st.lists(st.integers(0, 600), min_size=1, max_size=4)),
}


@FUZZ
@given(kwargs=fields_with_junk(SAMPLING_FIELDS))
def test_sampling_params(reference, kwargs):
    llm, ref = reference
    try:
        params = SamplingParams(**kwargs)
    except ConfigError as e:
        assert names_a_field(e, kwargs), e
        event("rejected")
        return
    event("ran")
    run(llm, [GOOD_PROMPT, OTHER_PROMPT], params, kwargs)
    assert holds_nothing(llm)
    assert good_tokens(llm) == ref


# ---- EngineConfig --------------------------------------------------------------------------------
ENGINE_VALUES = {
    "kv_memory_bytes": st.one_of(st.integers(1, 1 << 20), st.sampled_from(["1MiB", "64k", "0.5MiB", "1e6", "-1k"])),
    "max_model_len": st.integers(1, 600),
    "max_num_seqs": st.integers(1, 8),
    "max_num_batched_tokens": st.integers(1, 64),
    "preemption_mode": st.sampled_from(["recompute", "swap", "Swap"]),
    "swap_space_bytes": st.one_of(st.integers(0, 1 << 20), st.just("1MiB")),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "kv_memory_fraction": st.floats(0, 1),
    "enforce_eager": st.booleans(),
    "attention_backend": st.sampled_from(["auto", "torch", "triton", "cuda"]),
}
# No valid huge pool: it would be allocated.
SAFE_JUNK = {"kv_memory_bytes": st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 0), st.floats(),
                                          st.text(max_size=5))}


@FUZZ
@given(kwargs=fields_with_junk(ENGINE_VALUES, SAFE_JUNK))
def test_engine_config(loaded, reference, kwargs):
    _, ref = reference
    kwargs.setdefault("kv_memory_bytes", 1 << 20)
    try:
        llm = LLM(MODEL, loaded_model=loaded, **kwargs)
    except ConfigError as e:
        assert names_a_field(e, kwargs), e
        event("rejected")
        return
    event("ran")
    fields = [*kwargs, "n"]
    run(llm, [GOOD_PROMPT, OTHER_PROMPT], GOOD, fields)
    assert holds_nothing(llm)
    try:
        tokens = good_tokens(llm)
    except RequestError as e:  # the prompt does not fit this context or pool
        assert names_a_field(e, ["prompt"]), e
        return
    # Paged is lossless: only a shorter context (max_model_len) may cut the same tokens short.
    assert tokens == ref[: len(tokens)] and (len(tokens) == len(ref) or llm.engine.token_limit < 26)


# ---- strategy arguments ----------------------------------------------------------------------------
def plausible(hint: Any) -> st.SearchStrategy:
    """Values of the annotated type, near the ranges strategies accept (and just outside them)."""
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        return st.one_of(*(plausible(h) for h in typing.get_args(hint)))
    return {
        type(None): st.none(),
        bool: st.booleans(),
        int: st.integers(-2, 80),
        float: st.floats(-0.5, 1.5),
        # adaptive's long child: never infinigen, whose default calibration reads a text corpus.
        str: st.sampled_from(["h2o", "snapkv", "offload", "avg", "max", "token", "head", "random", "x"]),
    }.get(hint, st.dictionaries(st.sampled_from(["budget_ratio", "compress_prompt", "x"]), JUNK, max_size=2))


@st.composite
def strategy_and_args(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    name = draw(st.sampled_from(sorted(registry.available())))
    cls = registry.available()[name]
    hints = registry.arg_types(cls)
    keys = draw(st.lists(st.sampled_from(sorted(registry.accepted_args(cls))), unique=True, max_size=3))
    args = {k: draw(plausible(hints[k])) for k in keys}
    if keys and draw(st.booleans()):
        args[keys[0]] = draw(JUNK)
    for k in ("calibration", "thresholds_from"):  # read from disk; their errors are tested elsewhere
        args.pop(k, None)
    if name == "infinigen":
        args["calibration"] = "random"
    return name, args


@FUZZ
@given(choice=strategy_and_args())
def test_strategy_args(loaded, choice):
    name, args = choice
    try:
        kv = registry.create(name, args)
    except ConfigError as e:
        assert names_a_field(e, args), e
        event("rejected by the strategy")
        return
    fields = [*args, *ENGINE_FIELDS]
    try:
        llm = LLM(MODEL, strategy=kv, kv_memory_bytes=1 << 20, max_model_len=64, loaded_model=loaded)
    except ConfigError as e:
        assert names_a_field(e, fields), e
        event("rejected by the engine")
        return
    event(f"ran {name}")
    try:
        before = good_tokens(llm)
    except RequestError as e:  # the prompt does not fit this pool
        assert names_a_field(e, ["prompt"]), e
        return
    run(llm, [GOOD_PROMPT, OTHER_PROMPT], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), fields)
    assert holds_nothing(llm)
    after = good_tokens(llm)
    # random's scores come from one generator that moves on with every token written: what it
    # keeps, hence its tokens, may differ from run to run. Every other strategy is deterministic.
    if not any(isinstance(s, RandomStrategy) for s in (kv, getattr(kv, "long", None))):
        assert after == before
