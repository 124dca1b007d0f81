"""``sample_on_device`` against a row-at-a-time reference: torch.topk, torch.sort and
torch.multinomial on each row with that request's own generator."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope import SamplingParams
from kvscope.engine.sampler import filter_top_k_top_p, sample_on_device
from kvscope.request import Request


def reference_filter(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row ``[V]``: -inf outside its top-k set, then outside the smallest prefix (by logit,
    ties in token order) whose probability reaches ``top_p``."""
    row = row.clone()
    if 0 < top_k < row.numel():
        row[row < torch.topk(row, top_k).values[-1]] = float("-inf")
    if top_p < 1.0:
        order = torch.tensor(sorted(range(row.numel()), key=lambda t: (-row[t].item(), t)))
        probs = row[order].softmax(-1)
        before = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each one
        row[order[before >= top_p]] = float("-inf")
    return row


def requests(temps: list[float], ks: list[int], ps: list[float], seeds: list[int]) -> list[Request]:
    reqs = []
    for i, (t, k, p, s) in enumerate(zip(temps, ks, ps, seeds)):
        r = Request(str(i), [1], SamplingParams(temperature=t, top_k=k, top_p=p, seed=s))
        r.generator = torch.Generator().manual_seed(s)
        reqs.append(r)
    return reqs


def test_draws_what_multinomial_draws_and_flags_invalid_rows():
    """The same tokens and generator states as torch.multinomial on each row's filtered
    probabilities; a NaN row is flagged instead of checked on the host; greedy rows take the argmax."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    logits[2] = float("nan")
    reqs = requests([0.7, 0.0, 1.0, 1.3], [0, 0, 0, 20], [0.9, 1.0, 0.9, 0.8], [100, 101, 102, 103])
    tokens, valid, errors = sample_on_device(logits.clone(), reqs)
    assert valid.tolist() == [True, True, False, True] and not errors
    assert tokens[1] == logits[1].argmax()
    for i in (0, 3):
        gen = torch.Generator().manual_seed(100 + i)
        p = reqs[i].params
        probs = reference_filter(logits[i] / p.temperature, p.top_k, p.top_p).softmax(-1)
        assert tokens[i] == torch.multinomial(probs, 1, generator=gen)[0]
        assert torch.equal(gen.get_state(), reqs[i].generator.get_state())


def test_all_greedy_needs_no_validity_flags():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    tokens, valid, errors = sample_on_device(logits, requests([0.0] * 3, [0] * 3, [1.0] * 3, [1, 2, 3]))
    assert tokens.tolist() == logits.argmax(-1).tolist() and valid is None and not errors


def test_a_row_whose_generator_cannot_draw_fails_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    reqs = requests([1.0] * 3, [0] * 3, [1.0] * 3, [5, 6, 7])
    reqs[1].generator = "not a generator"
    tokens, valid, errors = sample_on_device(logits, reqs)
    assert list(errors) == [1] and valid.tolist() == [True, True, True]
    for i in (0, 2):
        probs = logits[i].softmax(-1)
        assert tokens[i] == torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5 + i))[0]


_row = st.tuples(st.sampled_from([0.0, 0.5, 1.0, 1.7]), st.integers(0, 40), st.sampled_from([0.3, 0.7, 0.95, 1.0]),
                 st.integers(0, 2**31))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(_row, min_size=1, max_size=6), vocab=st.integers(2, 40), seed=st.integers(0, 2**31),
       ties=st.booleans())
def test_any_batch_samples_each_row_as_the_reference_does(rows, vocab, seed, ties):
    """Whatever mix of greedy and sampled rows, temperatures, top-k (0, within and past the
    vocabulary) and top-p: every row's filter equals the row reference, and every sampled row
    draws what multinomial draws with its own generator, whatever the other rows are."""
    temps, ks, ps, seeds = (list(x) for x in zip(*rows))
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(seed))
    if ties:  # repeated values: the top-k threshold and the top-p order must handle them
        logits = (logits * 2).round() / 2
    got = filter_top_k_top_p(logits, ks, ps)
    for i in range(len(rows)):
        assert torch.equal(got[i], reference_filter(logits[i], ks[i], ps[i]))
    reqs = requests(temps, ks, ps, seeds)
    tokens, valid, errors = sample_on_device(logits.clone(), reqs)
    assert not errors
    for i, r in enumerate(reqs):
        if r.params.greedy:
            assert tokens[i] == logits[i].argmax()
            continue
        probs = reference_filter(logits[i] / r.params.temperature, ks[i], ps[i]).softmax(-1)
        assert tokens[i] == torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seeds[i]))[0]
        assert valid[i]
