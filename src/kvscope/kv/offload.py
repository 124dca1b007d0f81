"""``offload``: all KV in host memory, each layer's whole KV fetched every step (FlexGen style).

The baseline InfiniGen is measured against. Lossless: it attends over exactly the tokens ``paged``
does, so its outputs equal ``paged``'s. Every layer's earlier tokens are fetched by the GPU-side
gather from pinned host memory, layer ``l + 1``'s on the copy stream while layer ``l`` computes
(two prefetch buffers); the step is bound by PCIe once the context is long (see
``benchmarks/gpu/offload_decode.py``).

Pure-decode steps run the dense static step of ``kv/host_decode.py`` (the one ``infinigen`` runs
below its ``dense_layers``): eagerly at the batch's exact shape, or replayed from the CUDA graph of
its ``(batch, context)`` bucket, with no host sync and no per-layer launches from Python. Prefill
chunks and mixed steps run the ragged :class:`~kvscope.kv.offload_base.OffloadAttention`.
"""
from __future__ import annotations

from kvscope.kv.offload_base import HostOffloadStrategy
from kvscope.kv.registry import register


@register
class OffloadStrategy(HostOffloadStrategy):
    """Host-resident KV, dense per-layer prefetch. Args: ``host_kv_bytes``, ``block_size``, ``overlap``."""

    name = "offload"
