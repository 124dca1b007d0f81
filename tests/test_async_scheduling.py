"""Async scheduling (step t+1 launched before step t's tokens reach the host) gives every request
exactly the tokens, log-probabilities and finish reasons that the synchronous engine gives, for
every strategy that allows it; outputs arrive one step later; nothing is computed for a request
whose last token is already chosen; aborts, failures and preemption behave as without it.

With ``KVSCOPE_TEST_DEVICE=cuda`` the same tests run on a GPU (CUDA graphs and Triton kernels where
the strategy has them), where the overlap is real."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope import LLM, SamplingParams
from kvscope.engine.inflight import InFlight, input_patch, resolve_async_scheduling
from kvscope.engine.piecewise import PiecewiseRunner
from kvscope.errors import ConfigError
from kvscope.kv import registry
from kvscope.kv.paged import PagedStrategy
from kvscope.models.loader import load_model
from kvscope.request import Request
from kvscope.sampling_params import RequestOutputKind

MODEL = "dummy:tiny-llama"
DEVICE = os.environ.get("KVSCOPE_TEST_DEVICE", "cpu")
PROMPTS = [[(11 * i + 5 * j) % 300 + 4 for j in range(n)] for i, n in enumerate((37, 21, 45, 9, 30, 64))]
ASYNC = sorted(name for name in registry.available() if registry.create(name).async_scheduling)
# Lossy at these lengths; adaptive's long (h2o) child takes the requests of 40 tokens and more.
# infinigen: random calibration (dummy weights; no text package needed) and one dense layer of the
# model's two, so that its speculation runs.
SPECS = {"random": "random:budget=24", "quest": "quest:budget=16", "adaptive": "adaptive:long_threshold=40",
         "adaptive/offload": "adaptive:long_threshold=40,long=offload", "h2o": "h2o:heavy_ratio=0.2,recent_ratio=0.2",
         "infinigen": "infinigen:calibration=random,budget_ratio=0.5,dense_layers=1"}
# Every strategy that schedules asynchronously, KIVI's int4 besides quant's default, and infinigen with every layer dense: a step then
# never forks its speculation stream, which must not be joined inside a capture either.
LAUNCH_SPECS = [*(SPECS.get(n, n) for n in ASYNC), SPECS["adaptive/offload"], "quant:dtype=int4",
                "infinigen:calibration=random,budget_ratio=0.5,dense_layers=2"]


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL, device=DEVICE)


def make(loaded, strategy="paged", async_scheduling=True, kv_memory_bytes=4 << 20, **kw):
    return LLM(MODEL, strategy=strategy, kv_memory_bytes=kv_memory_bytes, loaded_model=loaded,
               async_scheduling=async_scheduling, device=DEVICE, **kw)


def mixed_params(stop_token: int | None = None, n: int = 2) -> list[SamplingParams]:
    """Greedy, seeded sampling with filters, logprobs, ``n`` samples, a stop token, several lengths."""
    return [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=7, temperature=0.9, top_p=0.8, top_k=50, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True,
                       stop_token_ids=[] if stop_token is None else [stop_token]),
        SamplingParams(max_tokens=5, temperature=1.0, seed=8, n=n, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.7, seed=5, ignore_eos=True, logprobs=True),
    ]


def results(llm: LLM, params: list[SamplingParams]) -> list[list[tuple]]:
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs] for o in outs]


def assert_same(got: list[list[tuple]], ref: list[list[tuple]]) -> None:
    """Tokens and finish reasons exactly; log-probabilities to float32 rounding (a batch of other
    rows can change a row's matmul blocking on the CPU)."""
    assert [[c[:2] for c in o] for o in got] == [[c[:2] for c in o] for o in ref]
    for o, r in zip(got, ref):
        for c, d in zip(o, r):
            assert c[2] == pytest.approx(d[2], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("strategy", [*ASYNC, "adaptive/offload"])
def test_async_equals_sync_for_every_strategy_that_allows_it(loaded, strategy):
    spec = SPECS.get(strategy, strategy)
    n = 2 if registry.available()[strategy.split("/")[0]].supports_fork else 1
    ref = results(make(loaded, spec, async_scheduling=False), mixed_params(n=n))
    # A stop token the greedy request meets mid-way in the synchronous run. Not for `random`: its
    # one generator serves every request, and the step computed after a stop token (discarded)
    # draws from it too, changing what the others evict.
    # Nor on a GPU: the discarded step changes that step's batch, hence its split counts and float
    # sums; every other request's batches are the synchronous engine's when stops are by length.
    stop = None if strategy == "random" or DEVICE == "cuda" else ref[2][0][0][6]
    ref = results(make(loaded, spec, async_scheduling=False), mixed_params(stop, n))  # fresh: `random`'s generator
    assert_same(results(make(loaded, spec), mixed_params(stop, n)), ref)
    assert stop is None or ref[2][0][1] == "stop"


def test_outputs_come_one_step_later_and_nothing_is_computed_twice(loaded):
    """With EOS ignored every request stops by length, known when its last token is launched: the
    async engine computes exactly the tokens the synchronous one does (forked samples included),
    in one more step call, and each output comes one call later."""
    counts = {}
    for mode in (False, True):
        e = make(loaded, "paged:enable_prefix_caching=False", async_scheduling=mode).engine
        e.add_request(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                 output_kind=RequestOutputKind.CUMULATIVE))
        e.add_request(PROMPTS[3], SamplingParams(max_tokens=3, temperature=1.0, seed=2, n=2, ignore_eos=True))
        seen, calls = [], 0
        while e.has_unfinished_requests():
            outs = e.step()
            calls += 1
            seen += [(calls, len(o.outputs[0].token_ids)) for o in outs if o.request_id == "0"]
        counts[mode] = (e.num_computed_tokens_total, e.num_steps, calls, seen)
        assert not e.requests
    sync_tokens, sync_steps, sync_calls, sync_seen = counts[False]
    assert counts[True] == (sync_tokens, sync_steps, sync_calls + 1, [(c + 1, n) for c, n in sync_seen])
    # The last token is never fed back: 3 of request 0's 4, 2 of each sample's 3.
    assert sync_tokens == len(PROMPTS[0]) + 3 + len(PROMPTS[3]) + 2 * 2
    assert sync_seen == [(1, 1), (2, 2), (3, 3), (4, 4)]


@pytest.fixture
def device_busy(monkeypatch):
    """Every launched step reads as still running on the device: the engine then reads it back
    after the next launch, as on a GPU whose steps outlast the host's work (on a tiny model a GPU
    finishes each step first, and the engine reads it back before the next launch)."""
    monkeypatch.setattr(InFlight, "done", lambda self: False)


def test_stop_token_costs_one_discarded_step_and_frees_the_kv(loaded, device_busy):
    sync = make(loaded, "paged", async_scheduling=False)
    ref = sync.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[ref[4]])
    llm = make(loaded, "paged")
    out = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[: ref.index(ref[4]) + 1] and out.finish_reason == "stop"
    e = llm.engine
    assert e.stats()["blocks_used"] == 0 and not e.scheduler.running
    # The step launched before the stop token was read back computed one more position.
    assert e.num_computed_tokens_total == len(PROMPTS[1]) + len(out.token_ids)


