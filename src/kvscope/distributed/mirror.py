"""Keeping every rank's KV strategy in lockstep with rank 0's scheduler.

Every rank owns a strategy instance bound to its shard's config (``num_kv_heads / N`` heads, the
same pool in tokens). Only rank 0 schedules. Its scheduler and engine see the strategy through
:class:`RecordingManager`, a :class:`KVManager` (the scheduler side of the contract, which names no
tensor) that forwards each call and records those that may change state (``allocate``, ``free``,
``fork``, ``swap_out``, ``swap_in``; ``lookup_prefix`` has no side effects) with their result and
the requests' state at the time of the call. The log rides with the next message to the workers,
where :class:`Mirror` replays it in order on mirror :class:`Request` objects. Strategies are
deterministic functions of these calls and of the step batches, so block ids and slot counts are
identical on every rank, while each rank's per-head decisions (eviction, selection) read only its
own heads (a statistic across heads is reduced over ``KVSetup.tensor_parallel``). A replayed call
whose result differs from rank 0's means the ranks diverged, and raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvscope.kv.base import KVStrategy, StepBatch
from kvscope.kv.manager import KVManager, KVUsage
from kvscope.request import Request, RequestStatus
from kvscope.sampling_params import SamplingParams

RECORDED = ("allocate", "free", "fork", "swap_out", "swap_in")


@dataclass(frozen=True)
class RequestState:
    """What a worker needs to bring its mirror of a request to rank 0's state. ``created`` holds
    ``(prompt_token_ids, params, eos_token_ids, parent_id, child_index)`` the first time a request
    is shipped; ``new_output`` the output tokens appended since it was last shipped."""

    request_id: str
    created: tuple[list[int], SamplingParams, tuple[int, ...], str | None, int] | None
    new_output: list[int]
    num_computed_tokens: int
    status: str
    swapped: bool


@dataclass(frozen=True)
class Op:
    """One recorded scheduler-side call: method name, request states, further arguments, result."""

    method: str
    requests: tuple[RequestState, ...]
    args: tuple[Any, ...]
    result: Any


@dataclass(frozen=True)
class BatchDesc:
    """A :class:`StepBatch` as plain data: request states before the step, ``[N]`` ids and
    positions as lists, and the rows whose logits rank 0 samples."""

    requests: tuple[RequestState, ...]
    num_new_tokens: list[int]
    input_ids: list[int]
    positions: list[int]
    query_start: list[int]
    sample_rows: list[int]


class RecordingManager(KVManager):
    """Rank 0's strategy as its scheduler sees it: every call forwarded to ``kv``, and the calls
    of :data:`RECORDED` also logged for the workers (:meth:`take_ops`)."""

    def __init__(self, kv: KVManager) -> None:
        self.inner = kv
        self._ops: list[Op] = []
        self._shipped: dict[str, int] = {}  # request id -> output tokens the workers have

    def state(self, req: Request) -> RequestState:
        """``req`` as the workers must see it now (its creation fields the first time)."""
        shipped = self._shipped.get(req.request_id)
        created = None
        if shipped is None:
            shipped = 0
            created = (req.prompt_token_ids, req.params, req.eos_token_ids, req.parent_id, req.child_index)
        out = req.output_token_ids
        self._shipped[req.request_id] = len(out)
        return RequestState(req.request_id, created, out[shipped:], req.num_computed_tokens,
                            req.status.value, req.swapped)

    def _record(self, method: str, reqs: tuple[Request, ...], args: tuple[Any, ...]) -> Any:
        states = tuple(self.state(r) for r in reqs)
        result = getattr(self.inner, method)(*reqs, *args)
        self._ops.append(Op(method, states, args, result))
        if method == "free" and reqs[0].is_finished:
            del self._shipped[reqs[0].request_id]  # the id may be used again by a new request
        return result

    def allocate(self, request: Request, num_tokens: int) -> bool:
        return self._record("allocate", (request,), (num_tokens,))

    def free(self, request: Request) -> None:
        self._record("free", (request,), ())

    def fork(self, parent: Request, child: Request) -> None:
        self._record("fork", (parent, child), ())

    def swap_out(self, request: Request) -> int:
        return self._record("swap_out", (request,), ())

    def swap_in(self, request: Request) -> int | None:
        return self._record("swap_in", (request,), ())

    def lookup_prefix(self, request: Request) -> int:
        return self.inner.lookup_prefix(request)

    def max_request_tokens(self) -> int:
        return self.inner.max_request_tokens()

    def max_sequence_tokens(self) -> int:
        return self.inner.max_sequence_tokens()

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def usage(self) -> KVUsage:
        return self.inner.usage()

    def take_ops(self) -> list[Op]:
        """The calls recorded since the last take, oldest first."""
        ops, self._ops = self._ops, []
        return ops

    def describe(self, batch: StepBatch, sample_rows: list[int]) -> BatchDesc:
        return BatchDesc(tuple(self.state(r) for r in batch.requests), list(batch.num_new_tokens),
                         batch.input_ids.tolist(), batch.positions.tolist(), list(batch.query_start),
                         list(sample_rows))


class Mirror:
    """A worker's mirror requests and the replay of rank 0's calls on its own strategy ``kv``."""

    def __init__(self, kv: KVStrategy, device: torch.device) -> None:
        self.kv = kv
        self.device = device
        self.requests: dict[str, Request] = {}

    def sync(self, s: RequestState) -> Request:
        """The mirror of ``s``'s request, brought to ``s`` (created on first sight)."""
        if s.created is not None:
            prompt, params, eos, parent, child_index = s.created
            self.requests[s.request_id] = Request(s.request_id, list(prompt), params, eos_token_ids=eos,
                                                  parent_id=parent, child_index=child_index)
        req = self.requests[s.request_id]
        req.output_token_ids.extend(s.new_output)
        req.num_computed_tokens = s.num_computed_tokens
        req.status = RequestStatus(s.status)
        req.swapped = s.swapped
        return req

    def replay(self, ops: list[Op], rank: int) -> None:
        for op in ops:
            reqs = tuple(self.sync(s) for s in op.requests)
            got = getattr(self.kv, op.method)(*reqs, *op.args)
            if got != op.result:
                raise RuntimeError(f"tensor-parallel rank {rank} diverged from rank 0: {op.method}"
                                   f"({', '.join(r.request_id for r in reqs)}, {op.args}) returned {got!r} "
                                   f"here and {op.result!r} on rank 0")
            if op.method == "free" and reqs[0].is_finished:
                del self.requests[reqs[0].request_id]

    def batch(self, desc: BatchDesc) -> StepBatch:
        """The :class:`StepBatch` rank 0 runs, over the mirror requests."""
        return StepBatch(
            requests=[self.sync(s) for s in desc.requests],
            num_new_tokens=desc.num_new_tokens,
            input_ids=torch.tensor(desc.input_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(desc.positions, dtype=torch.long, device=self.device),
            query_start=desc.query_start,
        )
