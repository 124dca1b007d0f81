"""A launched step whose sampled tokens are still on their way to the host (async scheduling).

After a step's forward, its tokens are chosen on the device (:func:`kvscope.engine.sampler.sample_on_device`),
and copied to pinned host memory behind an event; nothing waits for them. The engine can then
schedule and launch the next step at once, feeding it those device-side tokens
(:func:`input_patch`), and read this step's tokens back (:meth:`InFlight.wait`) while the next one
runs: the host's work per step (scheduling, batch building, stop checks, outputs) overlaps the
GPU's instead of following it, as vLLM's async scheduling does. Without async scheduling the
engine reads each step back at once, through the same path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.device_copy import to_device
from kvscope.engine.sampler import sample_on_device
from kvscope.errors import ConfigError
from kvscope.kv.base import KVStrategy
from kvscope.request import Request


@dataclass
class InFlight:
    """One launched step.

    Attributes:
        requests: the step's scheduled requests.
        sampled: one request per sampled token (the ``n`` samples forked in this step included).
        tokens: ``[S]`` int64 on the device: ``sampled``'s tokens, the next step's inputs.
        host_tokens: ``[S]`` int64 on the host, valid once :meth:`wait` returns.
        host_logprobs: ``[S]`` float32 on the host, the log-probability of each token (rows that
            asked for it; others are zero), or None when no row asked.
        host_logits: sampled index -> ``[V]`` float32 logits on the host (rows with ``return_logits``).
        errors: sampled index -> the exception sampling its row raised (its token is undefined).
        row_of: ``id(request)`` -> its index in ``tokens``.
        host_valid: ``[S]`` bool on the host once :meth:`wait` returns: False where a sampled row's
            probabilities were no distribution; None when every row is greedy.
    """

    requests: list[Request]
    sampled: list[Request]
    tokens: torch.Tensor
    host_tokens: torch.Tensor
    host_logprobs: torch.Tensor | None
    host_logits: dict[int, torch.Tensor]
    errors: dict[int, Exception]
    row_of: dict[int, int]
    host_valid: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None

    def done(self) -> bool:
        """Whether the device has finished the step and its copies to the host, known without
        waiting; False off CUDA (no event), where the step is read back after the next launch."""
        return self.ready is not None and self.ready.query()

    def wait(self) -> tuple[list[int], list[float] | None]:
        """Block until the host copies landed; the tokens and log-probabilities as Python lists.
        Rows whose probabilities were no distribution join :attr:`errors`."""
        if self.ready is not None:
            self.ready.synchronize()
        if self.host_valid is not None:
            for i in (~self.host_valid).nonzero().flatten().tolist():
                self.errors.setdefault(i, RuntimeError(
                    "probability tensor contains either `inf`, `nan` or element < 0"))
        lps = None if self.host_logprobs is None else self.host_logprobs.tolist()
        return self.host_tokens.tolist(), lps


def _to_host(t: torch.Tensor) -> torch.Tensor:
    # A device-to-host copy into pageable memory would block until the step ends; pinned does not.
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def launch_sampling(logits: torch.Tensor, rows: list[int], sampled: list[Request],
                    requests: list[Request]) -> InFlight:
    """Choose ``sampled[i]``'s token from ``logits[rows[i]]`` (``logits`` ``[M, V]`` float32) on the
    device, override forced tokens, gather the asked-for log-probabilities and logits, and start
    their copies to the host; returns without waiting for the device."""
    # Index tensors, never lists: a list index is copied to the device synchronously.
    sub = logits if rows == list(range(logits.shape[0])) else logits[to_device(rows, logits.device, torch.long)]
    tokens, valid, errors = sample_on_device(sub, sampled)
    # Output token k is forced_token_ids[k]; k counts this request's pending tokens too.
    forced = [(i, r.params.forced_token_ids[r.num_tokens - r.num_prompt_tokens]) for i, r in enumerate(sampled)
              if r.params.forced_token_ids is not None]
    if forced:  # the next step's input is the forced token, not the sampled one
        idx, vals = zip(*forced)
        tokens[to_device(idx, tokens.device, torch.long)] = to_device(vals, tokens.device, tokens.dtype)
    host_logprobs = None
    lp_rows = [i for i, r in enumerate(sampled) if r.params.logprobs]
    if lp_rows:
        lp = torch.zeros(len(sampled), dtype=torch.float32, device=sub.device)
        at = to_device(lp_rows, sub.device, torch.long)
        picked = torch.log_softmax(sub[at], -1).gather(1, tokens[at, None])[:, 0]
        lp[at] = picked.float()
        host_logprobs = _to_host(lp)
    host_logits = {i: _to_host(sub[i]) for i, r in enumerate(sampled) if r.params.return_logits}
    host_tokens = _to_host(tokens)
    host_valid = None if valid is None else _to_host(valid)
    ready = None
    if tokens.device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return InFlight(requests, sampled, tokens, host_tokens, host_logprobs, host_logits, errors,
                    {id(r): i for i, r in enumerate(sampled)}, host_valid, ready)


def input_patch(requests: list[Request], query_start: list[int], prev: InFlight | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where a step's input ids are still on the device: ``(rows [P], ids [P])`` int64, each row of
    the flattened batch whose token was sampled by ``prev`` and not read back yet, with that
    token; None when every input id is known on the host. Such a row is a decode row (one token):
    only the newest token of a request can be pending when it is scheduled."""
    dst, src = [], []
    for i, req in enumerate(requests):
        if req.num_computed_tokens >= req.num_known_tokens:
            if prev is None or id(req) not in prev.row_of:
                raise RuntimeError(f"request {req.request_id}: its next input token is pending but "
                                   "the step that sampled it is not in flight")
            dst.append(query_start[i])
            src.append(prev.row_of[id(req)])
    if not dst:
        return None
    if src == list(range(len(prev.sampled))):
        ids = prev.tokens  # every token of the previous step, in its order: no gather
    else:
        ids = prev.tokens[to_device(src, device, torch.long)]
    return to_device(dst, device, torch.long), ids


def resolve_async_scheduling(requested: bool | None, kv: KVStrategy, tensor_parallel: bool,
                             device: torch.device) -> bool:
    """``EngineConfig.async_scheduling`` resolved: None means on CUDA, for a strategy that allows it,
    on one process; True where it cannot apply is a :class:`ConfigError`."""
    why = ("tensor parallelism runs its steps in lockstep over ranks" if tensor_parallel
           else None if kv.async_scheduling else f"strategy {kv.name!r} does not allow it")
    if requested is None:
        return why is None and device.type == "cuda"
    if requested and why is not None:
        raise ConfigError(f"async_scheduling=True: {why}")
    return requested
