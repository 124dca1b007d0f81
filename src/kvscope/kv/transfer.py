"""The transfer engine shared by the offloading strategies (``offload``, ``infinigen``).

It moves KV rows between the host pool and the device, per layer, and keeps the books:

* a dedicated **copy stream** (CUDA), so that fetching layer ``l + 1`` runs while layer ``l``
  computes; each fetch records an event that the compute stream waits on just before it needs
  the rows (per-layer events);
* **preallocated prefetch buffers** on the device: two of them, used alternately by consecutive
  layers, so a fetch never overwrites rows that the previous layer is still reading;
* **byte counters** both ways, and the time the compute stream spent waiting on transfers;
* **few SMs for overlapped copies**: the gather and scatter kernels of the copy stream run on at most
  ``copy_programs`` programs. Their programs mostly wait on PCIe; with one program per row block
  they would take every SM and the compute kernels beside them would queue behind them, which
  serialises what the copy stream is for;
* a **synchronous mode** (``overlap=False``) that runs every copy on the compute stream, in order,
  for tests and debugging: it must give bit-identical outputs.

On CPU there is no second stream; host and device are the same memory, and the same calls run
the torch reference gather, so selection and accounting are exercised in CI.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvscope.attention.triton_gather import gather_rows, scatter_rows


# Programs of an overlapped copy kernel (see the module docstring); chosen on an H100 (132 SMs),
# where this many reach the pinned copy's bandwidth (benchmarks/results/infinigen_breakdown.md).
COPY_PROGRAMS = 32


@dataclass
class Fetch:
    """A fetch in flight: ``rows`` ``[2, M + spare, W]`` (a view of a prefetch buffer) and its event."""

    rows: torch.Tensor
    done: torch.cuda.Event | None


class TransferEngine:
    """Host <-> device row transfers with two prefetch buffers of ``buffer_elems`` elements each."""

    def __init__(self, device: torch.device, dtype: torch.dtype, buffer_elems: int, overlap: bool = True,
                 copy_programs: int = COPY_PROGRAMS) -> None:
        self.device = device
        self.dtype = dtype
        self.cuda = device.type == "cuda"
        self.overlap = overlap and self.cuda
        self.copy_programs = copy_programs
        self.stream = torch.cuda.Stream(device) if self.overlap else None
        # Two planes (K and V) per buffer; allocated once, viewed per fetch. Zeroed: rows past a
        # sequence's length get zero attention weight, but 0 * NaN is NaN, and uninitialised memory
        # may hold NaN (later steps leave finite values behind).
        self.buffers = [torch.zeros(2 * buffer_elems, dtype=dtype, device=device) for _ in range(2)]
        self.buffer_elems = buffer_elems
        self.elem_size = torch.empty(0, dtype=dtype).element_size()
        self.bytes_h2d = 0
        self.bytes_d2h = 0
        self.wait_ms = 0.0
        self._valid_rows_bytes = torch.zeros((), dtype=torch.int64, device=device)
        self._timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._held_for_graph: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        """Device bytes held by the prefetch buffers."""
        return 2 * 2 * self.buffer_elems * self.elem_size

    def fetch(self, src: torch.Tensor, idx: torch.Tensor, slot: int, valid: torch.Tensor | None = None,
              spare_rows: int = 0, sort: bool = True) -> Fetch:
        """Start copying rows ``idx`` ``[M]`` of the host planes ``src`` ``[2, R, W]`` into buffer ``slot % 2``.

        The returned rows are ``[2, M + spare_rows, W]``: the caller may write its own rows (the
        step's new K/V) after the fetched ones and attend over the buffer in place, with no copy.

        ``valid`` (``[M]`` bool, optional) marks the rows actually needed; the others are not moved
        (nor counted), which lets the caller decide on the device how many rows it wants.
        ``sort`` reads the rows in address order (see ``gather_rows``; on CUDA only).
        The copy is ordered after everything already queued on the compute stream (so the buffer's
        previous reader is done and earlier host writes have landed).
        """
        m, width = idx.numel(), src.shape[2]
        rows = m + spare_rows
        if rows * width > self.buffer_elems:
            raise RuntimeError(f"fetch of {rows} rows x {width} exceeds the prefetch buffer ({self.buffer_elems} elements)")
        out = self.buffers[slot % 2][: 2 * rows * width].view(2, rows, width)
        row_bytes = 2 * width * self.elem_size
        if valid is None:
            self.bytes_h2d += m * row_bytes
        else:  # counted on the device: reading the count here would stall the host every layer
            self._valid_rows_bytes += valid.sum() * row_bytes
        capturing = self._capturing()
        if not self.overlap:
            t0 = None if capturing else self._start_timer()
            gather_rows(src, idx, out=out[:, :m], valid=valid, sort=sort and self.cuda)
            if t0 is not None:
                self._stop_timer(t0)
            return Fetch(out, None)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            gather_rows(src, idx, out=out[:, :m], valid=valid, sort=sort and self.cuda,
                        max_programs=self.copy_programs)
            # Timing events cannot be recorded into a CUDA graph: a captured fetch is only ordered.
            done = torch.cuda.Event(enable_timing=not capturing)
            done.record(self.stream)
        self._used_by_copies(idx, valid)
        return Fetch(out, done)

    def _used_by_copies(self, *tensors: torch.Tensor | None) -> None:
        """Keep compute-stream tensors that queued copies read from being reused under them."""
        if self._capturing():
            # Inside a capture, freed memory is handed to the next allocation of the compute stream
            # with no event to wait for: keep the tensors alive until the copies are joined.
            self._held_for_graph.extend(t for t in tensors if t is not None)
        else:
            for t in tensors:
                if t is not None:
                    t.record_stream(self.stream)

    def _capturing(self) -> bool:
        return self.cuda and torch.cuda.is_current_stream_capturing()

    def join(self) -> None:
        """Make the compute stream wait for every copy queued so far (a captured step must end
        with its side-stream work joined)."""
        if self.overlap:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._held_for_graph.clear()

    def wait(self, fetch: Fetch) -> torch.Tensor:
        """Make the compute stream wait for ``fetch``; returns its rows ``[2, M, W]``."""
        if fetch.done is not None:
            if self._capturing():
                torch.cuda.current_stream(self.device).wait_event(fetch.done)
                return fetch.rows
            ready = torch.cuda.Event(enable_timing=True)
            ready.record()
            torch.cuda.current_stream(self.device).wait_event(fetch.done)
            self._timings.append((ready, fetch.done))
        return fetch.rows

    def write(self, dst: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
        """Store ``rows`` ``[2, M, W]`` (device) at rows ``idx`` ``[M]`` of the host planes ``dst``.
        Counted here, except while a graph is captured: a replay's caller counts its own writes."""
        capturing = self._capturing()
        if not capturing:
            self.bytes_d2h += rows.numel() * self.elem_size
        if not self.overlap:
            scatter_rows(dst, idx, rows)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            scatter_rows(dst, idx, rows, max_programs=self.copy_programs)
        # The compute stream may free these before the copy stream reads them.
        self._used_by_copies(rows, idx)

    def finish_step(self) -> None:
        """End a step on the device: later compute-stream work (a captured step's own copies
        included) waits for every copy of this one, such as the last layer's host writes. Then add
        up how long compute waited on the transfers that have run by now. The host never waits:
        with async scheduling it is building the next step while this one runs; the waits of steps
        still on the device are counted at a later call (every one, once the engine has read its
        last step back)."""
        self.join()
        self._count_waits()

    def _count_waits(self) -> None:
        done = 0
        for start, end in self._timings:
            if not (start.query() and end.query()):
                break
            self.wait_ms += max(0.0, start.elapsed_time(end))
            done += 1
        del self._timings[:done]

    def _start_timer(self) -> torch.cuda.Event | float:
        # Synchronous mode: the compute waits for the whole transfer, so its duration is the wait.
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _stop_timer(self, start: torch.cuda.Event | float) -> None:
        if isinstance(start, float):
            self.wait_ms += (time.perf_counter() - start) * 1e3
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._timings.append((start, end))

    def stats(self) -> dict[str, float]:
        self._count_waits()
        return {
            "transfer_bytes_h2d": self.bytes_h2d + int(self._valid_rows_bytes),
            "transfer_bytes_d2h": self.bytes_d2h,
            "transfer_wait_ms": self.wait_ms,
        }
