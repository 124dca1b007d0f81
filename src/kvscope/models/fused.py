"""Fused projections: one GEMM for several linears that read the same input (q/k/v, gate/up).

A decode step at small batch is launch-bound, so three q/k/v GEMMs cost about three times one GEMM
of their summed width. :class:`FusedLinear` stacks the parts' weights along the output features
(``[sum(part_sizes), in_features]``, vLLM's ``QKVParallelLinear`` / ``MergedColumnParallelLinear``
layout) and :meth:`FusedLinear.split` cuts its output into views, one per part.

Checkpoints keep the separate HF names. :func:`checkpoint_tensors` shows a model under those names
(fused parameters split into views of their rows) and :func:`fuse_checkpoint` turns a checkpoint
dict into the model's own names by concatenating the parts in order. Because every loader (safetensors
folders, converted GGUF, dummy weights, tensor-parallel shards) produces checkpoint-named tensors and
calls :func:`fuse_checkpoint` last, a tensor-parallel rank fuses its own slices: its ``qkv_proj`` is
``[its q heads, its k heads, its v heads]``, as in vLLM.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FusedLinear(nn.Linear):
    """``nn.Linear`` whose output features are the concatenation of named parts.

    Args:
        in_features: input width.
        parts: ``(checkpoint module name, output features)`` per part, in the fused order; the
            names are the sibling modules the checkpoint stores (``q_proj``, ``k_proj``, ...).
        bias: whether every part has a bias (they all have one or none, as in the HF models).
    """

    def __init__(self, in_features: int, parts: Sequence[tuple[str, int]], bias: bool) -> None:
        super().__init__(in_features, sum(size for _, size in parts), bias=bias)
        self.part_names = tuple(name for name, _ in parts)
        self.part_sizes = tuple(size for _, size in parts)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``y`` ``[..., out_features]`` (this layer's output) -> one view ``[..., size]`` per part."""
        return y.split(self.part_sizes, dim=-1)

    def part(self, name: str, tensor: str = "weight") -> torch.Tensor | None:
        """Rows of part ``name`` in ``tensor`` (``"weight"``: a ``[size, in_features]`` view,
        ``"bias"``: ``[size]``, None when the layer has no bias)."""
        t = getattr(self, tensor)
        if t is None:
            return None
        i = self.part_names.index(name)
        start = sum(self.part_sizes[:i])
        return t[start : start + self.part_sizes[i]]


def qkv_linear(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool) -> FusedLinear:
    """q/k/v as one linear: weight ``[(num_heads + 2 num_kv_heads) head_dim, hidden]``, rows of q,
    then k, then v (each rank's own heads under tensor parallelism)."""
    kv = num_kv_heads * head_dim
    return FusedLinear(hidden, (("q_proj", num_heads * head_dim), ("k_proj", kv), ("v_proj", kv)), bias=bias)


class FusedQKV:
    """Accessors of an attention module whose q/k/v live in ``self.qkv_proj`` (:func:`qkv_linear`),
    for code that needs one projection alone (InfiniGen's speculation, skewing)."""

    qkv_proj: FusedLinear

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The q projection alone (no RoPE): ``x`` ``[N, hidden]`` -> ``[N, num_heads * head_dim]``."""
        return F.linear(x, self.q_weight, self.qkv_proj.part("q_proj", "bias"))

    @property
    def q_weight(self) -> torch.Tensor:
        """``[num_heads * head_dim, hidden]``: the checkpoint's ``q_proj.weight`` (a view)."""
        return self.qkv_proj.part("q_proj")

    @property
    def k_weight(self) -> torch.Tensor:
        """``[num_kv_heads * head_dim, hidden]``: the checkpoint's ``k_proj.weight`` (a view)."""
        return self.qkv_proj.part("k_proj")

    @property
    def v_weight(self) -> torch.Tensor:
        """``[num_kv_heads * head_dim, hidden]``: the checkpoint's ``v_proj.weight`` (a view)."""
        return self.qkv_proj.part("v_proj")


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under checkpoint names: each :class:`FusedLinear`'s weight and bias
    appear as views of their part rows (``...q_proj.weight``, ``...q_proj.bias``, ``...k_proj.weight``,
    ...), at the place of the fused module, so the order is the unfused model's."""
    fused = {prefix: m for prefix, m in model.named_modules() if isinstance(m, FusedLinear)}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        prefix, _, kind = name.rpartition(".")
        layer = fused.get(prefix)
        if layer is None:
            out[name] = t
        elif kind == "weight":  # the bias follows each part's weight, as the unfused modules list them
            for part in layer.part_names:
                for k in ("weight", "bias"):
                    view = layer.part(part, k)
                    if view is not None:
                        out[_sibling(prefix, part, k)] = view.detach()
    return out


def fuse_checkpoint(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (checkpoint names, as :func:`checkpoint_tensors` lists them) under ``model``'s
    parameter names: the parts of each :class:`FusedLinear` concatenated in order along dim 0.

    Pops the parts from ``tensors`` as it goes, so that at most one fused layer's parts exist twice.
    """
    for prefix, layer in model.named_modules():
        if not isinstance(layer, FusedLinear):
            continue
        for kind in ("weight", "bias") if layer.bias is not None else ("weight",):
            parts = [tensors.pop(_sibling(prefix, p, kind)) for p in layer.part_names]
            tensors[f"{prefix}.{kind}"] = torch.cat(parts)
    return tensors


def _sibling(prefix: str, part: str, kind: str) -> str:
    """Checkpoint name of ``part``'s ``kind`` tensor, a sibling of the fused module at ``prefix``."""
    parent = prefix.rpartition(".")[0]
    return f"{parent}.{part}.{kind}" if parent else f"{part}.{kind}"
