"""``kvscope serve --api-server-count N``: N HTTP front-end processes on one port, in front of one
engine core, as vLLM's ``--api-server-count``.

One front-end process parses, validates, tokenizes and streams every request in turn (about half a
millisecond of CPU per request, ``benchmarks/results/serve_frontend_cpu.md``): at hundreds of
concurrent requests the last ones reach the engine late. With N front ends, the parent process
(:func:`serve_frontends`; each front end runs :func:`run_frontend`):

1. makes a temporary ``PROMETHEUS_MULTIPROC_DIR`` and puts it in its environment, so that every
   child has it before importing prometheus_client (the front ends' metrics are summed from it);
   binds host:port once;
2. starts the engine core with one pipe pair per front end
   (:class:`~kvscope.serve.core_process.CoreProcess`) and waits until the model is loaded;
3. spawns the N front ends, each given the bound socket, its pipes with the engine's info (the
   tokenizer and limits: no front end loads weights) and its slot of a shared count of requests
   in flight; each runs the usual app under uvicorn on that socket, and the kernel hands each new
   connection to one of them;
4. watches them. A front end that dies is logged (the core has aborted its requests and freed
   their KV when its pipes closed) and the others serve on; with none left the server exits. A
   core that dies makes every front end answer 503, as with one front end.

Ctrl-C (which reaches the whole process group) or SIGTERM to the parent: every front end shuts down
gracefully (open streams get ``GRACEFUL_SHUTDOWN_S`` to finish) and says goodbye to the core, which
exits once all have; then the parent removes the metrics directory. A front end still running
``GRACEFUL_SHUTDOWN_S + 10`` s later is killed, as is a core that has not exited 10 s after that.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, MutableSequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from kvscope.errors import ConfigError, KVScopeError
from kvscope.serve.core_process import CoreConnection, CoreProcess

if TYPE_CHECKING:
    from kvscope.llm import LLM

log = logging.getLogger("kvscope.serve")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
SHUTDOWN_MARGIN_S = 10  # beyond the front ends' graceful shutdown, before they are killed


@dataclass(frozen=True)
class FrontendOptions:
    """What every front end serves with (``run_server``'s arguments)."""

    served_model_name: str | None
    max_queue: int | None
    log_level: str
    multiprocess_dir: str


def run_frontend(index: int, sock: socket.socket, connection: CoreConnection, in_flight: MutableSequence[int],
                 options: FrontendOptions) -> None:
    """A front end's process: the app on the shared listening socket ``sock``, its engine the core
    behind ``connection``, until Ctrl-C / SIGTERM."""
    from kvscope.serve.engine_client import EngineProcess
    from kvscope.serve.server import run_server

    _stop_when_orphaned()
    engine = EngineProcess.attach(connection, in_flight, index)
    try:
        run_server(engine, served_model_name=options.served_model_name, max_queue=options.max_queue,
                   log_level=options.log_level, sock=sock, multiprocess_dir=options.multiprocess_dir)
    finally:
        engine.close()


def _stop_when_orphaned() -> None:
    """SIGTERM this front end (uvicorn's graceful shutdown) once its parent process has ended: a
    parent killed outright (SIGKILL, out of memory) cannot stop its children, and a front end left
    serving alone would hold the port. The core exits once every front end has gone. The parent's
    sentinel (multiprocessing's) says so even if it ended while this process was still starting."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        log.error("kvscope: the server's parent process is gone; front end %d shuts down", os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="kvscope-orphan-watch", daemon=True).start()


def serve_frontends(build: Callable[[], LLM], count: int, host: str = "127.0.0.1", port: int = 8000,
                    served_model_name: str | None = None, max_queue: int | None = None,
                    log_level: str = "info") -> None:
    """Serve ``build()``'s engine (built once, in the core's process; ``build`` must pickle) through
    ``count`` >= 2 front-end processes on ``host:port`` until Ctrl-C / SIGTERM; see the module
    docstring. Raises :class:`KVScopeError` if every front end dies."""
    if count < 2:
        raise ConfigError(f"--api-server-count: several front ends means 2 or more, got {count}")
    if max_queue is not None and max_queue < 1:
        raise ConfigError(f"max_queue must be >= 1, got {max_queue}")
    from kvscope.serve.server import GRACEFUL_SHUTDOWN_S

    with _metrics_dir() as metrics_dir, _sigterm_as_interrupt():
        sock = _bind(host, port)
        try:
            core = CoreProcess(build, count)
        except BaseException:
            sock.close()
            raise
        ctx = multiprocessing.get_context("spawn")
        in_flight = ctx.RawArray("q", count)  # one slot per front end, written by it alone
        options = FrontendOptions(served_model_name, max_queue, log_level, metrics_dir)
        procs: list[BaseProcess] = []
        try:
            for i, connection in enumerate(core.connections):
                p = ctx.Process(target=run_frontend, args=(i, sock, connection, in_flight, options),
                                name=f"kvscope-api-server-{i}", daemon=True)
                p.start()
                procs.append(p)
            # Only the children hold these now: a front end's death closes its pipes for the core.
            _close_parent_ends(sock, core)
            _watch(procs, core, in_flight)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the graceful shutdown below
            pass
        finally:
            _close_parent_ends(sock, core)  # again if a front end failed to start (closing twice is harmless)
            _shutdown(procs, core, GRACEFUL_SHUTDOWN_S + SHUTDOWN_MARGIN_S)


def _close_parent_ends(sock: socket.socket, core: CoreProcess) -> None:
    sock.close()
    for connection in core.connections:
        connection.close()


def _watch(procs: list[BaseProcess], core: CoreProcess, in_flight: MutableSequence[int]) -> None:
    """Until every front end has exited: log each that does (its slot of ``in_flight`` cleared, as
    the core has aborted its requests), and the core's death."""
    live = {p.sentinel: (i, p) for i, p in enumerate(procs)}
    core_sentinel: int | None = core.process.sentinel
    while live:
        for sentinel in wait([*live, *([core_sentinel] if core_sentinel is not None else [])]):
            if sentinel == core_sentinel:
                core_sentinel = None
                log.error("kvscope: the engine process died (exit code %s); every front end answers 503 "
                          "until the server is restarted", core.exitcode(0))
                continue
            i, p = live.pop(sentinel)
            p.join()
            in_flight[i] = 0
            log.error("kvscope: front end %d (pid %s) exited with code %s; %d front ends serve on",
                      i, p.pid, p.exitcode, len(live))
    raise KVScopeError("every front end of the server has exited")


