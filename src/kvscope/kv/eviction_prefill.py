"""The prefill chunks of a step, batched for the attention statistics of evicting strategies.

A statistic that reads prefill rows (H2O: every row; SnapKV: its observation window; TOVA: the
newest row) needs their attention probabilities, which the fused kernels never materialise. One
request at a time that is a dozen small launches per request and layer, host work that every
request of a burst waits for before its first token (on an H200, 100 ShareGPT prompts at once gave
`h2o` a median first-token time of 1.8 s, 0.8 s batched). Here the step's chunks are padded into a
few groups, each attended with one batched computation per layer.

Layout of a group of B chunks: the observed rows of chunk i (``m_i``: from its first observed row
to its newest) sit at the END of its ``M = max m_i`` rows (left padding), so ``[..., -1, :]`` is
every chunk's newest row, as the last-row statistic reads it; its context (``t_i`` slots, the
chunk's own tokens last) in the first ``t_i`` of ``T = max t_i`` columns. Padded rows see key 0
only (a defined softmax) and are zeroed before any reduction; padded columns are masked and never
folded. Groups are formed longest context first, while a group's float32 probabilities stay under
``MAX_GROUP_BYTES``; a chunk larger than that alone is a group of one, as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from kvscope.device_copy import to_device

#: Probabilities of one group, ``B x Hq x M x T`` float32; the softmax holds about three such.
MAX_GROUP_BYTES = 256 << 20


@dataclass
class PrefillGroup:
    """One group's index tensors, built once per step and used by every layer.

    ``q_index`` ``[B, M]``: flat query row of each (chunk, observed row), padded rows pointing at
    the chunk's first observed row; ``row_valid`` ``[B, M]`` bool; ``mask`` ``[B, 1, 1, M, T]``
    bool (True = visible); ``slots`` ``[B, T]`` the context's slots (padding: slot 0);
    ``out_rows`` ``[V]``: the valid (chunk, row) entries' flat indices in ``[B * M]`` and
    ``out_q`` ``[V]`` their query rows; ``fold_index`` ``[S]``: the valid columns' flat indices in
    ``[B * T]`` and ``fold_slots`` ``[S]`` their slots.
    """

    q_index: torch.Tensor
    row_valid: torch.Tensor
    mask: torch.Tensor
    slots: torch.Tensor
    out_rows: torch.Tensor
    out_q: torch.Tensor
    fold_index: torch.Tensor
    fold_slots: torch.Tensor


def plan_groups(chunks: list[tuple[int, int, int]], num_heads: int) -> list[list[int]]:
    """Chunk indices per group. ``chunks``: per chunk ``(first observed flat row, observed rows m,
    context t)``; ``num_heads``: query heads."""
    order = sorted(range(len(chunks)), key=lambda i: -chunks[i][2])
    groups: list[list[int]] = []
    rows = cols = 0
    for i in order:
        _, m, t = chunks[i]
        if groups and (len(groups[-1]) + 1) * num_heads * max(rows, m) * max(cols, t) * 4 <= MAX_GROUP_BYTES:
            groups[-1].append(i)
            rows, cols = max(rows, m), max(cols, t)
        else:
            groups.append([i])
            rows, cols = m, t
    return groups


def build_group(chunks: list[tuple[int, int, int]], tables: list[torch.Tensor], members: list[int],
                device: torch.device) -> PrefillGroup:
    """The index tensors of the group ``members`` (see :class:`PrefillGroup`; ``tables``: per
    chunk its context's slots ``[t]``, on the device, where the padded table is built); host lists
    are copied once."""
    M = max(chunks[i][1] for i in members)
    T = max(chunks[i][2] for i in members)
    q_index, valid, row_pos = [], [], []
    for i in members:
        first, m, t = chunks[i]
        pad = M - m
        q_index += [first] * pad + list(range(first, first + m))
        valid += [False] * pad + [True] * m
        # Row r of the m observed ones is the chunk's token t - m + r: it sees keys 0 .. t - m + r.
        row_pos += [0] * pad + list(range(t - m, t))
    lens = [chunks[i][2] for i in members]
    q_index_d = to_device(q_index, device, torch.long).view(len(members), M)
    valid_d = to_device(valid, device, torch.bool).view(len(members), M)
    row_pos_d = to_device(row_pos, device, torch.long).view(len(members), M)
    lens_d = to_device(lens, device, torch.long)
    cols = torch.arange(T, device=device)
    key_valid = cols[None, :] < lens_d[:, None]  # [B, T]
    mask = (cols[None, None, :] <= row_pos_d[:, :, None]) & key_valid[:, None, :]
    slots = pad_sequence([tables[i] for i in members], batch_first=True)  # [B, T], padding slot 0
    out_rows = torch.nonzero_static(valid_d.flatten(), size=sum(chunks[i][1] for i in members)).squeeze(1)
    fold_index = torch.nonzero_static(key_valid.flatten(), size=sum(lens)).squeeze(1)
    return PrefillGroup(q_index_d, valid_d, mask[:, None, None], slots, out_rows, q_index_d.flatten()[out_rows],
                        fold_index, slots.flatten()[fold_index])
