"""Build models without allocating, then fill them from safetensors files (or any tensor dict)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvscope.errors import ModelLoadError
from kvscope.models.base import CausalLM
from kvscope.models.config import ModelConfig
from kvscope.models.fused import checkpoint_tensors, fuse_checkpoint
from kvscope.models.llama import LlamaForCausalLM
from kvscope.models.opt import OPTForCausalLM

_ARCHS: dict[str, type[CausalLM]] = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}
# Buffers that old checkpoints saved but that kvscope recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_HEAD = "lm_head.weight"


def empty_model(config: ModelConfig) -> CausalLM:
    """The model of ``config`` with parameters on the meta device (no memory), ready for :func:`assign_weights`."""
    with torch.device("meta"):
        return _ARCHS[config.arch](config)


def expected_shapes(model: CausalLM) -> dict[str, torch.Size]:
    """Checkpoint tensor name -> shape, in the order of the unfused model's parameters (fused
    projections listed as their parts); the LM head is left out when tied to the embeddings."""
    shapes = {name: t.shape for name, t in checkpoint_tensors(model).items()}
    if model.config.tie_word_embeddings:
        del shapes[_HEAD]
    return shapes


def assign_weights(model: CausalLM, tensors: dict[str, torch.Tensor], where: str) -> CausalLM:
    """Install ``tensors`` (names as in :func:`expected_shapes`, already on the target device and dtype)
    as the parameters of ``model``, which is returned in eval mode without gradients. The parts of
    each fused projection are concatenated into it (``tensors`` loses them)."""
    expected = expected_shapes(model)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ModelLoadError(
            f"{where}: checkpoint tensors do not match the {model.config.arch} config"
            f" ({len(missing)} missing: {_few(missing)}; {len(unexpected)} unexpected: {_few(unexpected)})"
        )
    # Names were checked above; strict=False only lets a tied head be absent. assign=True swaps in
    # the given tensors (no copy but the fused ones) and unties the head, which tie_weights restores.
    model.load_state_dict(fuse_checkpoint(model, tensors), strict=False, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def load_safetensors_folder(
    folder: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> CausalLM:
    """Model of ``config`` with the weights of ``folder``'s safetensors file(s), cast to ``dtype`` on ``device``."""
    model = empty_model(config)
    return assign_weights(model, read_folder(folder, expected_shapes(model), device, dtype), str(folder))


#: ``(name, lazy safetensors slice) -> tensor``: reads part of a checkpoint tensor (a rank's shard).
Slicer = Callable[[str, Any], torch.Tensor]


def read_folder(folder: Path, expected: dict[str, torch.Size], device: torch.device, dtype: torch.dtype,
                slicer: Slicer | None = None) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of ``folder`` (shapes checked against ``expected``, the full model's),
    cast to ``dtype`` on ``device``; ``slicer`` reads only the part it returns of each."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        tensors.update(_read_file(file, expected, device, dtype, slicer))
    return tensors


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of ``folder``: the shards of model.safetensors.index.json, or all *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from e
        files = [folder / s for s in shards]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index} lists shards that are missing: {_few(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {_few(other)}; only safetensors weights are supported)" if other else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weight file{hint}")
    return files


def _read_file(
    file: Path, expected: dict[str, torch.Size], device: torch.device, dtype: torch.dtype,
    slicer: Slicer | None = None,
) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (name == _HEAD and _HEAD not in expected):
                    continue
                shape = torch.Size(f.get_slice(name).get_shape())
                if name in expected and shape != expected[name]:
                    raise ModelLoadError(
                        f"{file}: tensor {name} has shape {tuple(shape)}, the config implies {tuple(expected[name])}"
                    )
                # Cast per tensor so that at most one float32 tensor exists besides the final weights.
                t = f.get_tensor(name) if slicer is None else slicer(name, f.get_slice(name))
                out[name] = t.to(device=device, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as e:  # safetensors raises SafetensorError, OSError or RuntimeError on bad files
        raise ModelLoadError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from e
    return out


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "") if items else "none"
