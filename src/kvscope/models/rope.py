"""Rotary position embeddings (RoPE) in the "rotate half" layout of HF safetensors checkpoints.

A head vector ``x`` of size D is split into halves ``x1 = x[:D/2]``, ``x2 = x[D/2:]``; pair ``j``
(``x1[j]``, ``x2[j]``) is rotated by the angle ``pos * inv_freq[j]``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from kvscope.errors import ModelLoadError
from kvscope.models.config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` float32 on CPU, after the configured scaling."""
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    # float32 like the reference implementations, so long positions round the same way.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "linear":
        # Position interpolation: positions / factor, i.e. every frequency divided by factor.
        return inv_freq / float(_require(scaling, "factor"))
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling or {})
    return inv_freq


def _require(scaling: dict[str, Any] | None, key: str) -> Any:
    if not scaling or scaling.get(key) is None:
        raise ModelLoadError(f"rope_scaling {scaling!r} lacks {key!r}")
    return scaling[key]


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth ramp between."""
    factor = float(_require(scaling, "factor"))
    low = float(_require(scaling, "low_freq_factor"))
    high = float(_require(scaling, "high_freq_factor"))
    old_ctx = float(_require(scaling, "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables for positions ``[0, max_position_embeddings)``, built on first use per device.

    Not an ``nn.Module``: the tables are derived data that must stay float32 whatever dtype the model
    is cast to, and must not appear in the state dict.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.max_positions = config.max_position_embeddings
        # Computed eagerly so that an unsupported rope type fails at load time, not at the first step.
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[max_positions, head_dim // 2]`` float32 on ``device``."""
        if device not in self._tables:
            pos = torch.arange(self.max_positions, dtype=torch.float32, device=device)
            angles = torch.outer(pos, self.inv_freq.to(device))
            self._tables[device] = (angles.cos(), angles.sin())
        return self._tables[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[N, 1, head_dim // 2]`` in ``dtype`` for ``positions`` ``[N]`` (< max positions).

        Rounded to the activation dtype before use, as HF does for bf16/fp16 models. Compute once per
        forward and pass to :func:`rotate` in every layer.
        """
        cos_t, sin_t = self.tables(positions.device)
        return cos_t[positions].to(dtype).unsqueeze(1), sin_t[positions].to(dtype).unsqueeze(1)

    def apply(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` ``[N, H, D]`` and ``k`` ``[N, Hkv, D]`` by ``positions`` ``[N]``."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[N, H, D]`` by ``cos``/``sin`` ``[N, 1, D/2]`` from :meth:`RotaryEmbedding.cos_sin`."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
