"""Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2): RMSNorm, RoPE, GQA, SwiGLU.

Module names mirror the HF checkpoints (``model.layers.{i}.self_attn.o_proj.weight``, ...), except
that q/k/v are one ``qkv_proj`` and gate/up one ``gate_up_proj`` (one GEMM each, see ``fused.py``);
the loaders map the checkpoint's separate tensors into them.
"""
from __future__ import annotations

import torch
from torch import nn

from kvscope.errors import ModelLoadError
from kvscope.models.base import AttentionBackend, CausalLM, notify_layer_input
from kvscope.models.config import ModelConfig
from kvscope.models.fused import FusedLinear, FusedQKV, qkv_linear
from kvscope.models.rope import RotaryEmbedding
from kvscope.models.triton_ops import add_rms_norm, rotary, silu_mul


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, normalised in float32 then cast back before scaling."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, size]`` -> ``[N, size]``."""
        return add_rms_norm(x, None, self.weight, self.eps)[0]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual += x`` (``x`` alone when ``residual`` is None), then the norm of it: both ``[N, size]``."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class LlamaAttention(FusedQKV, nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.qkv_proj = qkv_linear(h, config.num_heads, config.num_kv_heads, d, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=config.attention_out_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionBackend) -> torch.Tensor:
        """``x`` ``[N, hidden]``, ``rope`` = RoPE ``(cos, sin)`` of the N positions -> ``[N, hidden]``."""
        n = x.shape[0]
        notify_layer_input(attn, self.layer_idx, x)
        # Views of one [N, (Hq + 2 Hkv) D] output: rows strided, heads contiguous, which RoPE's
        # kernel and the KV writers accept as they are.
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = rotary(q.view(n, self.num_heads, self.head_dim), *rope)
        k = rotary(k.view(n, self.num_kv_heads, self.head_dim), *rope)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        out = attn.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up as one ``[2 I, hidden]`` GEMM."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = FusedLinear(h, (("gate_proj", i), ("up_proj", i)), bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, hidden]`` -> ``[N, hidden]``."""
        # silu_mul reads row-strided views, so the halves of [N, 2 I] are never copied.
        return self.down_proj(silu_mul(*self.gate_up_proj.split(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm residual block. ``x`` ``[N, hidden]`` is the previous block's output (the embeddings
        for the first, with ``residual`` None); returns this block's output and the residual stream,
        whose sum is the block's result. The residual adds ride in the norms' kernels."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_norm(self.self_attn(h, rope, attn), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class LlamaForCausalLM(CausalLM):
    """Llama-family causal LM; ``config.arch`` must be ``"llama"``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "llama":
            raise ModelLoadError(f"LlamaForCausalLM cannot run arch {config.arch!r}")
        if config.hidden_act != "silu":
            raise ModelLoadError(f"hidden_act {config.hidden_act!r} is not supported for llama (only 'silu')")
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so (call after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[N]`` int64 -> final hidden states ``[N, hidden]``."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rope.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, attn)
        return self.model.norm.add_norm(x, residual)[0]

    def attention_query(self, layer_idx: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        attn = self.model.layers[layer_idx].self_attn
        q = attn.query(x).view(x.shape[0], attn.num_heads, attn.head_dim)
        return rotary(q, *self.rope.cos_sin(positions, x.dtype))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[M, hidden]`` -> float32 logits ``[M, vocab_size]``."""
        return self.lm_head(hidden).float()
