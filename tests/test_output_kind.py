"""Output kinds (vLLM's ``RequestOutputKind``) and the engine's cheap per-step load sample."""
from __future__ import annotations

import pytest

from kvscope import LLM, RequestOutputKind, SamplingParams
from kvscope.errors import ConfigError


@pytest.fixture(scope="module")
def llm():
    return LLM("dummy:tiny-llama", kv_memory_bytes=8 << 20, max_model_len=256)


def _drain(engine) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


def test_final_only_reports_once_with_what_cumulative_reports_last(llm):
    engine = llm.engine
    prompt = [5, 6, 7, 8, 9]
    cumulative = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request(prompt, cumulative, request_id="c")
    outs = _drain(engine)
    assert [o.finished for o in outs] == [False] * 5 + [True]
    assert [len(o.token_ids) for o in outs] == [1, 2, 3, 4, 5, 6]

    engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                              output_kind="final_only"), request_id="f")
    final = _drain(engine)
    assert len(final) == 1 and final[0].finished and final[0].request_id == "f"
    assert final[0].token_ids == outs[-1].token_ids
    assert len(final[0].metrics.token_times) == 6 and final[0].metrics.first_scheduled_time is not None


def test_final_only_request_still_reports_an_abort(llm):
    engine = llm.engine
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=50, output_kind=RequestOutputKind.FINAL_ONLY),
                       request_id="a")
    assert engine.step() == []
    engine.abort("a")
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort")]


def test_generate_outputs_do_not_depend_on_the_kind(llm):
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    a = llm.generate([[3, 4, 5], [9, 8]], params, use_tqdm=False)
    engine = llm.engine
    for i, p in enumerate([[3, 4, 5], [9, 8]]):
        engine.add_request(p, params, request_id=f"x{i}")
    last = {o.request_id: o for o in _drain(engine) if o.finished}
    assert [o.token_ids for o in a] == [last["x0"].token_ids, last["x1"].token_ids]
    assert params.output_kind is RequestOutputKind.CUMULATIVE  # generate did not change the caller's params


@pytest.mark.parametrize("kind", ["delta", 2, None, "FINAL"])
def test_bad_output_kind_is_named(kind):
    with pytest.raises(ConfigError, match="output_kind"):
        SamplingParams(output_kind=kind)


def test_load_sample_agrees_with_stats(llm):
    engine = llm.engine
    engine.add_request([5] * 40, SamplingParams(max_tokens=20), request_id="l")
    engine.step()
    load, stats = engine.load(), engine.stats()
    assert load == {k: stats[k] for k in load}
    assert set(load) >= {"num_running", "num_waiting", "num_preemptions", "kv_bytes_used", "kv_bytes_allocated"}
    assert load["kv_bytes_used"] > 0 and load["num_running"] == 1
    engine.abort("l")
    engine.step()
