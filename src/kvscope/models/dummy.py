"""``dummy:<preset>`` models: published architecture shapes with random weights.

Presets are written as the relevant keys of each model's HF ``config.json`` and go through the same
parser as real checkpoints. Weights are drawn directly on the target device in the target dtype.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from kvscope.errors import ModelLoadError
from kvscope.models.base import CausalLM
from kvscope.models.config import ModelConfig
from kvscope.models.hf_config import model_config_from_hf
from kvscope.models.safetensors_io import assign_weights, empty_model, expected_shapes
from kvscope.models.tokenizer import BYTE_LEVEL_EOS_ID

INIT_STD = 0.02


def _opt(hidden: int, ffn: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    return {
        "model_type": "opt", "vocab_size": 50272, "max_position_embeddings": 2048, "hidden_size": hidden,
        "ffn_dim": ffn, "num_hidden_layers": layers, "num_attention_heads": heads, **extra,
    }


_LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, dict[str, Any]] = {
    "opt-125m": _opt(768, 3072, 12, 12),
    "opt-350m": _opt(1024, 4096, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _opt(2048, 8192, 24, 32),
    "opt-2.7b": _opt(2560, 10240, 32, 32),
    "opt-6.7b": _opt(4096, 16384, 32, 32),
    "opt-13b": _opt(5120, 20480, 40, 40),
    "opt-30b": _opt(7168, 28672, 48, 56),
    "opt-66b": _opt(9216, 36864, 64, 72),
    "smollm2-135m": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    },
    "llama-3-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    },
    "llama-3-70b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    },
    # Llama-3-8B's shapes with Llama 3.1's 128k context (llama3 RoPE scaling, factor 8).
    "llama-3.1-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
    },
    "llama-2-7b": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    },
    # Mistral-7B-v0.1 (its 4096-token sliding window is not modelled: attention is over the full context).
    "mistral-7b": {
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    },
    # Qwen2.5-Coder-0.5B-Instruct, the architecture of the packaged qwen2.5-0.5b.
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    },
    # A few hundred K parameters each, for fast tests.
    "tiny-llama": {
        "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 192,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    },
    "tiny-qwen2": {
        "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "max_position_embeddings": 512, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    "tiny-opt": _opt(64, 256, 2, 4, vocab_size=512, max_position_embeddings=512),
}


def preset_config(preset: str) -> ModelConfig:
    """Config of a preset, with the byte-level tokenizer's eos (the one dummy models ship with)."""
    if preset not in PRESETS:
        raise ModelLoadError(f"unknown dummy preset {preset!r}; presets: {', '.join(PRESETS)}")
    cfg = model_config_from_hf(PRESETS[preset], name=f"dummy:{preset}")
    return dataclasses.replace(cfg, bos_token_id=None, eos_token_ids=(BYTE_LEVEL_EOS_ID,))


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> CausalLM:
    """``config``'s model with matrices ~ N(0, 0.02), norm weights 1 and biases 0, drawn on ``device``.

    Deterministic for a given (seed, device type); never allocates a float32 or CPU copy.
    """
    return assign_weights(empty_model(config), dict(draw_weights(config, device, dtype, seed)),
                          config.name or "dummy model")


def draw_weights(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`random_model`'s tensors one at a time, by checkpoint name, in a fixed order (a
    tensor-parallel rank keeps a slice of each and drops the rest).

    The order is the unfused model's parameters' (q, k, v, then o; gate, up, then down), so that a
    seed draws the same values as before projections were fused; the loader fuses them afterwards.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in expected_shapes(empty_model(config)).items():  # a tied head is left out
        t = torch.empty(shape, device=device, dtype=dtype)
        if name.endswith(".bias"):
            t.zero_()
        elif len(shape) == 1:  # RMSNorm / LayerNorm scales
            t.fill_(1.0)
        else:
            t.normal_(0.0, INIT_STD, generator=gen)
        yield name, t
