"""The scheduler side of a KV strategy: admission, growth, release. No tensors cross this contract.

The scheduler (``engine/scheduler.py``) sees a strategy only as a :class:`KVManager`, as vLLM v1's
scheduler sees its ``KVCacheManager``: it asks whether a request can be admitted or grow by some
tokens (``allocate`` returning False means "no room": the scheduler preempts, or a strategy that
evicts has already made room), releases what a finished or preempted request holds, forks ``n > 1``
samples and swaps preempted requests out and in. ``usage`` is the cheap typed reading of KV memory
the engine takes after every step. Nothing here names a tensor, so that this side can run where
no KV lives (rank 0 of a tensor-parallel group decides for every rank).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from kvscope.errors import ConfigError
from kvscope.request import Request


@dataclass(frozen=True)
class KVUsage:
    """The KV memory the engine tracks peaks of after every step: cheap to produce (no dict, no
    device sync). Bytes; ``host_kv_bytes`` None when the strategy keeps no KV on the host."""

    kv_bytes_used: int
    kv_bytes_allocated: int
    host_kv_bytes: int | None = None


class KVManager(ABC):
    """What the scheduler may ask of a KV strategy."""

    name: ClassVar[str]
    supports_prefix_caching: ClassVar[bool] = False
    supports_swap: ClassVar[bool] = False
    supports_fork: ClassVar[bool] = False

    @abstractmethod
    def max_request_tokens(self) -> int:
        """The longest prompt a request may have: what one request can hold (the whole pool, or
        one slot), less any room the strategy needs beside the prompt before it can evict."""

    def max_sequence_tokens(self) -> int:
        """The longest sequence a request may reach; strategies that evict can exceed what they hold."""
        return self.max_request_tokens()

    def lookup_prefix(self, request: Request) -> int:
        """Leading tokens of a not-yet-admitted request already cached. No side effects."""
        return 0

    @abstractmethod
    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Make ``request`` hold room for ``num_tokens`` tokens in total.

        For a request that holds nothing yet this admits it (taking prefix-cache hits first,
        which the scheduler then counts as computed). Returns False, changing nothing, when the
        pool cannot provide the room.
        """

    @abstractmethod
    def free(self, request: Request) -> None:
        """Release everything ``request`` holds (finish, abort, preemption by recompute)."""

    def swap_out(self, request: Request) -> int:
        """Move ``request``'s KV to host memory and free its device memory; returns bytes moved."""
        raise ConfigError(f"strategy {self.name!r} does not support swap preemption")

    def swap_in(self, request: Request) -> int | None:
        """Bring a swapped request back; returns bytes moved, or None if there is no room."""
        raise ConfigError(f"strategy {self.name!r} does not support swap preemption")

    def fork(self, parent: Request, child: Request) -> None:
        """Make ``child`` share all of ``parent``'s KV (copy-on-write)."""
        raise ConfigError(f"strategy {self.name!r} does not support forking (n > 1)")

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Accounting counters; see ``docs/architecture.md`` for their meaning."""

    def usage(self) -> KVUsage:
        """What :meth:`stats` says of the KV memory, read after every step: strategies whose
        ``stats`` is costly (or syncs with the device) override it with running counters."""
        s = self.stats()
        return KVUsage(s["kv_bytes_used"], s["kv_bytes_allocated"], s.get("host_kv_bytes"))
