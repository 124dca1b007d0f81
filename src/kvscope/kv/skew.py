"""InfiniGen's skewing: per layer and KV head an orthogonal matrix that concentrates the query/key
energy in a few columns, and the partial columns chosen from it.

For an orthogonal ``A``, ``(q A)(k A)^T = q k^T``: attention is unchanged, but with ``A`` the right
singular vectors of the layer's queries, a few columns of ``q A`` carry most of its magnitude, so
the dot product over those columns alone approximates the full score. InfiniGen's Llama code
applies ``A`` to queries and keys *after* RoPE (rotations depend on the position, so ``A`` cannot
be folded into ``W_q``/``W_k`` the way its OPT code does); kvscope does the same for every model.

Calibration (as InfiniGen's setup): run the model once over a calibration text (2048 tokens of
packaged prose), collect each layer's post-RoPE queries, and per KV head take the SVD of the
queries of its group's heads stacked ``[T * G, D]``. Column energy is ``sum |Q A|`` over the rows;
the partial columns are the top ``partial_weight_ratio * D`` of it. Results are persisted per
model (weights fingerprint) in the kvscope cache folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvscope.attention.torch_ref import attend_causal
from kvscope.errors import ConfigError, DatasetError
from kvscope.models.base import CausalLM
from kvscope.models.fused import checkpoint_tensors

CALIBRATION_TOKENS = 2048


@dataclass
class Skew:
    """``matrix`` ``[L, Hkv, D, D]`` (columns: singular vectors, strongest first) and
    ``energy`` ``[L, Hkv, D]`` (calibration ``sum |Q A|`` per skewed column), float32."""

    matrix: torch.Tensor
    energy: torch.Tensor

    def partial(self, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns ``[L, Hkv, d']`` (``d' = max(1, int(ratio * D))``) and the matrix restricted to
        them ``[L, Hkv, D, d']``: ``q @ A[..., cols]`` is the partial skewed query."""
        d = self.matrix.shape[-1]
        keep = max(1, int(ratio * d))
        cols = self.energy.topk(keep, dim=-1).indices.sort(dim=-1).values
        sub = torch.gather(self.matrix, 3, cols[:, :, None, :].expand(-1, -1, d, -1))
        return cols, sub


class _CaptureQueries:
    """Dense causal attention over one sequence that also keeps every layer's queries."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.queries: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.queries[layer] = q.float().cpu()
        return attend_causal(q, k, v, self.scale)


@torch.inference_mode()
def compute_skew(model: CausalLM, token_ids: list[int], device: torch.device) -> Skew:
    """Calibrate on ``token_ids`` (one sequence)."""
    cfg = model.config
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    capture = _CaptureQueries(cfg.head_dim**-0.5)
    model(ids, torch.arange(len(token_ids), device=device), capture)
    g = cfg.num_heads // cfg.num_kv_heads
    mats, energies = [], []
    for layer in range(cfg.num_layers):
        q = capture.queries[layer]  # [T, Hq, D]
        per_head = q.view(q.shape[0], cfg.num_kv_heads, g, cfg.head_dim).permute(1, 0, 2, 3)
        per_head = per_head.reshape(cfg.num_kv_heads, -1, cfg.head_dim)  # [Hkv, T * G, D]
        _, _, vh = torch.linalg.svd(per_head, full_matrices=False)
        a = vh.transpose(1, 2)  # [Hkv, D, D]
        mats.append(a)
        energies.append((per_head @ a).abs().sum(1))
    return Skew(torch.stack(mats).contiguous(), torch.stack(energies).contiguous())


def _cache_root() -> Path:
    env = os.environ.get("KVSCOPE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kvscope"


def fingerprint(model: CausalLM, token_ids: list[int]) -> str:
    """Identifies the weights and calibration tokens: hashes the config, a slice of every layer's
    query weights and the tokens (dummy models of one shape differ by seed)."""
    h = hashlib.sha256(json.dumps(model.config.__dict__, sort_keys=True, default=str).encode())
    for name, p in checkpoint_tensors(model).items():  # checkpoint names: q_proj is a view of qkv_proj
        if "q_proj.weight" in name:
            h.update(p.detach()[:4].float().cpu().numpy().tobytes())
    h.update(",".join(map(str, token_ids)).encode())
    return h.hexdigest()[:20]


def load_or_compute_skew(model: CausalLM, token_ids: list[int], device: torch.device) -> tuple[Skew, Path]:
    """The model's skew, from the cache when present (written atomically on first use)."""
    path = _cache_root() / "skew" / f"{fingerprint(model, token_ids)}.safetensors"
    if path.is_file():
        t = load_file(path)
        return Skew(t["matrix"], t["energy"]), path
    skew = compute_skew(model, token_ids, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"matrix": skew.matrix, "energy": skew.energy}, tmp)
    tmp.replace(path)
    return skew, path


def calibration_tokens(tokenizer, vocab_size: int, source: str, length: int = CALIBRATION_TOKENS) -> list[int]:
    """``length`` calibration tokens: packaged prose ``source`` (see ``workload.text``), or
    ``"random"`` (seeded uniform ids: for dummy weights, where text means nothing)."""
    from kvscope.workload.text import token_sequences

    if source == "random":
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (length,), generator=gen).tolist()
    try:
        return token_sequences(tokenizer, 1, length, source=source)[0]
    except DatasetError as e:
        raise ConfigError(f"infinigen: no calibration text for skewing ({e})") from None
