"""``quant``: paged KV stored at reduced precision, so the same memory holds 2-3.5x the tokens.

Two published schemes on top of ``paged``'s block pool (:class:`~kvscope.kv.paged.PagedStrategy`):

* ``dtype=fp8``: vLLM's ``kv_cache_dtype="fp8"`` (float8_e4m3fn), with float32 scales per tensor
  (``scale=tensor``, vLLM's default) or per KV head (``scale=head``) for each layer's K and V. The
  scales are calibrated from the data as it is written, as vLLM's ``calculate_kv_scales`` does: on
  a layer's first write, ``amax / 200`` for K and ``amax / 100`` for V, then fixed (values
  beyond the headroom saturate at +-448). A checkpoint's scales would need a loader hook; a
  one-shot calibration needs no extra pass and keeps a written code valid for ever. The scales
  depend on the first step's batch, so outputs may depend on what was served first.
* ``dtype=int8`` / ``dtype=int4``: KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
  Quantization for KV Cache"): keys quantized per channel over a group of ``group_size`` tokens,
  values per token over groups of ``min(group_size, head_dim)`` channels, float16 scale and zero;
  int4 packs two codes per byte. A block is one group (``block_size == group_size``): a request's
  newest tokens, fewer than a group, stay in full precision in a residual slot (KIVI's residual)
  and the block is quantized when it fills. Residual slots (``residual_slots``; default the
  engine's ``max_num_seqs``, or fewer if they would take more than 1/8 of ``kv_memory_bytes``)
  are memory taken from ``kv_memory_bytes`` before the blocks; a request needs one to be admitted,
  so they also bound how many requests run at once.

Attention reads the cache back for prefill and decode alike (the step's own tokens included, as
they were stored). The reference path dequantizes and calls :mod:`kvscope.attention.torch_ref`.
With ``attention_backend="triton"`` the kernels dequantize in registers: decode-only steps run
:mod:`kvscope.attention.triton_quant_decode` (every dtype); steps with prefill chunks run
:mod:`kvscope.kv.quant_triton_step` (every dtype: decode rows by the same decode kernel, the
chunks together by one prefill launch, fp8's
:func:`~kvscope.attention.triton_prefill.fp8_paged_prefill_attention` or KIVI's
:func:`~kvscope.attention.triton_kivi_prefill.kivi_paged_prefill_attention`, which reads the
quantized blocks and then the residual slot).

CUDA-graph decode (every dtype, on the Triton backend): ``paged``'s block-table steps
(:mod:`kvscope.kv.block_table_graphs`). fp8: :class:`~kvscope.attention.triton_quant_decode.StaticFP8Decode`
as their attention (:meth:`QuantStrategy.static_attention`): the new tokens are encoded at the
stored scales, written by slot, and read by the fp8 decode kernel. KIVI: :mod:`kvscope.kv.quant_graphs`
adds each row's residual slot to the static buffers, and
:class:`~kvscope.attention.triton_quant_decode.StaticKiviDecode` stores each new token with
:mod:`kvscope.attention.triton_kivi_write` (one program per row and KV head: to the residual, or,
when the token completes its group, the group quantized into its block, decided on the device
from the row's slot) before the KIVI decode kernel reads the step; codes and scales are the eager
write's, bit for bit.

As ``adaptive``'s long child (:meth:`QuantStrategy.adopt`) it gets ``long_share`` of the memory for
a quantized pool of its own, and a request handed over under pressure is quantized into it.

Not supported (declared): prefix caching, fork (``n > 1``), swap preemption.
"""
from __future__ import annotations

from typing import Any

import torch

from kvscope.device_copy import to_device
from kvscope.attention.torch_ref import attend_causal, attend_decode
from kvscope.errors import ConfigError
from kvscope.kv.backend import GraphDecode
from kvscope.kv.base import (
    Adoption, BlockTableLayout, GraphStatistics, Handover, KVSetup, KVStrategy, StepBatch,
)
from kvscope.kv.block_pool import BlockPool
from kvscope.kv.manager import KVManager, KVUsage
from kvscope.kv.paged import PagedStrategy, _PagedRequest
from kvscope.kv.quant_cache import FP8Cache, KiviCache, QuantPlan
from kvscope.kv.registry import register
from kvscope.models.base import AttentionBackend
from kvscope.request import Request

DTYPE_BITS = {"fp8": 8, "int8": 8, "int4": 4}
GROUP_SIZES = (32, 64)
FP8_BLOCK_SIZE = 16
#: Bits of a float16 scale plus a float16 zero, stored per quantization group.
SCALE_ZERO_BITS = 32
#: The default residual takes at most 1 / this of ``kv_memory_bytes``: a small pool keeps most of
#: its bytes for quantized blocks (and admits fewer requests at once).
RESIDUAL_SHARE_CAP = 8


