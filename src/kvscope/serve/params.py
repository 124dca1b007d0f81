"""A validated OpenAI request -> prompt token ids and :class:`SamplingParams`, or a 400 naming the field.

The engine stays the judge of what it can hold (prompt longer than the context or the KV pool:
``add_request`` rejects it and the server blames the prompt field). Checked here, because only
the server knows which field a limit concerns: the model name, fields kvscope cannot honour,
``prompt + max_tokens`` against the context (vLLM's rule), ``n > 1`` on a strategy that cannot
fork KV or more samples than a batch holds, and the memory that top-N logprobs would take.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.engine.sampling_params import SamplingParams
from kvscope.errors import ConfigError
from kvscope.models.tokenizer import Tokenizer
from kvscope.serve.engine_api import ServingLimits
from kvscope.serve.errors import APIError, bad_request
from kvscope.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest

#: Top-N logprobs keep every step's float32 logits row until the request ends (vocab x 4 bytes a
#: token); a request whose rows could exceed this is refused rather than allowed to exhaust memory.
TOP_LOGPROBS_MAX_BYTES = 256 << 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Plan:
    """One request, ready for the engine.

    ``top_logprobs``: None when no logprobs were asked; 0 for the chosen token's only; k for the
    k most likely alternatives too. ``prompt_param`` is the field engine rejections are blamed on.
    """

    prompts: list[list[int]]
    params: SamplingParams
    top_logprobs: int | None
    stream: bool
    include_usage: bool
    prompt_param: str


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"The model `{requested}` does not exist; this server serves `{served}`",
                       param="model", code="model_not_found")


def _reject_unsupported(req: SamplingRequest, extra: dict[str, Any]) -> None:
    """OpenAI fields kvscope knows but cannot honour: fine at their defaults, a 400 otherwise."""
    unsupported = {
        "presence_penalty": req.presence_penalty != 0.0,
        "frequency_penalty": req.frequency_penalty != 0.0,
        "logit_bias": bool(req.logit_bias),
        **extra,
    }
    for name, set_ in unsupported.items():
        if set_:
            raise bad_request(f"'{name}' is not supported by kvscope serve", name)


def completion_plan(req: CompletionRequest, tokenizer: Tokenizer, limits: ServingLimits) -> Plan:
    _reject_unsupported(req, {
        "echo": req.echo,
        "suffix": bool(req.suffix),
        "best_of": req.best_of is not None and req.best_of != req.n,
    })
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif prompt and isinstance(prompt[0], str):
        prompts = [tokenizer.encode(p) for p in prompt]  # type: ignore[arg-type]
    elif prompt and isinstance(prompt[0], list):
        prompts = [list(p) for p in prompt]  # type: ignore[arg-type]
    else:  # token ids ([] too: the engine refuses an empty prompt, naming it)
        prompts = [list(prompt)]  # type: ignore[arg-type]
    top = req.logprobs
    params = _sampling_params(req, prompts, limits, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, top, "logprobs")
    return Plan(prompts, params, top, req.stream, _include_usage(req), "prompt")


def chat_plan(req: ChatCompletionRequest, tokenizer: Tokenizer, limits: ServingLimits) -> Plan:
    _reject_unsupported(req, {
        "tools": bool(req.tools),
        "tool_choice": req.tool_choice not in (None, "none"),
        "response_format": req.response_format not in (None, {"type": "text"}),
    })
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if not tokenizer.has_chat_template:
        raise bad_request("this model's tokenizer has no chat template; use /v1/completions with a plain "
                          "prompt", "messages")
    messages = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise bad_request("only text content parts ({'type': 'text', 'text': ...}) are supported",
                                  f"messages[{i}].content")
            content = "".join(p.text for p in m.content)  # type: ignore[misc]
        else:
            content = m.content or ""
        messages.append({"role": m.role, "content": content})
    try:
        prompt = tokenizer.apply_chat_template(messages)
    except Exception as e:  # jinja raises TemplateError for conversations a template refuses
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
    top = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params = _sampling_params(req, [prompt], limits, max_tokens, None, top, "top_logprobs", max_param)
    return Plan([prompt], params, top, req.stream, _include_usage(req), "messages")


def _include_usage(req: SamplingRequest) -> bool:
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
    return bool(req.stream_options and req.stream_options.include_usage)


def _sampling_params(
    req: SamplingRequest,
    prompts: list[list[int]],
    limits: ServingLimits,
    max_tokens: int | None,
    default_max_tokens: int | None,
    top_logprobs: int | None,
    logprobs_param: str,
    max_tokens_param: str = "max_tokens",
) -> SamplingParams:
    longest = max(len(p) for p in prompts)
    room = limits.max_model_len - longest
    if max_tokens is None:
        # Up to the context (vLLM's default), or OpenAI's 16 for completions; a prompt with no room
        # left is the engine's to reject (named as the prompt's fault), so ask for one token.
        max_tokens = max(1, room if default_max_tokens is None else min(default_max_tokens, room))
    elif 0 <= room < max_tokens:
        raise bad_request(
            f"this model's context is {limits.max_model_len} tokens; the prompt has {longest} and "
            f"'{max_tokens_param}' asks for {max_tokens} more ({longest + max_tokens} in all)", max_tokens_param)
    if req.n > 1 and not limits.supports_fork:
        raise bad_request(
            f"n={req.n} needs a KV strategy that can fork a request's KV; strategy {limits.strategy!r} cannot "
            "(see `kvscope strategies`)", "n")
    if req.n > limits.max_num_seqs:  # a request's samples all run in one batch
        raise bad_request(f"n={req.n} is more than the server's --max-num-seqs ({limits.max_num_seqs})", "n")
    if top_logprobs and max_tokens * limits.vocab_size * 4 > TOP_LOGPROBS_MAX_BYTES:
        raise bad_request(
            f"top-{top_logprobs} logprobs keep {limits.vocab_size * 4} bytes of logits per token; with "
            f"max_tokens={max_tokens} that exceeds the server's {TOP_LOGPROBS_MAX_BYTES >> 20} MiB per "
            "request: lower max_tokens or ask for the chosen token's logprob only (0)", logprobs_param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise bad_request("stop strings must be non-empty", "stop")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0),
            seed=req.seed,
            n=req.n,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            logprobs=top_logprobs is not None,
            return_logits=bool(top_logprobs),
        )
    except ConfigError as e:  # SamplingParams names the field in its message
        raise bad_request(str(e), None) from None
