"""Token selection: greedy, temperature, top-k, top-p, per-request seeded generators."""
from __future__ import annotations

import torch

from kvscope.engine.request import Request


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


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """Pick one token per row of ``logits`` ``[M, V]`` (float32) for the matching request."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, req in enumerate(requests):
        p = req.params
        if p.greedy:
            out.append(greedy[row])
            continue
        filtered = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = filtered.softmax(-1)
        gen = req.generator
        if gen is not None and gen.device != probs.device:
            probs = probs.to(gen.device)
        out.append(int(torch.multinomial(probs, 1, generator=gen).item()))
    return out
