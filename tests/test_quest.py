"""``quest``: equal to ``paged`` when its budget covers every page; page bounds against brute force
over the cache (after prefill, decode growth, free and reuse, fork, swap); selection against a
brute-force top-k; the bound really bounds ``q . k``; attention over the selected pages against
masked full attention (torch path here, the Triton path interpreted in a child process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope import LLM, SamplingParams
from kvscope.errors import ConfigError
from kvscope.kv import registry
from kvscope.kv.quest_attention import attend_selected, selected_lens
from kvscope.kv.quest_pages import PageSelection, page_scores
from kvscope.models.dummy import preset_config

PROMPTS = [[(7 * i + j) % 200 + 4 for j in range(40 + 29 * i)] for i in range(3)]


def greedy(n: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


# ---- whole engine ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["dummy:tiny-llama", "dummy:tiny-qwen2"])
@pytest.mark.parametrize("spec", ["quest:budget=100000", "quest:budget_ratio=1.0,page_size=4"])
def test_budget_of_every_page_equals_paged(model, spec):
    page = registry.create(spec).page_size
    ref = LLM(model, strategy=f"paged:block_size={page}", kv_memory_bytes=8 << 20)
    llm = LLM(model, strategy=spec, kv_memory_bytes=8 << 20, max_num_batched_tokens=50)  # chunked prefill too
    assert tokens(llm.generate(PROMPTS, greedy(24), use_tqdm=False)) == tokens(
        ref.generate(PROMPTS, greedy(24), use_tqdm=False))
    st_ = llm.engine.stats()
    assert st_["quest_pages_read"] == st_["quest_pages_held"] > 0


def test_small_budget_reads_fewer_pages_and_holds_every_token():
    llm = LLM("dummy:tiny-llama", strategy="quest:budget=16,page_size=4", kv_memory_bytes=8 << 20)
    outs = llm.generate(PROMPTS, greedy(8), use_tqdm=False)
    assert all(len(c) == 8 for c in tokens(outs))
    s = llm.engine.stats()
    # 16 tokens = 4 pages of 4 per decode row; the rows hold 11-28 pages.
    decode_rows = 3 * 7
    assert s["quest_pages_read"] == 4 * decode_rows and s["quest_pages_held"] > 2 * s["quest_pages_read"]
    assert s["blocks_used"] == 0


@pytest.mark.slow
def test_smollm2_budget_of_every_page_equals_paged(smollm2):
    tok = smollm2.tokenizer
    prompts = [tok.encode(p) for p in ("The capital of France is", "Once upon a time, in a small village by the sea,"
                                       " there lived an old fisherman who")]
    ref = LLM("smollm2-135m", strategy="paged", kv_memory_bytes=64 << 20)
    llm = LLM("smollm2-135m", strategy="quest:budget_ratio=1.0", kv_memory_bytes=64 << 20)
    assert tokens(llm.generate(prompts, greedy(24), use_tqdm=False)) == tokens(
        ref.generate(prompts, greedy(24), use_tqdm=False))


# ---- page bounds -----------------------------------------------------------------------------------
def assert_bounds_exact(kv) -> int:
    """Every held block's bounds equal min/max of its written keys, recomputed from the cache;
    returns the number of blocks checked."""
    bs, checked = kv.block_size, 0
    for rid, table in kv.tables.items():
        held = kv._reqs[rid].held
        for i, block in enumerate(table[: -(-held // bs)]):
            n = min(bs, held - i * bs)
            keys = kv.cache.kv[:, 0, block * bs : block * bs + n]  # [L, n, Hkv, D]
            assert torch.equal(kv.bounds.kmin[:, block], keys.amin(1)), (rid, i, n)
            assert torch.equal(kv.bounds.kmax[:, block], keys.amax(1)), (rid, i, n)
            checked += 1
    return checked


def run_checking(llm: LLM, prompts, params) -> tuple[int, set[int]]:
    """Serve ``prompts``, checking every held block's bounds after each step; returns the number of
    checks and the blocks the requests held."""
    eng, checked, blocks = llm.engine, 0, set()
    for p in prompts:
        eng.add_request(p, params)
    while eng.has_unfinished_requests():
        eng.step()
        checked += assert_bounds_exact(eng.kv)
        blocks.update(b for t in eng.kv.tables.values() for b in t)
    return checked, blocks


def test_bounds_after_prefill_decode_and_reuse():
    # 9- and 13-token prompts end in one-token pages; a 12-page pool forces freed blocks to be reused.
    bpt = preset_config("tiny-llama").kv_bytes_per_token(torch.float32)
    llm = LLM("dummy:tiny-llama", strategy="quest:budget=8,page_size=4,enable_prefix_caching=False",
              kv_memory_bytes=12 * (4 + 1) * bpt, max_num_batched_tokens=7)  # a page's bounds = one token
    assert llm.engine.kv.pool.num_blocks == 12
    checked, first = run_checking(llm, [[5 + j for j in range(9)], [100 + j for j in range(13)]], greedy(9))
    assert checked > 0
    checked, second = run_checking(llm, [[300 + 3 * j for j in range(21)], [50 + j for j in range(5)]], greedy(12))
    assert checked > 0 and first & second  # blocks freed by the first wave were reused


def test_bounds_survive_fork_and_swap():
    llm = LLM("dummy:tiny-llama", strategy="quest:budget=8,page_size=4", kv_memory_bytes=8 << 20)
    sp = SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True, n=3)
    assert run_checking(llm, [[9 + j for j in range(10)]], sp)[0] > 0
    assert llm.engine.stats()["cow_copies"] > 0
    bpt = llm.engine.kv.bytes_per_token
    tight = LLM("dummy:tiny-llama", strategy="quest:budget=8,page_size=4", kv_memory_bytes=20 * 5 * bpt,
                preemption_mode="swap")  # 80 tokens for three requests growing to 122
    prompts = [[(3 * i + j) % 90 + 4 for j in range(n)] for i, n in enumerate((20, 24, 18))]
    assert run_checking(tight, prompts, greedy(20))[0] > 0
    assert tight.engine.stats()["swapped_in_bytes"] > 0


# ---- selection -------------------------------------------------------------------------------------
def brute_select(scores: list[float], n: int, keep: int) -> list[int]:
    forced = sorted({0, n - 1})
    rest = sorted((p for p in range(n) if p not in forced), key=lambda p: (-scores[p], p))
    return sorted(forced + rest[: keep - len(forced)])


@st.composite
def selections(draw):
    b, h, p = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 12))
    n = [draw(st.integers(1, p)) for _ in range(b)]
    keep = [draw(st.integers(min(2, x), x)) for x in n]
    k = draw(st.integers(max(keep), p))  # a captured step's places: more than any row keeps
    # Many ties, -0.0 and 0.0 among them (equal, so the lower page wins).
    scores = draw(st.lists(st.sampled_from([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0, float("-inf")]),
                           min_size=b * h * p, max_size=b * h * p))
    return torch.tensor(scores, dtype=torch.float32).view(b, h, p), n, keep, k


@settings(max_examples=200, deadline=None)
@given(selections())
def test_selection_is_the_brute_force_top_k(case):
    scores, n, keep, k = case
    b, h, p = scores.shape
    got = PageSelection(torch.tensor(n), torch.tensor(keep), p, k).select(scores)
    assert got.shape == (b, h, k)
    for i in range(b):
        for j in range(h):
            row = got[i, j].tolist()
            assert row[: keep[i]] == brute_select(scores[i, j].tolist(), n[i], keep[i])
            assert row[keep[i]:] == [p] * (k - keep[i])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 16), st.integers(1, 4), st.sampled_from([1, 2, 4]),
       st.floats(0.01, 100.0))
def test_bound_bounds_every_key_of_the_page(seed, tokens_in_page, dim_exp, group, magnitude):
    gen = torch.Generator().manual_seed(seed)
    d = 2**dim_exp
    keys = torch.randn(1, tokens_in_page, 2, d, generator=gen) * magnitude  # [B, T, Hkv, D]
    q = torch.randn(1, 2 * group, d, generator=gen)
    got = page_scores(q, keys.amin(1, keepdim=True), keys.amax(1, keepdim=True))  # [1, Hkv, 1]
    qg, k64 = q.double().view(1, 2, group, d), keys.double()
    lo, hi = k64.amin(1), k64.amax(1)  # [1, Hkv, D]
    formula = torch.maximum(qg * lo[:, :, None], qg * hi[:, :, None]).sum(-1).amax(-1)  # [1, Hkv]
    true_max = torch.einsum("bhgd,bthd->bhgt", qg, k64).amax(-1).amax(-1)
    tol = 1e-5 * (q.abs().sum() * keys.abs().max()).item()
    assert torch.allclose(got[..., 0].double(), formula, atol=tol, rtol=0)
    assert (got[..., 0].double() >= true_max - tol).all()


# ---- attention over the selected pages ---------------------------------------------------------
def attention_case(seed: int, bs: int, ctx: list[int], hq: int, hkv: int, d: int):
    """A pool with shuffled blocks, each row's page table, and a selection from random scores."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-c // bs) for c in ctx]
    num_blocks = sum(pages) + 3
    k = torch.randn(num_blocks * bs, hkv, d, generator=gen)
    v = torch.randn(num_blocks * bs, hkv, d, generator=gen)
    q = torch.randn(len(ctx), hq, d, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(pages)
    tables, off = [], 0
    for n in pages:
        tables.append(perm[off : off + n] + [perm[-1]] * (width - n))
        off += n
    keep = [min(n, max(2, n // 2)) for n in pages]
    scores = torch.randn(len(ctx), hkv, width, generator=gen)
    sel = PageSelection(torch.tensor(pages), torch.tensor(keep), width, max(keep)).select(scores)
    last = [c - (n - 1) * bs for c, n in zip(ctx, pages)]
    return q, k, v, torch.tensor(tables), sel, torch.tensor(keep), torch.tensor(last)


def masked_reference(q, k, v, tables, sel, keep, ctx, bs, scale) -> torch.Tensor:
    """Float64 full attention over each row's whole context with the unselected pages masked."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        t = torch.arange(ctx[i])
        slots = tables[i][t // bs] * bs + t % bs
        for h in range(hkv):
            chosen = set(sel[i, h, : keep[i]].tolist())
            mask = torch.tensor([int(p) in chosen for p in (t // bs)])
            kk, vv = k[slots, h].double(), v[slots, h].double()
            for g in range(hq // hkv):
                qh = q[i, h * (hq // hkv) + g].double()
                logits = (kk @ qh * scale).masked_fill(~mask, float("-inf"))
                out[i, h * (hq // hkv) + g] = logits.softmax(0) @ vv
    return out


ATTN_CASES = [  # (seed, block size, contexts, Hq, Hkv, D)
    (0, 4, [1, 9, 30], 4, 2, 16),
    (1, 16, [17, 70, 33], 8, 2, 32),
    (2, 4, [40, 5], 4, 1, 16),
    (3, 16, [130], 2, 2, 32),
]


def _attention_errors(triton: bool) -> list[float]:
    errs = []
    for seed, bs, ctx, hq, hkv, d in ATTN_CASES:
        q, k, v, tables, sel, keep, last = attention_case(seed, bs, ctx, hq, hkv, d)
        got = attend_selected(q, k, v, tables, sel, selected_lens(keep, last, bs, hkv), d**-0.5, bs, triton=triton)
        ref = masked_reference(q, k, v, tables, sel, keep, ctx, bs, d**-0.5)
        errs.append(float((got.double() - ref).abs().max()))
    return errs


def test_attention_over_selected_pages_equals_masked_full_attention():
    assert max(_attention_errors(triton=False)) < 1e-5


def _child_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(_attention_errors(triton=True)))


def test_triton_path_interpreted_equals_masked_full_attention(triton_interpreter):
    here = Path(__file__)
    code = f"import sys; sys.path.insert(0, {str(here.parent)!r}); import {here.stem} as t; t._child_main()"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max(json.loads(proc.stdout.splitlines()[-1])) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_triton_engine_equals_torch_engine():
    kw = dict(kv_memory_bytes=64 << 20, device="cuda", dtype="float32")
    torch_ = LLM("dummy:tiny-llama", strategy="quest:budget=32,page_size=16", attention_backend="torch", **kw)
    triton = LLM("dummy:tiny-llama", strategy="quest:budget=32,page_size=16", attention_backend="triton", **kw)
    prompts = [[(5 * i + j) % 300 + 4 for j in range(100 + 57 * i)] for i in range(3)]
    assert tokens(triton.generate(prompts, greedy(32), use_tqdm=False)) == tokens(
        torch_.generate(prompts, greedy(32), use_tqdm=False))


# ---- facts and arguments ----------------------------------------------------------------------------
def test_facts_and_arguments():
    f = registry.facts("quest:budget_ratio=0.25")
    assert f.selects_per_step and not f.lossless and f.residence == "device" and f.kept_share == 0.25
    assert f.pool_independent and f.graph_decode and not f.long_child
    assert registry.kept_share("quest") == 0.2 and registry.kept_share("quest:budget=64") is None
    assert registry.kept_share("quest:budget=64", prompt_tokens=256) == 0.25
    assert registry.available()["quest"].args_for_share(0.3) == {"budget_ratio": 0.3}
    q = registry.create("quest:budget=40,page_size=8")
    assert [q.keep_pages(c) for c in (1, 9, 17, 100, 1000)] == [1, 2, 3, 5, 5]
    for bad, arg in (("budget=0", "budget"), ("budget_ratio=1.5", "budget_ratio"), ("page_size=0", "page_size"),
                     ("budget=8,budget_ratio=0.5", "either")):
        with pytest.raises(ConfigError, match=arg):
            registry.create(f"quest:{bad}")


# ---- advisor and report: through the facts ------------------------------------------------------
def test_cost_model_holds_everything_and_reads_the_selected_pages():
    from kvscope.advise import resolve_model
    from kvscope.advise.cost_model import CostModel
    from kvscope.advise.hardware import H100
    from kvscope.advise.options import option_from_spec

    quest, paged = option_from_spec("quest:budget_ratio=0.2"), option_from_spec("paged")
    assert quest.selects and not quest.evicts and not quest.on_host and quest.budget_ratio == 0.2
    cm = CostModel(resolve_model("llama-3-8b"), H100)
    # 4096 tokens = 256 pages; 20% = 819.2 tokens -> 52 pages = 832 tokens, plus 256 pages' bounds.
    assert cm.decode_traffic(quest, 4096, 4096) == (832 + 256, 0.0)
    assert cm.decode_traffic(quest, 20, 20) == (20 + 2, 0.0)  # 2 pages: both read, whatever the budget
    assert cm.decode_traffic(paged, 4096, 4096) == (4096, 0.0)
    # Memory: every token held, plus one token's worth of bounds per 16-token block.
    assert cm.pool_tokens(quest) == cm.kv_pool_bytes * 16 // (cm.kv_bytes_per_token * 17)
    assert cm.running_tokens(quest, _sim(4096)) == cm.running_tokens(paged, _sim(4096))
    # Time: less KV read per token of context; quest's decode steps replay CUDA graphs as paged's do
    # (graph_decode), so the same per-layer cost and the smaller read win at every point.
    step = cm.decode_step_seconds
    assert step(quest, 32, 65536) - step(quest, 32, 32768) < 0.3 * (step(paged, 32, 65536) - step(paged, 32, 32768))
    assert step(quest, 1, 4096) < step(paged, 1, 4096) and step(quest, 32, 32768) < step(paged, 32, 32768)


def _sim(prompt: int):
    from kvscope.advise.simulate import SimRequest

    return SimRequest(0.0, prompt, 8, computed=prompt, generated=4)


def test_report_places_it_by_what_it_reads_and_holds():
    from kvscope.report.names import display_name, held_fraction, kept_fraction

    assert kept_fraction("quest:budget_ratio=0.25") == 0.25 and display_name("quest:budget_ratio=0.25") == "quest 25%"
    assert held_fraction("quest:budget_ratio=0.25") == 1.0
    assert held_fraction("h2o:heavy_ratio=0.1,recent_ratio=0.1") == pytest.approx(0.2)
    assert held_fraction("system:vllm") is None
