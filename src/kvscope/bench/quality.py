"""Quality of a KV strategy, measured through the engine's public API.

Every request goes through ``LLM.generate`` (``engine.add_request`` / ``engine.step``), so the
strategy manages its cache exactly as it would when serving: an eviction strategy drops tokens
as decoding goes, and what it dropped shows in the numbers.

- :func:`perplexity`: teacher-forced decoding of real text; each token is predicted from the
  cache the strategy kept.
- :func:`ruler_accuracy`: greedy answers to RULER needle-in-a-haystack prompts, scored as RULER
  scores them.
- :func:`agreement`: how closely a strategy's greedy outputs follow the full cache's.

All results are plain, JSON-serialisable dicts.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvscope.engine.outputs import RequestOutput
from kvscope.engine.sampling_params import SamplingParams
from kvscope.errors import ConfigError, RequestError
from kvscope.workload.ruler_scoring import postprocess_prediction, score_prediction

if TYPE_CHECKING:
    from kvscope.llm import LLM


def perplexity(
    llm: "LLM",
    token_ids: Sequence[Sequence[int]],
    prefix: int = 1,
    return_token_nll: bool = False,
    use_tqdm: bool = False,
) -> dict[str, Any]:
    """Perplexity of ``token_ids`` under the model with ``llm``'s KV strategy.

    Each sequence becomes one request whose prompt is its first ``prefix`` tokens and whose
    outputs are forced to the rest; all sequences are submitted together (batched). Token ``t``
    (``t >= prefix``) is scored by the log-probability the model gave it after the prompt was
    prefilled and tokens ``prefix .. t-1`` were decoded one at a time through the strategy's
    cache. With a lossless strategy this is the full-sequence perplexity of tokens
    ``prefix ..`` (the first ``prefix`` tokens are context only).

    Returns ``mean_nll`` (nats per token, pooled over all scored tokens), ``perplexity``
    (``exp(mean_nll)``), ``tokens_scored``, ``num_sequences``, ``prefix``, ``strategy``,
    ``elapsed_s`` and ``per_sequence`` (``index``, ``tokens_scored``, ``mean_nll``,
    ``perplexity``, and ``token_nll`` when ``return_token_nll``).
    """
    if prefix < 1:
        raise ConfigError(f"prefix must be >= 1 (a request needs a prompt), got {prefix}")
    if not token_ids:
        raise ConfigError("perplexity needs at least one sequence")
    seqs = [[int(t) for t in s] for s in token_ids]
    for i, s in enumerate(seqs):
        if len(s) <= prefix:
            raise ConfigError(f"sequence {i} has {len(s)} tokens; it needs more than prefix={prefix}")
    params = [
        SamplingParams(
            max_tokens=len(s) - prefix,
            temperature=0.0,  # the sampled token is replaced by the forced one; greedy skips the RNG
            ignore_eos=True,
            logprobs=True,
            forced_token_ids=s[prefix:],
        )
        for s in seqs
    ]
    start = time.perf_counter()
    outs = llm.generate([s[:prefix] for s in seqs], params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start

    per_sequence = []
    total_nll, total_tokens = 0.0, 0
    for i, (s, out) in enumerate(zip(seqs, outs)):
        logprobs = out.outputs[0].logprobs
        if len(logprobs) != len(s) - prefix or out.token_ids != s[prefix:]:
            # Cut short (KV pool or context limit, abort): a partial score would be misleading.
            raise RequestError(
                f"sequence {i}: scored {len(logprobs)} of {len(s) - prefix} tokens "
                f"(finish_reason={out.finish_reason!r}{', ' + out.error if out.error else ''})"
            )
        nll = [-lp for lp in logprobs]
        seq_nll = sum(nll)
        total_nll += seq_nll
        total_tokens += len(nll)
        record: dict[str, Any] = {
            "index": i,
            "tokens_scored": len(nll),
            "mean_nll": seq_nll / len(nll),
            "perplexity": math.exp(seq_nll / len(nll)),
        }
        if return_token_nll:
            record["token_nll"] = nll
        per_sequence.append(record)
    mean_nll = total_nll / total_tokens
    return {
        "strategy": strategy_spec(llm),
        "num_sequences": len(seqs),
        "prefix": prefix,
        "tokens_scored": total_tokens,
        "mean_nll": mean_nll,
        "perplexity": math.exp(mean_nll),
        "elapsed_s": elapsed,
        "per_sequence": per_sequence,
    }


def ruler_accuracy(
    llm: "LLM",
    samples: Sequence[dict[str, Any]],
    max_tokens: int | None = None,
    chat: bool = False,
    use_tqdm: bool = False,
) -> dict[str, Any]:
    """Greedy answers to RULER ``samples`` (from :func:`kvscope.workload.ruler.ruler_samples`), scored
    with RULER's string match (per task: all expected answers, or any of them for QA).

    Args:
        max_tokens: tokens to generate per sample; None takes the sample's RULER
            ``tokens_to_generate`` (128 for niah), or 128 when a sample does not say.
        chat: wrap each prompt in the model's chat template: the question goes in a user turn
            and the sample's ``answer_prefix`` starts the assistant's reply (RULER's chat
            wrappers do the same). Off by default: RULER's ``base`` template is the bare prompt.

    All samples are submitted together. Returns ``accuracy`` (mean score in [0, 1]), ``score``
    (RULER's figure, 100 x accuracy rounded to 2 decimals), ``num_samples``, ``per_task``
    (the same per task), ``strategy``, ``elapsed_s`` and ``samples`` (``index``, ``task``,
    ``length``, ``prompt_tokens``, ``outputs``, ``prediction``, ``score``, ``finish_reason``).
    """
    if not samples:
        raise ConfigError("ruler_accuracy needs at least one sample")
    prompts: list[str | list[int]] = []
    params = []
    for s in samples:
        if chat:
            prompts.append(_chat_prompt(llm, s))
        else:
            prompts.append(s["input"])
        n = max_tokens if max_tokens is not None else int(s.get("tokens_to_generate", 128))
        params.append(SamplingParams(max_tokens=n, temperature=0.0))
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start

    records = []
    by_task: dict[str, list[float]] = defaultdict(list)
    for s, out in zip(samples, outs):
        if out.error:
            raise RequestError(f"RULER sample {s.get('index')} ({s['task']}): {out.error}")
        score = score_prediction(s["task"], out.text, s["outputs"])
        by_task[s["task"]].append(score)
        records.append({
            "index": s.get("index"),
            "task": s["task"],
            "length": s.get("length"),
            "prompt_tokens": len(out.prompt_token_ids),
            "outputs": list(s["outputs"]),
            "prediction": postprocess_prediction(out.text),
            "score": score,
            "finish_reason": out.finish_reason,
        })
    scores = [r["score"] for r in records]
    return {
        "strategy": strategy_spec(llm),
        "num_samples": len(records),
        **_summary(scores),
        "per_task": {task: {"num_samples": len(v), **_summary(v)} for task, v in by_task.items()},
        "elapsed_s": elapsed,
        "samples": records,
    }


def strategy_spec(llm: "LLM") -> str:
    """The strategy as a ``name:key=value,...`` spec (its ``strategy_args`` folded in), for records."""
    spec = llm.config.strategy
    if not isinstance(spec, str):  # a strategy instance: only its name is known
        return str(llm.engine.stats()["strategy"])
    extra = ",".join(f"{k}={v!r}" for k, v in (llm.config.strategy_args or {}).items())
    if not extra:
        return spec
    return f"{spec}{',' if ':' in spec else ':'}{extra}"


def _summary(scores: list[float]) -> dict[str, float]:
    accuracy = sum(scores) / len(scores)
    return {"accuracy": accuracy, "score": round(100 * accuracy, 2)}


def _chat_prompt(llm: "LLM", sample: dict[str, Any]) -> list[int]:
    """Chat-template ids: the question as a user turn, then the answer prefix as the reply's start."""
    text, answer_prefix = sample["input"], sample.get("answer_prefix", "")
    question = text[: len(text) - len(answer_prefix)] if answer_prefix else text
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    if answer_prefix:
        ids += llm.tokenizer.encode(answer_prefix.lstrip(), add_special_tokens=False)
    return ids


def agreement(
    reference_outputs: Sequence[RequestOutput | Sequence[int]],
    outputs: Sequence[RequestOutput | Sequence[int]],
) -> dict[str, Any]:
    """Token agreement of ``outputs`` with ``reference_outputs`` (e.g. a strategy vs the full cache).

    Both are per-request output token ids (or :class:`RequestOutput`), in the same request order.
    Per request: ``match_fraction`` = positions where both hold the same token, over the longer
    of the two lengths (a token one side lacks counts as a mismatch); ``first_divergence`` = the
    first position that differs (including where one sequence ends early), None if identical.
    In greedy decoding everything after the first divergence follows a different context, so
    ``first_divergence`` is the sharper measure; ``match_fraction`` also counts re-convergence.

    Returns ``match_fraction`` (pooled over all positions), ``exact_match`` (fraction of
    identical requests), ``mean_first_divergence`` (over the requests that diverge; None if
    none does), ``num_requests`` and ``per_request`` (``index``, ``reference_tokens``,
    ``tokens``, ``matches``, ``match_fraction``, ``first_divergence``).
    """
    if len(reference_outputs) != len(outputs):
        raise ConfigError(f"got {len(reference_outputs)} reference outputs and {len(outputs)} outputs")
    if not outputs:
        raise ConfigError("agreement needs at least one request")
    per_request = []
    total_matches = total_positions = 0
    for i, (ref, out) in enumerate(zip(reference_outputs, outputs)):
        r, o = _token_ids(ref), _token_ids(out)
        matches = sum(a == b for a, b in zip(r, o))
        positions = max(len(r), len(o))
        first = next((k for k, (a, b) in enumerate(zip(r, o)) if a != b), None)
        if first is None and len(r) != len(o):
            first = min(len(r), len(o))
        per_request.append({
            "index": i,
            "reference_tokens": len(r),
            "tokens": len(o),
            "matches": matches,
            "match_fraction": matches / positions if positions else 1.0,
            "first_divergence": first,
        })
        total_matches += matches
        total_positions += positions
    diverged = [p["first_divergence"] for p in per_request if p["first_divergence"] is not None]
    return {
        "num_requests": len(per_request),
        "match_fraction": total_matches / total_positions if total_positions else 1.0,
        "exact_match": sum(p["first_divergence"] is None for p in per_request) / len(per_request),
        "mean_first_divergence": sum(diverged) / len(diverged) if diverged else None,
        "per_request": per_request,
    }


def _token_ids(x: RequestOutput | Sequence[int]) -> list[int]:
    return list(x.token_ids) if isinstance(x, RequestOutput) else [int(t) for t in x]
