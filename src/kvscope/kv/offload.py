"""``offload``: all KV in host memory, each layer's whole KV fetched every step (FlexGen style).

The baseline InfiniGen is measured against. Lossless: it attends over exactly the tokens ``paged``
does, so its outputs equal ``paged``'s. The fetch of layer ``l + 1`` runs on the copy stream while
layer ``l`` computes; the step is bound by PCIe once the context is long (see
``benchmarks/gpu/offload_decode.py``).
"""
from __future__ import annotations

from kvscope.kv.offload_base import HostOffloadStrategy
from kvscope.kv.registry import register


@register
class OffloadStrategy(HostOffloadStrategy):
    """Host-resident KV, dense per-layer prefetch. Args: ``host_kv_bytes``, ``block_size``, ``overlap``."""

    name = "offload"
    #: Every step fetches the whole context eagerly (no captured decode).
    graph_decode = False
