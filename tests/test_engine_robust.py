"""A request that fails (at sampling, forking, stop strings) fails alone; a failed step fails its own
requests and leaves the engine consistent; aborted requests get a final output and are forgotten;
an interrupted ``generate`` aborts its requests. The good requests' tokens are always checked against
the same requests run alone."""
from __future__ import annotations

import pytest

from kvscope import LLM, SamplingParams
from kvscope.engine import engine as engine_module
from kvscope.errors import ConfigError, RequestError
from kvscope.kv import registry
from kvscope.models.loader import load_model

MODEL = "dummy:tiny-llama"
PROMPTS = [[(7 * i + 3 * j) % 250 + 4 for j in range(n)] for i, n in enumerate((37, 21, 45))]
NEW = 10
# The KV a strategy holds for requests (``kv_bytes_used`` stays 0 for the host strategies, whose
# device buffers are staging only; their host blocks say what is held).
HELD = ("blocks_used", "host_blocks_used", "kv_bytes_used")


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


def make(loaded, strategy="paged", kv_memory_bytes=4 << 20, **kw):
    return LLM(MODEL, strategy=strategy, kv_memory_bytes=kv_memory_bytes, loaded_model=loaded, **kw)


def greedy(max_tokens=NEW, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def held(engine) -> int:
    """What the strategy holds for requests (blocks or bytes; 0 when nothing)."""
    stats = engine.stats()
    return sum(stats[k] for k in HELD if k in stats)


def run_to_end(engine) -> dict[str, object]:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def alone(llm, prompts, params=None):
    return [llm.generate([p], params or greedy(), use_tqdm=False)[0].token_ids for p in prompts]


def poison(params: SamplingParams) -> None:
    """A request whose sampling raises: its parameters were valid when checked, then changed (NaN
    probabilities, what ``temperature=1e-40`` used to produce)."""
    params.temperature = float("nan")


def test_reviewer_reproduction_now_serves_both(loaded):
    """The reported sequence: a tiny temperature no longer overflows (it is greedy), and a request
    whose sampling fails anyway fails alone, freeing its KV, while the other one finishes."""
    e = make(loaded).engine
    ref = alone(make(loaded), ["good"], greedy(4))[0]
    e.add_request("good", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), request_id="good")
    tiny = e.add_request("good", SamplingParams(max_tokens=4, temperature=1e-40, ignore_eos=True))
    bad_params = SamplingParams(max_tokens=4, temperature=0.5)
    poison(bad_params)
    bad = e.add_request("bad", bad_params)
    first = {o.request_id: o for o in e.step()}
    assert first[bad].finished and first[bad].finish_reason == "error"
    assert "sampling" in first[bad].error and "probability tensor" in first[bad].error
    assert not first["good"].finished
    done = run_to_end(e)
    assert done["good"].token_ids == ref and done[tiny].token_ids == ref
    assert held(e) == 0 and not e.requests and not e.scheduler.running


