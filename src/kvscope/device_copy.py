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


#: Triton compiles a kernel anew for each combination of its pointer arguments' 16-byte alignment;
#: views of one packed copy keep one alignment every step only if each starts on such a boundary.
ALIGN_BYTES = 16


def to_device_views(parts: Sequence[Sequence[int]], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """``parts`` (lists of numbers) copied to ``device`` in one :func:`to_device` of ``dtype``, as
    one view per part, each starting :data:`ALIGN_BYTES`-aligned (the copy itself is: the
    allocators align far more). Packed end to end instead, a part's alignment would follow the
    lengths of the parts before it, which change from step to step."""
    step = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    flat: list[int] = []
    starts = []
    for part in parts:
        starts.append(len(flat))
        flat.extend(part)
        flat.extend([0] * (-len(flat) % step))
    t = to_device(flat, device, dtype)
    return [t[s : s + len(p)] for s, p in zip(starts, parts)]
