"""Row gather and scatter between host-resident KV and the device, run by the GPU itself.

Offloading strategies keep KV in pinned host memory and need, per layer and step, a scattered set
of rows (one token of one KV head, ``D`` elements; or one token of all heads). Gathering those rows
on the CPU into a staging buffer and then copying it is bound by the CPU's memory copy (a few GB/s
measured on an H100 host). Pinned memory is mapped into the GPU's address space (UVA), so a kernel
can load the rows itself, straight across PCIe, and write them densely into device memory: the
transfer becomes many independent reads of ``row_bytes`` each, which keeps enough requests in
flight to run the link near its bulk-copy speed.

Layout: ``src`` is ``[2, R, W]`` (K and V planes, ``R`` rows of ``W`` elements, contiguous in the
last two dims); ``idx`` is ``[M]`` int64 row numbers; the result is ``[2, M, W]``. The same kernel
with source and destination swapped writes new rows into host memory (``scatter_rows``).

On CPU (and in the Triton interpreter) host and device are the same memory and the torch reference
(``index_select`` / ``index_copy_``) is used unless ``use_triton`` forces the kernel.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton use the torch path
    triton = None


if triton is not None:

    @triton.jit
    def _rows_kernel(
        src_ptr, dst_ptr, src_rows_ptr, dst_rows_ptr, valid_ptr,
        num_rows, width, iters, grid,
        src_plane, dst_plane,
        SRC_IDX: tl.constexpr, DST_IDX: tl.constexpr, HAS_VALID: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        # Row m goes from src row src_rows[m] (or m) to dst row dst_rows[m] (or m). Each program moves
        # ``iters`` blocks of BLOCK_R rows of both planes, striding over the blocks by the grid size;
        # the loop over W keeps any width legal.
        pid = tl.program_id(0)
        for it in range(0, iters):
            rows = (pid + it * grid) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < num_rows
            if HAS_VALID:
                # Rows the caller marked invalid are never read: no PCIe traffic for them.
                row_ok = row_ok & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
            s_rows = rows.to(tl.int64)
            d_rows = rows.to(tl.int64)
            if SRC_IDX:
                s_rows = tl.load(src_rows_ptr + rows, mask=row_ok, other=0)
            if DST_IDX:
                d_rows = tl.load(dst_rows_ptr + rows, mask=row_ok, other=0)
            for w0 in range(0, width, BLOCK_W):
                cols = w0 + tl.arange(0, BLOCK_W)
                m = row_ok[:, None] & (cols < width)[None, :]
                s_off = s_rows[:, None] * width + cols[None, :]
                d_off = d_rows[:, None] * width + cols[None, :]
                # Both planes' loads are issued before either store: twice the reads in flight.
                k = tl.load(src_ptr + s_off, mask=m)
                v = tl.load(src_ptr + src_plane + s_off, mask=m)
                tl.store(dst_ptr + d_off, k, mask=m)
                tl.store(dst_ptr + dst_plane + d_off, v, mask=m)


def _launch(src: torch.Tensor, dst: torch.Tensor, num_rows: int, src_idx: torch.Tensor | None,
            dst_idx: torch.Tensor | None, valid: torch.Tensor | None, max_programs: int | None) -> None:
    width = src.shape[2]
    block_w = min(triton.next_power_of_2(width), 256)
    # 8 KiB of payload per program, block and plane at D=128 bf16: enough loads in flight per SM to
    # hide PCIe latency.
    block_r = max(1, min(32, 4096 // block_w))
    blocks = triton.cdiv(num_rows, block_r)
    grid = blocks if max_programs is None else max(1, min(blocks, max_programs))
    any_idx = src_idx if src_idx is not None else dst_idx
    _rows_kernel[(grid,)](
        src, dst,
        src_idx if src_idx is not None else any_idx, dst_idx if dst_idx is not None else any_idx,
        valid if valid is not None else any_idx,
        num_rows, width, triton.cdiv(blocks, grid), grid, src.stride(0), dst.stride(0),
        SRC_IDX=src_idx is not None, DST_IDX=dst_idx is not None, HAS_VALID=valid is not None,
        BLOCK_R=block_r, BLOCK_W=block_w,
    )


def _check(src: torch.Tensor, idx: torch.Tensor) -> None:
    if src.dim() != 3 or src.shape[0] != 2 or not src[0].is_contiguous():
        raise ValueError(f"expected a [2, R, W] tensor with contiguous planes, got {tuple(src.shape)}")
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(f"row indices must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}")


def gather_rows(
    src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None, use_triton: bool | None = None,
    valid: torch.Tensor | None = None, sort: bool = False, max_programs: int | None = None,
) -> torch.Tensor:
    """``out[p, m] = src[p, idx[m]]`` (only where ``valid[m]``, when given).

    Args:
        src: ``[2, R, W]`` rows (pinned host memory or device memory).
        idx: ``[M]`` int64 row numbers, on the device that runs the copy.
        out: optional ``[2, >= M, W]`` destination on ``idx``'s device (its first M rows are written).
        use_triton: force (True) or forbid (False) the kernel; default: kernel when ``idx`` is on CUDA.
        valid: optional ``[M]`` bool; the kernel skips invalid rows (their output is left as is), so
            a caller can size a gather without knowing on the host how many rows it needs.
        sort: read the rows in address order (each still lands at its own output row). Scattered
            small rows from host memory go faster when neighbouring reads hit the same pages.
        max_programs: run the kernel on at most this many programs (each loops over row blocks).
            A copy overlapped with compute should hold few SMs: its programs mostly wait on PCIe,
            and every SM they hold is one the compute kernels beside it cannot use.
    Returns:
        ``[2, M, W]`` (a view of ``out`` when given).
    """
    _check(src, idx)
    m = idx.numel()
    if out is None:
        out = torch.empty(2, m, src.shape[2], dtype=src.dtype, device=idx.device)
    out = out[:, :m]
    if use_triton is None:
        use_triton = idx.is_cuda and triton is not None
    if not use_triton:
        out.copy_(src.index_select(1, idx.to(src.device)))
        return out
    if not m:
        return out
    if sort:
        idx, order = idx.sort()
        _launch(src, out, m, idx, order, valid[order] if valid is not None else None, max_programs)
    else:
        _launch(src, out, m, idx, None, valid, max_programs)
    return out


def scatter_rows(dst: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, use_triton: bool | None = None,
                 max_programs: int | None = None) -> None:
    """``dst[p, idx[m]] = rows[p, m]``: write ``rows`` ``[2, M, W]`` into ``dst`` ``[2, R, W]``
    (``max_programs`` as in :func:`gather_rows`)."""
    _check(dst, idx)
    if use_triton is None:
        use_triton = idx.is_cuda and triton is not None
    if not use_triton:
        dst.index_copy_(1, idx.to(dst.device), rows.to(dst.device))
        return
    if idx.numel():
        _launch(rows.contiguous(), dst, idx.numel(), None, idx, None, max_programs)
