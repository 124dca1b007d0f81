"""``BlockTableGraphs.load``: what the static decode buffers hold after each step, checked row by
row against values computed here by hand, over steps where tables grow, change in place (a
copy-on-write), rows change hands and a preempted request comes back with new blocks."""
from __future__ import annotations

import pytest
import torch

from kvscope.kv.backend import StepBatch
from kvscope.kv.block_table_graphs import BlockTableGraphs
from kvscope.kv.graphs import BlockTableDecode, BlockTableLayout
from kvscope.request import Request
from kvscope.sampling_params import SamplingParams

BS, MAX_LEN = 4, 32  # 8 blocks per table


class FakeSource(BlockTableDecode):
    """A block-table strategy reduced to what ``load`` reads: tables and held tokens by request id."""

    setup = None

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}
        self.held: dict[str, int] = {}

    def block_table_layout(self) -> BlockTableLayout:
        return BlockTableLayout(cache=None, block_size=BS)

    def block_tables(self, batch: StepBatch) -> list[list[int]]:
        return [self.tables[r.request_id] for r in batch.requests]

    def held_tokens(self, batch: StepBatch) -> list[int]:
        return [self.held[r.request_id] for r in batch.requests]


def _req(rid: str, num_tokens: int, computed: int) -> Request:
    """A request of ``num_tokens`` distinct tokens (half prompt, half output) at ``computed``."""
    base = 100 * (ord(rid[0]) - ord("a") + 1)
    toks = [base + t for t in range(num_tokens)]
    half = num_tokens // 2
    return Request(request_id=rid, prompt_token_ids=toks[:half], output_token_ids=toks[half:],
                   params=SamplingParams(max_tokens=64), num_computed_tokens=computed)


def _batch(reqs: list[Request]) -> StepBatch:
    n = len(reqs)
    return StepBatch(reqs, [1] * n, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                     list(range(n + 1)))


def _check(g: BlockTableGraphs, src: FakeSource, reqs: list[Request], size: int) -> None:
    for i, r in enumerate(reqs):
        table, h = src.tables[r.request_id], src.held[r.request_id]
        p = r.num_computed_tokens
        assert g.ids[i].item() == r.token_at(p) == 100 * (ord(r.request_id[0]) - ord("a") + 1) + p
        assert g.positions[i].item() == p and g.lens[i].item() == h + 1
        assert g.slots[i].item() == table[h // BS] * BS + h % BS
        assert g.tables[i, : len(table)].tolist() == table
    for i in range(len(reqs), size):  # padding: nothing written, one token of context at block 0
        assert (g.ids[i].item(), g.positions[i].item(), g.slots[i].item(), g.lens[i].item(),
                g.tables[i, 0].item()) == (0, 0, -1, 1, 0)


def test_load_follows_growing_replaced_and_readmitted_rows():
    src = FakeSource()
    g = BlockTableGraphs(src, [1, 2, 4], MAX_LEN, torch.device("cpu"))
    a, b, c = _req("a", 12, 5), _req("b", 20, 10), _req("c", 4, 0)
    src.tables.update(a=[7, 3], b=[9, 1, 4], c=[2])
    src.held.update(a=5, b=10, c=0)
    g.load(_batch([a, b, c]), 4)
    _check(g, src, [a, b, c], 4)

    # a fills its second block and gets a third; b is preempted (its row goes to d, with a shorter
    # table); c finished. Rows 2 and 3 of bucket 4 become padding.
    a.num_computed_tokens = src.held["a"] = 8
    src.tables["a"].append(11)
    d = _req("d", 6, 2)
    src.tables["d"], src.held["d"] = [5], 2
    g.load(_batch([a, d]), 4)
    _check(g, src, [a, d], 4)
    assert g.tables[1, :3].tolist() == [5, 1, 4]  # b's stale entries past d's one block stay unread

    # b is readmitted with new blocks; a's last block is copied on write (changed in place); an
    # evicting strategy holds fewer tokens than d computed.
    b.num_computed_tokens = src.held["b"] = 10
    src.tables["b"] = [6, 8, 12]
    src.tables["a"][2] = 13
    a.num_computed_tokens, src.held["a"] = 9, 9
    d.num_computed_tokens, src.held["d"] = 3, 1
    g.load(_batch([d, b, a]), 4)
    _check(g, src, [d, b, a], 4)

    g.load(_batch([b]), 1)  # a smaller bucket reads only its first rows
    _check(g, src, [b], 1)


def test_load_names_a_table_too_short_for_its_tokens():
    src = FakeSource()
    g = BlockTableGraphs(src, [2], MAX_LEN, torch.device("cpu"))
    a, b = _req("a", 12, 4), _req("b", 12, 8)
    src.tables.update(a=[1, 2], b=[3, 4])  # b's token 8 needs a third block
    src.held.update(a=4, b=8)
    with pytest.raises(IndexError, match="request b: 8 held tokens"):
        g.load(_batch([a, b]), 2)
