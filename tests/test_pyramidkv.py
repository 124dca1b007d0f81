"""``pyramidkv``: a flat pyramid is ``snapkv`` token for token with the same evictions; the per-layer
budgets (hand-checked, and as properties); the blocks a request holds follow the sum of its
budgets; what each layer keeps is SnapKV's top-scoring tokens by a dense brute-force reference,
stored intact, and decode over it equals dense attention over the kept tokens."""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_ref import make_tiny_checkpoint
from kvscope import LLM, SamplingParams
from kvscope.engine.request import Request
from kvscope.errors import ConfigError
from kvscope.kv import registry
from kvscope.kv.base import KVSetup, StepBatch
from kvscope.kv.eviction_layered_attention import kv_rows
from kvscope.kv.pyramidkv import pyramid_budgets
from kvscope.models.dummy import preset_config


def greedy(n: int = 16) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_checkpoint("llama", path)
    rng = random.Random(5)
    return str(path), [[rng.randrange(4, 256) for _ in range(n)] for n in (40, 23, 57, 31)]


def lockstep(path, prompts, specs, **engine):
    """Run ``specs`` side by side one step at a time; after every step, each running request's kept
    positions per layer and KV head (``[Hkv, n]`` each) and the stats. Returns the outputs."""
    llms = [LLM(path, strategy=s, kv_memory_bytes=8 << 20, **engine) for s in specs]
    for llm in llms:
        for i, p in enumerate(prompts):
            llm.engine.add_request(p, greedy(), request_id=str(i))
    done = [dict() for _ in llms]
    while llms[0].engine.has_unfinished_requests():
        kept = []
        for llm, out in zip(llms, done):
            for o in llm.engine.step():
                out[o.request_id] = o.token_ids
            kv = llm.engine.kv
            kept.append({r.request_id: [p.tolist() for p in kv.resident_positions(r)]
                         for r in llm.engine.scheduler.running if r.num_computed_tokens >= r.num_prompt_tokens})
        assert all(k == kept[0] for k in kept[1:])
        stats = [llm.engine.kv.stats() for llm in llms]
        for key in ("blocks_used", "kv_bytes_used", "evicted_tokens", "freed_blocks", "num_evictions"):
            assert len({s[key] for s in stats}) == 1, (key, stats)
    assert all(d == done[0] for d in done[1:])
    assert stats[0]["evicted_tokens"] > 0
    return done[0]


@pytest.mark.parametrize("engine", [{}, {"max_num_batched_tokens": 7, "max_num_seqs": 3}], ids=["batched", "chunked"])
def test_flat_pyramid_equals_snapkv_with_the_same_evictions(tiny, engine):
    path, prompts = tiny
    common = "budget_ratio=0.3,window=5,kernel_size=3,block_size=4"
    lockstep(path, prompts, [f"snapkv:{common}", f"pyramidkv:{common},beta=1"], **engine)


def test_flat_pyramid_equals_snapkv_on_the_dummy_model():
    rng = random.Random(9)
    prompts = [[rng.randrange(4, 500) for _ in range(n)] for n in (70, 45)]
    lockstep("dummy:tiny-llama", prompts, ["snapkv:budget_ratio=0.25", "pyramidkv:budget_ratio=0.25,beta=1"])


@pytest.mark.slow
def test_flat_pyramid_equals_snapkv_on_smollm2(smollm2):
    tok = smollm2.tokenizer
    text = ("The lighthouse keeper climbed the stairs every evening, counting the steps, checking the lamp, "
            "and writing the weather in a small notebook. One night the notebook was gone. ")
    prompts = [tok.encode(text * 2), tok.encode("Q: what did the keeper count? " + text)]
    specs = ["snapkv:budget_ratio=0.3,window=8", "pyramidkv:budget_ratio=0.3,window=8,beta=1"]
    outs = []
    for spec in specs:
        llm = LLM("smollm2-135m", strategy=spec, kv_memory_bytes=64 << 20)
        outs.append([o.token_ids for o in llm.generate(prompts, greedy(24), use_tqdm=False)])
        assert llm.engine.stats()["evicted_tokens"] > 0
    assert outs[0] == outs[1]


# ---- budgets ----------------------------------------------------------------------------------------
def test_budgets_by_hand():
    # h = 40 - 8 = 32: top 32/3 = 10.67, bottom 64 - 10.67 = 53.33, step 14.22:
    # 53.33, 39.11, 24.89, 10.67 -> floors 53, 39, 24, 10 (126 of 128) -> the two lowest round up.
    assert pyramid_budgets(40, 8, 100, 4, 3) == [62, 48, 32, 18]
    # h = 46: bottom 92 - 23 = 69 exceeds 60 - 4 = 56, so 56 and top 92 - 56 = 36; step 10.
    assert pyramid_budgets(50, 4, 60, 3, 2) == [60, 50, 40]
    assert pyramid_budgets(24, 4, 57, 2, 3) == [38, 10]  # 33.33, 6.67 -> 33 + 6 = 39 of 40
    assert pyramid_budgets(30, 6, 90, 5, 1) == [30] * 5  # beta 1: flat
    assert pyramid_budgets(90, 6, 90, 5, 20) == [90] * 5  # the whole prompt: nothing to evict


