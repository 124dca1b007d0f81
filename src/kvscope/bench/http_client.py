"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

A request is sent the way vLLM's ``bench serve`` sends it (``vllm/benchmarks/lib/
endpoint_request_func.py``): ``stream: true`` with ``stream_options: {include_usage: true}``,
``max_tokens`` = the request's output length, ``ignore_eos: true`` and, here, ``temperature: 0``
(greedy, so outputs can be compared across systems). The response is a server-sent event stream:
``data: {json}`` lines, ``:`` comment lines (keep-alive pings), and ``data: [DONE]`` at the end.

Which chunks count as tokens (their arrival times become the request's token times): a chunk whose
first choice carries text (``text`` for completions, ``delta.content`` for chat), or carries an
empty text before any ``finish_reason`` (a token that decodes to nothing, e.g. the first byte of a
multi-byte character). Not counted: a chat chunk that only announces the assistant's ``role`` (a
server may send it before the first token), an empty closing chunk with ``finish_reason`` set, and
the ``usage`` chunk; except that an empty finishing chunk is the one token time of a stream that
had no other, when ``usage`` counts generated tokens (they all came in it and decode to no text). vLLM counts every chunk with a choice; the two agree on vLLM's own server,
which sends the role with the first token and the finish reason with the last one.

Base URLs and the loopback rule: :mod:`kvscope.bench.endpoints`.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from kvscope.bench.endpoints import CHAT, api_url
from kvscope.errors import ConfigError

try:
    import aiohttp
except ImportError as e:  # an optional dependency: only the load generator needs it
    raise ConfigError(f"the HTTP load generator needs aiohttp: pip install aiohttp ({e})") from None

_ERROR_BODY_CHARS = 300  # enough of an error response to name the problem, not a whole HTML page


def request_body(endpoint: str, model: str, prompt: str | list[int], output_len: int,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of one streamed request; ``extra`` fields override the defaults.

    A completions prompt may be text or token ids (the OpenAI API takes a list of ints); a chat
    request needs text, sent as one user turn.
    """
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == CHAT:
        if not isinstance(prompt, str):
            raise ConfigError(f"{CHAT} needs text prompts; this request has token ids")
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(extra or {})
    return body


@dataclass
class StreamedResponse:
    """What one request saw; times are ``time.perf_counter()`` values.

    ``chunk_times``: arrival of each chunk that carries a token (see the module docstring);
    ``output_tokens`` / ``prompt_tokens``: the server's ``usage`` counts, None when it sent none;
    ``error``: None on success, else what went wrong (HTTP status and body, connection error,
    timeout, an error event in the stream, or a stream without a token); ``ended``: when the
    response ended or failed.
    """

    sent: float
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    finished_at: float | None = None
    error: str | None = None
    ended: float | None = None


def _choice_token(choice: dict[str, Any], chat: bool) -> str | None:
    """The text a choice carries when it carries a token, else None (see the module docstring)."""
    part = (choice.get("delta") or {}) if chat else choice
    text = part.get("content" if chat else "text")
    if text and isinstance(text, str):
        return text
    if choice.get("finish_reason") is not None or (chat and "role" in part):
        return None
    return ""


def _apply_event(data: dict[str, Any], out: StreamedResponse, chat: bool, now: float) -> None:
    if "error" in data:  # vLLM reports a failure that happens mid-stream as an error event
        err = data["error"]
        out.error = f"error event in the stream: {err.get('message', err) if isinstance(err, dict) else err}"
        return
    choices = data.get("choices") or []
    if choices:
        choice = choices[0]
        text = _choice_token(choice, chat)
        if text is not None:
            out.chunk_times.append(now)
            out.text += text
        if choice.get("finish_reason") is not None:
            out.finish_reason = choice["finish_reason"]
            out.finished_at = now
    usage = data.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            out.output_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            out.prompt_tokens = usage["prompt_tokens"]


def _read_lines(lines: list[bytes], out: StreamedResponse, chat: bool, now: float) -> bool:
    """Apply the event-stream ``lines`` that arrived at ``now`` to ``out``; True when the stream is
    over for this request (``[DONE]``, or an error recorded in ``out.error``)."""
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, ": ping" comments, event/id fields
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            return True
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            out.error = f"not JSON in the event stream: {payload[:_ERROR_BODY_CHARS]!r}"
            return True
        try:
            _apply_event(data, out, chat, now)
        except (AttributeError, TypeError, KeyError):  # malformed: fails this request, not the run
            out.error = f"unexpected event in the stream: {payload[:_ERROR_BODY_CHARS]!r}"
        if out.error:
            return True
    return False


def new_session() -> aiohttp.ClientSession:
    """A client session for a run: no cap on connections (a run caps requests in flight itself,
    when asked to), and no proxy from the environment (requests go to the server named)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False)


async def stream_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                         timeout_s: float | None) -> StreamedResponse:
    """POST ``body`` to ``url`` and read its event stream; never raises for a failed request (the
    failure is in ``error``), except :class:`asyncio.CancelledError`, which the caller owns."""
    chat = "messages" in body
    out = StreamedResponse(sent=time.perf_counter())
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with session.post(url, json=body, timeout=timeout) as resp:
            if resp.status != 200:
                text = (await resp.text(errors="replace"))[:_ERROR_BODY_CHARS]
                out.error = f"HTTP {resp.status} {resp.reason or ''}: {text}".strip()
                return out
            # Whole chunks as they arrive, split into lines here: one await per network read, not
            # two per event (its line and the blank separator); 18% less of the client's CPU per
            # streamed token (benchmarks/results/http_client_cpu.md), which a run's timing includes.
            pending = b""
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                *lines, pending = (pending + chunk).split(b"\n")
                if _read_lines(lines, out, chat, now):
                    break
            else:  # a last line without its newline, as a line reader would return it at the end
                _read_lines([pending], out, chat, time.perf_counter())
    except asyncio.TimeoutError:
        out.error = f"timed out after {timeout_s:g} s (the per-request timeout)"
    except aiohttp.ClientError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.ended = time.perf_counter()
    if out.error is None and not out.chunk_times and out.finished_at is not None and (out.output_tokens or 0) > 0:
        # Every token came in the finishing chunk, and together they decode to no text (a server
        # behind on a stream sends what it holds in one chunk): the server's count says they came.
        out.chunk_times.append(out.finished_at)
    if out.error is None and not out.chunk_times:
        out.error = f"the response stream carried no token (finish_reason={out.finish_reason!r})"
    return out


async def first_model_id(base_url: str, timeout_s: float = 30.0) -> str:
    """The first model id of ``GET /v1/models`` (what vLLM's ``bench serve`` uses without ``--model``)."""
    url = api_url(base_url, "/v1/models")
    try:
        async with new_session() as session:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status != 200:
                    raise ConfigError(f"GET {url}: HTTP {resp.status}; pass the model name (--model)")
                data = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        raise ConfigError(f"GET {url} failed ({type(e).__name__}: {e}); is the server up? "
                          f"Or pass the model name (--model)") from None
    models = data.get("data") if isinstance(data, dict) else None
    if not models or not isinstance(models[0], dict) or "id" not in models[0]:
        raise ConfigError(f"GET {url} listed no model; pass the model name (--model)")
    return str(models[0]["id"])
