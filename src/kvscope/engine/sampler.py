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


def _sample_row(logits: torch.Tensor, req: Request) -> tuple[torch.Tensor, torch.Tensor]:
    """One token ``[1]`` int64 from ``logits`` ``[V]`` under ``req``'s temperature, filters and
    generator, and whether its probabilities were valid (0-dim bool), both left on the device."""
    p = req.params
    filtered = _filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
    probs = filtered.softmax(-1)
    gen = req.generator
    if gen is not None and gen.device != probs.device:
        probs = probs.to(gen.device)
    # What torch.multinomial(probs, 1, generator=gen) draws (the same tokens, the same generator
    # state after), without its check of the probabilities, which waits for the device (.item()):
    # that check is returned instead, and read back with the token.
    q = torch.empty_like(probs).exponential_(1, generator=gen)
    valid = (probs.max() < float("inf")) & (probs.min() >= 0)
    return (probs / q).argmax(-1, keepdim=True), valid


def sample_on_device(logits: torch.Tensor, requests: list[Request]
                     ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, Exception]]:
    """Pick one token per row of ``logits`` ``[M, V]`` (float32) for the matching request, on the
    device and without waiting for it.

    Returns ``[M]`` int64 tokens; ``[M]`` bool, False where a sampled row's probabilities were
    not a distribution (NaN or infinite logits), or None when every row is greedy; and, per row
    whose sampling raised (a generator on the wrong device), its exception. Such rows' tokens are
    undefined: one request's failure is that request's alone, never the batch's.

    Greedy rows take one batched argmax; each sampled row draws from its own generator.
    """
    tokens = logits.argmax(dim=-1)
    valid = None
    errors: dict[int, Exception] = {}
    for i, req in enumerate(requests):
        if not req.params.greedy:
            if valid is None:
                valid = torch.ones(len(requests), dtype=torch.bool, device=logits.device)
            try:
                tokens[i : i + 1], valid[i] = _sample_row(logits[i], req)
            except Exception as e:  # noqa: BLE001 - isolated per request, reported in its output
                errors[i] = e
    return tokens, valid, errors
