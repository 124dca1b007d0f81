"""``quest``'s captured decode steps (``kv/quest_graphs.py``) against its eager steps, on the CPU:
the static steps run eagerly (``GraphRunner(capture=False)`` or by hand), torch path here, the
Triton path under Triton's interpreter in a child process.

* the device's pages-per-row equals the host's ``keep_pages`` at every context;
* one step, by hand: the same pages selected per row and KV head, the same output (float
  tolerance), the same cache and page bounds afterwards and the same counters, over rows of
  different lengths in a padded bucket, a last page of one token, budgets of the two-page minimum,
  part and all pages, grouped and plain heads, and a smaller batch after a larger one (the buckets
  share their buffers);
* whole engines: greedy tokens and logits of the static steps equal the eager engine's, and with
  every page selected equal ``paged``'s;
* the Triton scores kernel against the torch reference, and a Triton engine's static steps against
  its eager ones (interpreted).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvscope import LLM, SamplingParams
from kvscope.engine.cuda_graph import GraphRunner
from kvscope.kv import registry
from kvscope.kv.base import KVSetup, StepBatch
from kvscope.kv.quest_graphs import QuestGraphs
from kvscope.kv.quest_pages import PageSelection, page_scores
from kvscope.models.config import ModelConfig
from kvscope.request import Request
from kvscope.sampling_params import SamplingParams as Params

MAX_LEN = 256


@pytest.mark.parametrize("spec", ["quest:budget=16,page_size=4", "quest:budget=40,page_size=16", "quest:budget=4,page_size=4",
                                  "quest", "quest:budget_ratio=0.1,page_size=16", "quest:budget_ratio=0.3,page_size=4",
                                  "quest:budget_ratio=0.7,page_size=3", "quest:budget_ratio=1.0,page_size=16"])
def test_device_keep_equals_host_keep(spec):
    s = registry.create(spec)
    ctx = torch.arange(1, 5000)
    assert s.keep_pages_tensor(ctx.int()).tolist() == [s.keep_pages(c) for c in ctx.tolist()]


# ---- one step by hand --------------------------------------------------------------------------------
def bound_quest(spec: str, hq: int, hkv: int, d: int = 16, layers: int = 2):
    model = ModelConfig(arch="llama", vocab_size=8, hidden_size=hq * d, intermediate_size=8, num_layers=layers,
                        num_heads=hq, num_kv_heads=hkv, head_dim=d, max_position_embeddings=MAX_LEN)
    s = registry.create(spec)
    s.bind(KVSetup(model, torch.device("cpu"), torch.float32, 4 << 20, MAX_LEN, 4, 0, attention_backend="torch",
                   cuda_graph_sizes=[1, 2, 4]))
    return s


def decode_batch(s, contexts: list[int], gen: torch.Generator) -> StepBatch:
    """Requests holding ``context - 1`` tokens of random K/V (bounds exact), each decoding one."""
    reqs = []
    for i, c in enumerate(contexts):
        req = Request(request_id=f"r{i}-{c}", prompt_token_ids=[3] * c, params=Params(max_tokens=1))
        assert s.allocate(req, c)
        req.num_computed_tokens = c - 1
        reqs.append(req)
    kv = s.cache.kv
    kv.copy_(torch.randn(kv.shape, generator=gen))
    for req in reqs:
        s.bounds.recompute(s.cache, s.tables[req.request_id], req.num_computed_tokens)
    n = len(reqs)
    pos = torch.tensor([r.num_computed_tokens for r in reqs])
    return StepBatch(reqs, [1] * n, torch.full((n,), 3), pos, list(range(n + 1)))


def run_layers(attn, qkv: list[tuple[torch.Tensor, ...]], picked: list, monkeypatch) -> torch.Tensor:
    """Outputs ``[L, N, Hq, D]`` of ``attn`` layer by layer; every selection into ``picked``."""
    real = PageSelection.select

    def record(self, scores):
        out = real(self, scores)
        picked.append(out)
        return out

    monkeypatch.setattr(PageSelection, "select", record)
    out = torch.stack([attn.attend(layer, q, k, v) for layer, (q, k, v) in enumerate(qkv)])
    monkeypatch.setattr(PageSelection, "select", real)
    return out


def no_host_reads(monkeypatch) -> None:
    """Make every way of reading a tensor's value on the host raise: what a captured step must not
    do (on CUDA each is a sync, and a replay would reuse the value read at capture)."""
    def refuse(*args, **kw):
        raise AssertionError("a host read of device data in a static step")

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)


def state(s) -> list[torch.Tensor]:
    return [s.cache.kv.clone(), s.bounds.kmin.clone(), s.bounds.kmax.clone()]


STEP_CASES = [  # (spec, Hq, Hkv, batches of contexts: each one step, in order)
    ("quest:budget=16,page_size=4", 4, 2, [[30, 9, 61], [33, 5]]),  # 33: a last page of one token
    ("quest:budget=4,page_size=4", 4, 2, [[1, 17, 40, 100], [2]]),  # two pages, the least; one page held
    ("quest:budget_ratio=0.3,page_size=4", 8, 2, [[97, 12, 45], [250, 4]]),  # partial, G = 4
    ("quest:budget_ratio=1.0,page_size=16", 2, 2, [[70, 17, 33], [200]]),  # every page, no grouping
    ("quest:budget_ratio=0.2,page_size=16", 4, 1, [[255, 160, 16, 129]]),  # one KV head for all
]


@pytest.mark.parametrize("case", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_static_step_equals_eager_step(case, monkeypatch):
    spec, hq, hkv, batches = case
    gen = torch.Generator().manual_seed(len(spec) + hq)
    s = bound_quest(spec, hq, hkv)
    graphs = QuestGraphs(s, [1, 2, 4], MAX_LEN, torch.device("cpu"))
    assert graphs.width == MAX_LEN // s.page_size
    for contexts in batches:
        n = len(contexts)
        batch = decode_batch(s, contexts, gen)
        size = graphs.key(batch)
        # Random rows for the bucket; the first n are the requests', the rest padding.
        qkv = [(torch.randn(size, hq, 16, generator=gen), torch.randn(size, hkv, 16, generator=gen),
                torch.randn(size, hkv, 16, generator=gen)) for _ in range(2)]
        before = state(s)
        eager_sel: list = []
        counted = (s.pages_read, s.pages_held)
        eager = run_layers(s.begin_step(batch), [tuple(t[:n] for t in x) for x in qkv], eager_sel, monkeypatch)
        eager_state, eager_counts = state(s), (s.pages_read - counted[0], s.pages_held - counted[1])
        s.cache.kv.copy_(before[0])  # back to before the step
        s.bounds.kmin.copy_(before[1])
        s.bounds.kmax.copy_(before[2])
        static_sel: list = []
        step = graphs.step(size)
        counted = (s.pages_read, s.pages_held)
        step.load(batch)
        with monkeypatch.context() as m:
            no_host_reads(m)
            step.begin()
            static = run_layers(step.attention, qkv, static_sel, m)
        assert (s.pages_read - counted[0], s.pages_held - counted[1]) == eager_counts
        assert eager_counts[0] == sum(s.keep_pages(c) for c in contexts)
        torch.testing.assert_close(static[:, :n], eager, atol=1e-5, rtol=1e-5)
        for got, want in zip(state(s), eager_state):  # same K/V and bounds written, padding wrote nothing
            assert torch.equal(got, want)
        assert len(static_sel) == len(eager_sel) == 2
        for st, ea in zip(static_sel, eager_sel):
            assert st.shape == (size, hkv, s.keep_pages(MAX_LEN))  # fixed k
            for i, c in enumerate(contexts):
                keep = s.keep_pages(c)
                assert torch.equal(st[i, :, :keep], ea[i, :, :keep]), (c, st[i], ea[i])
                assert (st[i, :, keep:] == graphs.width).all()  # masked places
                assert ea[i, :, 0].eq(0).all() and ea[i, :, keep - 1].eq(-(-c // s.page_size) - 1).all()
        for req in batch.requests:
            s.free(req)


# ---- whole engines -------------------------------------------------------------------------------------
PROMPTS = [[(7 * i + j) % 200 + 4 for j in range(40 + 29 * i)] for i in range(3)]


def generate(spec: str, static: bool, model: str = "dummy:tiny-llama") -> tuple[list, int, dict]:
    llm = LLM(model, strategy=spec, kv_memory_bytes=8 << 20, max_model_len=MAX_LEN)
    e = llm.engine
    if static:
        e.runner.graphs = GraphRunner(e.model, QuestGraphs(e.kv, [1, 2, 4], MAX_LEN, e.config.torch_device),
                                      e.config.torch_device, capture=False)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True) for n in (6, 20, 13)]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [o.outputs[0] for o in outs], e.runner.graph_replays, e.stats()


@pytest.mark.parametrize("model", ["dummy:tiny-llama", "dummy:tiny-qwen2"])
@pytest.mark.parametrize("spec", ["quest:budget=16,page_size=4", "quest:budget_ratio=0.3,page_size=4"])
def test_engine_static_steps_equal_eager_steps(spec, model):
    eager, eager_replays, eager_stats = generate(spec, False, model)
    static, replays, stats = generate(spec, True, model)
    assert [o.token_ids for o in static] == [o.token_ids for o in eager]
    for a, b in zip(static, eager):
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-4, rtol=1e-4)
    # One prefill step, then every decode step static: 3 rows (bucket 4) x 5, 2 x 7, 1 x 7.
    assert eager_replays == 0 and replays == 19
    assert stats["quest_pages_read"] == eager_stats["quest_pages_read"] < stats["quest_pages_held"]
    assert stats["quest_pages_held"] == eager_stats["quest_pages_held"]
    assert stats["kv_bytes_used"] == 0


def test_engine_static_steps_of_every_page_equal_paged():
    ref = LLM("dummy:tiny-llama", strategy="paged:block_size=4", kv_memory_bytes=8 << 20, max_model_len=MAX_LEN)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 20, 13)]
    want = [o.outputs[0].token_ids for o in ref.generate(PROMPTS, params, use_tqdm=False)]
    static, replays, stats = generate("quest:budget_ratio=1.0,page_size=4", True)
    assert [o.token_ids for o in static] == want and replays == 19
    assert stats["quest_pages_read"] == stats["quest_pages_held"] > 0


def test_graphs_only_on_the_triton_backend():
    """The engine asks ``decode_graphs`` only on CUDA with graph sizes; quest answers on the Triton
    backend (the torch path's scores would gather the bucket's whole width), and says so in its facts."""
    for backend, captured in (("triton", True), ("torch", False)):
        s = bound_quest("quest", 4, 2)
        s.setup = KVSetup(**{**s.setup.__dict__, "attention_backend": backend})
        assert isinstance(s.decode_graphs(), QuestGraphs) == captured
    assert registry.facts("quest").graph_decode


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ["quest:budget=32,page_size=16", "quest:budget_ratio=0.3,page_size=4"])
def test_graphs_equal_eager_on_cuda(spec):
    """Decode steps replayed from CUDA graphs (batches padded to a bucket, rows finishing at
    different steps) give the eager steps' tokens and float32 logits."""
    prompts = [[(5 * i + j) % 300 + 4 for j in range(n)] for i, n in enumerate((5, 17, 100, 1, 180, 33))]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True)
              for n in (20, 7, 13, 20, 3, 11)]
    runs = {}
    for eager in (True, False):
        llm = LLM("dummy:tiny-llama", device="cuda", dtype="float32", strategy=spec, attention_backend="triton",
                  enforce_eager=eager, kv_memory_bytes=8 << 20, max_model_len=256, max_num_seqs=8)
        runs[eager] = llm.generate(prompts, params, use_tqdm=False)
        replays = llm.engine.stats()["cuda_graph_replays"]
        assert (replays == 0) if eager else (replays >= 19), replays
    assert [o.outputs[0].token_ids for o in runs[False]] == [o.outputs[0].token_ids for o in runs[True]]
    for a, b in zip(runs[False], runs[True]):
        x, y = torch.stack(a.outputs[0].logits), torch.stack(b.outputs[0].logits)
        assert torch.allclose(x, y, atol=1e-4, rtol=0), (x - y).abs().max()


