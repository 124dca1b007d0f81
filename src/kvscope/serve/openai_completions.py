"""``POST /v1/completions``: a prompt (text or token ids, or a batch of them) -> ``n`` choices each.

Choice ``index`` is ``prompt_index * n + sample_index``, as OpenAI numbers a batch. Streaming
sends one chunk per choice update that brought a token (also a token that adds no text yet, as vLLM
does: a client counts tokens by chunks); ``logprobs: k`` gives each token's logprob and, for k > 0, a
``top_logprobs`` dict of the k most likely tokens plus the chosen one (k = 0: ``top_logprobs`` is
null).
"""
from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from kvscope.engine.outputs import RequestOutput
from kvscope.models.tokenizer import Tokenizer
from kvscope.serve.detokenize import ChoiceStream, Logprobs, TokenLogprob
from kvscope.serve.generation import (EventTemplate, ServingContext, finish_reason, new_request_id, respond, sse,
                                     usage)
from kvscope.serve.params import Plan, check_model, completion_plan
from kvscope.serve.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request) -> Response:
    check_model(req.model, ctx.model_name)
    plan = completion_plan(req, ctx.tokenizer, ctx.limits)
    rid = new_request_id("cmpl")
    logprobs = Logprobs(ctx.tokenizer, plan.top_logprobs) if plan.top_logprobs is not None else None
    chunks = _Chunks(ctx.model_name, rid, plan, ctx.tokenizer, logprobs) if plan.stream else None

    def body(outputs: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                lp = _logprobs(logprobs.entries(c), 0, plan.top_logprobs)[0] if logprobs else None
                choices.append(CompletionChoice(index=i * plan.params.n + c.index, text=c.text, logprobs=lp,
                                                finish_reason=finish_reason(c)))
        return CompletionResponse(id=rid, model=ctx.model_name, choices=choices, usage=usage(outputs))

    return await respond(ctx, raw, plan, rid, chunks, body)


def _logprobs(entries: list[TokenLogprob], offset: int, k: int | None) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy logprobs object for ``entries`` whose text starts at character ``offset``;
    also the offset after them."""
    lp = CompletionLogprobs(top_logprobs=[] if k else None)
    for e in entries:
        lp.tokens.append(e.token)
        lp.token_logprobs.append(e.logprob)
        lp.text_offset.append(offset)
        offset += len(e.token)
        if lp.top_logprobs is not None:
            lp.top_logprobs.append({**dict(e.top), e.token: e.logprob})
    return lp, offset


class _Chunks:
    """The streamed chunks of one request: per-choice text and logprob progress."""

    def __init__(self, model: str, rid: str, plan: Plan, tokenizer: Tokenizer, logprobs: Logprobs | None) -> None:
        self._model, self._rid, self._plan = model, rid, plan
        self._created = int(time.time())
        num_choices = len(plan.prompts) * plan.params.n
        self._choices = [ChoiceStream(tokenizer, plan.params, logprobs) for _ in range(num_choices)]
        self._offsets = [0] * num_choices  # characters of text before each choice's next token
        self._latest: dict[int, RequestOutput] = {}
        self._templates: dict[int, EventTemplate] = {}

    def head(self) -> list[str]:
        return []  # a completion's first chunk already carries text

    def _chunk(self, choices: list[CompletionChoice], **usage_field: object) -> CompletionResponse:
        return CompletionResponse(id=self._rid, created=self._created, model=self._model, choices=choices,
                                  **usage_field)

    def _text_events(self, index: int) -> EventTemplate:
        """Chunks of one choice without logprobs, as :meth:`_chunk` would make them."""
        template = self._templates.get(index)
        if template is None:
            chunk: dict[str, object] = {
                "id": self._rid, "object": "text_completion", "created": self._created, "model": self._model,
                "choices": [{"index": index, "text": EventTemplate.TEXT, "logprobs": None,
                             "finish_reason": EventTemplate.REASON}]}
            if self._plan.include_usage:
                chunk["usage"] = None
            template = self._templates[index] = EventTemplate(chunk)
        return template

    def update(self, updates: dict[int, RequestOutput]) -> list[str]:
        events = []
        self._latest.update(updates)
        for i, out in sorted(updates.items()):
            for c in out.outputs:
                index = i * self._plan.params.n + c.index
                state = self._choices[index]
                if state.done:
                    continue
                text, entries = state.update(c)
                reason = finish_reason(c) if c.finished else None
                lp = None
                if entries is not None:
                    lp, self._offsets[index] = _logprobs(entries, self._offsets[index], self._plan.top_logprobs)
                if not (text or entries or reason or state.new_tokens):
                    continue
                if lp is not None:
                    choice = CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=reason)
                    events.append(sse(self._chunk([choice]), self._plan.include_usage))
                else:
                    events.append(self._text_events(index)(text, reason))
        return events

    def tail(self) -> list[str]:
        if not self._plan.include_usage:
            return []
        outputs = [self._latest[i] for i in sorted(self._latest)]
        return [sse(self._chunk([], usage=usage(outputs)), True)]
