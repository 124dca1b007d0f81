"""Starting the engine-core process (:mod:`kvscope.serve.engine_core`) and holding it: the parent's
handle of the child, and the pipes of each front end that will drive it.

With one front end (``kvscope serve``'s default), :class:`~kvscope.serve.engine_client.EngineProcess`
starts the core and is its only front end. With ``--api-server-count N`` the parent process starts
it with N pipe pairs and hands each :class:`CoreConnection` to a front-end process of its own
(:mod:`kvscope.serve.frontends`): no front end loads the model, each gets the tokenizer and limits
the core sent.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from kvscope.errors import KVScopeError
from kvscope.serve.engine_api import EngineInfo
from kvscope.serve.engine_core import START_FAILED, recv, run_engine_core

if TYPE_CHECKING:
    from kvscope.llm import LLM


@dataclass
class CoreConnection:
    """One front end's side of a loaded engine core: the pipe its commands go down, the pipe its
    messages come up, what the core announced (the engine's info and first stats), and the core's
    pid. Picklable while a ``spawn``ed front-end process starts (the pipes travel as descriptors)."""

    commands: Connection
    messages: Connection
    info: EngineInfo
    stats: dict[str, Any]
    pid: int

    def close(self) -> None:
        self.commands.close()
        self.messages.close()


class CoreProcess:
    """The engine core in a ``spawn``ed child with one pipe pair per front end, its model loaded.

    The constructor waits until the child has built the engine (the model loaded once, in the
    child) and raises what its ``build`` raised; :attr:`connections` then holds one
    :class:`CoreConnection` per front end. Only the child and the front ends hold the pipes'
    other ends, so a front end's death closes its pipes (the core drops it), and the core's death
    closes every front end's (each reports the engine dead).
    """

    def __init__(self, build: Callable[[], LLM], num_clients: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot run in a forked child
        commands = [ctx.Pipe(duplex=False) for _ in range(num_clients)]  # (core reads, front end writes)
        messages = [ctx.Pipe(duplex=False) for _ in range(num_clients)]  # (front end reads, core writes)
        core_ends = [(c[0], m[1]) for c, m in zip(commands, messages)]
        self.process = ctx.Process(target=run_engine_core, args=(build, core_ends), name="kvscope-engine-core")
        self.process.start()
        for reader, writer in core_ends:
            reader.close()
            writer.close()
        ends = [(c[1], m[0]) for c, m in zip(commands, messages)]
        try:
            firsts = [recv(reader) for _, reader in ends]
        except BaseException as e:  # the child died, or Ctrl-C here: no point in finishing the load
            self.process.terminate()
            self._close(ends)
            self.process.join()
            if isinstance(e, (EOFError, OSError)):
                raise KVScopeError(f"the engine process exited with code {self.process.exitcode} while "
                                   "loading the model") from None
            raise
        if firsts[0][0] == START_FAILED:
            self._close(ends)
            self.stop()
            raise firsts[0][1]
        _, info, stats = firsts[0]
        self.connections = [CoreConnection(w, r, info, stats, self.process.pid) for w, r in ends]

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def exitcode(self, timeout: float) -> int | None:
        """The child's exit code once it has exited (waiting at most ``timeout`` s; None if it runs)."""
        self.process.join(timeout)
        return self.process.exitcode

    def stop(self, timeout: float = 10.0) -> None:
        """Wait ``timeout`` s for the child to exit (told to stop, or its front ends gone), then
        terminate it, then kill it."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    @staticmethod
    def _close(ends: list[tuple[Connection, Connection]]) -> None:
        for writer, reader in ends:
            writer.close()
            reader.close()
