"""``POST /v1/chat/completions``: messages -> the model's chat template -> ``n`` assistant replies.

Streaming sends each choice's ``{"role": "assistant", "content": ""}`` delta first, then content
deltas, the last one with ``finish_reason``. ``logprobs: true`` gives each token's logprob and bytes;
``top_logprobs: k`` adds the k most likely alternatives.
"""
from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from kvscope.engine.outputs import RequestOutput
from kvscope.models.tokenizer import Tokenizer
from kvscope.serve.detokenize import ChoiceStream, Logprobs, TokenLogprob
from kvscope.serve.generation import EventTemplate, ServingContext, finish_reason, new_request_id, respond, sse, usage
from kvscope.serve.params import Plan, chat_plan, check_model
from kvscope.serve.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    TopLogprob,
)
from kvscope.serve.protocol import TokenLogprob as TokenLogprobBody


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request) -> Response:
    check_model(req.model, ctx.model_name)
    plan = chat_plan(req, ctx.tokenizer, ctx.limits)
    rid = new_request_id("chatcmpl")
    logprobs = Logprobs(ctx.tokenizer, plan.top_logprobs) if plan.top_logprobs is not None else None
    chunks = _Chunks(ctx.model_name, rid, plan, ctx.tokenizer, logprobs) if plan.stream else None

    def body(outputs: list[RequestOutput]) -> ChatCompletionResponse:
        choices = [
            ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                       logprobs=_logprobs(logprobs.entries(c)) if logprobs else None, finish_reason=finish_reason(c))
            for c in outputs[0].outputs
        ]
        return ChatCompletionResponse(id=rid, model=ctx.model_name, choices=choices, usage=usage(outputs))

    return await respond(ctx, raw, plan, rid, chunks, body)


def _logprobs(entries: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprobBody(token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
                         top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in e.top])
        for e in entries
    ])


class _Chunks:
    """The streamed chunks of one chat request: per-choice text and logprob progress."""

    def __init__(self, model: str, rid: str, plan: Plan, tokenizer: Tokenizer, logprobs: Logprobs | None) -> None:
        self._model, self._rid, self._plan = model, rid, plan
        self._created = int(time.time())
        self._choices = [ChoiceStream(tokenizer, plan.params, logprobs) for _ in range(plan.params.n)]
        self._latest: RequestOutput | None = None
        self._templates: dict[int, EventTemplate] = {}

    def _event(self, choices: list[ChatStreamChoice], **usage_field: object) -> str:
        chunk = ChatCompletionChunk(id=self._rid, created=self._created, model=self._model, choices=choices,
                                    **usage_field)
        return sse(chunk, self._plan.include_usage)

    def head(self) -> list[str]:
        return [self._event([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(self._plan.params.n)]

    def update(self, updates: dict[int, RequestOutput]) -> list[str]:
        out = self._latest = updates[0]
        events = []
        for c in out.outputs:
            state = self._choices[c.index]
            if state.done:
                continue
            text, entries = state.update(c)
            reason = finish_reason(c) if c.finished else None
            if text and entries is None:
                events.append(self._content_events(c.index)(text, reason))
            elif text or entries or reason or state.new_tokens:
                lp = _logprobs(entries) if entries is not None else None
                choice = ChatStreamChoice(index=c.index, delta=DeltaMessage(content=text or None), logprobs=lp,
                                          finish_reason=reason)
                events.append(self._event([choice]))
        return events

    def _content_events(self, index: int) -> EventTemplate:
        """Chunks of one choice with content and no logprobs, as :meth:`_event` would make them."""
        template = self._templates.get(index)
        if template is None:
            chunk: dict[str, object] = {
                "id": self._rid, "object": "chat.completion.chunk", "created": self._created, "model": self._model,
                "choices": [{"index": index, "delta": {"content": EventTemplate.TEXT}, "logprobs": None,
                             "finish_reason": EventTemplate.REASON}]}
            if self._plan.include_usage:
                chunk["usage"] = None
            template = self._templates[index] = EventTemplate(chunk)
        return template

    def tail(self) -> list[str]:
        if not self._plan.include_usage or self._latest is None:
            return []
        return [self._event([], usage=usage([self._latest]))]