# ---- Triton (interpreted) ------------------------------------------------------------------------------
def _scores_errors() -> list[float]:
    from kvscope.attention.triton_quest_scores import quest_page_scores

    errs = []
    gen = torch.Generator().manual_seed(0)
    for b, hq, hkv, d, width, blocks in [(3, 4, 2, 16, 37, 50), (2, 2, 2, 24, 8, 9), (1, 8, 1, 32, 70, 80)]:
        q = torch.randn(b, hq, d, generator=gen)
        keys = torch.randn(blocks, 3, hkv, d, generator=gen)
        kmin, kmax = keys.amin(1), keys.amax(1)
        tables = torch.randint(0, blocks, (b, width), generator=gen, dtype=torch.int32)
        n = torch.randint(1, width + 1, (b,), generator=gen, dtype=torch.int32)
        got = quest_page_scores(q, kmin, kmax, tables, n)
        want = page_scores(q, kmin[tables.long()], kmax[tables.long()])
        live = torch.arange(width)[None, None, :] < n[:, None, None]
        errs.append(float((got - want).abs().masked_fill(~live, 0).max()))
        # A page's score does not depend on the table's width: the first columns alone score alike.
        narrow = quest_page_scores(q, kmin, kmax, tables[:, :5].contiguous(), n.clamp(max=5))
        assert torch.equal(narrow.masked_fill(~live[..., :5], 0), got[..., :5].masked_fill(~live[..., :5], 0))
    return errs


