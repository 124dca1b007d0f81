"""Turns a scheduled step into model inputs, runs the model through the strategy's backend."""
from __future__ import annotations

import torch

from kvscope.device_copy import to_device
from kvscope.engine.cuda_graph import GraphRunner
from kvscope.engine.piecewise import PiecewiseRunner
from kvscope.kv.backend import KVBackend, StepBatch
from kvscope.models.base import CausalLM
from kvscope.request import Request


class ModelRunner:
    """Sees the strategy only as a :class:`~kvscope.kv.backend.KVBackend`. ``graphs``: the graph
    runner of the strategy's captured decode steps, tried first for the pure-decode steps;
    ``pieces``: the model's piecewise graphs, tried for the steps the decode graphs decline."""

    def __init__(self, model: CausalLM, kv: KVBackend, device: torch.device,
                 graphs: GraphRunner | None = None, pieces: PiecewiseRunner | None = None) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.graphs = graphs
        self.pieces = pieces
        self.graph_replays = 0
        self.piecewise_replays = 0

    def build_batch(self, requests: list[Request], num_new_tokens: list[int]) -> StepBatch:
        if num_new_tokens.count(1) == len(num_new_tokens):  # pure decode (most steps): one token each
            pos = [req.num_computed_tokens for req in requests]
            ids = [req.token_at(s) for req, s in zip(requests, pos)]
            starts = list(range(len(requests) + 1))
        else:
            ids, pos, starts = [], [], [0]
            for req, n in zip(requests, num_new_tokens):
                s = req.num_computed_tokens
                if n == 1:  # all_token_ids would copy the whole sequence for one token
                    ids.append(req.token_at(s))
                else:
                    ids.extend(req.all_token_ids[s : s + n])
                pos.extend(range(s, s + n))
                starts.append(starts[-1] + n)
        return StepBatch(
            requests=requests,
            num_new_tokens=num_new_tokens,
            input_ids=to_device(ids, self.device, torch.long),
            positions=to_device(pos, self.device, torch.long),
            query_start=starts,
        )

    @torch.inference_mode()
    def run(self, batch: StepBatch, sample_rows: list[int]) -> torch.Tensor:
        """Compute the step; return float32 logits ``[len(sample_rows), vocab]`` of those rows."""
        if self.graphs is not None:
            logits = self.graphs.run(batch, sample_rows)
            if logits is not None:
                self.graph_replays += 1
                return logits
        if batch.input_patch is not None:
            rows, ids = batch.input_patch
            batch.input_ids.index_copy_(0, rows, ids)
        attn = self.kv.begin_step(batch)
        hidden = None if self.pieces is None else self.pieces.run(batch, attn)
        if hidden is None:
            hidden = self.model(batch.input_ids, batch.positions, attn)
        else:
            self.piecewise_replays += 1
        rows = to_device(sample_rows, hidden.device, torch.long)
        return self.model.compute_logits(hidden[rows])
