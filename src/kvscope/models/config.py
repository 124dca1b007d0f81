"""Architecture description shared by every model family kvscope implements."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kvscope.errors import ModelLoadError

Arch = Literal["llama", "opt"]


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a decoder-only transformer.

    ``arch`` selects the implementation: ``"llama"`` covers Llama 2/3, Mistral, SmolLM2 and Qwen2
    (RMSNorm, RoPE, GQA, SwiGLU; ``attention_bias`` for Qwen2's qkv bias); ``"opt"`` covers OPT
    (learned positions with offset 2, LayerNorm, ReLU MLP).
    """

    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # Llama's ``attention_bias`` also puts a bias on o_proj; Qwen2 has qkv bias only.
    attention_out_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # OPT only.
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = ""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V that one token occupies over all layers."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def num_params(self) -> int:
        """Exact parameter count of the kvscope model, from the shapes (tied embeddings counted once)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        if self.arch == "opt":
            d = self.word_embed_proj_dim or h
            # q/k/v/out and fc1/fc2 all carry biases; two LayerNorms (weight + bias) per layer.
            layer = (h * q + q) + 2 * (h * kv + kv) + (q * h + h) + (h * i + i) + (i * h + h) + 4 * h
            extra = (self.max_position_embeddings + 2) * h
            extra += 2 * h if self.do_layer_norm_before else 0
            extra += 2 * d * h if d != h else 0
        else:
            d = h
            layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
            layer += (q + 2 * kv) if self.attention_bias else 0
            layer += h if self.attention_out_bias else 0
            layer += (2 * i + h) if self.mlp_bias else 0
            extra = h
        emb = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + extra
