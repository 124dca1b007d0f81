"""HF transformers as the independent reference: tiny random checkpoints and greedy generation."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_tiny_checkpoint(kind: str, path, seed: int = 0):
    """Save a small random HF model of family ``kind`` to ``path``; return the HF model."""
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=512)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, num_key_value_heads=2, intermediate_size=128, rope_theta=10000.0,
                             tie_word_embeddings=False)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common, num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)
    elif kind == "opt":
        cfg = tf.OPTConfig(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           ffn_dim=128, max_position_embeddings=512, word_embed_proj_dim=64)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if kind == "qwen2":
        # Random init leaves the qkv biases at zero; make them matter.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """HF greedy continuation that never stops early; returns (tokens, logits ``[steps, V]``).

    EOS is removed from the generation config rather than suppressed with ``min_new_tokens``,
    which would mask its logit and change the argmax.
    """
    model.generation_config.eos_token_id = None
    inp = torch.tensor([prompt_ids])
    out = model.generate(
        inp,
        attention_mask=torch.ones_like(inp),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, torch.cat(out.logits).float()
