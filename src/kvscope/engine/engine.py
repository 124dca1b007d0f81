"""The step-level engine: requests in, one scheduled model step at a time, outputs out."""
from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvscope.config import EngineConfig
from kvscope.engine.cuda_graph import GraphRunner, engine_graph_sizes
from kvscope.engine.piecewise import build_pieces, engine_piecewise_sizes
from kvscope.engine.executor import StepExecutor
from kvscope.engine.inflight import InFlight, input_patch, launch_sampling, resolve_async_scheduling
from kvscope.engine.model_runner import ModelRunner
from kvscope.engine.outputs import RequestOutput, build_output
from kvscope.engine.peaks import Peaks
from kvscope.engine.prompts import check_fields, check_fits, prompt_token_ids
from kvscope.engine.scheduler import ScheduleResult, Scheduler
from kvscope.engine.stopping import stop_reason
from kvscope.errors import ConfigError, RequestError
from kvscope.kv.base import KVSetup, KVStrategy
from kvscope.kv.manager import KVManager
from kvscope.request import Request, RequestStatus
from kvscope.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from kvscope.models.loader import LoadedModel

logger = logging.getLogger(__name__)


class LLMEngine:
    """One model, one KV strategy, a scheduler and a sampler.

    ``add_request`` validates and queues; ``step`` runs one scheduled batch and returns the
    outputs of every request that produced a token or finished (``finished`` tells which are
    done); ``abort`` stops a request at any time and frees its KV at once; the next ``step``
    returns its final output (``finish_reason="abort"``), as vLLM's does, and only then forgets
    it, so its id may be used again.

    Failures stay with the request that caused them:

    - A bad request raises :class:`RequestError` (its sampling parameters, :class:`ConfigError`)
      in ``add_request`` and never disturbs the requests already being served.
    - A failure inside one request's part of a step (sampling, forking its ``n`` samples,
      stop strings, logprobs) finishes that request alone with ``finish_reason="error"`` and the
      exception in its output's ``error``, and frees its KV; the batch carries on.
    - A failure of the step as a whole (building the batch, the model forward, the strategy's
      ``begin_step``/``end_step``) belongs to no single request. vLLM then declares the engine
      dead (``EngineDeadError``: every request fails, the engine must be restarted). kvscope
      fails only the requests of that step, the same way, freeing their KV (and with it whatever
      the strategy half-wrote for them), logs the traceback, and keeps serving the rest, which the
      failed step did not touch. An interrupt (``KeyboardInterrupt``) mid-step does the same, then
      propagates: no request is ever left with a computed position and no token to show for it.
    """

    def __init__(self, loaded: LoadedModel, kv: KVStrategy, config: EngineConfig,
                 executor: StepExecutor | None = None) -> None:
        """``executor``: rank 0 of a tensor-parallel group's scheduler view, runner and group
        (:class:`~kvscope.engine.executor.StepExecutor`); None: one process does it all."""
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.kv = kv
        if kv.setup is not None:
            raise ConfigError(
                f"this {kv.name!r} strategy instance is already bound to an engine (a KV pool of "
                f"{kv.setup.kv_memory_bytes} bytes) and keeps that engine's state; give each LLM its own "
                "instance, or a strategy spec string"
            )
        if config.preemption_mode == "swap" and not kv.supports_swap:
            raise ConfigError(f"strategy {kv.name!r} does not support preemption_mode='swap'")
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_position_embeddings,
            loaded.config.max_position_embeddings,
        )
        self.graph_sizes = engine_graph_sizes(config.enforce_eager, config.torch_device, config.cuda_graph_sizes,
                                              config.max_num_seqs)
        kv_bytes = config.kv_pool_bytes()
        setup = KVSetup(
            model=loaded.config,
            device=config.torch_device,
            dtype=config.torch_dtype,
            kv_memory_bytes=kv_bytes,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            swap_space_bytes=config.swap_space_bytes,
            attention_backend=config.resolved_attention_backend,
            cuda_graph_sizes=self.graph_sizes,
            tensor_parallel=None if executor is None else executor.tensor_parallel,
        )
        try:
            kv.bind(setup)
        except (RuntimeError, MemoryError) as e:  # torch's allocation failures (OutOfMemoryError included)
            raise ConfigError(
                f"strategy {kv.name!r} could not allocate its KV memory for kv_memory_bytes={kv_bytes} "
                f"(swap_space_bytes={config.swap_space_bytes}): {e}"
            ) from None
        kv.attach_model(loaded)
        self.manager: KVManager = kv if executor is None else executor.manager  # every scheduler-side call
        self.scheduler = Scheduler(
            self.manager, config.max_num_seqs, config.max_num_batched_tokens, config.preemption_mode
        )
        self.piecewise_sizes = None if executor is not None else engine_piecewise_sizes(
            config.enforce_eager, config.torch_device, config.piecewise_graph_sizes, config.max_num_batched_tokens)
        self.runner = executor.runner if executor is not None else ModelRunner(
            self.model, kv, config.torch_device, self._capture_graphs(),
            build_pieces(self.model, self.piecewise_sizes, config.torch_dtype, config.torch_device))
        self.async_scheduling = resolve_async_scheduling(config.async_scheduling, kv, executor is not None,
                                                         config.torch_device)
        self._inflight: InFlight | None = None  # the launched step not read back yet (async scheduling)
        self.requests: dict[str, Request] = {}
        self._groups: dict[str, list[Request]] = {}  # parent id -> its n samples, parent first
        self._due: set[str] = set()  # groups finished between steps (aborts): output at the next step
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_steps = 0
        self.num_computed_tokens_total = 0
        self.peaks = Peaks()

    def _capture_graphs(self) -> GraphRunner | None:
        decode = self.kv.decode_graphs() if self.graph_sizes is not None else None
        return None if decode is None else GraphRunner(self.model, decode, self.config.torch_device)

    # ---- requests ------------------------------------------------------------------------------
    @property
    def token_limit(self) -> int:
        """The most tokens (prompt + output) one request may reach."""
        return min(self.max_model_len, self.kv.max_sequence_tokens())

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request (text, or prompt token ids); returns its id."""
        return self._queue(self._new_request(prompt, params, request_id, arrival_time))

    def add_requests(self, prompts: Sequence[str | list[int]], params: Sequence[SamplingParams]) -> list[str]:
        """Queue several requests, all or none: a bad one raises :class:`RequestError` naming its
        index, and none is queued. Returns their ids."""
        reqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                reqs.append(self._new_request(prompt, p))
            except RequestError as e:
                raise RequestError(f"prompt {i}: {e}") from None
        return [self._queue(r) for r in reqs]

    def _new_request(
        self, prompt: object, params: SamplingParams | None, request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """A validated :class:`Request`, not queued yet."""
        params = SamplingParams() if params is None else params
        rid = request_id if request_id is not None else str(next(self._ids))
        check_fields(rid, params, arrival_time, self.requests)
        text, token_ids = prompt_token_ids(prompt, self.tokenizer, rid)
        check_fits(rid, token_ids, params, self.model_config.vocab_size, self.max_model_len, self.kv,
                   self.kv.setup.kv_memory_bytes, self.config.max_num_seqs)
        return Request(
            request_id=rid,
            prompt_token_ids=token_ids,
            params=params,
            eos_token_ids=() if params.ignore_eos else self.tokenizer.eos_token_ids,
            prompt=text,
            arrival_time=arrival_time if arrival_time is not None else time.perf_counter(),
            generator=self._generator(params.seed),
            max_total_tokens=min(len(token_ids) + params.max_tokens, self.token_limit),
        )

    def _queue(self, req: Request) -> str:
        self.requests[req.request_id] = req
        self._groups[req.request_id] = [req]
        self.scheduler.add(req)
        return req.request_id

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.config.torch_device)
        gen.manual_seed(seed if seed is not None else self._rng.randrange(1 << 62))
        return gen

    def abort(self, request_id: str) -> None:
        """Stop a request (and its forked samples) now, freeing its KV; the next :meth:`step`
        returns its final output. Unknown ids are ignored."""
        group = self._groups.get(request_id)
        if group is None:
            return
        for req in group:
            if not req.is_finished:
                self._finish(req, "abort")
        self._due.add(request_id)

    def has_unfinished_requests(self) -> bool:
        """Whether :meth:`step` has work: requests to run, or final outputs of aborted ones to return."""
        return self.scheduler.num_unfinished > 0 or bool(self._due) or self._inflight is not None

    def samples(self, request_id: str) -> list[Request]:
        """The live state of a queued request: itself, then the ``n - 1`` samples forked from it as
        they come (appended to this same list). Read-only, between steps: a streaming server reads
        each step's new tokens here, instead of having ``step`` copy every output (``FINAL_ONLY``)."""
        return self._groups[request_id]

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the outputs of the requests it advanced or finished,
        and the final outputs of requests aborted since the last step. With async scheduling the
        batch is launched, the previous one read back, and the outputs are the previous one's (read
        back before the launch when the device has already finished it)."""
        prev, self._inflight = self._inflight, None
        if prev is not None and prev.done():
            # The device is idle (a host-bound step): read the last step back before launching the
            # next, as the synchronous engine does. The host does the same work per step, and the
            # tokens go out a launch earlier (a burst's first tokens waited for a prefill launch).
            self._due |= self._complete(prev)
            prev = None
        sched = self.scheduler.schedule()
        if sched.requests:
            try:
                self._inflight = self._launch(sched, prev)
            except BaseException as exc:
                self._due |= self._fail_step(sched, exc)
                if not isinstance(exc, Exception):
                    self._due |= self._complete(prev) if prev is not None else set()
                    raise
        elif self.scheduler.waiting and not self.scheduler.running and prev is None:
            # Nothing runs and the head of the queue still cannot be admitted: it never will be.
            head = self.scheduler.waiting[0]
            self._finish(head, "error", "does not fit in the KV pool even when it is empty")
            self._due.add(head.group_id)
        if prev is not None:
            self._due |= self._complete(prev)
        if self._inflight is not None and not self.async_scheduling:
            self._due |= self._complete(self._inflight)
            self._inflight = None
        if sched.requests:  # what the step leaves held, as stats() reads it between steps
            self.peaks.update(self.kv.usage(), len(self.scheduler.running))  # typed, no dict, no sync
        due, self._due = self._due, set()
        return self._outputs_for(due)

    def _launch(self, sched: ScheduleResult, prev: InFlight | None) -> InFlight:
        """Compute the scheduled tokens and start sampling, without waiting for the device; the
        rows whose input ``prev`` sampled take it from the device."""
        now = time.perf_counter()
        for req in sched.requests:
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        batch = self.runner.build_batch(sched.requests, sched.num_new_tokens)
        batch.input_patch = input_patch(sched.requests, batch.query_start, prev, self.config.torch_device)
        to_sample = [
            i for i, (r, n) in enumerate(zip(sched.requests, sched.num_new_tokens))
            if r.num_computed_tokens + n == r.num_tokens
        ]
        logits = self.runner.run(batch, [batch.query_start[i + 1] - 1 for i in to_sample])
        for req, n in zip(sched.requests, sched.num_new_tokens):
            req.num_computed_tokens += n
        self.num_computed_tokens_total += sum(sched.num_new_tokens)
        self.kv.end_step(batch)
        self.num_steps += 1
        rows, sampled = self._families([sched.requests[i] for i in to_sample])
        inflight = launch_sampling(logits, rows, sampled, sched.requests)
        for req in sampled:
            req.num_pending_tokens += 1
        return inflight

    def _families(self, reqs: list[Request]) -> tuple[list[int], list[Request]]:
        """Fork the ``n`` samples of the new parents among ``reqs`` (row ``i`` of the step's logits
        each); returns the logits row of every request to sample, and those requests. A request
        whose fork fails is failed alone."""
        rows, sampled = [], []
        for row, req in enumerate(reqs):
            family = [req]
            if req.params.n > 1 and req.parent_id is None and req.num_tokens == req.num_prompt_tokens:
                try:
                    family += self._fork(req)
                except Exception as exc:  # noqa: BLE001 - this request's failure only
                    for r in self._groups[req.request_id]:
                        self._fail(r, "forking its samples", exc)
                    continue
            rows += [row] * len(family)
            sampled += family
        return rows, sampled

    def _complete(self, step: InFlight) -> set[str]:
        """Read ``step``'s tokens back and give each request its token (stop checks included);
        requests finished since it was launched (aborted, or stopped by their previous token) drop
        theirs. Returns the groups touched."""
        try:
            tokens, logprobs = step.wait()
        except Exception as exc:  # noqa: BLE001 - the device failed this step: its requests only
            for req in step.sampled:
                if not req.is_finished:
                    self._finish(req, "error", f"the engine step failed: {type(exc).__name__}: {exc}")
            return {r.group_id for r in step.requests}
        now, limit = time.perf_counter(), self.token_limit  # the limit: once a step, not once a request
        for i, req in enumerate(step.sampled):
            if req.is_finished:
                continue
            req.num_pending_tokens -= 1
            if i in step.errors:
                self._fail(req, "sampling", step.errors[i])
                continue
            try:
                self._append(req, tokens[i], step, i, logprobs, now, limit)
            except Exception as exc:  # noqa: BLE001 - this request's failure only
                self._fail(req, "processing its token", exc)
        return {r.group_id for r in step.requests}

    def _append(self, req: Request, tok: int, step: InFlight, i: int, logprobs: list[float] | None,
                now: float, limit: int) -> None:
        """Append ``tok``, ``step``'s ``i``-th sampled token (forced tokens already applied), to
        ``req``'s output, with its logits and log-probability when asked for."""
        req.output_token_ids.append(tok)
        req.token_times.append(now)
        if req.params.return_logits:
            req.logits.append(step.host_logits[i])
        if logprobs is not None and req.params.logprobs:
            req.logprobs.append(logprobs[i])
        reason = stop_reason(req, tok, self.tokenizer, limit)
        if reason is not None:
            self._finish(req, reason)

    def _fail(self, req: Request, stage: str, exc: BaseException) -> None:
        """Finish ``req`` with ``finish_reason="error"`` for ``exc``, raised while ``stage``."""
        logger.warning("request %s failed while %s", req.request_id, stage, exc_info=exc)
        self._finish(req, "error", f"failed while {stage}: {type(exc).__name__}: {exc}")

    def _fail_step(self, sched: ScheduleResult, exc: BaseException) -> set[str]:
        """The step failed as a whole: fail its requests, and the samples forked in it (running with
        every position computed and no token: the next step would have nothing to feed them)."""
        scheduled = {id(r) for r in sched.requests}
        victims = [r for r in sched.requests if not r.is_finished] + [
            r for r in self.scheduler.running if id(r) not in scheduled and r.num_computed_tokens >= r.num_tokens
        ]
        if isinstance(exc, Exception):
            logger.error("engine step failed; failing its %d requests", len(victims), exc_info=exc)
        for r in victims:
            self._finish(r, "error", f"the engine step failed: {type(exc).__name__}: {exc}")
        return {r.group_id for r in victims}

    def _fork(self, parent: Request) -> list[Request]:
        children = []
        for k in range(1, parent.params.n):
            seed = None if parent.params.seed is None else parent.params.seed + k
            child = parent.sample(k, self._generator(seed))
            # Known to the engine before the strategy shares KV with it: a failed fork frees it too.
            self.requests[child.request_id] = child
            self._groups[parent.request_id].append(child)
            self.scheduler.add_running(child)
            self.manager.fork(parent, child)
            children.append(child)
        return children

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if error is not None:
            req.error = f"request {req.request_id}: {error}"
        req.finished_time = time.perf_counter()
        self.scheduler.remove(req)
        self.manager.free(req)

    # ---- outputs and stats ---------------------------------------------------------------------------
    def _outputs_for(self, ids: set[str]) -> list[RequestOutput]:
        """Outputs of the groups ``ids``, oldest first (an unfinished ``FINAL_ONLY`` one has none);
        a finished group is forgotten here. Groups without an output are dropped before the sort: in a
        ``FINAL_ONLY`` batch (``LLM.generate``) that is all but the few finishing."""
        final, outs = RequestOutputKind.FINAL_ONLY, []
        ready = [(rid, g) for rid, g in ((r, self._groups.get(r)) for r in ids) if g is not None
                 and (g[0].params.output_kind is not final or all(r.is_finished for r in g))]
        for rid, group in sorted(ready, key=lambda x: x[1][0].arrival_time):
            out = build_output(group, self.tokenizer)
            outs.append(out)
            if out.finished:
                for r in group:
                    self.requests.pop(r.request_id, None)
                del self._groups[rid]
        return outs

    def load(self) -> dict[str, int]:
        """What a serving timeline samples after each step: request counts and KV bytes, from
        typed counters (cheap: no strategy stats, no device sync); keys as in :meth:`stats`."""
        u, sched = self.kv.usage(), self.scheduler
        out = {"num_running": len(sched.running), "num_waiting": len(sched.waiting),
               "num_preemptions": sched.num_preemptions, "kv_bytes_used": u.kv_bytes_used,
               "kv_bytes_allocated": u.kv_bytes_allocated}
        return out if u.host_kv_bytes is None else {**out, "host_kv_bytes": u.host_kv_bytes}

    def stats(self) -> dict[str, Any]:
        """Engine counters plus the strategy's KV accounting (see docs/architecture.md)."""
        return {
            "strategy": self.kv.name,
            "num_steps": self.num_steps,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_swap_preemptions": self.scheduler.num_swap_preemptions,
            "num_computed_tokens": self.num_computed_tokens_total,
            "cuda_graph_sizes": self.graph_sizes or [],
            "cuda_graph_replays": self.runner.graph_replays,
            "piecewise_graph_sizes": self.piecewise_sizes or [],
            "piecewise_graph_replays": self.runner.piecewise_replays,
            "async_scheduling": self.async_scheduling,
            **self.kv.stats(),
            **self.peaks.as_dict(),
        }


