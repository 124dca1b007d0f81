"""``load_model(spec)``: packaged names, HF safetensors folders, GGUF files and ``dummy:<preset>``."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from kvscope.errors import ModelLoadError
from kvscope.models.base import CausalLM
from kvscope.models.config import ModelConfig
from kvscope.models.dummy import preset_config, random_model
from kvscope.models.gguf_convert import converted_gguf
from kvscope.models.hf_config import model_config_from_hf
from kvscope.models.registry import PACKAGED, list_models
from kvscope.models.safetensors_io import load_safetensors_folder
from kvscope.models.tokenizer import Tokenizer

__all__ = ["LoadedModel", "list_models", "load_model", "load_tokenizer"]

DUMMY_PREFIX = "dummy:"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    config: ModelConfig
    model: CausalLM
    tokenizer: Tokenizer
    source: str  # where the weights came from (path, GGUF + cache folder, or dummy preset)


def load_model(
    spec: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoadedModel:
    """Load ``spec``: a packaged name (``smollm2-135m``, ``qwen2.5-0.5b``), ``dummy:<preset>``, a folder
    with config.json + safetensors, or a ``.gguf`` file. ``seed`` only matters for dummy models."""
    spec = os.fspath(spec)
    device = torch.device(device)
    if spec.startswith(DUMMY_PREFIX):
        config = preset_config(spec[len(DUMMY_PREFIX) :])
        model = random_model(config, device, dtype, seed)
        return LoadedModel(config, model, Tokenizer.byte_level(config.vocab_size), spec)
    if spec in PACKAGED:
        parts = PACKAGED[spec].locate()
        folder = converted_gguf(parts, spec)
        return _load_folder(folder, spec, device, dtype, source=f"{spec} ({parts[0].parent}, cache {folder})")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, path.name, device, dtype, source=str(path))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: expected a folder with config.json + safetensors, or a .gguf file")
        folder = converted_gguf([path], path.stem)
        return _load_folder(folder, path.stem, device, dtype, source=f"{path} (cache {folder})")
    if path.suffix == ".gguf" or len(path.parts) > 1 or spec.startswith((".", "~")):
        raise ModelLoadError(f"no such file or directory: {path}")
    raise ModelLoadError(
        f"unknown model {spec!r}: use one of {', '.join(PACKAGED)}, 'dummy:<preset>'"
        " (see `kvscope models`), a folder with config.json + *.safetensors, or a .gguf file"
    )


def _load_folder(folder: Path, name: str, device: torch.device, dtype: torch.dtype, source: str) -> LoadedModel:
    config = model_config_from_hf(_read_json(folder / "config.json", required=True), name)
    model = load_safetensors_folder(folder, config, device, dtype)
    return LoadedModel(config, model, _folder_tokenizer(folder, config), source)


def _folder_tokenizer(folder: Path, config: ModelConfig) -> Tokenizer:
    # Instruct checkpoints often list extra stop ids (e.g. Llama 3's <|eot_id|>) in generation_config.json.
    gen_eos = _read_json(folder / "generation_config.json", required=False).get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else (gen_eos or [])
    eos = (*config.eos_token_ids, *gen_eos)
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return Tokenizer.from_pretrained(folder, eos, config.vocab_size)
    print(f"kvscope: {folder} has no tokenizer files; using a byte-level tokenizer", file=sys.stderr)
    return Tokenizer.byte_level(config.vocab_size)


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer :func:`load_model` would give ``spec``, without loading its weights (a load
    generator needs the tokenizer of the model a server runs, not the model)."""
    spec = os.fspath(spec)
    if spec.startswith(DUMMY_PREFIX):
        return Tokenizer.byte_level(preset_config(spec[len(DUMMY_PREFIX) :]).vocab_size)
    path = Path(spec).expanduser()
    if spec in PACKAGED:
        folder = converted_gguf(PACKAGED[spec].locate(), spec)
    elif path.is_file() and path.suffix == ".gguf":
        folder = converted_gguf([path], path.stem)
    elif path.is_dir():
        folder = path
    else:
        raise ModelLoadError(f"unknown model {spec!r} for a tokenizer: use one of {', '.join(PACKAGED)}, "
                             "'dummy:<preset>', a model folder or a .gguf file")
    config = model_config_from_hf(_read_json(folder / "config.json", required=True), folder.name)
    return _folder_tokenizer(folder, config)


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.parent}: no {path.name} (not a Hugging Face model folder?)")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data
