"""Device storage of the ``quant`` strategy: quantized KV blocks, their scales, and KIVI's residual.

Both caches hold ``num_blocks`` blocks of ``block_size`` tokens, addressed by the block ids of a
:class:`~kvscope.kv.block_pool.BlockPool`, and answer two per-layer calls for one step's
:class:`QuantPlan`: :meth:`write` (the step's new K/V) and :meth:`gather` (the dequantized K/V the
step's attention reads, in the model's dtype, for the reference torch path).

* :class:`FP8Cache`: ``data`` ``[L, 2, num_blocks * block_size, Hkv, D]`` float8_e4m3fn codes
  (kept as uint8: indexing works on every device), ``scale`` ``[L, 2, Hkv]`` float32. Every token is
  quantized as it is written, as in vLLM.
* :class:`KiviCache`: codes ``kq``/``vq`` ``[L, num_blocks, G, Hkv, D * bits / 8]`` uint8, key
  scale/zero ``[L, num_blocks, Hkv, D]`` and value scale/zero ``[L, num_blocks, G, Hkv, D / Gv]``
  float16, and ``residual`` ``[L, 2, R, G, Hkv, D]`` in the model's dtype: a request's newest
  tokens, fewer than a block, stay there (in its residual slot) until their block fills and is
  quantized as a whole (``G == block_size``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvscope.device_copy import to_device
from kvscope.kv.quant_codec import (
    FP8_K_RANGE, FP8_V_RANGE, fp8_dequantize, fp8_quantize, fp8_scale, kivi_dequantize_block, kivi_quantize_block,
)
from kvscope.kv.slot_cache import table_slots
from kvscope.models.config import ModelConfig


def _longs(values: list[int], device: torch.device) -> torch.Tensor:
    return to_device(values, device, torch.long)


@dataclass
class QuantPlan:
    """Index tensors of one step, built once on the host (every layer reuses them).

    Attributes:
        tables: per request, indices ``[context_len]`` of its tokens (in order) into the
            ``[2, M, Hkv, D]`` K/V that :meth:`gather` returns.
        new_slots: (fp8) ``[N]`` slot of each new token.
        gather_slots: (fp8) ``[M]`` slots gathered.
        gather_blocks: (KIVI) ``[nb]`` full blocks gathered, then ``res_rows`` ``[m]`` rows of
            ``residual.view(2, R * G, Hkv, D)``.
        done_blocks: (KIVI) ``[nc]`` blocks this step fills; ``scratch_src``/``scratch_dst``: new
            rows ``[N]`` going to ``scratch.view(nc * G)``; ``old_blocks``/``old_res``: scratch
            blocks that start with tokens of earlier steps, and the residual slots holding them;
            ``res_src``/``res_dst``: new rows going to the residual (its flat ``R * G`` rows).
    """

    tables: list[torch.Tensor]
    new_slots: torch.Tensor | None = None
    gather_slots: torch.Tensor | None = None
    gather_blocks: torch.Tensor | None = None
    res_rows: torch.Tensor | None = None
    done_blocks: torch.Tensor | None = None
    scratch_src: torch.Tensor | None = None
    scratch_dst: torch.Tensor | None = None
    old_blocks: torch.Tensor | None = None
    old_res: torch.Tensor | None = None
    res_src: torch.Tensor | None = None
    res_dst: torch.Tensor | None = None


class FP8Cache:
    """float8_e4m3fn KV with per-tensor or per-KV-head scales, calibrated on each layer's first write
    (vLLM's ``calculate_kv_scales``: ``amax / 200`` for K, ``amax / 100`` for V, then fixed)."""

    bits = 8

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, per_head: bool) -> None:
        shape = (model.num_layers, 2, num_blocks * block_size, model.num_kv_heads, model.head_dim)
        self.data = torch.zeros(shape, dtype=torch.uint8, device=device)
        self.scale = torch.ones(model.num_layers, 2, model.num_kv_heads, dtype=torch.float32, device=device)
        self.calibrated = [False] * model.num_layers
        self.block_size, self.dtype, self.per_head = block_size, dtype, per_head

    @staticmethod
    def block_bytes(model: ModelConfig, block_size: int) -> int:
        """Bytes of one block (codes only: the scales are per layer, in :meth:`fixed_bytes`)."""
        return block_size * 2 * model.num_layers * model.num_kv_heads * model.head_dim

    @staticmethod
    def fixed_bytes(model: ModelConfig) -> int:
        """Bytes beside the blocks: the float32 scales."""
        return model.num_layers * 2 * model.num_kv_heads * 4

    def plan(self, tables: list[list[int]], done: list[int], q_lens: list[int], device: torch.device) -> QuantPlan:
        slots, out, offset = [], [], 0
        for table, d, n in zip(tables, done, q_lens):
            slots.append(table_slots(table, d + n, self.block_size, device))
            out.append(torch.arange(offset, offset + d + n, device=device))
            offset += d + n
        new = torch.cat([s[d:] for s, d in zip(slots, done)])
        return QuantPlan(out, new_slots=new, gather_slots=torch.cat(slots))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: QuantPlan) -> None:
        """Quantize the step's new ``k``, ``v`` ``[N, Hkv, D]`` into their slots."""
        if not self.calibrated[layer]:
            self.scale[layer, 0] = fp8_scale(k, FP8_K_RANGE, self.per_head)
            self.scale[layer, 1] = fp8_scale(v, FP8_V_RANGE, self.per_head)
            self.calibrated[layer] = True
        for i, codes in enumerate(self.codes(layer, k, v)):
            self.data[layer, i].index_copy_(0, plan.new_slots, codes)

    def codes(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 codes ``[N, Hkv, D]`` of ``k`` and ``v`` at layer ``layer``'s current scales
        (no calibration: read from the device tensor, so a captured graph uses the fixed scales)."""
        scale = self.scale[layer, :, :, None]  # [2, Hkv, 1]
        return fp8_quantize(k, scale[0]).view(torch.uint8), fp8_quantize(v, scale[1]).view(torch.uint8)

    def gather(self, layer: int, plan: QuantPlan) -> torch.Tensor:
        """Dequantized K/V ``[2, M, Hkv, D]`` of ``plan.gather_slots``, in the model's dtype."""
        codes = self.data[layer][:, plan.gather_slots].view(torch.float8_e4m3fn)
        return fp8_dequantize(codes, self.scale[layer][:, None, :, None]).to(self.dtype)


class KiviCache:
    """KIVI's int8/int4 KV: per-channel keys, per-token values, a full-precision residual."""

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, residual_slots: int,
                 device: torch.device, dtype: torch.dtype, bits: int, value_group: int) -> None:
        L, H, D, G = model.num_layers, model.num_kv_heads, model.head_dim, block_size
        packed = D * bits // 8
        self.kq = torch.zeros(L, num_blocks, G, H, packed, dtype=torch.uint8, device=device)
        self.vq = torch.zeros_like(self.kq)
        self.k_scale = torch.zeros(L, num_blocks, H, D, dtype=torch.float16, device=device)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.v_scale = torch.zeros(L, num_blocks, G, H, D // value_group, dtype=torch.float16, device=device)
        self.v_zero = torch.zeros_like(self.v_scale)
        self.residual = torch.zeros(L, 2, residual_slots, G, H, D, dtype=dtype, device=device)
        self.block_size, self.bits, self.value_group, self.dtype = G, bits, value_group, dtype

    @staticmethod
    def block_bytes(model: ModelConfig, block_size: int, bits: int, value_group: int) -> int:
        """Bytes of one block: K and V codes plus float16 scale and zero (key: per channel; value:
        per token and channel group)."""
        L, H, D, G = model.num_layers, model.num_kv_heads, model.head_dim, block_size
        codes = 2 * G * H * D * bits // 8
        return L * (codes + 2 * 2 * H * D + 2 * 2 * G * H * (D // value_group))

    @staticmethod
    def fixed_bytes(model: ModelConfig, block_size: int, residual_slots: int, dtype: torch.dtype) -> int:
        """Bytes beside the blocks: the residual slots, in the model's dtype."""
        return residual_slots * block_size * model.kv_bytes_per_token(dtype)

    def plan(self, tables: list[list[int]], done: list[int], q_lens: list[int], res_slots: list[int],
             device: torch.device) -> QuantPlan:
        G = self.block_size
        done_blocks, scratch_src, scratch_dst, old_blocks, old_res = [], [], [], [], []
        res_src, res_dst, gather_blocks, res_rows, spans = [], [], [], [], []
        row = 0
        for table, d, n, r in zip(tables, done, q_lens, res_slots):
            end = d + n
            first_new_full = len(done_blocks)
            for j in range(d // G, end // G):  # the blocks this step fills
                if j == d // G and d % G:
                    old_blocks.append(len(done_blocks))
                    old_res.append(r)
                done_blocks.append(table[j])
            for p in range(d, end):
                if p // G < end // G:
                    scratch_src.append(row)
                    scratch_dst.append((first_new_full + p // G - d // G) * G + p % G)
                else:
                    res_src.append(row)
                    res_dst.append(r * G + p % G)
                row += 1
            spans.append((len(gather_blocks) * G, end // G * G, len(res_rows), end % G))
            gather_blocks += table[: end // G]
            res_rows += [r * G + t for t in range(end % G)]
        total = len(gather_blocks) * G
        tables_out = [torch.cat([torch.arange(b0, b0 + nb, device=device),
                                 torch.arange(total + r0, total + r0 + nr, device=device)])
                      for b0, nb, r0, nr in spans]
        return QuantPlan(
            tables_out, gather_blocks=_longs(gather_blocks, device), res_rows=_longs(res_rows, device),
            done_blocks=_longs(done_blocks, device), scratch_src=_longs(scratch_src, device),
            scratch_dst=_longs(scratch_dst, device), old_blocks=_longs(old_blocks, device),
            old_res=_longs(old_res, device), res_src=_longs(res_src, device), res_dst=_longs(res_dst, device),
        )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: QuantPlan) -> None:
        """Store the step's new ``k``, ``v`` ``[N, Hkv, D]``: tokens of blocks this step fills are
        quantized with their block (earlier tokens come from the residual), the rest go to the
        residual. The residual is read before it is written: a request's slot is reused from
        offset 0 as soon as its block fills."""
        res = self.residual[layer]  # [2, R, G, Hkv, D]
        G, H, D = res.shape[2:]
        kv = torch.stack([k, v]).to(res.dtype)  # [2, N, Hkv, D]
        nc = plan.done_blocks.numel()
        if nc:
            scratch = res.new_empty(2, nc, G, H, D)
            if plan.old_blocks.numel():
                scratch[:, plan.old_blocks] = res[:, plan.old_res]
            scratch.view(2, nc * G, H, D)[:, plan.scratch_dst] = kv[:, plan.scratch_src]
            kq, ks, kz, vq, vs, vz = kivi_quantize_block(scratch[0], scratch[1], self.bits, self.value_group)
            b = plan.done_blocks
            self.kq[layer, b], self.k_scale[layer, b], self.k_zero[layer, b] = kq, ks, kz
            self.vq[layer, b], self.v_scale[layer, b], self.v_zero[layer, b] = vq, vs, vz
        if plan.res_src.numel():
            res.view(2, -1, H, D)[:, plan.res_dst] = kv[:, plan.res_src]

    def dequantize(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of full ``blocks`` ``[nb]``: ``[nb, G, Hkv, D]`` float32 each."""
        return kivi_dequantize_block(self.kq[layer, blocks], self.k_scale[layer, blocks], self.k_zero[layer, blocks],
                                     self.vq[layer, blocks], self.v_scale[layer, blocks], self.v_zero[layer, blocks],
                                     self.bits)

    def gather(self, layer: int, plan: QuantPlan) -> torch.Tensor:
        """K/V ``[2, M, Hkv, D]`` in the model's dtype: the dequantized full blocks of
        ``plan.gather_blocks``, then the residual rows ``plan.res_rows``."""
        k, v = self.dequantize(layer, plan.gather_blocks)
        H, D = k.shape[2:]
        full = torch.stack([k, v]).reshape(2, -1, H, D).to(self.dtype)
        res = self.residual[layer].view(2, -1, H, D)[:, plan.res_rows]
        return torch.cat([full, res], dim=1)
