"""Helpers of the ``kvscope serve`` tests: an in-process server on a loopback port, and /metrics parsing."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kvscope import LLM  # noqa: E402
from kvscope.serve.app import create_app  # noqa: E402
from kvscope.serve.engine_client import EngineProcess  # noqa: E402

#: How ``kvscope serve`` runs its engine: on a thread of the server, or in a process of its own.
MODES = ("thread", "process")


def served(mode: str, build: Callable[[], LLM]) -> LLM | EngineProcess:
    """What ``create_app`` serves in ``mode``: ``build()`` here, or an engine-core process that calls
    it (``build`` must pickle: a module-level function or a ``functools.partial`` of one)."""
    return build() if mode == "thread" else EngineProcess(build)


async def sdk_completion(client: Any, model: str, prompt: str, stream: bool) -> str:
    """A greedy 16-token completion's text (EOS ignored) through an ``openai.AsyncOpenAI`` client,
    streamed or not."""
    kwargs = dict(model=model, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        return (await client.completions.create(**kwargs)).choices[0].text
    return "".join([x.choices[0].text async for x in await client.completions.create(stream=True, **kwargs)])


def scrape(base_url: str) -> dict[str, float]:
    """``base_url/metrics`` as ``{name{label=value,...}: value}``, labels other than model_name kept;
    a series that appears twice is an error."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            key = f"{s.name}{{{labels}}}" if labels else s.name
            assert key not in out, f"{key} appears twice in /metrics"
            out[key] = s.value
    return out


class ServerThread:
    """``kvscope serve``'s app for ``engine`` (an LLM, or an engine process) under uvicorn on a free
    127.0.0.1 port, in a thread.

    Use as a context manager; ``serving`` is the app's :class:`ServingContext`. An engine process
    is closed on exit.
    """

    def __init__(self, engine: LLM | EngineProcess, **app_args: Any) -> None:
        self._engine = engine
        self.app = create_app(engine, **app_args)
        self.serving = self.app.state.serving
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()
        if isinstance(self._engine, EngineProcess):
            self._engine.close()

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{name{label=value,...}: value}``, labels other than model_name kept."""
        return scrape(self.base_url)

    def wait_idle(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until the engine has nothing in flight; its last stats snapshot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.serving.engine.stats
            if self.serving.engine.num_requests == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0:
                return stats
            time.sleep(0.05)
        raise AssertionError(f"the server is still busy after {timeout} s: {self.serving.engine.stats}")