class QuantAttention:
    """Reference AttentionBackend over a quantized cache for one step: write, dequantize what the
    step reads (:meth:`FP8Cache.gather` / :meth:`KiviCache.gather`), attend with the torch
    reference (decode rows together over padded tables, prefill chunks one by one)."""

    def __init__(self, cache: FP8Cache | KiviCache, plan: QuantPlan, query_start: list[int], scale: float) -> None:
        self.cache, self.plan, self.query_start, self.scale = cache, plan, query_start, scale
        device = plan.tables[0].device
        q_lens = [query_start[i + 1] - query_start[i] for i in range(len(plan.tables))]
        self.decode_rows = [i for i, n in enumerate(q_lens) if n == 1]
        self.prefill_rows = [i for i, n in enumerate(q_lens) if n > 1]
        if self.decode_rows:
            lens = [plan.tables[i].numel() for i in self.decode_rows]
            padded = torch.zeros(len(lens), max(lens), dtype=torch.long, device=device)
            for j, i in enumerate(self.decode_rows):
                padded[j, : lens[j]] = plan.tables[i]
            self.decode_index = padded
            self.decode_lens = to_device(lens, device)
            self.decode_q = to_device([query_start[i] for i in self.decode_rows], device)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer_idx, k, v, self.plan)
        kv = self.cache.gather(layer_idx, self.plan)  # [2, M, Hkv, D]
        out = torch.empty_like(q)
        if self.decode_rows:
            out[self.decode_q] = attend_decode(q[self.decode_q], kv[0][self.decode_index], kv[1][self.decode_index],
                                               self.decode_lens, self.scale)
        for i in self.prefill_rows:
            s, e = self.query_start[i], self.query_start[i + 1]
            t = self.plan.tables[i]
            out[s:e] = attend_causal(q[s:e], kv[0][t], kv[1][t], self.scale)
        return out