@settings(max_examples=300, deadline=None)
@given(layers=st.integers(1, 80), prompt=st.integers(2, 100_000), ratio=st.floats(0.01, 1.0),
       window=st.integers(1, 128), beta=st.floats(1.0, 1000.0))
def test_budgets_are_a_pyramid_that_sums_to_the_total(layers, prompt, ratio, window, beta):
    total = max(1, int(ratio * prompt))
    window = min(window, total)
    b = pyramid_budgets(total, window, prompt, layers, beta)
    assert len(b) == layers and sum(b) == layers * total
    assert all(x >= y for x, y in zip(b, b[1:])) and min(b) >= window
    if total < prompt:
        assert b[0] <= prompt


@pytest.mark.parametrize("spec, match", [
    ("pyramidkv:beta=0.5", "beta"), ("pyramidkv:beta=true", "beta"), ("pyramidkv:window=0", "window"),
    ("pyramidkv:kernel_size=4", "kernel_size"), ("pyramidkv:pooling='min'", "pooling"),
    ("pyramidkv:budget_ratio=1.5", "budget_ratio"), ("pyramidkv:budget=8,budget_ratio=0.2", "either"),
])
def test_bad_parameters(spec, match):
    with pytest.raises(ConfigError, match=match):
        registry.create(spec)


def test_facts():
    f = registry.facts("pyramidkv:budget_ratio=0.3")
    assert f.kept_share == 0.3 and not f.lossless and f.pool_independent and f.long_child and not f.graph_decode
    assert registry.available()["pyramidkv"].args_for_share(0.4) == {"budget_ratio": 0.4}
    assert "pyramidkv" in registry.long_children()


# ---- memory -----------------------------------------------------------------------------------------
def test_blocks_after_prefill_follow_the_sum_of_the_layer_budgets():
    # tiny-llama: 2 layers. Prompt 57, budget 24, window 4, beta 3: layers keep 38 and 10 (above).
    prompt = [(5 * j) % 400 + 4 for j in range(57)]
    held = {}
    for spec in ("pyramidkv:budget=24,window=4,beta=3,block_size=4", "snapkv:budget=24,window=4,block_size=4"):
        llm = LLM("dummy:tiny-llama", strategy=spec, kv_memory_bytes=8 << 20)
        llm.engine.add_request(prompt, greedy(4), request_id="r")
        llm.engine.step()  # the whole prompt, compressed at the step's end
        held[spec.partition(":")[0]] = llm.engine.kv.stats()
        bpt = llm.engine.kv.bytes_per_token
    # pyramidkv: ceil(38/4) + ceil(10/4) = 10 + 3 = 13 layer-blocks -> ceil(13 / 2) = 7 blocks;
    # snapkv: ceil(24/4) = 6 blocks; the prompt took ceil(57/4) = 15.
    assert held["pyramidkv"]["blocks_used"] == 7 and held["snapkv"]["blocks_used"] == 6
    assert held["pyramidkv"]["freed_blocks"] == 15 - 7
    assert held["pyramidkv"]["layer_blocks_used"] == 13
    assert held["pyramidkv"]["kv_bytes_used"] == (38 + 10) * bpt // 2 == held["snapkv"]["kv_bytes_used"]
    assert held["pyramidkv"]["evicted_tokens"] == (57 - 38 + 57 - 10) * 2  # per KV head


def deep_setup(layers: int, blocks: int, bs: int) -> KVSetup:
    cfg = dataclasses.replace(preset_config("tiny-llama"), num_layers=layers)
    slot = cfg.kv_bytes_per_token(torch.float32) + cfg.num_layers * cfg.num_kv_heads * 12
    return KVSetup(cfg, torch.device("cpu"), torch.float32, blocks * bs * slot, 256, 4, 0)