def test_abort_while_a_step_is_in_flight(loaded):
    """Aborted after two step calls: with async scheduling its second token is still in flight (its
    output has one), and the request left gets the synchronous engine's tokens."""
    finals = {}
    for overlap in (False, True):
        e = make(loaded, "paged", async_scheduling=overlap).engine
        keep = e.add_request(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        gone = e.add_request(PROMPTS[2], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        e.step()
        e.step()
        assert (e._inflight is not None and all(r.num_pending_tokens for r in e.requests.values())) == overlap
        e.abort(gone)
        done = {}
        while e.has_unfinished_requests():
            done.update({o.request_id: o for o in e.step() if o.finished})
        assert done[gone].finish_reason == "abort" and done[keep].finish_reason == "length"
        assert e.stats()["blocks_used"] == 0 and not e.requests
        finals[overlap] = done
    assert finals[True][keep].outputs[0].token_ids == finals[False][keep].outputs[0].token_ids
    assert len(finals[True][gone].outputs[0].token_ids) == 1 and len(finals[False][gone].outputs[0].token_ids) == 2


# Bookkeeping, not numerics: under pressure the two engines batch differently for a step (a finished
# request's KV is seen free a step later), which moves float sums on a GPU and can flip near-ties.
CPU_ONLY = pytest.mark.skipif(DEVICE != "cpu", reason="batches differ by a step between the engines here")


@CPU_ONLY
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_under_a_small_pool(loaded, mode):
    """A pool of 12 blocks for 6 requests forces preemption; tokens equal the synchronous run's."""
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True) for _ in PROMPTS]
    kw = dict(kv_memory_bytes=12 * 16 * loaded.config.kv_bytes_per_token(torch.float32), preemption_mode=mode,
              max_num_seqs=6)
    sync = make(loaded, "paged:enable_prefix_caching=False", async_scheduling=False, **kw)
    ref = results(sync, params)
    llm = make(loaded, "paged:enable_prefix_caching=False", **kw)
    assert_same(results(llm, params), ref)
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.stats()["blocks_used"] == 0


