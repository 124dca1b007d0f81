"""The cost model's tensor-parallel term (``kvscope.distributed``'s layout, ``models/parallel.py``).

Over ``N`` ranks each rank holds ``1/N`` of every decoder layer's matmul weights and of the KV
heads, and the embedding and LM head whole (kvscope replicates them). A step therefore streams
``(layer weights) / N + embedding + head`` and ``1/N`` of the KV per rank, does ``1/N`` of the
layers' FLOPs and attention (and the whole LM head), and adds two all-reduces per layer (after
attention's output projection and after the MLP, Llama and OPT alike) of the step's hidden states,
``new tokens x hidden x dtype bytes`` each. A ring all-reduce of ``B`` bytes moves ``2 (N - 1) / N x
B`` through each rank's link, so it costs ``latency + 2 (N - 1) / N x B / link rate``
(:class:`~kvscope.advise.hardware.Hardware`'s ``allreduce_latency_s`` and
``interconnect_bytes_per_s``). With ``N = 1`` every term is the single-device one. The per-layer
step overhead is the single-device one too (replayed or eager by the same rule): every rank
captures its pure-decode steps as CUDA graphs, the all-reduces recorded inside them, so an
all-reduce's latency is the collective's own, with no host launch cost added.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvscope.advise.hardware import Hardware
from kvscope.errors import ConfigError
from kvscope.models.config import ModelConfig

#: All-reduces per decoder layer: attention's output projection and the MLP's down projection.
ALLREDUCES_PER_LAYER = 2


@dataclass(frozen=True)
class TensorParallelTerm:
    """``size`` ranks serving ``model`` on ``hardware``; ``elem``: bytes per element of the dtype."""

    model: ModelConfig
    hardware: Hardware
    size: int
    elem: int

    def __post_init__(self) -> None:
        if self.model.num_kv_heads % self.size:
            raise ConfigError(f"tensor_parallel_size={self.size} must divide the model's num_kv_heads "
                              f"({self.model.num_kv_heads})")

    def allreduce_seconds(self, nbytes: float) -> float:
        """One ring all-reduce of ``nbytes`` per rank; 0 on one rank."""
        n = self.size
        if n == 1:
            return 0.0
        return self.hardware.allreduce_latency_s + 2 * (n - 1) / n * nbytes / self.hardware.interconnect_bytes_per_s

    def step_comm_seconds(self, new_tokens: int) -> float:
        """The all-reduces of a step computing ``new_tokens`` tokens (seconds)."""
        nbytes = new_tokens * self.model.hidden_size * self.elem
        return self.model.num_layers * ALLREDUCES_PER_LAYER * self.allreduce_seconds(nbytes)

    def rank_params(self, params: int, replicated: int) -> float:
        """Parameters one rank holds: ``replicated`` (embedding, head) whole, the rest split."""
        return (params - replicated) / self.size + replicated
