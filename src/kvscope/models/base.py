"""The seam between model code and KV-cache strategies.

Model code never knows how KV is stored. Each step it receives the flattened new tokens of every
scheduled request (varlen, like vLLM) and an :class:`AttentionBackend` built by the KV strategy for
this step. For every layer the model computes q/k/v for the new tokens (RoPE already applied) and
hands them to ``backend.attend``, which writes k/v wherever the strategy keeps them and returns the
attention output.

A backend may also define ``layer_input(layer_idx, x)``: the model calls it with each layer's
attention input before projecting it, which is the moment an offloading strategy starts fetching
the next layer's KV (and InfiniGen speculates on it with :meth:`CausalLM.attention_query`).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from kvscope.models.config import ModelConfig


class AttentionBackend(Protocol):
    """Per-step attention provided by a KV strategy."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new keys/values of ``layer_idx`` and attend over the cache.

        Args:
            q: ``[N, num_heads, head_dim]`` queries of the N new tokens of this step.
            k: ``[N, num_kv_heads, head_dim]`` keys (after RoPE) of the same tokens.
            v: ``[N, num_kv_heads, head_dim]`` values of the same tokens.
        Returns:
            ``[N, num_heads, head_dim]`` attention output, softmax scale ``head_dim ** -0.5``.
        """
        ...


def notify_layer_input(attn: AttentionBackend, layer_idx: int, x: torch.Tensor) -> None:
    """Call the backend's optional ``layer_input`` hook with attention input ``x`` ``[N, hidden]``."""
    hook = getattr(attn, "layer_input", None)
    if hook is not None:
        hook(layer_idx, x)


class CausalLM(nn.Module):
    """Common interface of the model families (see ``llama.py`` and ``opt.py``)."""

    config: ModelConfig

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """``input_ids``/``positions``: ``[N]`` int64. Returns final hidden states ``[N, hidden]``."""
        raise NotImplementedError

    def attention_query(self, layer_idx: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queries ``[N, num_heads, head_dim]`` (RoPE applied, not scaled) that layer ``layer_idx``
        would compute from attention input ``x`` ``[N, hidden]`` at ``positions`` ``[N]``."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[M, hidden]`` -> float32 logits ``[M, vocab_size]``."""
        raise NotImplementedError
