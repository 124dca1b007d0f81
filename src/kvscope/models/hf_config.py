"""Translate an HF ``config.json`` dict into a :class:`ModelConfig`."""
from __future__ import annotations

from typing import Any

from kvscope.errors import ModelLoadError
from kvscope.models.config import ModelConfig

# model_type -> (arch, defaults for keys that HF's config classes default and checkpoints may omit).
_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"rms_norm_eps": 1e-6, "tie_word_embeddings": False}),
    "mistral": ("llama", {"rms_norm_eps": 1e-6, "tie_word_embeddings": False}),
    "qwen2": ("llama", {"rms_norm_eps": 1e-6, "tie_word_embeddings": False}),
    "opt": ("opt", {"tie_word_embeddings": True}),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)


def model_config_from_hf(d: dict[str, Any], name: str) -> ModelConfig:
    """Build the config of model ``name`` from its HF config dict (llama, mistral, qwen2, opt)."""
    model_type = d.get("model_type")
    if model_type not in _FAMILIES:
        raise ModelLoadError(
            f"{name}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    arch, defaults = _FAMILIES[model_type]
    cfg = {**defaults, **{k: v for k, v in d.items() if v is not None}}

    def need(key: str) -> Any:
        if key not in cfg:
            raise ModelLoadError(f"{name}: config of model_type {model_type!r} lacks {key!r}")
        return cfg[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    common = dict(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        max_position_embeddings=int(need("max_position_embeddings")),
        tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        name=name,
    )
    if arch == "opt":
        return _opt_config(cfg, common, name)
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
        raise ModelLoadError(f"{name}: Qwen2 sliding-window attention (use_sliding_window) is not supported")
    theta, scaling = _rope(cfg, name)
    # Qwen2 always has a qkv bias (its config has no switch); Llama's attention_bias covers o_proj too.
    llama_bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        arch="llama",
        intermediate_size=int(need("intermediate_size")),
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=int(cfg.get("head_dim", hidden // heads)),
        norm_eps=float(cfg["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=model_type == "qwen2" or llama_bias,
        attention_out_bias=model_type == "llama" and llama_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        **common,
    )


def _opt_config(cfg: dict[str, Any], common: dict[str, Any], name: str) -> ModelConfig:
    if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
        raise ModelLoadError(f"{name}: OPT without biases or LayerNorm affine parameters is not supported")
    if cfg.get("_remove_final_layer_norm", False):
        raise ModelLoadError(f"{name}: OPT with _remove_final_layer_norm is not supported")
    hidden, heads = common["hidden_size"], common["num_heads"]
    if "ffn_dim" not in cfg:
        raise ModelLoadError(f"{name}: config of model_type 'opt' lacks 'ffn_dim'")
    return ModelConfig(
        arch="opt",
        intermediate_size=int(cfg["ffn_dim"]),
        num_kv_heads=heads,
        head_dim=hidden // heads,
        norm_eps=1e-5,  # nn.LayerNorm's default; OPT configs carry no eps
        hidden_act=str(cfg.get("activation_function", "relu")),
        word_embed_proj_dim=int(cfg.get("word_embed_proj_dim", hidden)),
        do_layer_norm_before=bool(cfg.get("do_layer_norm_before", True)),
        **common,
    )


def _rope(cfg: dict[str, Any], name: str) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from transformers 5 ``rope_parameters`` or the older keys.

    ``rope_scaling`` is normalised to ``{"rope_type": ..., <params>}``, or None for plain RoPE.
    """
    params = cfg.get("rope_parameters")
    if params is None:
        params = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 10000.0)}
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise ModelLoadError(f"{name}: cannot read RoPE parameters from {params!r}")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return float(params["rope_theta"]), None if scaling["rope_type"] == "default" else scaling


def _eos_ids(eos: int | list[int] | None) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)