def brute_snapkv_scores(q, k, window, kernel):
    """SnapKV's score of one layer, densely: ``q`` ``[n, Hq, D]``, ``k`` ``[n, Hkv, D]`` -> ``[n, Hkv]``
    float64: the last ``window`` rows' causal attention summed over rows and each group's heads,
    then each token takes the max over its ``kernel`` neighbours."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    logits = torch.einsum("nhd,thd->hnt", q.double(), k.double().repeat_interleave(hq // hkv, 1)) * d**-0.5
    logits = logits.masked_fill(torch.arange(n)[None, None, :] > torch.arange(n)[None, :, None], float("-inf"))
    votes = logits.softmax(-1)[:, n - window:].sum(1).view(hkv, hq // hkv, n).sum(1).T  # [n, Hkv]
    half = kernel // 2
    return torch.stack([votes[max(0, t - half): t + half + 1].max(0).values for t in range(n)])


@pytest.mark.parametrize("chunks", [[100], [61, 39]], ids=["one", "chunked"])
def test_each_layer_keeps_snapkv_top_tokens_intact_and_decodes_over_them(chunks):
    L, bs, n, total, window, beta = 4, 4, sum(chunks), 40, 8, 3.0
    s = registry.create(f"pyramidkv:budget={total},window={window},kernel_size=3,beta={beta},block_size={bs}")
    s.bind(deep_setup(L, 64, bs))
    cfg = s.setup.model
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    steps = 3
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(L, n + steps, h, d, generator=g) for h in (hq, hkv, hkv))
    req = Request("r", [1] * n, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    start = 0
    for c in chunks:
        assert s.allocate(req, start + c)
        pos = torch.arange(start, start + c)
        batch = StepBatch([req], [c], torch.ones(c, dtype=torch.long), pos, [0, c])
        att = s.begin_step(batch)
        for layer in range(L):
            att.attend(layer, q[layer, pos], k[layer, pos], v[layer, pos])
        req.num_computed_tokens = start + c
        s.end_step(batch)
        start += c
    budgets = [62, 48, 32, 18]  # test_budgets_by_hand
    assert s.layer_resident["r"] == budgets
    # 16 + 12 + 8 + 5 = 41 layer-blocks -> 11 of the prompt's 25 blocks.
    assert len(s.tables["r"]) == 11 and s.stats()["blocks_used"] == 11
    kept = s.resident_positions(req)
    kvf = s.cache.kv.view(-1, hkv, d)
    for layer in range(L):
        ref = brute_snapkv_scores(q[layer, :n], k[layer, :n], window, 3)
        ref[n - window:] = float("inf")  # the window is always kept
        for h in range(hkv):
            got = kept[layer][h]
            assert got.numel() == budgets[layer] and set(range(n - window, n)) <= set(got.tolist())
            # The kept scores are the top ones (ties at the cut may go either way).
            torch.testing.assert_close(ref[got, h].sort().values, ref[:, h].topk(budgets[layer]).values.sort().values)
        # Stored intact, wherever the layer's layer-blocks now are.
        u = s._slots(s.layer_tables["r"][layer], budgets[layer])
        order = s.positions.view(-1, hkv)[u]  # [n_l, Hkv] position of each slot
        rows = kv_rows(u, s.cache.num_slots)
        for h in range(hkv):
            assert torch.equal(kvf[rows, h], k[layer, order[:, h], h])
            assert torch.equal(kvf[rows + s.cache.num_slots, h], v[layer, order[:, h], h])
    # Decode: each layer attends over its kept tokens plus the new ones, nothing else.
    for t in range(n, n + steps):
        assert s.allocate(req, t + 1)
        pos = torch.tensor([t])
        batch = StepBatch([req], [1], torch.ones(1, dtype=torch.long), pos, [0, 1])
        att = s.begin_step(batch)
        for layer in range(L):
            out = att.attend(layer, q[layer, pos], k[layer, pos], v[layer, pos])
            for h in range(hq):
                kh = h // (hq // hkv)
                visible = torch.cat([kept[layer][kh], torch.arange(n, t + 1)])
                p = ((k[layer, visible, kh].double() @ q[layer, t, h].double()) * d**-0.5).softmax(0)
                torch.testing.assert_close(out[0, h].double(), p @ v[layer, visible, kh].double(),
                                           rtol=1e-4, atol=1e-5)
        req.num_computed_tokens = t + 1
        s.end_step(batch)
    assert s.layer_resident["r"] == [b + steps for b in budgets]
    need = sum(math.ceil((b + steps) / bs) for b in budgets)  # 17 + 13 + 9 + 6 = 45 layer-blocks
    assert len(s.tables["r"]) == math.ceil(need / L) == 12
    s.free(req)
    assert s.pool.num_free == s.pool.num_blocks


def test_serves_as_adaptive_long_child():
    prompts = [[(7 * i + j) % 200 + 4 for j in range(40 + 9 * i)] for i in range(3)]
    llm = LLM("dummy:tiny-llama", kv_memory_bytes=8 << 20,
              strategy="adaptive:long=pyramidkv,long_budget_ratio=0.5,long_threshold=62,block_size=4")
    outs = llm.generate(prompts, greedy(12), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    st = llm.engine.stats()
    assert st["adaptive_long"] == "pyramidkv" and st["adaptive_admitted_long_length"] == 1
    assert st["num_evictions"] == 1 and st["blocks_used"] == 0
