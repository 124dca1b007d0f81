"""Fused projections (q/k/v in ``qkv_proj``, gate/up in ``gate_up_proj``): the fused parameters hold
the checkpoint's separate tensors exactly, at hand-computed row offsets; dummy weights equal the
unfused model's draw for a seed; the accessors and checkpoint view give back the separate tensors."""
from __future__ import annotations

import pytest
import torch
from hf_ref import make_tiny_checkpoint
from safetensors.torch import load_file

from kvscope.models.dummy import INIT_STD, preset_config
from kvscope.models.fused import FusedLinear, checkpoint_tensors, fuse_checkpoint
from kvscope.models.loader import load_model


def _attn_and_mlp(model, arch: str, i: int):
    if arch == "opt":
        return model.model.decoder.layers[i].self_attn, None, f"model.decoder.layers.{i}"
    layer = model.model.layers[i]
    return layer.self_attn, layer.mlp, f"model.layers.{i}"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
def test_fused_rows_are_the_checkpoint_tensors(kind, tmp_path):
    make_tiny_checkpoint(kind, tmp_path)
    ckpt = load_file(tmp_path / "model.safetensors")
    loaded = load_model(str(tmp_path))
    cfg = loaded.config
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    assert (kind == "opt") == (kv_rows == q_rows)  # llama and qwen2 checkpoints have GQA: k, v narrower than q
    has_bias = kind in ("qwen2", "opt")
    for i in range(cfg.num_layers):
        attn, mlp, prefix = _attn_and_mlp(loaded.model, cfg.arch, i)
        w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
        assert w.shape == (q_rows + 2 * kv_rows, cfg.hidden_size)
        bounds = {"q_proj": (0, q_rows), "k_proj": (q_rows, q_rows + kv_rows),
                  "v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows)}
        for part, (lo, hi) in bounds.items():
            assert torch.equal(w[lo:hi], ckpt[f"{prefix}.self_attn.{part}.weight"]), (i, part)
            if has_bias:
                assert torch.equal(b[lo:hi], ckpt[f"{prefix}.self_attn.{part}.bias"]), (i, part)
        assert (b is not None) == has_bias
        if kind == "qwen2":
            assert b.abs().max() > 0  # make_tiny_checkpoint randomises the qkv biases
        # The accessors InfiniGen's skewing and speculation use are views of the same rows.
        assert torch.equal(attn.q_weight, ckpt[f"{prefix}.self_attn.q_proj.weight"])
        assert torch.equal(attn.k_weight, ckpt[f"{prefix}.self_attn.k_proj.weight"])
        assert torch.equal(attn.v_weight, ckpt[f"{prefix}.self_attn.v_proj.weight"])
        assert attn.q_weight.data_ptr() == w.data_ptr()
        if mlp is not None:
            inter = cfg.intermediate_size
            gu = mlp.gate_up_proj.weight
            assert gu.shape == (2 * inter, cfg.hidden_size)
            assert torch.equal(gu[:inter], ckpt[f"{prefix}.mlp.gate_proj.weight"])
            assert torch.equal(gu[inter:], ckpt[f"{prefix}.mlp.up_proj.weight"])
    # The checkpoint view lists exactly the file's tensors, with its values.
    view = checkpoint_tensors(loaded.model)
    if cfg.tie_word_embeddings:
        ckpt.setdefault("lm_head.weight", ckpt["model.decoder.embed_tokens.weight" if kind == "opt"
                                               else "model.embed_tokens.weight"])
    assert view.keys() == ckpt.keys()
    assert all(torch.equal(view[k], ckpt[k]) for k in ckpt)


def test_attention_query_is_the_q_projection(tmp_path):
    make_tiny_checkpoint("qwen2", tmp_path)
    ckpt = load_file(tmp_path / "model.safetensors")
    model = load_model(str(tmp_path)).model
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    attn = model.model.layers[1].self_attn
    ref = x @ ckpt["model.layers.1.self_attn.q_proj.weight"].T + ckpt["model.layers.1.self_attn.q_proj.bias"]
    torch.testing.assert_close(attn.query(x), ref, atol=1e-6, rtol=0)
    assert torch.equal(model.attention_query(1, x, torch.zeros(5, dtype=torch.long)).reshape(5, -1),
                       attn.query(x))  # position 0: RoPE is the identity


def _unfused_draw_order(preset: str) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters of the unfused models, in the order they were drawn before fusion, written out
    by hand from the config (Llama-family and OPT module order)."""
    c = preset_config(preset)
    h, d, inter = c.hidden_size, c.head_dim, c.intermediate_size
    q, kv = c.num_heads * d, c.num_kv_heads * d
    out: list[tuple[str, tuple[int, ...]]] = []
    if c.arch == "llama":
        out.append(("model.embed_tokens.weight", (c.vocab_size, h)))
        for i in range(c.num_layers):
            p = f"model.layers.{i}"
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                out.append((f"{p}.self_attn.{name}.weight", (rows, h)))
                if c.attention_bias:
                    out.append((f"{p}.self_attn.{name}.bias", (rows,)))
            out += [(f"{p}.self_attn.o_proj.weight", (h, q)), (f"{p}.mlp.gate_proj.weight", (inter, h)),
                    (f"{p}.mlp.up_proj.weight", (inter, h)), (f"{p}.mlp.down_proj.weight", (h, inter)),
                    (f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
        out.append(("model.norm.weight", (h,)))
    else:
        assert c.word_embed_proj_dim in (None, h) and c.do_layer_norm_before  # no project_in/out
        out += [("model.decoder.embed_tokens.weight", (c.vocab_size, h)),
                ("model.decoder.embed_positions.weight", (c.max_position_embeddings + 2, h))]
        for i in range(c.num_layers):
            p = f"model.decoder.layers.{i}"
            for name, rows in (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv),
                               ("self_attn.out_proj", h)):
                out += [(f"{p}.{name}.weight", (rows, h)), (f"{p}.{name}.bias", (rows,))]
            out += [(f"{p}.self_attn_layer_norm.weight", (h,)), (f"{p}.self_attn_layer_norm.bias", (h,)),
                    (f"{p}.fc1.weight", (inter, h)), (f"{p}.fc1.bias", (inter,)),
                    (f"{p}.fc2.weight", (h, inter)), (f"{p}.fc2.bias", (h,)),
                    (f"{p}.final_layer_norm.weight", (h,)), (f"{p}.final_layer_norm.bias", (h,))]
        out += [("model.decoder.final_layer_norm.weight", (h,)), ("model.decoder.final_layer_norm.bias", (h,))]
    if not c.tie_word_embeddings:
        out.append(("lm_head.weight", (c.vocab_size, h)))
    return out


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-opt"])
def test_dummy_weights_equal_the_unfused_draw(preset):
    gen = torch.Generator().manual_seed(7)
    ref = {}
    for name, shape in _unfused_draw_order(preset):
        if name.endswith(".bias"):
            ref[name] = torch.zeros(shape)
        elif len(shape) == 1:
            ref[name] = torch.ones(shape)
        else:
            ref[name] = torch.empty(shape).normal_(0.0, INIT_STD, generator=gen)
    model = load_model(f"dummy:{preset}", seed=7).model
    got = checkpoint_tensors(model)
    if model.config.tie_word_embeddings:
        del got["lm_head.weight"]
    assert list(got) == list(ref)  # same names in the same order
    for name, t in ref.items():
        assert torch.equal(got[name], t), name


def test_split_returns_views_and_fuse_checkpoint_round_trips():
    layer = FusedLinear(6, (("a", 2), ("b", 3)), bias=True)
    y = layer(torch.randn(4, 6))
    a, b = layer.split(y)
    assert a.shape == (4, 2) and b.shape == (4, 3)
    assert a.data_ptr() == y.data_ptr() and b.data_ptr() == y.data_ptr() + 2 * y.element_size()
    parent = torch.nn.Module()
    parent.ab = layer
    tensors = checkpoint_tensors(parent)
    assert list(tensors) == ["a.weight", "a.bias", "b.weight", "b.bias"]
    fused = fuse_checkpoint(parent, dict(tensors))
    assert fused.keys() == {"ab.weight", "ab.bias"}
    assert torch.equal(fused["ab.weight"], layer.weight) and torch.equal(fused["ab.bias"], layer.bias)
