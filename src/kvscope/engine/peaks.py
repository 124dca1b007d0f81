"""Peaks of KV memory and of the running batch, updated after every engine step from typed
counters (:class:`~kvscope.kv.base.KVUsage`): no stats dict is built and nothing syncs with the device."""
from __future__ import annotations

from kvscope.kv.base import KVUsage


class Peaks:
    """Running maxima; :meth:`as_dict` is what ``engine.stats()`` reports (nothing before a step)."""

    def __init__(self) -> None:
        self.tracked = False
        self.kv_bytes_used = 0
        self.kv_bytes_allocated = 0
        self.host_kv_bytes: int | None = None  # None: the strategy keeps no KV on the host
        self.num_running = 0

    def update(self, usage: KVUsage, num_running: int) -> None:
        self.tracked = True
        self.kv_bytes_used = max(self.kv_bytes_used, usage.kv_bytes_used)
        self.kv_bytes_allocated = max(self.kv_bytes_allocated, usage.kv_bytes_allocated)
        if usage.host_kv_bytes is not None:
            self.host_kv_bytes = max(self.host_kv_bytes or 0, usage.host_kv_bytes)
        self.num_running = max(self.num_running, num_running)

    def as_dict(self) -> dict[str, int]:
        if not self.tracked:
            return {}
        out = {"peak_kv_bytes_used": self.kv_bytes_used, "peak_kv_bytes_allocated": self.kv_bytes_allocated}
        if self.host_kv_bytes is not None:
            out["peak_host_kv_bytes"] = self.host_kv_bytes
        out["peak_num_running"] = self.num_running
        return out
