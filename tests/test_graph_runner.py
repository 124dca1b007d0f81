"""The two sides of the strategy contract, and the engine's graph runner on CPU.

The scheduler is driven by a KV manager that holds no tensors (exact admission and preemption);
the graph runner runs strategies' static decode steps eagerly (``capture=False``), with padded
buckets, and must give the tokens of the eager steps: ``infinigen``'s steps in-process (torch path),
the block-table steps of ``paged``, ``contiguous`` and ``h2o`` through Triton's interpreter in a
child process (see tests/test_triton_decode.py for why a child).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvscope import LLM, SamplingParams
from kvscope.engine.cuda_graph import GraphRunner
from kvscope.engine.scheduler import Scheduler
from kvscope.kv.manager import KVManager
from kvscope.request import Request, RequestStatus
from kvscope.sampling_params import SamplingParams as Params


class TokenBudget(KVManager):
    """A manager with no tensors: ``capacity`` tokens, counted per request."""

    name = "token-budget"

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: dict[str, int] = {}

    def max_request_tokens(self) -> int:
        return self.capacity

    def allocate(self, request: Request, num_tokens: int) -> bool:
        others = sum(v for k, v in self.held.items() if k != request.request_id)
        if others + num_tokens > self.capacity:
            return False
        self.held[request.request_id] = max(num_tokens, self.held.get(request.request_id, 0))
        return True

    def free(self, request: Request) -> None:
        self.held.pop(request.request_id, None)

    def stats(self) -> dict[str, Any]:
        used = sum(self.held.values())
        return {"kv_bytes_used": used, "kv_bytes_allocated": used}


def _req(rid: str, n: int) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(range(1, n + 1)), params=Params(max_tokens=4))


def test_scheduler_runs_on_a_manager_without_tensors():
    kv = TokenBudget(capacity=10)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16)
    a, b = _req("a", 4), _req("b", 5)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [r.request_id for r in out.requests] == ["a", "b"] and out.num_new_tokens == [4, 5]
    assert kv.held == {"a": 4, "b": 5}
    for req in out.requests:  # as the engine does after a step: computed, one token sampled
        req.num_computed_tokens += 4 if req is a else 5
        req.output_token_ids.append(7)
    a.output_token_ids.append(7)  # a grows by two, b by one: 6 + 6 > 10, so b (admitted last) yields
    a.num_computed_tokens += 1
    out = sched.schedule()
    assert [r.request_id for r in out.requests] == ["a"] and [r.request_id for r in out.preempted] == ["b"]
    assert kv.held == {"a": 6} and b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert kv.usage().kv_bytes_used == 6


def test_infinigen_static_steps_equal_eager_steps(tmp_path):
    from hf_ref import make_tiny_checkpoint
    from kvscope.kv.host_decode import HostGraphs

    path = tmp_path / "llama"
    make_tiny_checkpoint("llama", path)
    prompts = [[5 + i for i in range(n)] for n in (40, 23, 57)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    spec = "infinigen:calibration=random,calibration_len=64,budget_ratio=0.5"
    eager = LLM(str(path), strategy=spec, kv_memory_bytes=4 << 20, max_model_len=256)
    expected = [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    static = LLM(str(path), strategy=spec, kv_memory_bytes=4 << 20, max_model_len=256)
    engine = static.engine
    engine.runner.graphs = GraphRunner(engine.model, HostGraphs(engine.kv, [1, 2, 4]), engine.config.torch_device,
                                       capture=False)
    got = [o.token_ids for o in static.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    # Three rows run in bucket 4 (one padding row), then 2 and 1 as requests finish together.
    assert engine.runner.graph_replays >= 11
    assert engine.kv.stats()["kv_bytes_used"] == 0


def test_offload_static_steps_equal_eager_steps_and_paged(tmp_path):
    """``offload``'s decode steps on the static ``(batch, context)`` buckets give the tokens and logits
    of its eager steps and of ``paged``: three rows of unequal contexts in bucket 4 (one padding
    row), then 2 and 1 as requests finish, the longest crossing context bucket 256 -> 384."""
    import torch

    from hf_ref import make_tiny_checkpoint
    from kvscope.kv.host_decode import HostGraphs

    path = tmp_path / "llama"
    make_tiny_checkpoint("llama", path)
    prompts = [[5 + i % 200 for i in range(n)] for n in (252, 23, 57)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True) for n in (12, 4, 8)]
    kw = {"kv_memory_bytes": 4 << 20, "max_model_len": 320}

    def run(spec: str, static: bool):
        llm = LLM(str(path), strategy=spec, **kw)
        engine = llm.engine
        if static:
            engine.runner.graphs = GraphRunner(engine.model, HostGraphs(engine.kv, [1, 2, 4]),
                                               engine.config.torch_device, capture=False)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.token_ids for o in outs], [torch.stack(o.outputs[0].logits) for o in outs], engine

    paged_ids, paged_logits, _ = run("paged", False)
    eager_ids, eager_logits, _ = run("offload", False)
    ids, logits, engine = run("offload", True)
    assert ids == eager_ids == paged_ids and [len(t) for t in ids] == [12, 4, 8]
    for got, eager, paged in zip(logits, eager_logits, paged_logits):
        assert torch.allclose(got, eager, atol=1e-5, rtol=0), (got - eager).abs().max()
        assert torch.allclose(got, paged, atol=1e-4, rtol=0), (got - paged).abs().max()
    # Every decode step after the prefill: 3 rows x 3 steps, 2 x 4, 1 x 4; the 252-token prompt holds
    # 256 earlier tokens at its 5th decode step, 257 (bucket 384) at its 6th.
    assert engine.runner.graph_replays == 11
    assert set(engine.runner.graphs._steps) == {(4, 256), (2, 256), (2, 384), (1, 384)}
    assert engine.kv.stats()["kv_bytes_used"] == 0


_CHILD = r'''
import json, sys
from hf_ref import make_tiny_checkpoint
from kvscope import LLM, SamplingParams
from kvscope.engine.cuda_graph import GraphRunner
from kvscope.kv.block_table_graphs import BlockTableGraphs

path = sys.argv[1]
make_tiny_checkpoint("llama", path)
prompts = [[5 + i for i in range(n)] for n in (40, 23, 57)]
params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
out = {}
for spec in ("paged", "contiguous", "h2o:heavy_ratio=0.25,recent_ratio=0.25"):
    kw = dict(strategy=spec, kv_memory_bytes=4 << 20, max_model_len=128, attention_backend="triton")
    eager = [o.token_ids for o in LLM(path, **kw).generate(prompts, params, use_tqdm=False)]
    llm = LLM(path, **kw)
    e = llm.engine
    e.runner.graphs = GraphRunner(e.model, BlockTableGraphs(e.kv, [1, 2, 4], 128, e.config.torch_device),
                                  e.config.torch_device, capture=False)
    static = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    out[spec] = {"eager": eager, "static": static, "replays": e.runner.graph_replays}
print(json.dumps(out))
'''


def _interpreted_child(script: str, tmp_path_factory) -> dict:
    """The JSON that ``script`` prints last, run in a child process under the Triton interpreter
    with a fresh tiny checkpoint folder as its argument."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    proc = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def block_table_results(tmp_path_factory, triton_interpreter) -> dict:
    return _interpreted_child(_CHILD, tmp_path_factory)


