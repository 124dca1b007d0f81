"""Host-to-device copies that never wait for the device.

``torch.tensor(data, device="cuda")`` and ``cpu_tensor.to("cuda")`` copy synchronously: PyTorch
follows the copy with a stream synchronization, so the host waits until every kernel already
queued has run. An engine that launches step t+1 while step t runs (async scheduling) would stall
on each such copy while building step t+1's inputs. Staged through pinned memory, a copy is
ordered on the stream like any kernel and returns at once; PyTorch's pinned-memory cache keeps the
staging buffer until the copy has run.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(data: Sequence[int] | Sequence[float] | torch.Tensor, device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """``data`` (a list, or a CPU tensor) as a tensor on ``device`` (of ``dtype`` when given),
    without waiting for the device's queued work."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cuda":
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
