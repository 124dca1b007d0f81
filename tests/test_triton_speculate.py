"""InfiniGen's speculation (``attention/triton_speculate.py``): the torch path against a plain
Python reference written from the definition, and the Triton kernels against the torch path,
through the interpreter on CPU (in a child process, as in ``test_triton_decode.py``) and compiled
on a GPU; and under tensor parallelism, each rank's selection over its half of the heads against
the single-rank selection's share. Inputs are small integers and the scale a power of two, so every logit is exact in
float32 whatever the summation order, and ties (which the definition breaks by position) occur."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvscope.attention.triton_speculate import speculate_rows

CASES = r"""
import torch

def make_case(seed, b, c, hkv, g, d, lens, real, cap, per_head, kp, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    n = 4 * c
    qp = torch.randint(-2, 3, (b, hkv, g, d), generator=gen).float()
    pk = torch.randint(-2, 3, (n, hkv, d), generator=gen).to(torch.bfloat16)
    slots = torch.stack([torch.randperm(n - 1, generator=gen)[:c] for _ in range(b)])
    args = dict(qp=qp, partial_keys=pk, slots=slots, lens=torch.tensor(lens), real=torch.tensor(real),
                scale=0.5, alpha=2.0, per_head=per_head, kp=kp,
                cap=torch.tensor([float(x) for x in cap] if isinstance(cap, list) else [float(cap)] * b),
                counters=torch.zeros(n, dtype=torch.int32))
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}

CASES = [
    # seed, b, c, hkv, g, d, lens, real, cap, per_head, kp
    (0, 3, 64, 2, 3, 5, [37, 5, 64], [True, True, False], 1e9, True, 70),
    (1, 3, 64, 2, 3, 5, [37, 5, 64], [True, True, True], 1e9, False, 70),
    (2, 2, 40, 3, 1, 4, [40, 17], [True, True], 3.0, True, 16),
    (3, 4, 33, 1, 4, 7, [1, 2, 33, 20], [True, True, True, False], 8.0, False, 16),
    (4, 3, 50, 2, 2, 6, [50, 12, 30], [True, True, True], [9.0, 2.0, 6.0], True, 16),  # caps per row
]
"""

SPLIT = r"""
def split_run(case, use_triton, world):
    # ``world`` ranks, one after another (the interpreter runs one kernel at a time): each selects
    # over its contiguous share of the KV heads. A selection makes one reduction, whose inputs do
    # not depend on its output, so a first pass records every rank's input and a second hands each
    # rank the reduced value. Returns each rank's (rows, valid, kept) and counters.
    h = make_case(*case)["qp"].shape[1] // world
    seen, out = [], []

    def rank_args(r):
        args = make_case(*case)
        args["qp"] = args["qp"][:, r * h:(r + 1) * h].contiguous()
        args["partial_keys"] = args["partial_keys"][:, r * h:(r + 1) * h].contiguous()
        return args

    for r in range(world):
        speculate_rows(**rank_args(r), use_triton=use_triton, world=world,
                       all_reduce=lambda t, op: seen.append((op, t.clone())) or t)
    assert len(seen) == world and len({op for op, _ in seen}) == 1
    stacked = torch.stack([t for _, t in seen])
    reduced = stacked.sum(0) if seen[0][0] == "sum" else stacked.amax(0)
    for r in range(world):
        args = rank_args(r)
        out.append((speculate_rows(**args, use_triton=use_triton, world=world,
                                   all_reduce=lambda t, op: t.copy_(reduced)), args["counters"]))
    return out


def check_split(case, use_triton, world=2):
    # Each of ``world`` ranks selects over its contiguous share of the KV heads with the group's
    # reduction; the result must be the single-rank selection's share of heads (per head), or the
    # same whole tokens (by their best head), and the ranks' counters must add up to its counters.
    full = make_case(*case)
    hkv, per_head = full["qp"].shape[1], full["per_head"]
    want = speculate_rows(**full, use_triton=use_triton)
    out = split_run(case, use_triton, world)
    h = hkv // world
    counters = torch.zeros_like(full["counters"])
    for r, ((rows, valid, kept), cnt) in enumerate(out):
        if per_head:  # rows: slot * heads + head, with this rank's head count and indices
            wrows, wvalid, wkept = (x[:, r * h:(r + 1) * h] for x in want)
            slot, head = wrows // hkv, wrows % hkv - r * h
            assert torch.equal(valid, wvalid) and torch.equal(kept, wkept), (case, r)
            assert torch.equal(rows[valid], (slot * h + head)[valid]), (case, r)
            counters += cnt
        else:
            assert all(torch.equal(x, w) for x, w in zip((rows, valid, kept), want)), (case, r)
            assert torch.equal(cnt, full["counters"]), (case, r)
    if per_head:
        assert torch.equal(counters, full["counters"]), case