def test_prefix_cache_registers_only_known_tokens(loaded):
    """Shared prefixes hit the cache under async scheduling too, and the hits serve the same tokens."""
    prefix = PROMPTS[5][:48]
    prompts = [prefix + [5, 6, 7], prefix + [9, 10]]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outs = {}
    for mode in (False, True):
        llm = make(loaded, "paged", async_scheduling=mode)
        first = llm.generate([prompts[0]], params, use_tqdm=False)[0].outputs[0].token_ids
        # The first request's own output, resubmitted: its generated blocks are cached as well.
        again = llm.generate([prompts[0] + first[:-1], prompts[1]], params, use_tqdm=False)
        outs[mode] = (first, [o.outputs[0].token_ids for o in again],
                      llm.engine.stats()["prefix_cache_hit_tokens"])
    # The resubmission hits 4 blocks (the 4th holds 3 prompt and 13 output tokens), the other 3.
    assert outs[True] == outs[False] and outs[True][2] == 4 * 16 + 3 * 16


def test_input_patch_reads_the_previous_steps_tokens():
    p = SamplingParams(max_tokens=5)
    a, b, c = (Request(str(i), [1, 2, 3], p) for i in range(3))
    a.num_computed_tokens = 3; a.num_pending_tokens = 1  # noqa: E702 - its 4th token is pending
    b.num_computed_tokens = 1  # prefill chunk, ids known
    c.num_computed_tokens = 3; c.num_pending_tokens = 1  # noqa: E702
    prev_tokens = torch.tensor([40, 50, 60])  # CPU: a unit test of the row mapping
    prev = InFlight([c, a], [c, a, b], prev_tokens, prev_tokens, None, {}, {}, {id(c): 0, id(a): 1, id(b): 2})
    rows, ids = input_patch([a, b, c], [0, 1, 3, 4], prev, torch.device("cpu"))
    assert rows.tolist() == [0, 3] and ids.tolist() == [50, 40]
    assert a.token_at(3) == 0 and a.num_tokens == 4 and a.num_known_tokens == 3
    assert input_patch([b], [0, 2], None, torch.device("cpu")) is None
    with pytest.raises(RuntimeError, match="request 0: its next input token is pending"):
        input_patch([a], [0, 1], None, torch.device("cpu"))


def test_config_refuses_async_where_it_cannot_apply(loaded):
    class CpuWriter(PagedStrategy):  # a strategy whose CPU writes KV a step reads
        name, async_scheduling = "cpu-writer", False

    with pytest.raises(ConfigError, match="strategy 'cpu-writer' does not allow it"):
        resolve_async_scheduling(True, CpuWriter(), False, torch.device("cpu"))
    assert not resolve_async_scheduling(None, CpuWriter(), False, torch.device("cuda"))
    assert make(loaded, "adaptive:long=offload").engine.async_scheduling  # follows both children
    with pytest.raises(ConfigError, match="async_scheduling must be True or False"):
        make(loaded, "paged", async_scheduling="yes")
    # Default: on CUDA for paged; off on a CPU (no overlap to gain).
    assert make(loaded, "paged", async_scheduling=None).engine.async_scheduling == (DEVICE == "cuda")


@pytest.mark.parametrize("spec", ["paged", "h2o:heavy_ratio=0.2,recent_ratio=0.2"])
def test_peaks_are_what_stats_shows_between_steps(loaded, spec):
    e = make(loaded, spec).engine
    for i, n in enumerate((40, 23, 57)):
        e.add_request([(5 * i + j) % 200 + 4 for j in range(n)], SamplingParams(max_tokens=8, ignore_eos=True))
    peak = 0
    while e.has_unfinished_requests():
        e.step()
        u, s = e.kv.usage(), e.kv.stats()
        assert u.kv_bytes_used == s["kv_bytes_used"]
        peak = max(peak, s["kv_bytes_used"])
    assert e.stats()["peak_kv_bytes_used"] == peak > 0 and e.kv.stats()["kv_bytes_used"] == 0