def _shutdown(procs: list[BaseProcess], core: CoreProcess, timeout: float) -> None:
    """Stop the front ends gracefully (SIGTERM: each says goodbye to the core), then the core."""
    # Ignored here from now on: a second Ctrl-C still reaches the front ends (uvicorn then skips
    # the rest of its graceful shutdown), while this process still reaps them and the core.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            log.error("kvscope: front end %s did not shut down within %.0f s; killing it", p.pid, timeout)
            p.kill()
            p.join()
    core.stop(SHUTDOWN_MARGIN_S)


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, for the front ends to listen on."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KVScopeError(f"cannot bind {host}:{port}: {e.strerror}") from None
    return sock


@contextmanager
def _metrics_dir() -> Iterator[str]:
    """A fresh ``PROMETHEUS_MULTIPROC_DIR`` in this process's environment (inherited by the
    children, set before they import prometheus_client), removed with what the front ends wrote."""
    previous = os.environ.get(METRICS_DIR_ENV)
    path = tempfile.mkdtemp(prefix="kvscope-metrics-")
    os.environ[METRICS_DIR_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(METRICS_DIR_ENV, None)
        else:
            os.environ[METRICS_DIR_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does (by default it would end this process at
    once, leaving the children to find out for themselves); both handlers restored after."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
