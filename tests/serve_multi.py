"""Helpers of the ``--api-server-count`` tests: a server of several front-end processes in front of
one engine core, started as a subprocess on a loopback port, and its processes as ``/proc`` shows
them (which are front ends, which front end holds a connection, whether any is left).

Run as a script, this module is that server: ``python serve_multi.py PORT COUNT BUILD_HEX`` serves
the pickled ``build`` (e.g. a ``partial`` of :func:`serve_engines.paced_llm`) through
``kvscope.serve.frontends.serve_frontends``, as ``kvscope serve --api-server-count COUNT`` does.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
ESTABLISHED, LISTEN = "01", "0A"  # TCP socket states in /proc/net/tcp


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``argv`` (a server on ``port``) in a session of its own, so that a test can send the whole
    process group a Ctrl-C. A context manager: entering waits until /health answers 200; leaving
    stops what is still running with SIGTERM to the parent."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(argv, env=env, start_new_session=True)

    @classmethod
    def frontends(cls, build: Callable[[], Any], count: int) -> ServerProcess:
        """``count`` front ends serving ``build()`` (which must pickle by reference)."""
        port = free_port()
        return cls([sys.executable, str(Path(__file__)), str(port), str(count), pickle.dumps(build).hex()], port)

    def __enter__(self) -> ServerProcess:
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def descendants(self) -> list[int]:
        """Every live process under the server's parent process."""
        children: dict[int, list[int]] = {}
        for pid, ppid, _ in _processes():
            children.setdefault(ppid, []).append(pid)
        out, todo = [], [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                out.append(child)
                todo.append(child)
        return out

    def frontend_pids(self) -> list[int]:
        """The processes that hold the server's listening socket: its front ends (the parent closes
        its own once they have started; one may not be accepting yet)."""
        return _holders(_inodes(self.port, None, LISTEN), self.descendants())

    def core_pid(self) -> int:
        """The engine core: the server's spawned process that holds no listening socket (the front
        ends hold it; multiprocessing's resource tracker is not spawned that way)."""
        frontends = self.frontend_pids()
        (pid,) = [p for p in self.descendants() if p not in frontends
                  and b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        return pid

    def frontend_of(self, client_port: int) -> int:
        """The front end that serves the connection from ``client_port``."""
        (pid,) = _holders(_inodes(self.port, client_port), self.descendants())
        return pid

    def frontends_connected(self) -> set[int]:
        """The front ends that hold a client's connection now."""
        return set(_holders(_inodes(self.port, None, ESTABLISHED), self.descendants()))


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie has exited)."""
    return [pid for pid, _, state in _processes() if pid in pids and state != "Z"]


def _processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, state) of every process."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # exited meanwhile
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            out.append((int(entry), int(ppid), state))
    return out


def _inodes(port: int, remote_port: int | None, state: str = LISTEN) -> set[str]:
    """Socket inodes of the TCP sockets on local ``port``: the server's end of the connection from
    ``remote_port``, or (``remote_port`` None) every socket in ``state``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, st, inode = (line.split()[i] for i in (1, 2, 3, 9))
            if int(local.rsplit(":", 1)[1], 16) != port:
                continue
            if int(remote.rsplit(":", 1)[1], 16) == remote_port if remote_port is not None else st == state:
                out.add(inode)
    return out


def _holders(inodes: set[str], pids: list[int]) -> list[int]:
    """Those of ``pids`` that hold a socket of ``inodes``."""
    links = {f"socket:[{i}]" for i in inodes}
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in links:
                    out.append(pid)
                    break
            except OSError:
                continue
    return out


if __name__ == "__main__":
    from kvscope.serve.frontends import serve_frontends

    port, count, build = sys.argv[1:4]
    serve_frontends(pickle.loads(bytes.fromhex(build)), int(count), port=int(port), log_level="warning")
