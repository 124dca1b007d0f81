"""OPT decoder: learned positions (offset 2), LayerNorm, ReLU MLP, biases everywhere.

Module names mirror the HF checkpoints (``model.decoder.layers.{i}.fc1.weight``, ...), except that
q/k/v are one ``qkv_proj`` (one GEMM, see ``fused.py``); the loaders map the checkpoint's separate
tensors into it. Queries are not pre-scaled: the attention backend applies ``head_dim ** -0.5``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvscope.errors import ModelLoadError
from kvscope.models.base import AttentionBackend, CausalLM, notify_layer_input
from kvscope.models.config import ModelConfig
from kvscope.models.fused import FusedQKV, qkv_linear

# OPT's position table has two leading rows (a fairseq padding-index legacy): position p uses row p + 2.
POSITION_OFFSET = 2


class OPTAttention(FusedQKV, nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.qkv_proj = qkv_linear(h, config.num_heads, config.num_kv_heads, d, bias=True)
        self.out_proj = nn.Linear(config.num_heads * d, h)

    def forward(self, x: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """``x`` ``[N, hidden]`` -> ``[N, hidden]``."""
        n = x.shape[0]
        notify_layer_input(attn, self.layer_idx, x)
        # Views of one [N, (Hq + 2 Hkv) D] output (rows strided, heads contiguous): the attention
        # backends take q/k/v with any row stride.
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        out = attn.attend(self.layer_idx, q.view(n, self.num_heads, self.head_dim),
                          k.view(n, self.num_kv_heads, self.head_dim), v.view(n, self.num_kv_heads, self.head_dim))
        return self.out_proj(out.reshape(n, self.num_heads * self.head_dim))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(h, eps=config.norm_eps)
        self.fc1 = nn.Linear(h, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, h)
        self.final_layer_norm = nn.LayerNorm(h, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """``x`` ``[N, hidden]`` -> ``[N, hidden]``; pre-LN or post-LN per ``do_layer_norm_before``."""
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), attn)
            return x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, attn))
        return self.final_layer_norm(x + self.fc2(F.relu(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        d = config.word_embed_proj_dim or h
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, h)
        # OPT-350m embeds in a narrower space and projects to/from the residual width.
        self.project_in = nn.Linear(d, h, bias=False) if d != h else None
        self.project_out = nn.Linear(h, d, bias=False) if d != h else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_layers))
        # Post-LN OPT already normalises at the end of every layer, so it has no final LayerNorm.
        self.final_layer_norm = nn.LayerNorm(h, eps=config.norm_eps) if config.do_layer_norm_before else None


class OPTModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(CausalLM):
    """OPT causal LM; ``config.arch`` must be ``"opt"``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "opt":
            raise ModelLoadError(f"OPTForCausalLM cannot run arch {config.arch!r}")
        if config.hidden_act != "relu":
            raise ModelLoadError(f"activation {config.hidden_act!r} is not supported for opt (only 'relu')")
        if config.num_kv_heads != config.num_heads:
            raise ModelLoadError("OPT has no grouped-query attention: num_kv_heads must equal num_heads")
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim or config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so (call after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[N]`` int64 -> final hidden states ``[N, hidden]``."""
        dec = self.model.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + dec.embed_positions(positions + POSITION_OFFSET)
        for layer in dec.layers:
            x = layer(x, attn)
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        return x

    def attention_query(self, layer_idx: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        attn = self.model.decoder.layers[layer_idx].self_attn
        return attn.query(x).view(x.shape[0], attn.num_heads, attn.head_dim)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[M, hidden]`` -> float32 logits ``[M, vocab_size]``."""
        # project_out belongs to the head side so that forward keeps the [N, hidden] contract.
        project_out = self.model.decoder.project_out
        if project_out is not None:
            hidden = project_out(hidden)
        return self.lm_head(hidden).float()
