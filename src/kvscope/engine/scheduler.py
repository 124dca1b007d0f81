"""Continuous batching over per-request ``num_computed_tokens`` (vLLM v1's scheduler model).

Each step has a token budget. Running requests are served first, in admission order, each taking
what it still needs (one token in decode, a chunk of its prompt in prefill); then waiting requests
are admitted FCFS while budget, the running cap and KV memory allow. When a running request cannot
grow, the most recently admitted running request is preempted: its KV is freed and recomputed
later (``recompute``), or copied to host memory and back (``swap``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvscope.kv.manager import KVManager
from kvscope.request import Request, RequestStatus


@dataclass
class ScheduleResult:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    """FCFS continuous-batching scheduler; it sees the KV strategy only as a :class:`KVManager`."""

    def __init__(
        self,
        kv: KVManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        preemption_mode: str = "recompute",
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_swap_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """A forked child starts where its parent is: already computed, already running."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def remove(self, request: Request) -> None:
        """Forget a finished or aborted request (the engine frees its KV)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)

    def schedule(self) -> ScheduleResult:
        out = ScheduleResult()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.last_token_pending:  # finished once read back: nothing left to compute
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
            i += 1

        # vLLM admits nothing new in a step that had to preempt: memory is already short.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            if req.swapped:
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if self.kv.swap_in(req) is None:
                    break
                req.swapped = False
                if not self.kv.allocate(req, req.num_computed_tokens + n):
                    # Swapped in but cannot grow this step: keep it running, it grows next step.
                    self.waiting.popleft()
                    self._start(req)
                    continue
            else:
                cached = self.kv.lookup_prefix(req)
                n = min(req.num_tokens - cached, budget)
                if not self.kv.allocate(req, cached + n):
                    break
                req.num_computed_tokens = cached
                req.num_prefix_cached_tokens = cached
            self.waiting.popleft()
            self._start(req)
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
        return out

    def _start(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _preempt(self, req: Request) -> None:
        self.num_preemptions += 1
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        if self.preemption_mode == "swap" and self.kv.swap_out(req) is not None:
            req.swapped = True
            self.num_swap_preemptions += 1
        else:
            self.kv.free(req)
            req.num_computed_tokens = 0
        self.waiting.appendleft(req)
