"""The user-facing facade: ``LLM(...).generate(prompts, SamplingParams)``."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from kvscope.config import EngineConfig
from kvscope.constants import DEFAULT_STRATEGY
from kvscope.engine.engine import LLMEngine
from kvscope.engine.outputs import RequestOutput
from kvscope.errors import ConfigError, RequestError
from kvscope.kv import registry
from kvscope.kv.base import KVStrategy
from kvscope.models.loader import LoadedModel, load_model
from kvscope.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int]


class LLM:
    """Load a model and a KV strategy into one engine.

    Args:
        model: ``smollm2-135m`` (default), ``qwen2.5-0.5b``, an HF safetensors folder, a ``.gguf``
            file, or ``dummy:<preset>``.
        strategy: a registered name (``kvscope strategies``), a ``name:key=value,...`` spec, or
            a :class:`KVStrategy` instance; ``strategy_args`` adds keyword arguments.
        kv_memory_bytes: size of the KV pool, in bytes or as a size string (``"64MiB"``); None takes
            a fraction of free device memory.
        loaded_model: weights and tokenizer already returned by :func:`load_model` for the same
            ``model``, ``device``, ``dtype`` (and ``seed``, for dummy models), to share them between
            engines instead of loading them again (a study's points do this). The engine never
            modifies the model, so each engine still gets its own KV strategy and state.
        tensor_parallel_size: (an :class:`EngineConfig` field) split the model over this many
            processes and devices (``kvscope.distributed``); call :meth:`close` when done.
        **engine_args: any other :class:`EngineConfig` field (``max_model_len``, ``max_num_seqs``,
            ``max_num_batched_tokens``, ``preemption_mode``, ``swap_space_bytes``, ``seed``...).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        strategy: str | KVStrategy = DEFAULT_STRATEGY,
        strategy_args: dict[str, Any] | None = None,
        kv_memory_bytes: int | str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        loaded_model: LoadedModel | None = None,
        **engine_args: Any,
    ) -> None:
        self.config = EngineConfig(
            model=model,
            strategy=strategy,
            strategy_args=strategy_args,
            kv_memory_bytes=kv_memory_bytes,
            device=device,
            dtype=dtype,
            **engine_args,
        )
        if self.config.tensor_parallel_size > 1:
            if loaded_model is not None:
                raise ConfigError("loaded_model cannot be shared with tensor_parallel_size > 1: each rank "
                                  "loads its own shard")
            from kvscope.distributed.launch import tensor_parallel_engine

            self.engine = tensor_parallel_engine(self.config)
            self.tokenizer = self.engine.tokenizer
            return
        kv = registry.create(strategy, strategy_args)
        loaded = loaded_model
        if loaded is None:
            loaded = load_model(model, self.config.torch_device, self.config.torch_dtype, self.config.seed)
        self.tokenizer = loaded.tokenizer
        self.engine = LLMEngine(loaded, kv, self.config)

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (also done when the LLM is garbage-collected
        or the interpreter exits); nothing to do on one rank. No generation works afterwards."""
        close = getattr(self.engine.runner, "close", None)
        if close is not None:
            close()

    def rank_stats(self) -> list[dict[str, Any]]:
        """Each rank's KV strategy counters (``kv.stats()``), rank 0's first: one entry on one rank.
        Under tensor parallelism every rank's must agree on counts (blocks, tokens held)."""
        ranks = getattr(self.engine.runner, "rank_stats", None)
        return ranks() if ranks is not None else [self.engine.kv.stats()]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        All prompts are validated before any runs: a bad one raises :class:`RequestError` naming
        its index, and the engine is left as it was. If the generation is interrupted (Ctrl-C, or
        any exception), this call's requests are aborted and their KV freed before the exception
        propagates, so the next call does not first finish them.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise RequestError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        # Only final outputs are returned, so the engine need not copy each growing output every step.
        final = RequestOutputKind.FINAL_ONLY
        params = [dataclasses.replace(p, output_kind=final) if isinstance(p, SamplingParams) else p for p in params]
        ids = self.engine.add_requests(prompts, params)
        try:
            return self._run(ids, use_tqdm)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise

    def chat(
        self,
        conversations: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to chat conversations through the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.tokenizer.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]