STRATEGIES = [
    "paged", "contiguous", "h2o", "streaming", "tova", "snapkv", "knorm",
    # random's scores come from one generator shared by all requests: with a budget covering the
    # sequences nothing is evicted, so a batch cannot change what the good requests keep.
    "random:budget=4096",
    "offload", "infinigen:calibration=random,dense_layers=1",
    "adaptive:long_threshold=50",  # the 45-token prompt (+ 10) goes to the long child, the others stay full
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bad_request_fails_alone_in_a_mixed_batch(loaded, strategy):
    """Good, bad, good in one batch; the bad one's sampling starts failing mid-decode. It finishes
    with its error and the tokens it had, its KV is freed at once, and the good ones finish with
    the tokens they get alone."""
    llm = make(loaded, strategy)
    refs = alone(llm, [PROMPTS[0], PROMPTS[2]])
    e = llm.engine
    a = e.add_request(PROMPTS[0], greedy())
    bad_params = SamplingParams(max_tokens=NEW, temperature=0.8, seed=1, ignore_eos=True)
    bad = e.add_request(PROMPTS[1], bad_params)
    b = e.add_request(PROMPTS[2], greedy())
    done = {}
    for _ in range(3):
        done.update({o.request_id: o for o in e.step() if o.finished})
    before = held(e)
    assert before > 0
    poison(bad_params)
    outs = {o.request_id: o for o in e.step()}
    failed = outs[bad]
    assert failed.finished and failed.finish_reason == "error"
    assert failed.error.startswith(f"request {bad}: failed while sampling: RuntimeError")
    assert 1 <= len(failed.token_ids) < NEW
    assert bad not in e.requests and all(r.request_id != bad for r in e.scheduler.running)
    assert held(e) < before  # its KV went back at once
    done.update(run_to_end(e))
    assert done[a].token_ids == refs[0] and done[b].token_ids == refs[1]
    assert done[a].finish_reason == done[b].finish_reason == "length"
    assert held(e) == 0 and not e.requests


def test_stop_string_failure_fails_only_that_request(loaded, monkeypatch):
    llm = make(loaded)
    refs = alone(llm, PROMPTS[:1])
    e = llm.engine

    def broken_decode(ids, skip_special_tokens=True):
        raise ValueError("undecodable")

    monkeypatch.setattr(e.tokenizer, "decode", broken_decode)
    good = e.add_request(PROMPTS[0], greedy())
    bad = e.add_request(PROMPTS[1], greedy(stop=["zz"]))  # only its stop check decodes
    done = run_to_end(e)
    assert done[bad].finish_reason == "error" and len(done[bad].token_ids) == 1
    assert "failed while processing its token: ValueError: undecodable" in done[bad].error
    assert done[good].token_ids == refs[0]
    assert held(e) == 0


def test_fork_failure_fails_the_request_and_all_its_samples(loaded, monkeypatch):
    llm = make(loaded)
    refs = alone(llm, PROMPTS[:1])
    e = llm.engine
    calls = []

    def fork(parent, child):  # the second sample's fork fails, after the first one's succeeded
        calls.append(child.request_id)
        if len(calls) == 2:
            raise RuntimeError("no room to fork")
        type(e.kv).fork(e.kv, parent, child)

    monkeypatch.setattr(e.kv, "fork", fork)
    good = e.add_request(PROMPTS[0], greedy())
    bad = e.add_request(PROMPTS[1], greedy(n=3))
    done = run_to_end(e)
    assert [c.finish_reason for c in done[bad].outputs] == ["error"] * 3
    assert all("forking its samples: RuntimeError: no room to fork" in c.error for c in done[bad].outputs)
    assert done[good].token_ids == refs[0]
    assert held(e) == 0 and not e.requests


@pytest.mark.parametrize("where", ["forward", "end_step"])
def test_failed_step_fails_its_requests_and_the_engine_goes_on(loaded, monkeypatch, where):
    """The model forward (nothing advanced yet) or the strategy's end_step (counters already moved)
    raises once: the step's requests fail with the error and their KV is freed; the request that was
    waiting, and every later one, are served with the tokens they get alone."""
    llm = make(loaded, max_num_seqs=2)
    refs = alone(llm, PROMPTS)
    e = llm.engine
    target = e.runner if where == "forward" else e.kv
    name = "run" if where == "forward" else "end_step"
    real = getattr(target, name)
    state = {"calls": 0}

    def flaky(*args):
        state["calls"] += 1
        if state["calls"] == 3:
            raise RuntimeError("device lost")
        return real(*args)

    monkeypatch.setattr(target, name, flaky)
    ids = [e.add_request(p, greedy()) for p in PROMPTS]
    done = run_to_end(e)
    for rid in ids[:2]:
        assert done[rid].finish_reason == "error"
        assert done[rid].error == f"request {rid}: the engine step failed: RuntimeError: device lost"
    assert done[ids[2]].token_ids == refs[2]  # it waited (max_num_seqs=2) and was untouched
    assert held(e) == 0 and not e.requests
    assert alone(llm, PROMPTS[:1]) == refs[:1]


def test_interrupt_mid_step_leaves_no_request_without_its_token(loaded, monkeypatch):
    """Ctrl-C after the counters moved but before the tokens were sampled: the step's requests are
    failed (KV freed) before the interrupt propagates, their outputs come with the next step, and
    nothing later raises IndexError."""
    llm = make(loaded)
    refs = alone(llm, PROMPTS[:1])
    e = llm.engine
    ids = [e.add_request(p, greedy()) for p in PROMPTS[:2]]
    e.step()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_module, "launch_sampling", interrupted)
    with pytest.raises(KeyboardInterrupt):
        e.step()
    monkeypatch.undo()
    assert not e.scheduler.running and held(e) == 0
    outs = {o.request_id: o for o in e.step()}
    assert sorted(outs) == sorted(ids) and all(o.finish_reason == "error" for o in outs.values())
    assert "KeyboardInterrupt" in outs[ids[0]].error
    assert not e.requests and alone(llm, PROMPTS[:1]) == refs


