"""Token selection: greedy, temperature, top-k, top-p, per-request seeded generators.

The sampled rows of a step are filtered, normalised and drawn from as one batch: a constant number
of kernels whatever the batch, and one noise draw per row from that request's own generator (what
keeps a seeded request's tokens independent of the batch it runs in). Launching ~10 small ops per
sampled row instead made the host, not the GPU, bound a 64-request decode step (64 x 1k tokens,
Llama-3.1-8B shapes on an H100: benchmarks/results/strategy_profile.md).
"""
from __future__ import annotations

import torch

from kvscope.device_copy import to_device
from kvscope.request import Request


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask ``logits`` ``[M, V]`` outside each row's top-k set and top-p nucleus with -inf.

    ``top_k[i] <= 0`` or ``>= V`` and ``top_p[i] == 1`` leave row i unfiltered. Top-p keeps the
    smallest prefix of the row sorted by logit (ties in token order) whose mass reaches ``top_p``,
    the token that crosses it included, over the logits that survived top-k.
    """
    rows, vocab = logits.shape
    device = logits.device
    ks = [k if 0 < k < vocab else 0 for k in top_k]
    if any(ks):
        most = max(ks)
        # The k-th largest value of each row (a row without top-k compares against -inf: kept).
        kth = torch.topk(logits, most, dim=-1).values.gather(
            1, to_device([max(k, 1) - 1 for k in ks], device, torch.long)[:, None])
        kth = kth.masked_fill(to_device([k == 0 for k in ks], device, torch.bool)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        p = to_device(top_p, device, torch.float32)[:, None]
        # Rows at 1.0 are left alone: a cumulative sum that rounds up to 1 must not clip their tail.
        drop_sorted = (probs.cumsum(-1) - probs >= p) & (p < 1.0)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _draw(probs: torch.Tensor, requests: list[Request]) -> tuple[torch.Tensor, dict[int, Exception]]:
    """Row i's token ``[M]`` int64 from ``probs`` ``[M, V]``, with ``requests[i]``'s generator.

    What ``torch.multinomial(probs[i], 1, generator=gen)`` draws (the same tokens, the same
    generator state after) without its check of the probabilities, which waits for the device.
    """
    noise = torch.empty_like(probs)
    errors: dict[int, Exception] = {}
    for i, req in enumerate(requests):
        gen = req.generator
        try:
            if gen is not None and gen.device != probs.device:
                noise[i].copy_(torch.empty(probs.shape[1], device=gen.device).exponential_(1, generator=gen))
            else:
                noise[i].exponential_(1, generator=gen)
        except Exception as e:  # noqa: BLE001 - isolated per request, reported in its output
            errors[i] = e
    return (probs / noise).argmax(-1), errors


def sample_on_device(logits: torch.Tensor, requests: list[Request]
                     ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, Exception]]:
    """Pick one token per row of ``logits`` ``[M, V]`` (float32) for the matching request, on the
    device and without waiting for it.

    Returns ``[M]`` int64 tokens; ``[M]`` bool, False where a sampled row's probabilities were
    not a distribution (NaN or infinite logits), or None when every row is greedy; and, per row
    whose draw raised (a generator that cannot draw there), its exception. Such rows' tokens are
    undefined: one request's failure is that request's alone, never the batch's.

    Greedy rows take the argmax; sampled rows are scaled, filtered and normalised together, each
    drawing its noise from its own generator.
    """
    tokens = logits.argmax(dim=-1)
    at = [i for i, req in enumerate(requests) if not req.params.greedy]
    if not at:
        return tokens, None, {}
    sampled = [requests[i] for i in at]
    params = [r.params for r in sampled]
    device = logits.device
    idx = to_device(at, device, torch.long)
    temps = to_device([p.temperature for p in params], device, logits.dtype)[:, None]
    filtered = filter_top_k_top_p(logits[idx] / temps, [p.top_k for p in params], [p.top_p for p in params])
    probs = filtered.softmax(-1)
    drawn, row_errors = _draw(probs, sampled)
    tokens[idx] = drawn
    valid = torch.ones(len(requests), dtype=torch.bool, device=device)
    valid[idx] = (probs.amax(-1) < float("inf")) & (probs.amin(-1) >= 0)
    return tokens, valid, {at[j]: e for j, e in row_errors.items()}
