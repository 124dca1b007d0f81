"""Model code vs HF transformers (the independent reference), RoPE, config parsing and the dense oracle."""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from kvscope.attention.dense import DenseCausalBackend, run_dense
from kvscope.errors import ModelLoadError
from kvscope.models.config import ModelConfig
from kvscope.models.hf_config import model_config_from_hf
from kvscope.models.llama import LlamaForCausalLM
from kvscope.models.loader import load_model
from kvscope.models.rope import RotaryEmbedding

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

HF_CONFIGS = {
    "llama-gqa": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
    # head_dim != hidden/heads, tied head, and Llama 3.1 frequency scaling that matters within 16 tokens.
    "llama3-rope-tied": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=1, head_dim=24, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=True),
    "llama-linear-rope-bias": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 4.0},
        attention_bias=True, mlp_bias=True),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False,
                                              rope_theta=1e6),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=300, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128),
    # OPT-350m layout: post-LayerNorm, narrower embeddings with project_in/project_out.
    "opt-post-ln-proj": lambda: transformers.OPTConfig(
        vocab_size=300, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False),
}


def make_hf_model(config: transformers.PretrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """HF model with every parameter random (HF's init zeroes biases and sets norms to 1, which would
    leave bias/norm handling untested)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model


def hf_logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    hf = make_hf_model(HF_CONFIGS[name]())
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(str(tmp_path))
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1))
    ours = run_dense(loaded.model, ids)
    ref = hf_logits(hf, ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert ref.std() > 0.3  # logits spread enough for the tolerance to mean something
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_bf16_model_runs_and_returns_float32_logits(tmp_path):
    hf = make_hf_model(HF_CONFIGS["qwen2"]())
    hf.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(2))
    ours = run_dense(loaded.model, ids)
    assert ours.dtype == torch.float32
    # bf16 keeps ~3 significant digits; agreement on the argmax of most positions is the sane check.
    agree = (ours.argmax(-1) == hf_logits(hf, ids).argmax(-1)).float().mean()
    assert agree >= 0.8


def test_rope_depends_on_relative_position_only():
    cfg = model_config_from_hf({"model_type": "llama", **SMALL, "rope_scaling": LLAMA3_ROPE}, "t")
    rope = RotaryEmbedding(cfg)
    q = torch.randn(1, 1, cfg.head_dim).expand(4, 1, -1)
    k = torch.randn(1, 1, cfg.head_dim).expand(4, 1, -1)
    rq, _ = rope.apply(torch.tensor([3, 10, 50, 90]), q, k)
    _, rk = rope.apply(torch.tensor([0, 7, 47, 87]), q, k)
    dots = (rq * rk).sum(-1).flatten()
    torch.testing.assert_close(dots, dots[:1].expand(4), atol=1e-4, rtol=0)
    # Position 0 is the identity rotation.
    r0, _ = rope.apply(torch.tensor([0]), q[:1], k[:1])
    torch.testing.assert_close(r0, q[:1])


def test_dense_backend_is_causal_gqa_softmax():
    torch.manual_seed(0)
    t, h, hkv, d = 5, 4, 2, 8
    q, k, v = torch.randn(t, h, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    out = DenseCausalBackend(d**-0.5).attend(0, q, k, v)
    for i in range(t):
        for head in range(h):
            kv = head // (h // hkv)
            w = torch.softmax(k[: i + 1, kv] @ q[i, head] / math.sqrt(d), dim=0)
            torch.testing.assert_close(out[i, head], w @ v[: i + 1, kv])


def test_hf_config_accepts_old_and_new_rope_keys():
    base = {"model_type": "llama", **SMALL, "num_key_value_heads": 2, "eos_token_id": [5, 7]}
    old = model_config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}, "m")
    new = model_config_from_hf(
        {**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}, "m")
    assert old == new
    assert old.rope_theta == 5e5 and old.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert old.eos_token_ids == (5, 7) and old.head_dim == 16 and old.num_kv_heads == 2
    plain = model_config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "m")
    assert plain.rope_scaling is None


def test_hf_config_families():
    qwen = model_config_from_hf({"model_type": "qwen2", **SMALL, "eos_token_id": 3}, "q")
    assert qwen.attention_bias and not qwen.attention_out_bias and qwen.eos_token_ids == (3,)
    opt = model_config_from_hf(
        {"model_type": "opt", **{k: v for k, v in SMALL.items() if k != "intermediate_size"}, "ffn_dim": 96}, "o")
    assert (opt.arch, opt.hidden_act, opt.tie_word_embeddings, opt.word_embed_proj_dim) == ("opt", "relu", True, 64)


def test_hf_config_errors():
    with pytest.raises(ModelLoadError, match=r"'gpt2'.*llama, mistral, qwen2, opt"):
        model_config_from_hf({"model_type": "gpt2"}, "g")
    with pytest.raises(ModelLoadError, match="hidden_size"):
        model_config_from_hf({"model_type": "llama", "vocab_size": 10}, "m")
    dynamic = model_config_from_hf(
        {"model_type": "llama", **SMALL, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "m")
    with pytest.raises(ModelLoadError, match="dynamic"):
        LlamaForCausalLM(dynamic)


def test_config_rejects_bad_gqa_ratio():
    with pytest.raises(ModelLoadError, match="multiple"):
        ModelConfig(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3,
                    num_kv_heads=2, head_dim=4, max_position_embeddings=8)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    from kvscope.models.gguf_convert import cache_dir_for
    from kvscope.models.registry import PACKAGED

    folder = cache_dir_for(PACKAGED["smollm2-135m"].locate(), "smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    ids = torch.tensor(smollm2.tokenizer.encode("The capital of France is Paris, and the capital of Italy is"))
    ours = run_dense(smollm2.model, ids)
    ref = hf_logits(hf, ids)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)
    assert smollm2.tokenizer.decode([int(ours[-1].argmax())]).strip() == "Rome"
