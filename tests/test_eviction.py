"""Eviction strategies: identical to paged at full budget; h2o equal to an independent dense
mask-based H2O (token sets and logits); resident size and real memory freed; bad parameters."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from h2o_ref import DenseMaskedH2O
from hf_ref import make_tiny_checkpoint
import functools
import itertools
import os

from kvscope import LLM as _LLM
from kvscope import SamplingParams

# The same tests run on a GPU with KVSCOPE_TEST_DEVICE=cuda (the HF reference stays on the CPU).
DEVICE = os.environ.get("KVSCOPE_TEST_DEVICE", "cpu")
LLM = functools.partial(_LLM, device=DEVICE)
from kvscope.errors import ConfigError, RequestError
from kvscope.models.loader import load_model

EVICTING = ["h2o", "streaming", "tova", "snapkv", "knorm", "random"]
NEW = 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_checkpoint("llama", path)
    rng = random.Random(3)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (40, 23, 57)]
    return str(path), prompts


def greedy(n=NEW, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@pytest.mark.parametrize("name", EVICTING)
def test_full_budget_equals_paged(tiny, name):
    path, prompts = tiny
    ref = LLM(path, kv_memory_bytes=8 << 20).generate(prompts, greedy(), use_tqdm=False)
    llm = LLM(path, strategy=f"{name}:budget=4096", kv_memory_bytes=8 << 20)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert llm.engine.stats()["evicted_tokens"] == 0


def run_lockstep(path, prompts, budget, recent):
    """Engine (batched) and the dense reference (one per prompt) side by side, step by step."""
    # Lockstep needs each step's token from that step (async scheduling returns it one step later).
    llm = LLM(path, strategy=f"h2o:budget={budget},recent={recent}", kv_memory_bytes=8 << 20, async_scheduling=False)
    eng, kv = llm.engine, llm.engine.kv
    model = load_model(path).model
    scale = model.config.head_dim ** -0.5
    refs = {}
    for i, p in enumerate(prompts):
        eng.add_request(p, greedy(return_logits=True), request_id=str(i))
        refs[str(i)] = (DenseMaskedH2O(model.config.num_layers, budget, recent, scale), list(p))
    checked = 0
    while eng.has_unfinished_requests():
        live = {r.request_id: r for r in eng.scheduler.running}
        outs = eng.step()
        for out in outs:
            ref, tokens = refs[out.request_id]
            # Feed the reference what the engine just computed: the prompt, then one token per step.
            new = tokens if ref.k[0] is None else tokens[-1:]
            pos = torch.arange(len(tokens) - len(new), len(tokens))
            with torch.no_grad():
                hidden = model(torch.tensor(new), pos, ref)
                logits = model.compute_logits(hidden[-1:])[0]
            if len(tokens) > len(prompts[int(out.request_id)]):
                ref.evict(len(tokens))
            ours = out.outputs[0].logits[-1]
            assert torch.allclose(ours, logits.float(), atol=1e-4, rtol=0), (ours - logits).abs().max()
            tokens.append(out.token_ids[-1])
            assert int(logits.argmax()) == out.token_ids[-1]
            req = live.get(out.request_id)
            if req is not None and not out.finished:
                assert torch.equal(kv.resident_positions(req).cpu(), ref.kept_positions())
                checked += 1
    return checked


def test_h2o_matches_dense_masked_reference_batch1(tiny):
    path, prompts = tiny
    assert run_lockstep(path, prompts[:1], budget=16, recent=6) >= NEW - 2


def test_h2o_matches_dense_masked_reference_batched(tiny):
    path, prompts = tiny
    assert run_lockstep(path, prompts, budget=12, recent=4) >= 3 * (NEW - 2)


@pytest.mark.parametrize("name", EVICTING)
def test_resident_size_is_min_budget_length_every_step(tiny, name):
    path, prompts = tiny
    budget = 24
    spec = f"{name}:budget={budget}" + ("" if name == "snapkv" else ",compress_prompt=True")
    llm = LLM(path, strategy=spec, kv_memory_bytes=8 << 20, max_num_batched_tokens=16)
    eng, kv = llm.engine, llm.engine.kv
    for i, p in enumerate(prompts):
        eng.add_request(p, greedy(), request_id=str(i))
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        for req in eng.scheduler.running:
            n = req.num_computed_tokens
            pos = kv.resident_positions(req).cpu()
            expected = n if name == "snapkv" and n < req.num_prompt_tokens else min(budget, n)
            if name == "snapkv" and n > req.num_prompt_tokens:
                expected = min(budget, req.num_prompt_tokens) + n - req.num_prompt_tokens
            assert pos.shape[-1] == expected, (name, n, pos.shape)
            # Every head keeps the newest token, and nothing beyond what was computed.
            assert bool((pos[..., -1] == n - 1).all()) and int(pos.max()) < n
            assert kv.resident[req.request_id] * 1 <= len(kv.tables[req.request_id]) * kv.block_size
            steps += 1
    assert steps > 10
    s = eng.stats()
    assert s["freed_blocks"] > 0 and s["evicted_tokens"] > 0 and s["blocks_used"] == 0


def test_tova_keeps_same_tokens_across_heads_and_streaming_keeps_sinks(tiny):
    path, prompts = tiny
    for name, check in (("tova", "heads"), ("streaming", "sinks")):
        llm = LLM(path, strategy=f"{name}:budget=16", kv_memory_bytes=8 << 20)
        eng = llm.engine
        eng.add_request(prompts[0], greedy())
        for _ in range(5):
            eng.step()
        req = eng.scheduler.running[0]
        pos = eng.kv.resident_positions(req).cpu()
        if check == "heads":
            assert torch.equal(pos[:, :1].expand_as(pos), pos)
        else:
            n = req.num_computed_tokens
            expected = torch.tensor([0, 1, 2, 3] + list(range(n - 12, n)))
            assert torch.equal(pos, expected.expand_as(pos))


@pytest.mark.parametrize("prompt_len", [2, 30])
def test_streaming_keeps_sinks_and_window_every_step(tiny, prompt_len):
    """Sinks and the recent window, from the definition, after every decode step: through the prompt's
    one-off eviction and the one-token replacement of each decode step after it, also when the
    prompt is shorter than the sinks (decode tokens become sinks)."""
    path, prompts = tiny
    llm = LLM(path, strategy="streaming:budget=10,sinks=4", kv_memory_bytes=8 << 20)
    eng = llm.engine
    eng.add_request(prompts[2][:prompt_len], greedy(24))
    replaced = 0
    while eng.has_unfinished_requests():
        before = eng.kv.num_evictions
        eng.step()
        replaced += eng.kv.num_evictions - before
        for req in eng.scheduler.running:
            n = req.num_computed_tokens
            # The prompt stays whole until the first decode step (compress_prompt is off).
            keep = range(n) if n <= prompt_len else set(range(min(4, n))) | set(range(max(0, n - 6), n))
            expected = sorted(keep)
            pos = eng.kv.resident_positions(req).cpu()
            assert torch.equal(pos, torch.tensor(expected).expand_as(pos)), (n, pos[0, 0])
    assert replaced > 10


def test_h2o_ratio_budget_and_memory_gain(tiny):
    path, prompts = tiny
    llm = LLM(path, strategy="h2o", kv_memory_bytes=8 << 20)  # 10% heavy + 10% recent of the prompt
    eng = llm.engine
    eng.add_request(prompts[2], greedy())  # 57 tokens -> 5 heavy + 5 recent
    eng.step()
    eng.step()
    req = eng.scheduler.running[0]
    assert eng.kv.budgets[req.request_id].total == 10
    assert eng.kv.resident_positions(req).cpu().shape[-1] == 10
    assert len(eng.kv.tables[req.request_id]) == 1  # one 16-token block instead of four


@pytest.mark.parametrize(
    "spec, match",
    [
        ("h2o:heavy_ratio=0", "heavy_ratio must be in"),
        ("h2o:recent_ratio=1.5", "recent_ratio must be in"),
        ("h2o:heavy_ratio=0.7,recent_ratio=0.6", "must be <= 1"),
        ("h2o:budget=8,recent=16", "smaller than the recent window"),
        ("tova:budget_ratio=2", "budget_ratio must be in"),
        ("streaming:budget=4", "must exceed the 4 sink"),
        ("snapkv:kernel_size=4", "odd integer"),
        ("h2o:scorer=foo", "unknown argument"),
        ("heavyhitter", "unknown strategy"),
    ],
)
def test_bad_parameters(spec, match):
    from kvscope.kv import registry

    with pytest.raises(ConfigError, match=match):
        registry.create(spec)


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_eviction_under_preemption_and_mixed_batches(tiny, name):
    """A pool too small for the prompts' prefill forces preemption (recompute); every request still
    finishes, never holds more than its budget in decode, and all blocks come back."""
    path, prompts = tiny
    probe = LLM(path, strategy=f"{name}:budget=8", kv_memory_bytes=8 << 20)
    slot_bytes = probe.engine.kv.setup.kv_memory_bytes // probe.engine.kv.max_request_tokens()
    llm = LLM(path, strategy=f"{name}:budget=8", kv_memory_bytes=5 * 16 * slot_bytes, max_num_batched_tokens=64)
    eng, kv = llm.engine, llm.engine.kv
    rng = random.Random(0)
    many = [[rng.randrange(4, 256) for _ in range(rng.randrange(20, 60))] for _ in range(8)]
    for i, p in enumerate(many):
        eng.add_request(p, greedy(), request_id=str(i))
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        for req in eng.scheduler.running:
            if name == "h2o" and req.num_computed_tokens > req.num_prompt_tokens:
                assert kv.resident[req.request_id] <= 8
    assert sorted(done) == sorted(str(i) for i in range(8))
    assert all(len(o.token_ids) == NEW for o in done.values())
    s = eng.stats()
    assert s["num_preemptions"] > 0 and s["blocks_used"] == 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=4), st.integers(1, 8), st.integers(0, 2**31))
def test_one_over_budget_replacement_keeps_what_a_dense_ranking_keeps(budgets, recent, seed):
    """A batch of decode steps each one token over budget (the batched in-place path): per layer and
    KV head, exactly the lowest-scoring token outside the recent window is gone, the newest token
    sits in its slot with its K/V, score and position, and every other token stays where it was."""
    from kvscope.kv.registry import create
    from kvscope.config import EngineConfig
    from kvscope.engine.engine import LLMEngine
    from kvscope.engine.request import Request

    gen = torch.Generator().manual_seed(seed)
    loaded = load_model("dummy:tiny-llama")
    eng = LLMEngine(loaded, create(f"h2o:budget=64,recent={recent},block_size=4"),
                    EngineConfig(model="dummy:tiny-llama", kv_memory_bytes=4 << 20, max_model_len=256))
    kv = eng.kv
    kv.cache.kv.copy_(torch.randn(kv.cache.kv.shape, generator=gen))
    reqs, before = [], []
    for i, total in enumerate(budgets):
        total = max(total, recent)
        r = Request(f"r{i}", [1] * total, SamplingParams(max_tokens=4, ignore_eos=True))
        r.output_token_ids += [1, 1]
        assert kv.allocate(r, total + 1)
        kv.budgets[r.request_id] = kv.budgets[r.request_id].__class__(total, recent)
        kv.resident[r.request_id] = total + 1  # the step's token is in; one over budget
        r.num_computed_tokens = total + 1
        slots = kv._slots(kv.tables[r.request_id], total + 1)
        kv.positions[:, slots] = torch.arange(total + 1)[None, :, None]
        kv.scores[:, slots] = torch.rand(kv.scores[:, slots].shape, generator=gen)
        before.append((slots, kv.cache.kv[:, :, slots].clone(), kv.scores[:, slots].clone()))
        reqs.append(r)
    kv._replace_one(reqs)
    for r, (slots, kv_before, sc_before) in zip(reqs, before):
        total = kv.budgets[r.request_id].total
        assert kv.resident[r.request_id] == total
        L, _, H = sc_before.shape
        for layer in range(L):
            for h in range(H):
                scores = sc_before[layer, :, h].tolist()
                old = [t for t in range(total + 1) if t < r.num_computed_tokens - recent]
                victim = min(old, key=lambda t: (scores[t], t))
                kept = sorted(set(range(total + 1)) - {victim})
                now = kv.positions[layer, slots[:total], h].tolist()
                assert sorted(now) == kept
                newest = now.index(total) if total in now else None
                if victim < total:  # the newest token took the victim's slot
                    assert newest == victim
                    assert torch.equal(kv.cache.kv[layer, :, slots[victim], h], kv_before[layer, :, total, h])
                    assert kv.scores[layer, slots[victim], h] == sc_before[layer, total, h]
                for t in kept:  # the others did not move
                    if t != total:
                        assert now[t] == t
                        assert torch.equal(kv.cache.kv[layer, :, slots[t], h], kv_before[layer, :, t, h])


def test_which_policies_decode_from_captured_graphs():
    from kvscope.kv.registry import create

    kinds = {name: create(name).captured_decode for name in EVICTING}
    # h2o folds its statistic in the graph; snapkv decodes plainly (it compresses the prompt once and
    # evicts nothing in decode), and so does streaming (its scores are fixed when a token is written:
    # the eviction after the replay needs nothing from the step); the others need eager steps (scores
    # keyed on the new key, or a last-row statistic).
    assert kinds == {"h2o": "statistic", "snapkv": "plain", "streaming": "plain", "tova": None, "knorm": None,
                     "random": None}


@pytest.mark.parametrize("name", ["snapkv", "tova", "h2o"])
@pytest.mark.parametrize("chunks", [[23], [9, 14], [19, 4]], ids=["one", "window-split", "window-in-second"])
def test_prefill_scores_and_output_equal_dense_attention(name, chunks):
    """A prompt prefilled in ``chunks``: every row's output equals dense causal attention, and each
    policy's scores equal the statistic computed from the dense probabilities: SnapKV's window rows
    summed over the group's query heads, TOVA's newest row averaged over all heads (replacing each
    chunk), H2O's every row summed."""
    from kvscope.engine.request import Request
    from kvscope.kv.base import KVSetup, StepBatch
    from kvscope.kv.registry import create
    from kvscope.models.dummy import preset_config

    cfg = preset_config("tiny-llama")
    s = create(f"{name}:budget=1000,block_size=4" + (",window=6" if name == "snapkv" else ""))
    s.bind(KVSetup(cfg, torch.device("cpu"), torch.float32, 4 << 20, 64, 4, 0))
    n, hq, hkv, d = sum(chunks), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = torch.Generator().manual_seed(sum(chunks) * len(chunks))
    q, k, v = (torch.randn(cfg.num_layers, n, h, d, generator=g) for h in (hq, hkv, hkv))
    req = Request("r", [1] * n, SamplingParams(max_tokens=2, ignore_eos=True))
    expected = torch.zeros(cfg.num_layers, n, hkv, dtype=torch.float64)
    start = 0
    for c in chunks:
        assert s.allocate(req, start + c)
        pos = torch.arange(start, start + c)
        att = s.begin_step(StepBatch([req], [c], torch.ones(c, dtype=torch.long), pos, [0, c]))
        for layer in range(cfg.num_layers):
            out = att.attend(layer, q[layer, pos], k[layer, pos], v[layer, pos])
            kk, vv = k[layer, :start + c].double(), v[layer, :start + c].double()
            logits = torch.einsum("nhd,thd->hnt", q[layer, pos].double(),
                                  kk.repeat_interleave(hq // hkv, 1)) * d**-0.5
            logits = logits.masked_fill(torch.arange(start + c)[None, None, :] > pos[None, :, None], float("-inf"))
            probs = logits.softmax(-1)  # [Hq, c, T]
            ref = torch.einsum("hnt,thd->nhd", probs, vv.repeat_interleave(hq // hkv, 1))
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
            grouped = probs.view(hkv, hq // hkv, c, -1)
            if name == "snapkv":
                rows = pos >= n - 6
                expected[layer, :start + c] += grouped[:, :, rows].sum((1, 2)).T
            elif name == "tova":
                expected[layer] = 0
                expected[layer, :start + c] = probs[:, -1].mean(0)[:, None].expand(-1, hkv)
            else:
                expected[layer, :start + c] += grouped.sum((1, 2)).T
        req.num_computed_tokens = start + c
        s.end_step(StepBatch([req], [c], torch.ones(c, dtype=torch.long), pos, [0, c]))
        start += c
    slots = s._slots(s.tables["r"], n)
    torch.testing.assert_close(s.scores[:, slots].double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("name", ["snapkv", "tova", "h2o"])
@pytest.mark.parametrize("group_bytes", [1, 1 << 30], ids=["one-chunk-groups", "one-group"])
def test_batched_prefill_chunks_equal_dense_attention(name, group_bytes, device, monkeypatch):
    """Three requests prefilled in one step and finished in the next beside a decode row, the chunks
    batched into groups (eviction_prefill): every row's output and every slot's score equal dense
    causal attention per request, whether each chunk is its own group or all share one."""
    from kvscope.engine.request import Request
    from kvscope.kv import eviction_prefill
    from kvscope.kv.base import KVSetup, StepBatch
    from kvscope.kv.registry import create
    from kvscope.models.dummy import preset_config

    monkeypatch.setattr(eviction_prefill, "MAX_GROUP_BYTES", group_bytes)
    cfg = preset_config("tiny-llama")
    s = create(f"{name}:budget=1000,block_size=4" + (",window=6" if name == "snapkv" else ""))
    s.bind(KVSetup(cfg, torch.device(device), torch.float32, 4 << 20, 64, 4, 0))
    hq, hkv, d, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    lens = [23, 9, 14]
    steps = [[12, 9, 5], [11, 1, 9]]  # request 1 decodes in the second step
    g = torch.Generator().manual_seed(7)
    qkv = [tuple(torch.randn(L, n + 2, h, d, generator=g) for h in (hq, hkv, hkv)) for n in lens]
    reqs = [Request(f"r{i}", [1] * n, SamplingParams(max_tokens=2, ignore_eos=True)) for i, n in enumerate(lens)]
    expected = [torch.zeros(L, n + 2, hkv, dtype=torch.float64) for n in lens]
    done = [0, 0, 0]
    for chunk in steps:
        pos = [torch.arange(done[i], done[i] + c) for i, c in enumerate(chunk)]
        for r, c, dn in zip(reqs, chunk, done):
            assert s.allocate(r, dn + c)
        starts = [0, *itertools.accumulate(chunk)]
        batch = StepBatch(reqs, chunk, torch.ones(starts[-1], dtype=torch.long, device=device),
                          torch.cat(pos).to(device), starts)
        att = s.begin_step(batch)
        for layer in range(L):
            q, k, v = (torch.cat([qkv[i][part][layer, pos[i]] for i in range(3)]).to(device) for part in range(3))
            out = att.attend(layer, q, k, v).cpu()
            for i, c in enumerate(chunk):
                t = done[i] + c
                qi = qkv[i][0][layer, pos[i]].double()
                kk, vv = (x[layer, :t].double().repeat_interleave(hq // hkv, 1) for x in qkv[i][1:])
                logits = torch.einsum("nhd,thd->hnt", qi, kk) * d**-0.5
                probs = logits.masked_fill(torch.arange(t)[None, None, :] > pos[i][None, :, None],
                                           float("-inf")).softmax(-1)
                ref = torch.einsum("hnt,thd->nhd", probs, vv)
                torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), ref, rtol=1e-4, atol=1e-5)
                grouped = probs.view(hkv, hq // hkv, c, -1)
                decode = c == 1 and done[i] >= lens[i]
                if name == "snapkv" and not decode:
                    expected[i][layer, :t] += grouped[:, :, pos[i] >= lens[i] - 6].sum((1, 2)).T
                elif name == "tova":
                    expected[i][layer] = 0
                    expected[i][layer, :t] = probs[:, -1].mean(0)[:, None].expand(-1, hkv)
                elif name == "h2o":
                    expected[i][layer, :t] += grouped.sum((1, 2)).T
        for r, c in zip(reqs, chunk):
            r.num_computed_tokens += c
        s.end_step(batch)
        done = [dn + c for dn, c in zip(done, chunk)]
    for r, n, exp in zip(reqs, done, expected):
        slots = s._slots(s.tables[r.request_id], n)
        torch.testing.assert_close(s.scores[:, slots].double().cpu(), exp[:, :n], rtol=1e-4, atol=1e-6)


def _pool_llm(path, spec, blocks):
    """An engine whose pool holds exactly ``blocks`` 16-token blocks."""
    probe = LLM(path, strategy=spec, kv_memory_bytes=8 << 20).engine.kv
    slot_bytes = probe.bytes_per_token + probe.extra_slot_bytes(probe.setup.model)
    llm = LLM(path, strategy=spec, kv_memory_bytes=blocks * 16 * slot_bytes)
    assert llm.engine.kv.pool.num_blocks == blocks
    return llm


@pytest.mark.parametrize("name", ["h2o", "streaming", "tova", "knorm", "random"])
def test_prompt_filling_the_pool_is_served(tiny, name):
    """A prompt exactly the pool's size used to be admitted, then fail after its first token (its first
    decode token needs a slot beside the whole prompt). It is evicted to its budget just before that
    step, which is what compress_prompt does at the end of prefill: the same tokens, at any pool size."""
    path, _ = tiny
    prompt = [random.Random(5).randrange(4, 256) for _ in range(64)]
    llm = _pool_llm(path, name, 4)
    assert llm.engine.kv.max_request_tokens() == 64
    out = llm.generate([prompt], greedy(), use_tqdm=False)[0]
    ref = LLM(path, strategy=f"{name}:compress_prompt=true", kv_memory_bytes=8 << 20).generate(
        [prompt], greedy(), use_tqdm=False)[0]
    assert (out.finish_reason, out.error) == ("length", None)
    assert out.token_ids == ref.token_ids
    s = llm.engine.stats()
    assert s["blocks_used"] == 0 and s["evicted_tokens"] > 0


def test_prompt_filling_the_pool_without_room_to_evict_is_rejected_up_front(tiny):
    """Budgets that keep a pool-sized prompt whole leave no slot for its first decode token: such a
    prompt is refused in add_request (one token shorter is served); an absolute budget covering the
    pool evicts nothing, so the pool caps the sequence, as for paged."""
    path, _ = tiny
    keep_all = _pool_llm(path, "h2o:heavy_ratio=0.5,recent_ratio=0.5", 4)
    assert keep_all.engine.kv.max_request_tokens() == 63
    with pytest.raises(RequestError, match="prompt has 64 tokens but strategy 'h2o' serves prompts of at most 63"):
        keep_all.generate([[5] * 64], greedy(), use_tqdm=False)
    assert keep_all.generate([[5] * 63], greedy(), use_tqdm=False)[0].finish_reason == "length"
    for name in ("tova", "snapkv"):
        big = _pool_llm(path, f"{name}:budget=100", 4)
        outs = big.generate([[5] * 64, [6] * 50], greedy(), use_tqdm=False)
        got = [(o.finish_reason, o.error, len(o.token_ids)) for o in outs]
        assert got == [("length", None, 1), ("length", None, 14)]
        assert big.engine.stats()["blocks_used"] == 0
