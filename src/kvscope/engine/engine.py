"""The step-level engine: requests in, one scheduled model step at a time, outputs out."""
from __future__ import annotations

import itertools
import random
import time
from typing import TYPE_CHECKING, Any

import torch

from kvscope.config import DEFAULT_CPU_KV_BYTES, EngineConfig
from kvscope.engine.cuda_graph import DecodeGraphs, default_graph_sizes
from kvscope.engine.model_runner import ModelRunner
from kvscope.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvscope.engine.request import Request, RequestStatus
from kvscope.engine.sampler import sample
from kvscope.engine.sampling_params import SamplingParams
from kvscope.engine.scheduler import Scheduler
from kvscope.errors import ConfigError, RequestError
from kvscope.kv.base import KVSetup, KVStrategy

if TYPE_CHECKING:
    from kvscope.models.loader import LoadedModel

_STOP_STR_LOOKBACK = 32  # extra characters re-decoded when checking for a stop string


class LLMEngine:
    """One model, one KV strategy, a scheduler and a sampler.

    ``add_request`` validates and queues; ``step`` runs one scheduled batch and returns the
    outputs of every request that produced a token (``finished`` tells which are done);
    ``abort`` removes a request at any time. Bad requests raise :class:`RequestError` in
    ``add_request`` and never disturb the requests already being served.
    """

    def __init__(self, loaded: LoadedModel, kv: KVStrategy, config: EngineConfig) -> None:
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.kv = kv
        if config.preemption_mode == "swap" and not kv.supports_swap:
            raise ConfigError(f"strategy {kv.name!r} does not support preemption_mode='swap'")
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_position_embeddings,
            loaded.config.max_position_embeddings,
        )
        self.graph_sizes = (
            None if config.enforce_eager or config.torch_device.type != "cuda"
            else config.cuda_graph_sizes or default_graph_sizes(config.max_num_seqs)
        )
        kv.bind(
            KVSetup(
                model=loaded.config,
                device=config.torch_device,
                dtype=config.torch_dtype,
                kv_memory_bytes=self._kv_bytes(),
                max_model_len=self.max_model_len,
                max_num_seqs=config.max_num_seqs,
                swap_space_bytes=config.swap_space_bytes,
                attention_backend=config.resolved_attention_backend,
                cuda_graph_sizes=self.graph_sizes,
            )
        )
        kv.attach_model(loaded)
        self.scheduler = Scheduler(
            kv, config.max_num_seqs, config.max_num_batched_tokens, config.preemption_mode
        )
        self.runner = ModelRunner(self.model, kv, config.torch_device, self._capture_graphs())
        self.requests: dict[str, Request] = {}
        self._groups: dict[str, list[Request]] = {}  # parent id -> its n samples, parent first
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_steps = 0
        self.num_computed_tokens_total = 0
        self._peaks: dict[str, float] = {}

    def _capture_graphs(self) -> DecodeGraphs | None:
        if self.graph_sizes is None or self.kv.block_table_layout() is None:
            return None
        return DecodeGraphs(self.model, self.kv, self.graph_sizes, self.max_model_len, self.config.torch_device)

    def _kv_bytes(self) -> int:
        cfg = self.config
        if cfg.kv_memory_bytes is not None:
            return cfg.kv_memory_bytes
        if cfg.torch_device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(cfg.torch_device)
            return int(free * cfg.kv_memory_fraction)
        return DEFAULT_CPU_KV_BYTES

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
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use")
        if not token_ids:
            raise RequestError(f"request {rid}: the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise RequestError(f"request {rid}: prompt token ids must be in [0, {vocab})")
        n = len(token_ids)
        if n > self.max_model_len:
            raise RequestError(
                f"request {rid}: prompt has {n} tokens, more than the model's context "
                f"(max_model_len={self.max_model_len})"
            )
        if n > self.kv.max_request_tokens():
            raise RequestError(
                f"request {rid}: prompt has {n} tokens but the whole KV pool of strategy "
                f"{self.kv.name!r} holds at most {self.kv.max_request_tokens()} tokens per request"
            )
        forced = params.forced_token_ids or []
        if forced and (min(forced) < 0 or max(forced) >= vocab):
            raise RequestError(f"request {rid}: forced_token_ids must be in [0, {vocab})")
        if params.n > 1 and not self.kv.supports_fork:
            raise RequestError(f"request {rid}: n={params.n} needs a strategy that can fork KV")
        req = Request(
            request_id=rid,
            prompt_token_ids=token_ids,
            params=params,
            eos_token_ids=() if params.ignore_eos else self.tokenizer.eos_token_ids,
            prompt=text,
            arrival_time=arrival_time if arrival_time is not None else time.perf_counter(),
            generator=self._generator(params.seed),
        )
        self.requests[rid] = req
        self._groups[rid] = [req]
        self.scheduler.add(req)
        return rid

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.config.torch_device)
        gen.manual_seed(seed if seed is not None else self._rng.randrange(1 << 62))
        return gen

    def abort(self, request_id: str) -> None:
        """Stop a request (and its forked samples) now, freeing its KV. Unknown ids are ignored."""
        for req in self._groups.get(request_id, []):
            if not req.is_finished:
                self._finish(req, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.requests:
            if self.scheduler.waiting and not self.scheduler.running:
                # Nothing runs and the head of the queue still cannot be admitted: it never will be.
                head = self.scheduler.waiting[0]
                self._finish(head, "error", "does not fit in the KV pool even when it is empty")
                return self._outputs_for({head.parent_id or head.request_id})
            return []
        now = time.perf_counter()
        for req in sched.requests:
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        batch = self.runner.build_batch(sched.requests, sched.num_new_tokens)
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

        sampled_reqs = [sched.requests[i] for i in to_sample]
        rows = list(range(len(to_sample)))
        for row, req in list(zip(rows, sampled_reqs)):
            if req.params.n > 1 and req.parent_id is None and not req.output_token_ids:
                for child in self._fork(req):
                    sampled_reqs.append(child)
                    rows.append(row)
        tokens = sample(logits[rows], sampled_reqs)
        now = time.perf_counter()
        touched = set()
        for row, req, tok in zip(rows, sampled_reqs, tokens):
            forced = req.params.forced_token_ids
            if forced is not None:
                tok = forced[len(req.output_token_ids)]
            req.output_token_ids.append(tok)
            req.token_times.append(now)
            if req.params.return_logits:
                req.logits.append(logits[row].detach().cpu())
            if req.params.logprobs:
                req.logprobs.append(float(torch.log_softmax(logits[row], -1)[tok]))
            self._check_stop(req, tok)
            touched.add(req.parent_id or req.request_id)
        self._track_peaks()
        return self._outputs_for(touched)

    def _fork(self, parent: Request) -> list[Request]:
        children = []
        for k in range(1, parent.params.n):
            seed = None if parent.params.seed is None else parent.params.seed + k
            child = Request(
                request_id=f"{parent.request_id}#{k}",
                prompt_token_ids=parent.prompt_token_ids,
                params=parent.params,
                eos_token_ids=parent.eos_token_ids,
                prompt=parent.prompt,
                arrival_time=parent.arrival_time,
                num_computed_tokens=parent.num_computed_tokens,
                parent_id=parent.request_id,
                child_index=k,
                first_scheduled_time=parent.first_scheduled_time,
                generator=self._generator(seed),
            )
            self.kv.fork(parent, child)
            self.scheduler.add_running(child)
            self.requests[child.request_id] = child
            self._groups[parent.request_id].append(child)
            children.append(child)
        return children

    def _check_stop(self, req: Request, tok: int) -> None:
        p = req.params
        if tok in req.eos_token_ids or tok in p.stop_token_ids:
            self._finish(req, "stop")
        elif p.stop and self._match_stop_string(req):
            self._finish(req, "stop")
        elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.token_limit:
            self._finish(req, "length")

    def _match_stop_string(self, req: Request) -> bool:
        p = req.params
        text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=p.skip_special_tokens)
        window = max(len(s) for s in p.stop) + _STOP_STR_LOOKBACK
        start = max(0, len(text) - window)
        hits = [(text.find(s, start), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        req.text_end = i + len(s) if p.include_stop_str_in_output else i
        return True

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if error is not None:
            req.error = f"request {req.request_id}: {error}"
        req.finished_time = time.perf_counter()
        self.scheduler.remove(req)
        self.kv.free(req)

    # ---- outputs and stats ---------------------------------------------------------------------------
    def _outputs_for(self, ids: set[str]) -> list[RequestOutput]:
        outs = []
        for rid in sorted(ids, key=lambda r: self._groups[r][0].arrival_time if r in self._groups else 0):
            group = self._groups.get(rid)
            if group is None:
                continue
            outs.append(self._make_output(group))
            if all(r.is_finished for r in group) and len(group) == group[0].params.n:
                for r in group:
                    self.requests.pop(r.request_id, None)
                del self._groups[rid]
        return outs

    def _make_output(self, group: list[Request]) -> RequestOutput:
        head = group[0]
        decode = lambda ids, s=head.params.skip_special_tokens: self.tokenizer.decode(ids, skip_special_tokens=s)  # noqa: E731
        completions = [
            CompletionOutput(
                index=r.child_index,
                token_ids=list(r.output_token_ids),
                finish_reason=r.finish_reason,
                _decode=decode,
                text_end=r.text_end,
                error=r.error,
                logits=list(r.logits),
                logprobs=list(r.logprobs),
            )
            for r in group
        ]
        finished = all(r.is_finished for r in group) and len(group) == head.params.n
        return RequestOutput(
            request_id=head.request_id,
            prompt=head.prompt,
            prompt_token_ids=head.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=RequestMetrics(
                arrival_time=head.arrival_time,
                first_scheduled_time=head.first_scheduled_time,
                token_times=list(head.token_times),
                finished_time=head.finished_time,
                num_prompt_tokens=head.num_prompt_tokens,
                num_prefix_cached_tokens=head.num_prefix_cached_tokens,
                num_preemptions=head.num_preemptions,
            ),
        )

    def _track_peaks(self) -> None:
        kv = self.kv.stats()
        for key in ("kv_bytes_used", "kv_bytes_allocated", "host_kv_bytes"):
            if key in kv:
                self._peaks[f"peak_{key}"] = max(self._peaks.get(f"peak_{key}", 0), kv[key])
        self._peaks["peak_num_running"] = max(self._peaks.get("peak_num_running", 0), len(self.scheduler.running))

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
            **self.kv.stats(),
            **self._peaks,
        }
