"""Token selection: greedy, temperature, top-k, top-p, per-request seeded generators."""
from __future__ import annotations

import torch

from kvscope.request import Request


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask ``logits`` ``[V]`` outside the top-k set and outside the top-p nucleus with -inf."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _sample_row(logits: torch.Tensor, req: Request) -> int:
    """One token from ``logits`` ``[V]`` under ``req``'s temperature, filters and generator."""
    p = req.params
    filtered = _filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
    probs = filtered.softmax(-1)
    gen = req.generator
    if gen is not None and gen.device != probs.device:
        probs = probs.to(gen.device)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int | Exception]:
    """Pick one token per row of ``logits`` ``[M, V]`` (float32) for the matching request.

    Greedy rows take one batched argmax. Each sampled row runs on its own, and a row that raises
    (NaN probabilities, a generator on the wrong device) gets its exception in place of a token:
    one request's failure is that request's alone, never the batch's.
    """
    out: list[int | Exception] = [0] * len(requests)
    greedy = [i for i, r in enumerate(requests) if r.params.greedy]
    if greedy:
        # All rows greedy (the common case) needs no gather of a [M, V] copy first.
        rows = logits if len(greedy) == len(requests) else logits[greedy]
        for i, tok in zip(greedy, rows.argmax(dim=-1).tolist()):
            out[i] = tok
    for i, req in enumerate(requests):
        if not req.params.greedy:
            try:
                out[i] = _sample_row(logits[i], req)
            except Exception as e:  # noqa: BLE001 - isolated per request, reported in its output
                out[i] = e
    return out