def test_generate_interrupted_aborts_its_requests(loaded, monkeypatch):
    """Ctrl-C in LLM.generate: its requests are aborted and their KV freed; the next call computes
    only its own request (it used to finish the leftovers first)."""
    llm = make(loaded, "paged:enable_prefix_caching=false")  # every token computed is counted
    refs = alone(llm, PROMPTS[2:])
    e = llm.engine
    real_step = e.step
    state = {"calls": 0}

    def step():
        state["calls"] += 1
        if state["calls"] == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(e, "step", step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS[:2], greedy(), use_tqdm=False)
    monkeypatch.undo()
    assert held(e) == 0 and e.scheduler.num_unfinished == 0
    computed = e.stats()["num_computed_tokens"]
    out = llm.generate(PROMPTS[2:], greedy(), use_tqdm=False)
    assert [o.token_ids for o in out] == refs
    assert e.stats()["num_computed_tokens"] - computed == len(PROMPTS[2]) + NEW - 1
    assert not e.requests


def test_aborted_requests_are_reported_then_forgotten(loaded):
    """1,500 aborts leave nothing behind: each final output (finish_reason "abort") comes with the
    next step, the engine forgets the request, and its id can be used again."""
    e = make(loaded).engine
    for i in range(1500):
        rid = e.add_request([5, 6, 7], greedy(), request_id="same" if i % 2 else None)
        e.abort(rid)
        (out,) = e.step()
        assert (out.request_id, out.finished, out.finish_reason, out.token_ids) == (rid, True, "abort", [])
    assert not e.requests and not e._groups and not e.has_unfinished_requests()
    many = [e.add_request([5, 6, 7], greedy()) for _ in range(20)]
    for rid in many:
        e.abort(rid)
    assert sorted(o.request_id for o in e.step()) == sorted(many) and not e.requests


def test_abort_mid_batch_and_before_fork(loaded):
    llm = make(loaded)
    refs = alone(llm, PROMPTS[:1])
    e = llm.engine
    good = e.add_request(PROMPTS[0], greedy())
    running = e.add_request(PROMPTS[1], greedy())
    forked = e.add_request(PROMPTS[2], greedy(n=2), request_id="n2")
    e.abort("n2")  # still waiting: it never forks, and its one sample is its final output
    e.step()
    e.step()
    e.abort(running)
    outs = {o.request_id: o for o in e.step()}
    assert outs[running].finished and outs[running].finish_reason == "abort" and len(outs[running].token_ids) == 2
    assert not outs[good].finished
    done = run_to_end(e)
    assert done[good].token_ids == refs[0] and forked not in done
    assert held(e) == 0 and not e.requests


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("\ud800", "not valid text"),
        ("ok \udfff", "surrogates not allowed at character 3"),
        ([1, 2.5], "token ids must be integers, got 2.5"),
        ([1, True], "token ids must be integers, got True"),
        (["a"], "token ids must be integers"),
        (None, "must be a string or a list of token ids"),
        ([], "empty"),
    ],
)
def test_bad_prompts_raise_request_errors(loaded, prompt, match):
    e = make(loaded).engine
    with pytest.raises(RequestError, match=match):
        e.add_request(prompt, greedy())
    assert not e.requests


def test_bad_request_fields_raise_request_errors(loaded):
    e = make(loaded, max_num_seqs=4).engine
    with pytest.raises(RequestError, match="request_id must be a string"):
        e.add_request([1], greedy(), request_id=7)
    with pytest.raises(RequestError, match="without '#'"):
        e.add_request([1], greedy(), request_id="a#1")
    with pytest.raises(RequestError, match="params must be a SamplingParams"):
        e.add_request([1], {"max_tokens": 3})
    with pytest.raises(RequestError, match="arrival_time must be a finite number"):
        e.add_request([1], greedy(), arrival_time=float("nan"))
    with pytest.raises(RequestError, match="n=5 samples run together, more than max_num_seqs=4"):
        e.add_request([1], greedy(n=5))
    assert not e.requests


def test_generate_validates_every_prompt_before_queueing_any(loaded):
    llm = make(loaded)
    with pytest.raises(RequestError, match="prompt 1: request 1: the prompt is not valid text"):
        llm.generate(["fine", "\ud800"], greedy(), use_tqdm=False)
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()


def test_a_strategy_instance_serves_one_engine(loaded):
    kv = registry.create("paged")
    first = make(loaded, kv, kv_memory_bytes=1 << 20)
    with pytest.raises(ConfigError, match="already bound to an engine \\(a KV pool of 1048576 bytes\\)"):
        make(loaded, kv, kv_memory_bytes=8 << 20)
    assert first.engine.kv.setup.kv_memory_bytes == 1 << 20  # the first engine's pool is unchanged
    assert alone(first, PROMPTS[:1]) == alone(make(loaded), PROMPTS[:1])


def test_unallocatable_pool_is_a_config_error(loaded):
    with pytest.raises(ConfigError, match="could not allocate its KV memory for kv_memory_bytes=4611686018427387904"):
        make(loaded, kv_memory_bytes=1 << 62)
