"""The eager step of ``quant`` on the Triton backend when it holds prefill chunks (every dtype).

The step's new K/V are stored by the cache's own write (:meth:`FP8Cache.write`, which also
calibrates a layer's scales on its first write; :meth:`KiviCache.write`, which quantizes the blocks
the step fills and leaves the rest in the request's residual slot); then every row reads the cache
back, as the torch path does, but without dequantizing the whole context first: decode rows (one
new token) by the split-K decode kernel
(:func:`~kvscope.attention.triton_quant_decode.quant_decode_attention`), prefill chunks all together
by one prefill launch: :func:`~kvscope.attention.triton_prefill.fp8_paged_prefill_attention` over
fp8 codes, :func:`~kvscope.attention.triton_kivi_prefill.kivi_paged_prefill_attention` over KIVI's
blocks and residual. Decode-only steps take
:class:`~kvscope.attention.triton_quant_decode.TritonQuantDecode` instead.
"""
from __future__ import annotations

import torch

from kvscope.attention.triton_kivi_prefill import kivi_paged_prefill_attention
from kvscope.attention.triton_prefill import fp8_paged_prefill_attention
from kvscope.attention.triton_quant_decode import quant_decode_attention
from kvscope.device_copy import to_device
from kvscope.kv.quant_cache import FP8Cache, KiviCache, QuantPlan
from kvscope.kv.slot_cache import StepRows


class TritonQuantAttention:
    """AttentionBackend of one ``quant`` step with prefill chunks (and possibly decode rows).

    Args:
        cache: the strategy's fp8 or KIVI storage.
        plan: the step's ``cache.plan`` (what :meth:`attend`'s write stores where).
        tables: per request, its block ids (at least enough for its tokens after the step).
        done: per request, tokens cached before this step.
        query_start: ``[B + 1]`` row offsets of each request's new tokens in the flattened batch.
        res_slots: (KIVI) per request, its residual slot; empty for fp8.
        scale: softmax scale.
    """

    def __init__(self, cache: FP8Cache | KiviCache, plan: QuantPlan, tables: list[list[int]], done: list[int],
                 query_start: list[int], res_slots: list[int], scale: float) -> None:
        self.cache, self.plan, self.scale = cache, plan, scale
        device = plan.tables[0].device
        bs = cache.block_size
        batch = len(tables)
        q_lens = [query_start[i + 1] - query_start[i] for i in range(batch)]
        ctx = [d + n for d, n in zip(done, q_lens)]
        # Built on the host, each part copied once without waiting for the device (no sync).
        width = max(-(-t // bs) for t in ctx)
        # Columns past a request's last block are padding that the kernels never read.
        padded = torch.tensor([(t[:width] + [0] * width)[:width] for t in tables], dtype=torch.int32)
        lens = torch.tensor(ctx, dtype=torch.int32)
        res = torch.tensor(res_slots, dtype=torch.int32) if res_slots else None
        split = StepRows.of(query_start, device)
        decode, prefill = split.decode, split.prefill
        self.decode_q, self.prefill_q = split.decode_q, split.prefill_q
        self.prefill_cu, self.prefill_max_len = split.prefill_cu, split.prefill_max_len
        if decode:
            self.decode_tables = to_device(padded[decode], device)
            self.decode_lens = to_device(lens[decode], device)
            self.decode_res = to_device(res[decode], device) if res is not None else None
        self.prefill_tables = to_device(padded[prefill], device)
        self.prefill_lens = to_device(lens[prefill], device)
        self.prefill_res = to_device(res[prefill], device) if res is not None else None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[N, Hq, D]``, ``k``/``v`` ``[N, Hkv, D]`` of the step's new tokens -> ``[N, Hq, D]``."""
        self.cache.write(layer_idx, k, v, self.plan)
        out = torch.empty_like(q)
        if self.decode_q is not None:
            out[self.decode_q] = quant_decode_attention(q[self.decode_q], self.cache, layer_idx, self.decode_tables,
                                                        self.decode_lens, self.decode_res, self.scale)
        rows = self.prefill_q
        if isinstance(rows, slice):  # written in place through a view of out
            self._prefill(layer_idx, q[rows], out[rows])
        else:
            out[rows] = self._prefill(layer_idx, q[rows], None)
        return out

    def _prefill(self, layer: int, q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """The chunks' attention: ``q`` ``[n, Hq, D]`` -> ``[n, Hq, D]`` (into ``out`` when given)."""
        cache = self.cache
        index = (self.prefill_cu, self.prefill_lens, self.scale)
        if isinstance(cache, KiviCache):
            return kivi_paged_prefill_attention(q, cache, layer, self.prefill_tables, self.prefill_res, *index,
                                                self.prefill_max_len, out=out)
        codes, scales = cache.data[layer], cache.scale[layer]
        return fp8_paged_prefill_attention(q, codes[0], codes[1], scales[0], scales[1], self.prefill_tables,
                                           *index, cache.block_size, self.prefill_max_len, out=out)
