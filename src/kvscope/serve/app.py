"""The FastAPI application: routes, OpenAI-shaped errors, and the engine's lifetime.

``create_app(engine)`` serves either an :class:`~kvscope.llm.LLM` (its engine then runs on a
thread of this process, :class:`~kvscope.serve.async_engine.AsyncEngine`) or an
:class:`~kvscope.serve.engine_client.EngineProcess` (the engine in a child process, what
``kvscope serve`` runs by default). Serving starts with the app (ASGI lifespan) and stops with it.
The app depends on the engine's public API only: ``add_request``, ``step``, ``abort``,
``has_unfinished_requests``, ``stats``, plus the limits read once at start (``max_model_len``, the
vocabulary size, whether the strategy can fork).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvscope.errors import ConfigError
from kvscope.serve.async_engine import AsyncEngine
from kvscope.serve.engine_api import EngineInfo, ServeError
from kvscope.serve.engine_client import EngineProcess
from kvscope.serve.errors import APIError, from_serve_error
from kvscope.serve.generation import ServingContext
from kvscope.serve.metrics import ServerMetrics
from kvscope.serve.openai_chat import create_chat_completion
from kvscope.serve.openai_completions import create_completion
from kvscope.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

if TYPE_CHECKING:
    from kvscope.llm import LLM

#: Pydantic's names for the members of a union (``"str"``, ``"list[int]"``) appear in error
#: locations; they are not request fields.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})
DEFAULT_QUEUE_PER_SEQ = 4  # --max-queue defaults to this many times max_num_seqs


def create_app(engine: LLM | EngineProcess, served_model_name: str | None = None,
               max_queue: int | None = None, multiprocess_dir: str | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``engine`` under ``served_model_name`` (default: its model spec).

    ``max_queue``: requests admitted at once (waiting + running, a batch of prompts counts each);
    above it a request gets 503 with ``Retry-After: 1``. Default: 4 x ``max_num_seqs``.
    ``multiprocess_dir``: the app is one front end of several (``--api-server-count``), whose
    metrics it reports summed (see :mod:`kvscope.serve.metrics`).
    While the app runs, it owns the engine: nothing else may call an ``LLM``'s engine.
    """
    if max_queue is not None and max_queue < 1:
        raise ConfigError(f"max_queue must be >= 1, got {max_queue}")
    if isinstance(engine, EngineProcess):
        info, served = engine.info, engine
    else:
        info, served = EngineInfo.of(engine), AsyncEngine(engine.engine)
    name = served_model_name or info.model
    limits = info.limits
    metrics = ServerMetrics(name, limits.max_model_len, lambda: served.stats, lambda: served.num_requests,
                            multiprocess_dir)
    served.observer = metrics
    ctx = ServingContext(
        engine=served, tokenizer=info.tokenizer, model_name=name, model_root=info.model, limits=limits,
        max_queue=max_queue if max_queue is not None else DEFAULT_QUEUE_PER_SEQ * limits.max_num_seqs,
        metrics=metrics,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        served.start()
        try:
            yield
        finally:
            await asyncio.to_thread(served.shutdown)

    app = FastAPI(title="kvscope", summary="OpenAI-compatible serving of one kvscope engine", lifespan=lifespan)
    app.state.serving = ctx
    _add_routes(app, ctx)
    _add_error_handlers(app, metrics)
    return app


def _add_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.get("/health")
    async def health() -> Response:
        """200 while the engine serves, 503 otherwise (shutting down, or its process died)."""
        return Response(status_code=200 if ctx.engine.is_running else 503)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=ctx.model_name, root=ctx.model_root,
                                         max_model_len=ctx.limits.max_model_len)])

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await create_completion(ctx, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(ctx, req, raw)


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def respond(error: APIError) -> JSONResponse:
        if error.status < 500 or error.status == 503:
            metrics.rejected(error.status, error.code == "queue_full")
        return JSONResponse(error.body().model_dump(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return respond(from_serve_error(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(validation_api_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return respond(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return respond(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


def _param(loc: Sequence[Any]) -> str | None:
    """``("messages", 0, "content", "str")`` -> ``"messages[0].content"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out or None


def validation_api_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """FastAPI's validation errors (a 422) -> a 400 naming the first field at fault."""
    first = errors[0]
    loc = list(first.get("loc", ()))
    if loc[:1] != ["body"]:
        return APIError(400, f"{first.get('msg')} at {'.'.join(map(str, loc))}")
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    param = _param(loc[1:])
    if param is None:
        if isinstance(first.get("input"), bytes | str):  # FastAPI parses JSON only when told it is JSON
            return APIError(400, "the request body must be JSON, sent with 'Content-Type: application/json'")
        return APIError(400, "the request body must be a JSON object")
    if first.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param)
    messages = list(dict.fromkeys(e["msg"] for e in errors if _param(list(e.get("loc", ()))[1:]) == param))
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return APIError(400, f"invalid '{param}': {'; or '.join(messages)} (got {got})", param)
