"""Tensor-parallel model shards (Megatron-LM's layout): one rank's part of a model.

Column-parallel (output features split, no communication, since every rank has the whole input):
``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj`` (Llama), ``fc1`` (OPT), weights and
biases. Row-parallel (input features split; each rank's partial product is summed by an all-reduce,
then the bias is added once): ``o_proj``, ``down_proj`` (Llama), ``out_proj``, ``fc2`` (OPT). So a
rank holds ``num_heads / N`` query heads, ``num_kv_heads / N`` KV heads (contiguous: rank ``r`` has
query heads ``r H/N ..`` and the KV heads of exactly their groups) and ``intermediate_size / N`` of
the MLP, and a layer costs two all-reduces of ``[tokens, hidden]``. Embeddings, norms and the LM
head stay replicated: they are a small share of a large model's weights and keep every rank's
hidden state whole.

A shard is an ordinary kvscope model built from :func:`shard_config` (the local head and MLP
counts), its row-parallel linears replaced by :class:`RowParallelLinear`; the model code itself
does not know it is sharded. Each rank reads only its slices of the full checkpoint (HF names
unchanged) or draws the full dummy weights and keeps its slices, so a shard's weights are exactly
the single-device model's. Sharding works on the checkpoint's separate tensors and the fused
projections are assembled afterwards from the rank's slices, so a rank's ``qkv_proj`` is [its q
heads, its k heads, its v heads] and its ``gate_up_proj`` [its gate rows, its up rows] (vLLM's
``QKVParallelLinear`` / ``MergedColumnParallelLinear`` layout), not a slice of the full fused weight.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kvscope.errors import ConfigError, ModelLoadError
from kvscope.models.base import CausalLM
from kvscope.models.config import ModelConfig
from kvscope.models.dummy import draw_weights, preset_config
from kvscope.models.gguf_convert import converted_gguf
from kvscope.models.hf_config import model_config_from_hf
from kvscope.models.loader import DUMMY_PREFIX, LoadedModel, load_tokenizer
from kvscope.models.registry import PACKAGED
from kvscope.models.safetensors_io import assign_weights, empty_model, expected_shapes, read_folder
from kvscope.models.tokenizer import Tokenizer

COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "out_proj", "fc2"})


class RowParallelLinear(nn.Linear):
    """``y = all_reduce(x_r W_r^T) + b``: ``x`` ``[N, in_features]`` is this rank's slice of the
    input features, ``W_r`` ``[out, in_features]`` the matching columns; returns the full ``[N, out]``
    on every rank of the default process group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


def shard_config(config: ModelConfig, world: int) -> ModelConfig:
    """``config`` as one of ``world`` ranks sees it: heads, KV heads and MLP width divided by ``world``.
    Raises :class:`ConfigError` naming ``tensor_parallel_size`` when a count does not divide."""
    for field, count in (("num_kv_heads", config.num_kv_heads), ("num_heads", config.num_heads),
                         ("intermediate_size", config.intermediate_size)):
        if count % world:
            raise ConfigError(f"tensor_parallel_size={world} must divide the model's {field} ({count}) "
                              f"of {config.name or config.arch}: each rank holds an equal share of them")
    return dataclasses.replace(config, num_heads=config.num_heads // world,
                               num_kv_heads=config.num_kv_heads // world,
                               intermediate_size=config.intermediate_size // world)


def shard_dim(name: str) -> int | None:
    """The dimension along which checkpoint tensor ``name`` is split across ranks; None: replicated
    (a row-parallel bias is added once, after the all-reduce, so it is replicated too)."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    module, kind = parts[-2], parts[-1]
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL and kind == "weight":
        return 1
    return None


def _part(name: str, shape: torch.Size | list[int], rank: int, world: int) -> tuple[slice, ...] | None:
    dim = shard_dim(name)
    if dim is None:
        return None
    size = shape[dim] // world
    return (slice(None),) * dim + (slice(rank * size, (rank + 1) * size),)


def parallelize(model: CausalLM) -> CausalLM:
    """Replace ``model``'s row-parallel linears (meta tensors, before weights are assigned) by
    :class:`RowParallelLinear` of the same shapes; names stay the checkpoint's."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in ROW_PARALLEL and type(child) is nn.Linear:
                setattr(parent, child_name, RowParallelLinear(
                    child.in_features, child.out_features, bias=child.bias is not None, device="meta"))
    return model


def full_config(spec: str) -> ModelConfig:
    """The unsharded config of model ``spec`` (any :func:`~kvscope.models.loader.load_model` spec),
    read without weights: what the tensor-parallel checks need before any process starts."""
    if spec.startswith(DUMMY_PREFIX):
        return preset_config(spec[len(DUMMY_PREFIX):])
    folder, name = _folder(spec)
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder / 'config.json'}: not a readable model config ({type(e).__name__}: {e})") from None
    return model_config_from_hf(raw, name)


def _folder(spec: str) -> tuple[Path, str]:
    if spec in PACKAGED:
        return converted_gguf(PACKAGED[spec].locate(), spec), spec
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf([path], path.stem), path.stem
    if path.is_dir():
        return path, path.name
    raise ModelLoadError(f"unknown model {spec!r} for tensor parallelism: use a packaged name, "
                         "'dummy:<preset>', a model folder or a .gguf file")


def load_shard(spec: str | os.PathLike[str], device: torch.device, dtype: torch.dtype, seed: int,
               rank: int, world: int) -> LoadedModel:
    """Rank ``rank`` of ``world``'s shard of model ``spec``: its ``config`` is the local one
    (:func:`shard_config`), its weights the slices of the single-device model's."""
    spec = os.fspath(spec)
    full = full_config(spec)
    local = shard_config(full, world)
    expected = expected_shapes(empty_model(full))
    if spec.startswith(DUMMY_PREFIX):
        tensors = _dummy_shard(full, device, dtype, seed, rank, world)
        tokenizer = Tokenizer.byte_level(full.vocab_size)
        source = spec
    else:
        folder, _ = _folder(spec)

        def slicer(name: str, lazy: Any) -> torch.Tensor:
            part = _part(name, lazy.get_shape(), rank, world)
            return lazy[:] if part is None else lazy[part]

        tensors = read_folder(folder, expected, device, dtype, slicer)
        tokenizer = load_tokenizer(spec)
        source = str(folder)
    model = assign_weights(parallelize(empty_model(local)), tensors, f"{spec} (rank {rank} of {world})")
    return LoadedModel(local, model, tokenizer, f"{source} (tensor-parallel rank {rank} of {world})")


def _dummy_shard(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int,
                 rank: int, world: int) -> dict[str, torch.Tensor]:
    """The dummy model's draws, each cut to this rank's slice at once: one full tensor exists at a
    time, and the shard equals the single-device model's slices."""
    out: dict[str, torch.Tensor] = {}
    for name, t in draw_weights(config, device, dtype, seed):
        part = _part(name, t.shape, rank, world)
        out[name] = t if part is None else t[part].contiguous()
    return out
