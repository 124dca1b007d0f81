"""uvicorn around the app: what ``kvscope serve`` runs."""
from __future__ import annotations

import gc
import socket
from typing import TYPE_CHECKING

import uvicorn

from kvscope.serve.app import create_app

if TYPE_CHECKING:
    from kvscope.llm import LLM
    from kvscope.serve.engine_client import EngineProcess

#: On shutdown, streams still open after this long are cancelled (their requests aborted).
GRACEFUL_SHUTDOWN_S = 5


def run_server(
    engine: LLM | EngineProcess,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    max_queue: int | None = None,
    log_level: str = "info",
    sock: socket.socket | None = None,
    multiprocess_dir: str | None = None,
) -> None:
    """Serve ``engine`` until interrupted (Ctrl-C / SIGTERM), on ``host:port``, or on the listening
    socket ``sock`` that other front ends share (``multiprocess_dir``: see ``create_app``)."""
    app = create_app(engine, served_model_name, max_queue, multiprocess_dir)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    # What start-up made (torch, the tokenizer, the app; in thread mode the model too) lives as long
    # as the server: out of the collector's sight, the collections that the objects made per
    # streamed token trigger scan only those (12 -> 3.5 us per request and step to dispatch outputs).
    gc.collect()
    gc.freeze()
    try:
        uvicorn.Server(config).run(sockets=None if sock is None else [sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown; nothing is left to do
        pass
    finally:
        gc.unfreeze()  # so that what start-up made is freed as usual on the way out
