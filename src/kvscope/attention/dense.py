"""Cache-free causal attention over one sequence: the reference that model tests compare against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvscope.models.base import CausalLM


class DenseCausalBackend:
    """AttentionBackend for ONE sequence given whole in a single forward call (no KV cache).

    Each ``attend`` call attends causally over exactly the q/k/v it receives, so the model must be
    fed the full sequence at once with positions ``0..T-1``.
    """

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[T, H, D]``, ``k``/``v`` ``[T, Hkv, D]`` -> ``[T, H, D]``."""
        group = q.shape[1] // k.shape[1]
        # GQA: query head h reads kv head h // group, i.e. each kv head repeated `group` times in a row.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=self.scale
        )
        return out.transpose(0, 1)


@torch.inference_mode()
def run_dense(model: CausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence forward of ``input_ids`` ``[T]`` -> float32 logits ``[T, vocab_size]``."""
    positions = torch.arange(input_ids.shape[0], device=input_ids.device)
    backend = DenseCausalBackend(model.config.head_dim**-0.5)
    return model.compute_logits(model(input_ids, positions, backend))