def test_static_steps_take_their_pending_ids_on_the_device(loaded):
    """A pure-decode step replayed from static buffers (``GraphRunner(capture=False)``, quest's
    steps: the ones that run on the torch backend) gets its pending input ids written into the
    static ids: tokens equal the eager synchronous engine's, every decode step static."""
    from kvscope.engine.cuda_graph import GraphRunner
    from kvscope.kv.quest_graphs import QuestGraphs

    spec, prompts = "quest:budget=16,page_size=4", PROMPTS[:3]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 20, 13)]
    ref = make(loaded, spec, async_scheduling=False, max_model_len=160).generate(prompts, params, use_tqdm=False)
    llm = make(loaded, spec, max_model_len=160)
    e = llm.engine
    e.runner.graphs = GraphRunner(e.model, QuestGraphs(e.kv, [1, 2, 4], 160, e.config.torch_device),
                                  e.config.torch_device, capture=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert e.runner.graph_replays == 5 + 7 + 7  # rows 3, 2, 1 decoding: every decode step static


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", LAUNCH_SPECS)
def test_launching_a_step_never_waits_for_the_device(spec):
    """With async scheduling, launching a step (batch building, the forward, sampling, the copies
    back) must not synchronize with the GPU, or the host waits for the step still running: pure
    decode steps (from graphs where the strategy captures them) and a mixed step (a prompt joining)
    under PyTorch's sync debug mode."""
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True, logprobs=True)
    tokens = {}
    for overlap in (False, True):
        e = LLM(MODEL, strategy=spec, device="cuda", kv_memory_bytes=8 << 20, async_scheduling=overlap).engine
        for p in PROMPTS[:3]:
            e.add_request(p, params)
        e.step()
        e.step()
        launch = e._launch

        def strict(*args, launch=launch):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        if overlap:
            e._launch = strict
        e.add_request(PROMPTS[3], params)  # joins at the third step in both engines: a mixed step
        done = {}
        while e.has_unfinished_requests():
            done.update({o.request_id: o for o in e.step() if o.finished})
        tokens[overlap] = [done[str(i)].outputs[0].token_ids for i in range(4)]
        assert e.runner.graph_replays > 0 or not e.kv.facts().graph_decode  # eager decoders: every step checked
    assert tokens[True] == tokens[False]


_request = st.tuples(st.integers(1, 60), st.integers(1, 12), st.booleans(), st.integers(0, 3))  # len, max, greedy, stop


@CPU_ONLY
@settings(max_examples=40, deadline=None)
@given(waves=st.lists(st.lists(_request, max_size=3), min_size=1, max_size=5), abort_at=st.integers(0, 8),
       mode=st.sampled_from(["recompute", "swap"]), pieces=st.booleans())
def test_any_arrival_pattern_gives_the_synchronous_tokens(loaded, waves, abort_at, mode, pieces):
    """Requests arriving in waves between steps, some sampled, some with a stop token, one aborted
    mid-way, in a pool small enough to preempt: every request that was not aborted gets the
    synchronous engine's tokens; the aborted one a prefix of them; no KV is left held. With
    ``pieces`` the asynchronous engine runs its prefill and mixed steps through piecewise graphs'
    static buffers (``PiecewiseRunner(capture=False)``), padded to small buckets."""
    results = {}
    for overlap in (False, True):
        e = make(loaded, "paged", async_scheduling=overlap, preemption_mode=mode, max_num_seqs=4,
                 kv_memory_bytes=10 * 16 * loaded.config.kv_bytes_per_token(torch.float32)).engine
        if overlap and pieces:
            e.runner.pieces = PiecewiseRunner(e.model, [4, 16, 64], torch.float32, e.config.torch_device, capture=False)
        done, ids, calls = {}, [], 0
        for wave in waves + [[]] * 100:  # the async engine returns outputs a step later
            for n, max_tokens, greedy, stop in wave:
                prompt = [(7 * n + 3 * j + len(ids)) % 300 + 4 for j in range(n)]
                params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else 0.9, seed=len(ids),
                                        ignore_eos=True, stop_token_ids=[4 + 37 * stop] if stop else [])
                ids.append(e.add_request(prompt, params))
            if calls == abort_at and ids:
                e.abort(ids[0])
            done.update({o.request_id: o for o in e.step() if o.finished})
            calls += 1
            if not e.has_unfinished_requests() and len(done) == len(ids):
                break
        assert len(done) == len(ids) and e.stats()["blocks_used"] == 0 and not e.requests
        assert e.runner.piecewise_replays == 0 or (overlap and pieces)
        results[overlap] = {i: (o.outputs[0].token_ids, o.outputs[0].finish_reason) for i, o in done.items()}
    sync, got = results[False], results[True]
    for i in sync:
        if sync[i][1] == "abort" or got[i][1] == "abort":
            assert got[i][0] == sync[i][0][: len(got[i][0])] or sync[i][0] == got[i][0][: len(sync[i][0])]
        else:
            assert got[i] == sync[i]