"""

CHILD = CASES + SPLIT + r"""
import kvscope.attention.triton_speculate as ts
for chunk in (16384, 16):  # 16: several chunks per row, the selection kernel's looping path
    ts._SELECT_CHUNK = chunk
    for case in CASES:
        a, b = make_case(*case), make_case(*case)
        want = speculate_rows(**a, use_triton=False)
        got = speculate_rows(**b, use_triton=True)
        for w, x, name in zip(want, got, ("rows", "valid", "kept")):
            assert torch.equal(w, x), (case, chunk, name, w, x)
        assert torch.equal(a["counters"], b["counters"]), case
for case in CASES:
    if case[3] % 2 == 0:
        check_split(case, use_triton=True)
print("ok")
"""

exec(CASES)
exec(SPLIT)


def reference(qp, partial_keys, slots, lens, real, scale, alpha, cap, per_head, kp):
    """InfiniGen's selection from its definition, with Python loops over exact values."""
    b, hkv, g, d = qp.shape
    heads = hkv if per_head else 1
    rel = {}
    for i in range(b):
        n = int(lens[i])
        per_kv = []
        for h in range(hkv):
            logits = [[float((qp[i, h, q] * partial_keys[slots[i, t], h].float()).sum()) * scale for t in range(n)]
                      for q in range(g)]
            best = [max(row) for row in logits]
            per_kv.append([max(logits[q][t] - best[q] for q in range(g)) for t in range(n)])
        rel[i] = per_kv if per_head else [[max(per_kv[h][t] for h in range(hkv)) for t in range(n)]]
    out = {}
    for i in range(b):
        # k: the mean count over the row's heads, floored, in [1, the row's cap].
        count = sum(sum(s > -alpha for s in rel[i][h]) for h in range(heads))
        k = min(max(1, count // heads), float(cap[i]))
        for h in range(heads):
            keep = min(int(k), int(lens[i]), kp) if bool(real[i]) else 0
            ranked = sorted(range(int(lens[i])), key=lambda t: (-rel[i][h][t], t))[:keep]
            out[i, h] = sorted(ranked)
    return out


@pytest.mark.parametrize("case", CASES)
def test_torch_path_matches_the_definition(case):
    args = make_case(*case)
    rows, valid, kept = speculate_rows(**args, use_triton=False)
    want = reference(**{k: v for k, v in args.items() if k != "counters"})
    hkv = args["qp"].shape[1]
    counters = torch.zeros_like(args["counters"])
    for (i, h), toks in want.items():
        slots = [int(args["slots"][i, t]) for t in toks]
        expect = [s * hkv + h for s in slots] if args["per_head"] else slots
        assert int(kept[i, h]) == len(toks)
        assert rows[i, h, : len(toks)].tolist() == expect
        assert valid[i, h].tolist() == [j < len(toks) for j in range(args["kp"])]
        for s in slots:
            counters[s] += 1
    assert torch.equal(args["counters"], counters)


@pytest.mark.parametrize("case", [c for c in CASES if c[3] % 2 == 0])
def test_tensor_parallel_ranks_select_their_share(case):
    check_split(case, use_triton=False)
    check_split(case[:9] + (not case[9],) + case[10:], use_triton=False)


def test_kernels_in_interpreter(triton_interpreter):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import torch\nfrom kvscope.attention.triton_speculate import speculate_rows\n" + CHILD
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("per_head", [True, False])
def test_kernels_on_cuda(per_head):
    pytest.importorskip("triton")
    for case in CASES:
        case = case[:9] + (per_head,) + case[10:]
        a, b = make_case(*case), make_case(*case, device="cuda")
        want = speculate_rows(**a, use_triton=False)
        got = speculate_rows(**b, use_triton=True)
        for w, x in zip(want, got):
            assert torch.equal(w, x.cpu()), case
        assert torch.equal(a["counters"], b["counters"].cpu())
    # A row longer than the selection kernel holds in registers at once (two chunks), at 16k+ tokens.
    long = (7, 2, 20000, 2, 4, 8, [20000, 12345], [True, True], 4000.0, per_head, 4016)
    a, b = make_case(*long), make_case(*long, device="cuda")
    want = speculate_rows(**a, use_triton=False)
    got = speculate_rows(**b, use_triton=True)
    for w, x in zip(want, got):
        assert torch.equal(w, x.cpu())
