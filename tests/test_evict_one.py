"""A decode step's one-token eviction (``kv/evict_one.py``): the torch path against a loop over
every (layer, request, head) written from the definition, and the fused Triton kernel against the
torch path, exactly (through the interpreter on CPU, in a child process; compiled on a GPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvscope.kv.evict_one import replace_one_torch

CASE = r'''
def make_case(seed, L=3, H=3, D=24, bs=4, n=3, ties=True):
    """Cache state for ``n`` requests over random blocks: held lengths not multiples of ``bs``,
    recent windows of several widths, integer scores (ties) when ``ties``."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 40
    S = num_blocks * bs
    kv = torch.randn(L, 2, S, H, D, generator=g)
    scores = (torch.randint(0, 4, (L, S, H), generator=g).float() if ties else torch.rand(L, S, H, generator=g))
    positions = torch.randint(0, 50, (L, S, H), generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    held = [int(x) for x in torch.randint(2, 9 * bs, (n,), generator=g)]
    tables, used = [], 0
    for h_ in held:
        nb = -(-h_ // bs)
        tables.append(perm[used : used + nb])
        used += nb
    most = max(len(t) for t in tables)
    recent = [int(x) for x in torch.randint(0, 50, (n,), generator=g)]
    packed = torch.tensor([t + t[-1:] * (most - len(t)) + [h_, r] for t, h_, r in zip(tables, held, recent)])
    return kv, scores, positions, packed[:, :most], packed[:, most], packed[:, most + 1], bs
'''
exec(CASE)


def reference(kv, scores, positions, tables, held, recent, bs):
    """From the definition: per layer, request and head, the first lowest score among held tokens
    whose position precedes the recent window (the first token when none does) takes the newest."""
    kv, scores, positions = kv.clone(), scores.clone(), positions.clone()
    L, _, _, H, _ = kv.shape
    for i in range(tables.shape[0]):
        slots = [int(tables[i, j // bs]) * bs + j % bs for j in range(int(held[i]))]
        last = slots[-1]
        for layer in range(L):
            for h in range(H):
                cands = [j for j, s in enumerate(slots) if positions[layer, s, h] < recent[i]]
                best = min(cands, key=lambda j: (float(scores[layer, slots[j], h]), j)) if cands else 0
                dst = slots[best]
                kv[layer, :, dst, h] = kv[layer, :, last, h]
                scores[layer, dst, h] = scores[layer, last, h]
                positions[layer, dst, h] = positions[layer, last, h]
    return kv, scores, positions


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.booleans())
def test_torch_path_follows_the_definition(seed, ties):
    case = make_case(seed, ties=ties)  # noqa: F821 (defined by exec above, shared with the child)
    want = reference(*case)
    kv, scores, positions = case[0].clone(), case[1].clone(), case[2].clone()
    replace_one_torch(kv, scores, positions, *case[3:])
    assert torch.equal(kv, want[0]) and torch.equal(scores, want[1]) and torch.equal(positions, want[2])


CHILD = CASE + r'''
from kvscope.kv.evict_one import replace_one_torch, replace_one_triton
for seed in range(12):
    for ties in (True, False):
        for block_t in (8, 128):  # several tiles per row (ties across tiles), and one
            case = make_case(seed, ties=ties)
            a = [t.clone() for t in case[:3]]
            b = [t.clone() for t in case[:3]]
            replace_one_torch(*a, *case[3:])
            replace_one_triton(*b, *case[3:], block_t=block_t)
            for x, y, name in zip(a, b, ("kv", "scores", "positions")):
                assert torch.equal(x, y), (seed, ties, block_t, name)
print("ok")
'''


def test_triton_kernel_equals_the_torch_path_in_interpreter(triton_interpreter):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", "import torch\n" + CHILD], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_equals_the_torch_path_on_cuda(dtype):
    from kvscope.kv.evict_one import replace_one_triton

    for seed in range(8):
        case = make_case(seed, L=4, H=8, D=128, bs=16, n=5)  # noqa: F821
        state = [case[0].to(dtype).cuda(), case[1].cuda(), case[2].cuda()]
        rest = [t.cuda() for t in case[3:6]] + [case[6]]
        a, b = [t.clone() for t in state], [t.clone() for t in state]
        replace_one_torch(*a, *rest)
        replace_one_triton(*b, *rest)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), seed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_evicts_alike_on_either_backend_on_cuda(tmp_path):
    """``h2o`` in float32 on a GPU: the Triton backend (fused eviction, fused statistics) gives the
    torch backend's greedy tokens and eviction counts."""
    import random

    from hf_ref import make_tiny_checkpoint
    from kvscope import LLM, SamplingParams

    path = tmp_path / "llama"
    make_tiny_checkpoint("llama", path)
    rng = random.Random(4)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (5, 40, 90, 17)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    runs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(path), device="cuda", strategy="h2o:budget=24,recent=8,block_size=4", attention_backend=backend,
                  kv_memory_bytes=8 << 20, max_model_len=256, max_num_seqs=8)
        runs[backend] = ([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)],
                         llm.engine.stats()["evicted_tokens"])
    assert runs["torch"] == runs["triton"] and runs["torch"][1] > 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 10_000), min_size=1, max_size=9), min_size=1, max_size=7), st.data())
def test_pack_tables_matches_padded_rows(blocks, data):
    """The numpy packer against the rows written out by hand: the held count, the recent window's
    first position, then each table padded with its last block id to a row of a multiple of 16;
    and unpack's views of it."""
    from kvscope.kv.evict_one import pack_tables, unpack

    held = data.draw(st.lists(st.integers(1, 10**6), min_size=len(blocks), max_size=len(blocks)))
    recent = data.draw(st.lists(st.integers(0, 10**6), min_size=len(blocks), max_size=len(blocks)))
    most = max(len(b) for b in blocks)
    width = 16 * ((most + 2 + 15) // 16)
    expected = [[h, r] + b + b[-1:] * (width - 2 - len(b)) for b, h, r in zip(blocks, held, recent)]
    packed = pack_tables(blocks, held, recent)
    assert packed.dtype.name == "int64"
    assert packed.tolist() == expected
    tables, h, r = unpack(torch.from_numpy(packed), most)
    assert tables.tolist() == [b + b[-1:] * (most - len(b)) for b in blocks]
    assert h.tolist() == held and r.tolist() == recent


@given(most=st.integers(1, 300), n=st.integers(1, 64))
def test_packed_views_keep_one_alignment_and_stride_class_whatever_the_longest_table(most, n):
    """What Triton specialises a launch on (pointer 16-byte alignment, integers divisible by 16 or
    equal to 1) is the same for every step, so the eviction kernel compiles once."""
    from kvscope.kv.evict_one import pack_tables, unpack

    blocks = [list(range(most))] + [[0]] * (n - 1)
    packed = torch.from_numpy(pack_tables(blocks, [1] * n, [0] * n)).clone()  # a fresh (allocator-aligned) copy
    assert packed.data_ptr() % 16 == 0
    tables, held, recent = unpack(packed, most)
    assert (tables.data_ptr() % 16, held.data_ptr() % 16, recent.data_ptr() % 16) == (0, 0, 8)
    assert tables.stride(0) % 16 == held.stride(0) % 16 == recent.stride(0) % 16 == 0 and tables.stride(1) == 1