def test_adaptive_under_pressure_serves_every_request_and_frees_its_kv(loaded):
    """Under memory pressure the scheduler sees a finished request's KV one step later (as vLLM's),
    so adaptive's pressure routing may differ from the synchronous engine's; every request still
    completes at full length, hand-overs included, and nothing stays held."""
    spec = "adaptive:long_threshold=1000,pressure=0.5,relief=0.2,pressure_min_length=20"
    llm = make(loaded, spec, kv_memory_bytes=14 * 16 * loaded.config.kv_bytes_per_token(torch.float32))
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True) for _ in PROMPTS]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [16] * len(PROMPTS)
    s = llm.engine.stats()
    assert s["adaptive_admitted_long_pressure"] + s["adaptive_compressed_under_pressure"] > 0
    assert s["kv_bytes_used"] == 0 and s["adaptive_requests_full"] == s["adaptive_requests_long"] == 0


def test_resolution_and_the_cli_flag():
    from kvscope.cli import build_parser
    from kvscope.cli_args import _llm_args

    paged, cuda, cpu = registry.create("paged"), torch.device("cuda"), torch.device("cpu")
    assert resolve_async_scheduling(None, paged, False, cuda) and not resolve_async_scheduling(None, paged, False, cpu)
    assert not resolve_async_scheduling(None, paged, True, cuda)  # tensor parallel: synchronous
    with pytest.raises(ConfigError, match="tensor parallelism"):
        resolve_async_scheduling(True, paged, True, cpu)
    assert resolve_async_scheduling(True, paged, False, cpu) and not resolve_async_scheduling(False, paged, False, cuda)
    parse = build_parser().parse_args
    assert _llm_args(parse(["generate", "hi", "--no-async-scheduling"]))["async_scheduling"] is False
    assert _llm_args(parse(["generate", "hi", "--async-scheduling"]))["async_scheduling"] is True
    assert _llm_args(parse(["generate", "hi"]))["async_scheduling"] is None


class _Finished:
    """A CUDA event stand-in for a step the device has already finished."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("finished", [False, True])
def test_a_finished_step_is_read_back_before_the_next_launch(loaded, monkeypatch, finished):
    """When the previous step's event has completed (a host-bound step: the device waits for the
    host), its tokens are read back before the next launch, as the synchronous engine does; while
    it runs, after. Tokens equal the synchronous engine's either way."""
    from kvscope.engine import engine as engine_module

    params = mixed_params(n=1)
    ref = results(make(loaded, "h2o:heavy_ratio=0.2,recent_ratio=0.2", async_scheduling=False), params)
    llm = make(loaded, "h2o:heavy_ratio=0.2,recent_ratio=0.2")
    if not finished:
        monkeypatch.setattr(InFlight, "done", lambda self: False)
    else:
        launch = engine_module.launch_sampling

        def finished_launch(*args, **kw):
            step = launch(*args, **kw)
            step.ready = _Finished()
            return step
        monkeypatch.setattr(engine_module, "launch_sampling", finished_launch)
    e, run, pending_at_launch = llm.engine, llm.engine.runner.run, []

    def recording_run(*args, **kw):
        pending_at_launch.append(sum(r.num_pending_tokens for r in e.requests.values()))
        return run(*args, **kw)
    monkeypatch.setattr(e.runner, "run", recording_run)
    assert_same(results(llm, params), ref)
    # Every launch after the first finds the previous step's tokens read back, or still pending.
    assert len(pending_at_launch) > 3
    assert (max(pending_at_launch) == 0) == finished