@pytest.mark.parametrize("spec", ["paged", "contiguous", "h2o:heavy_ratio=0.25,recent_ratio=0.25"])
def test_block_table_static_steps_equal_eager_steps(block_table_results, spec):
    res = block_table_results[spec]
    assert res["static"] == res["eager"]
    assert res["replays"] >= 5  # every decode step after the prefill


_QUANT_CHILD = r'''
import json, sys
import torch
from hf_ref import make_tiny_checkpoint
from kvscope import LLM, SamplingParams
from kvscope.attention import decode_splits
from kvscope.engine.cuda_graph import GraphRunner
from kvscope.kv.block_table_graphs import BlockTableGraphs

# Split these short contexts as long ones split on a GPU: eager steps then choose their split count
# from the step's widest table, static steps from max_model_len, so the two paths differ.
decode_splits._PROGRAMS_PER_SM, decode_splits._MIN_SPLIT_TOKENS = 64, 16
path = sys.argv[1]
make_tiny_checkpoint("llama", path)
prompts = [[5 + i for i in range(n)] for n in (40, 23, 57)]
params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True) for n in (4, 10, 7)]
out = {}
for spec in ("quant:dtype=fp8", "quant:dtype=fp8,scale=head"):
    kw = dict(strategy=spec, kv_memory_bytes=4 << 20, max_model_len=128, attention_backend="triton")
    eager_llm = LLM(path, **kw)
    eager = eager_llm.generate(prompts, params, use_tqdm=False)
    llm = LLM(path, **kw)
    e = llm.engine
    graphs = BlockTableGraphs(e.kv, [1, 2, 4], 128, e.config.torch_device)
    buckets, load = [], graphs.load
    def record(batch, size, load=load, buckets=buckets):
        buckets.append([len(batch.requests), size])
        load(batch, size)
    graphs.load = record
    e.runner.graphs = GraphRunner(e.model, graphs, e.config.torch_device, capture=False)
    static = llm.generate(prompts, params, use_tqdm=False)
    rel = max(((torch.stack(a.outputs[0].logits) - torch.stack(b.outputs[0].logits)).abs().max()
               / torch.stack(b.outputs[0].logits).abs().max()).item() for a, b in zip(static, eager))
    out[spec] = {"eager": [o.token_ids for o in eager], "static": [o.token_ids for o in static],
                 "dtype": str(eager[0].outputs[0].logits[0].dtype), "rel": rel, "buckets": buckets,
                 "replays": e.runner.graph_replays,
                 "splits": {s: step.attention.num_splits for s, (step, _) in e.runner.graphs._steps.items()},
                 "same_cache": torch.equal(eager_llm.engine.kv.cache.data, e.kv.cache.data)
                 and torch.equal(eager_llm.engine.kv.cache.scale, e.kv.cache.scale)}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def quant_results(tmp_path_factory, triton_interpreter) -> dict:
    return _interpreted_child(_QUANT_CHILD, tmp_path_factory)


@pytest.mark.parametrize("spec", ["quant:dtype=fp8", "quant:dtype=fp8,scale=head"])
def test_quant_fp8_static_steps_equal_eager_steps(quant_results, spec):
    """fp8 decode steps on the static buffers (new tokens encoded at the stored scales, written by
    slot, padding skipped) give the eager steps' tokens, float32 logits and cache bytes, with three
    rows in bucket 4, then two and one as requests of different lengths finish."""
    res = quant_results[spec]
    assert res["static"] == res["eager"] and [len(t) for t in res["eager"]] == [4, 10, 7]
    assert res["dtype"] == "torch.float32" and res["rel"] < 1e-5, res["rel"]
    assert res["same_cache"]  # same codes at the same slots, same calibrated scales
    # One prefill step, then every decode step on a static step: 3 rows x 3, 2 x 3, 1 x 3.
    assert res["buckets"] == [[3, 4]] * 3 + [[2, 2]] * 3 + [[1, 1]] * 3 and res["replays"] == 9
    assert res["splits"]["4"] > 1  # the bucket's split count, fixed from max_model_len