@register
class QuantStrategy(PagedStrategy):
    """Paged KV quantized to fp8 (vLLM) or int8/int4 (KIVI); see the module docstring."""

    name = "quant"
    lossless = False
    drops_under_pressure = False  # nothing is dropped: quality does not depend on the pool
    supports_prefix_caching = False
    supports_swap = False
    supports_fork = False

    def __init__(self, dtype: str = "fp8", group_size: int | None = None, scale: str | None = None,
                 residual_slots: int | None = None) -> None:
        if dtype not in DTYPE_BITS:
            raise ConfigError(f"quant: dtype must be one of {list(DTYPE_BITS)}, got {dtype!r}")
        self.kv_dtype, self.bits, self.kivi = dtype, DTYPE_BITS[dtype], dtype != "fp8"
        if self.kivi:
            if scale is not None:
                raise ConfigError(f"quant: scale applies to dtype=fp8 only (int scales are KIVI's groups), got {scale!r}")
            group_size = 32 if group_size is None else group_size
            if group_size not in GROUP_SIZES:
                raise ConfigError(f"quant: group_size must be one of {list(GROUP_SIZES)}, got {group_size!r}")
            if residual_slots is not None and residual_slots < 1:
                raise ConfigError(f"quant: residual_slots must be a positive integer, got {residual_slots!r}")
        else:
            if group_size is not None or residual_slots is not None:
                raise ConfigError("quant: group_size and residual_slots apply to dtype=int8/int4 only "
                                  "(fp8 quantizes each token as it is written)")
            scale = "tensor" if scale is None else scale
            if scale not in ("tensor", "head"):
                raise ConfigError(f"quant: scale must be 'tensor' or 'head', got {scale!r}")
        self.group_size, self.scale_mode, self.residual_arg = group_size, scale, residual_slots
        super().__init__(block_size=group_size if self.kivi else FP8_BLOCK_SIZE, enable_prefix_caching=False)
        self.value_group = group_size
        self._res_free: list[int] = []
        self._res_of: dict[str, int] = {}

    # ---- facts ---------------------------------------------------------------------------------------
    def kv_bits(self) -> float:
        """Bits per stored element: the code width, plus (KIVI) each group's float16 scale and zero
        spread over its elements (keys: ``group_size`` tokens; values: ``value_group`` channels,
        ``group_size`` until bound to a model with a smaller head). fp8's per-layer scales are a
        fixed cost, not per element. KIVI's residual slots are per request, not per token."""
        if not self.kivi:
            return float(self.bits)
        return self.bits + (SCALE_ZERO_BITS / self.group_size + SCALE_ZERO_BITS / self.value_group) / 2

    def decode_read_bytes(self, context: int) -> int | None:
        """What the decode kernels read, from the cache's tensors: fp8, every token's codes plus the
        layers' scales; KIVI, the ``context // G`` full blocks' codes and scale/zero, then the last
        ``context % G`` tokens from the residual in the model's dtype."""
        c = self.cache
        if isinstance(c, FP8Cache):
            return context * c.data[:, :, 0].numel() * c.data.element_size() + c.scale.nbytes
        block = sum(t[:, 0].numel() * t.element_size() for t in (c.kq, c.vq, c.k_scale, c.k_zero, c.v_scale, c.v_zero))
        row = c.residual[:, :, 0, 0]
        return context // self.block_size * block + context % self.block_size * row.numel() * row.element_size()

    @classmethod
    def args_for_share(cls, share: float) -> dict[str, Any] | None:
        return None  # no budget: every token is kept, at lower precision

    def kept_share(self, prompt_tokens: int | None = None) -> float:
        return 1.0

    # ---- lifecycle -----------------------------------------------------------------------------------
    def bind(self, setup: KVSetup) -> None:
        m, bs = setup.model, self.block_size
        if self.kivi:
            self.value_group = min(self.group_size, m.head_dim)
            if m.head_dim % self.value_group or (self.bits == 4 and m.head_dim % 2):
                raise ConfigError(f"quant: head_dim={m.head_dim} is not a multiple of the value group "
                                  f"{self.value_group} (group_size)")
            slot_bytes = KiviCache.fixed_bytes(m, bs, 1, setup.dtype)
            slots = self.residual_arg or max(1, min(setup.max_num_seqs,
                                                    setup.kv_memory_bytes // RESIDUAL_SHARE_CAP // slot_bytes))
            self.block_bytes = KiviCache.block_bytes(m, bs, self.bits, self.value_group)
            self.fixed_bytes = KiviCache.fixed_bytes(m, bs, slots, setup.dtype)
        else:
            slots = 0
            self.block_bytes = FP8Cache.block_bytes(m, bs)
            self.fixed_bytes = FP8Cache.fixed_bytes(m)
        num_blocks = (setup.kv_memory_bytes - self.fixed_bytes) // self.block_bytes
        if num_blocks < 1:
            raise ConfigError(
                f"quant: kv_memory_bytes={setup.kv_memory_bytes} holds no block beside the fixed "
                f"{self.fixed_bytes} bytes (scales, or {slots} residual slots: lower residual_slots) "
                f"and one block of {self.block_bytes} bytes")
        self.setup = setup
        self.bytes_per_token = self.block_bytes / bs
        self.full_bytes_per_token = m.kv_bytes_per_token(setup.dtype)
        self.pool = BlockPool(num_blocks, enable_caching=False)
        self.scale = m.head_dim**-0.5
        if self.kivi:
            self.cache: FP8Cache | KiviCache = KiviCache(m, num_blocks, bs, slots, setup.device, setup.dtype,
                                                         self.bits, self.value_group)
        else:
            self.cache = FP8Cache(m, num_blocks, bs, setup.device, setup.dtype, self.scale_mode == "head")
        self._res_free = list(range(slots - 1, -1, -1))

    # ---- scheduler side ------------------------------------------------------------------------------
    def allocate(self, request: Request, num_tokens: int) -> bool:
        rid = request.request_id
        new = rid not in self.tables
        if new and self.kivi and not self._res_free:
            return False
        if not super().allocate(request, num_tokens):
            return False
        if new and self.kivi:
            self._res_of[rid] = self._res_free.pop()
        return True

    def free(self, request: Request) -> None:
        super().free(request)
        slot = self._res_of.pop(request.request_id, None)
        if slot is not None:
            self._res_free.append(slot)

    def adopt(self, handover: Handover) -> Adoption:
        """Take over a running request from ``adaptive``'s full child: its K/V (``[L, 2, n, Hkv,
        D]``) written through this cache, so quantized as a prefill of the same tokens would be
        (COPIED). REFUSED, changing nothing, when the pool lacks the blocks (or KIVI a residual slot)."""
        req, n = handover.request, handover.held
        rid, need = req.request_id, self._num_blocks(n)
        if rid in self.tables or need > self.pool.num_free or (self.kivi and not self._res_free):
            return Adoption.REFUSED
        table = self.pool.allocate(need)
        self.tables[rid] = table
        self._reqs.setdefault(rid, _PagedRequest()).held = n
        if self.kivi:
            self._res_of[rid] = self._res_free.pop()
        plan = self._plan([table], [0], [n], [self._res_of[rid]] if self.kivi else [])
        kv = handover.read_kv()
        for layer in range(kv.shape[0]):
            self.cache.write(layer, kv[layer, 0], kv[layer, 1], plan)
        return Adoption.COPIED

    def swap_out(self, request: Request) -> int | None:
        return KVStrategy.swap_out(self, request)

    def swap_in(self, request: Request) -> int | None:
        return KVStrategy.swap_in(self, request)

    def fork(self, parent: Request, child: Request) -> None:
        KVStrategy.fork(self, parent, child)

    def usage(self) -> KVUsage:
        return KVManager.usage(self)  # from this class's own byte accounting, itself a cheap sum

    def stats(self) -> dict[str, Any]:
        bs = self.block_size
        held = [self._reqs[rid].held if rid in self._reqs else 0 for rid in self.tables]
        residual = sum(h % bs for h in held) if self.kivi else 0
        quantized = sum(held) - residual
        allocated_tokens = self.pool.num_used * bs
        res_bytes = self.fixed_bytes if self.kivi else 0
        return {
            "block_size": bs,
            "num_blocks": self.pool.num_blocks,
            "blocks_used": self.pool.num_used,
            "blocks_free": self.pool.num_free,
            "kv_bytes_reserved": self.pool.num_blocks * self.block_bytes + self.fixed_bytes,
            "kv_bytes_allocated": self.pool.num_used * self.block_bytes
            + len(self._res_of) * bs * self.full_bytes_per_token,
            "kv_bytes_used": round(quantized * self.bytes_per_token) + residual * self.full_bytes_per_token,
            "internal_fragmentation": (1 - sum(held) / allocated_tokens) if allocated_tokens else 0.0,
            "kv_dtype": self.kv_dtype,
            "kv_bits": self.kv_bits(),
            "tokens_capacity": self.pool.num_blocks * bs,
            "bytes_per_token": self.bytes_per_token,
            "full_precision_bytes_per_token": self.full_bytes_per_token,
            "residual_slots": len(self._res_of) + len(self._res_free),
            "residual_bytes": res_bytes,
            "residual_tokens": residual,
        }

    # ---- model side ----------------------------------------------------------------------------------
    def begin_step(self, batch: StepBatch) -> AttentionBackend:
        tables = [self.tables[req.request_id] for req in batch.requests]
        done = [req.num_computed_tokens for req in batch.requests]
        qs = batch.query_start
        q_lens = [qs[i + 1] - qs[i] for i in range(len(tables))]
        res = self.residual_slots(batch) if self.kivi else []
        plan = self._plan(tables, done, q_lens, res)
        if self.setup.attention_backend == "triton":
            # Imported here: the torch path must work where triton is not installed.
            if all(n == 1 for n in q_lens):
                from kvscope.attention.triton_quant_decode import TritonQuantDecode

                return TritonQuantDecode(self.cache, plan, tables, done, res, self.scale)
            from kvscope.kv.quant_triton_step import TritonQuantAttention

            return TritonQuantAttention(self.cache, plan, tables, done, qs, res, self.scale)
        return QuantAttention(self.cache, plan, qs, self.scale)

    def _plan(self, tables: list[list[int]], done: list[int], q_lens: list[int], res: list[int]) -> QuantPlan:
        """The cache's plan for requests holding ``done`` tokens and writing ``q_lens`` more; ``res``
        their residual slots (KIVI; empty for fp8)."""
        if self.kivi:
            return self.cache.plan(tables, done, q_lens, res, self.setup.device)
        return self.cache.plan(tables, done, q_lens, self.setup.device)

    def residual_slots(self, batch: StepBatch) -> list[int]:
        """(KIVI) Per request of ``batch``, its residual slot."""
        return [self._res_of[req.request_id] for req in batch.requests]

    # ---- captured decode (see the module docstring) ----------------------------------------------------
    def block_table_layout(self) -> BlockTableLayout | None:
        if self.setup.attention_backend != "triton":
            return None
        return BlockTableLayout(self.cache, self.block_size)

    def decode_graphs(self) -> GraphDecode | None:
        if not self.kivi:
            return super().decode_graphs()
        setup = self.setup
        if setup is None or not setup.cuda_graph_sizes or self.block_table_layout() is None:
            return None
        from kvscope.kv.quant_graphs import KiviGraphs

        return KiviGraphs(self, setup.cuda_graph_sizes, setup.max_model_len, setup.device)

    def graph_ready(self, batch: StepBatch) -> bool:
        # fp8: a captured step never calibrates: every layer must have its scales from an eager
        # write. In serving a prefill always comes first; a request given its context directly (the
        # decode benchmarks) has its first decode step run eagerly, which calibrates. KIVI has no
        # calibration: its groups' scales are taken as each block is quantized.
        return self.kivi or all(self.cache.calibrated)

    def static_attention(self, layout: BlockTableLayout, slots: torch.Tensor, tables: torch.Tensor,
                         lens: torch.Tensor, scale: float, num_splits: int,
                         stats: GraphStatistics | None) -> AttentionBackend:
        # fp8's; KIVI's steps (kv/quant_graphs.py) build theirs, which also read the residual slots.
        from kvscope.attention.triton_quant_decode import StaticFP8Decode

        return StaticFP8Decode(layout.cache, slots, tables, lens, scale, num_splits)