_ENGINE_CHILD = r'''
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import test_quest_graphs as t
from kvscope import LLM, SamplingParams
from kvscope.engine.cuda_graph import GraphRunner
from kvscope.kv.quest_graphs import QuestGraphs

out = {"scores": t._scores_errors()}
params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True) for n in (3, 6, 4)]
prompts = [p[:30] for p in t.PROMPTS]
for spec in ("quest:budget=12,page_size=4", "quest:budget_ratio=1.0,page_size=4"):
    runs = []
    for static in (False, True):
        llm = LLM("dummy:tiny-llama", strategy=spec, kv_memory_bytes=4 << 20, max_model_len=64,
                  attention_backend="triton")
        e = llm.engine
        if static:
            e.runner.graphs = GraphRunner(e.model, QuestGraphs(e.kv, [1, 2, 4], 64, e.config.torch_device),
                                          e.config.torch_device, capture=False)
        runs.append((llm.generate(prompts, params, use_tqdm=False), e.runner.graph_replays))
    (eager, _), (static, replays) = runs
    diff = max(float((torch.stack(a.outputs[0].logits) - torch.stack(b.outputs[0].logits)).abs().max())
               for a, b in zip(static, eager))
    out[spec] = {"eager": [o.outputs[0].token_ids for o in eager], "static": [o.outputs[0].token_ids for o in static],
                 "replays": replays, "diff": diff}
print(json.dumps(out))
'''


def test_triton_static_steps_interpreted(triton_interpreter):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _ENGINE_CHILD, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(res["scores"]) < 1e-4, res["scores"]
    for spec in ("quest:budget=12,page_size=4", "quest:budget_ratio=1.0,page_size=4"):
        r = res[spec]
        assert r["static"] == r["eager"] and r["diff"] < 1e-4, r
        assert r["replays"] == 5  # after the prefill: 3 rows x 2 steps, 2 x 1, 1 x 2
