"""Block pool and paged allocator: exact block ids, LRU reuse, prefix hits, and invariants under
random operation sequences (hypothesis)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope.engine.request import Request
from kvscope.engine.sampling_params import SamplingParams
from kvscope.kv.base import KVSetup
from kvscope.kv.block_pool import BlockPool, hash_block
from kvscope.kv.paged import PagedStrategy
from kvscope.models.config import ModelConfig

TINY = ModelConfig(
    arch="llama", vocab_size=100, hidden_size=4, intermediate_size=8, num_layers=2,
    num_heads=1, num_kv_heads=1, head_dim=2, max_position_embeddings=4096,
)
BPT = TINY.kv_bytes_per_token(torch.float32)  # 2 * 2 layers * 1 head * 2 dims * 4 bytes = 32


def make_paged(num_blocks: int, block_size: int = 4, caching: bool = True, swap_bytes: int = 1 << 20):
    kv = PagedStrategy(block_size=block_size, enable_prefix_caching=caching)
    kv.bind(KVSetup(TINY, torch.device("cpu"), torch.float32, num_blocks * block_size * BPT, 4096, 64, swap_bytes))
    return kv


def req(rid: str, tokens: list[int]) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(tokens), params=SamplingParams(max_tokens=8))


def test_pool_hands_out_blocks_in_order_and_reuses_lru():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    pool.free([1, 0])
    assert pool.num_free == 3
    # Free queue: 5 (never used), then 1, then 0 in the order they were freed.
    assert pool.allocate(3) == [5, 1, 0]
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_pool_detects_double_free():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([b])


def test_prefix_lookup_rechecks_tokens_and_survives_until_reuse():
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache(b, h, [1, 2, 3, 4])
    assert pool.lookup(h, [1, 2, 3, 4]) == b
    assert pool.lookup(h, [1, 2, 3, 5]) is None  # same hash, other tokens: a miss
    pool.free([b])
    assert pool.lookup(h, [1, 2, 3, 4]) == b  # free but still cached
    pool.allocate(2)  # blocks 1, 2
    assert pool.lookup(h, [1, 2, 3, 4]) == b
    pool.allocate(1)  # now block 0 is reused: its hash goes
    assert pool.lookup(h, [1, 2, 3, 4]) is None
    assert pool.num_cached == 0


def test_chained_hash_depends_on_prefix():
    a = hash_block(hash_block(None, [1, 2]), [3, 4])
    b = hash_block(hash_block(None, [9, 9]), [3, 4])
    assert a != b


def test_paged_block_tables_and_prefix_hits_are_exact():
    kv = make_paged(num_blocks=8, block_size=4)
    r1 = req("a", list(range(10)))  # 10 tokens -> 3 blocks
    assert kv.lookup_prefix(r1) == 0
    assert kv.allocate(r1, 10)
    assert kv.tables["a"] == [0, 1, 2]
    r1.num_computed_tokens = 10
    kv.end_step(_batch([r1]))
    assert kv.pool.num_cached == 2  # two full blocks registered, the partial one not
    # Same first 8 tokens: two blocks hit; at most (num_tokens - 1) // 4 blocks may hit.
    r2 = req("b", list(range(8)) + [50, 51, 52])
    assert kv.lookup_prefix(r2) == 8
    assert kv.allocate(r2, 11)
    assert kv.tables["b"] == [0, 1, 3]
    assert kv.pool.ref_cnt[:4] == [2, 2, 1, 1]
    # A prompt that is exactly two cached blocks recomputes its last block.
    r3 = req("c", list(range(8)))
    assert kv.lookup_prefix(r3) == 4
    kv.free(r1)
    kv.free(r2)
    assert kv.pool.num_used == 0
    assert kv.stats()["prefix_cache_hit_tokens"] == 8


def test_paged_allocation_failure_changes_nothing():
    kv = make_paged(num_blocks=3, block_size=4)
    r1 = req("a", list(range(12)))
    assert kv.allocate(r1, 12)
    r2 = req("b", [7, 7])
    assert not kv.allocate(r2, 2)
    assert "b" not in kv.tables and kv.pool.num_free == 0
    r1.num_computed_tokens = 12
    assert not kv.allocate(r1, 13)
    assert kv.tables["a"] == [0, 1, 2]


def test_fork_shares_then_copies_on_write():
    kv = make_paged(num_blocks=6, block_size=4)
    parent = req("p", list(range(6)))
    assert kv.allocate(parent, 6)
    kv.cache.kv[:, :, :8] = torch.randn(2, 2, 8, 1, 2)
    parent.num_computed_tokens = 6
    child = req("p#1", list(range(6)))
    child.num_computed_tokens = 6
    kv.fork(parent, child)
    assert kv.tables["p#1"] == [0, 1] and kv.pool.ref_cnt[:2] == [2, 2]
    # The child writes token 6 into shared block 1: it gets a private copy (block 2).
    assert kv.allocate(child, 7)
    assert kv.tables["p#1"] == [0, 2] and kv.pool.ref_cnt[:3] == [2, 1, 1]
    assert torch.equal(kv.cache.kv[:, :, 8:12], kv.cache.kv[:, :, 4:8])
    assert kv.stats()["cow_copies"] == 1
    # The parent is now the only user of block 1: no copy.
    assert kv.allocate(parent, 7)
    assert kv.tables["p"] == [0, 1]
    kv.free(parent)
    kv.free(child)
    assert kv.pool.num_used == 0 and sum(kv.pool.ref_cnt) == 0


def test_swap_round_trip_restores_kv_exactly():
    kv = make_paged(num_blocks=4, block_size=4)
    r = req("a", list(range(7)))
    assert kv.allocate(r, 7)
    r.num_computed_tokens = 7
    data = torch.randn(2, 2, 7, 1, 2)
    kv.cache.write(kv._slots(kv.tables["a"], 7), data)
    assert kv.swap_out(r) == 7 * BPT
    assert kv.pool.num_used == 0 and kv.stats()["host_kv_bytes"] == 7 * BPT
    other = req("b", list(range(4)))
    # Free queue after the swap: 2, 3 (never used), then 1, 0 (freed tail first).
    assert kv.allocate(other, 4)
    assert kv.tables["b"] == [2]
    assert kv.swap_in(r) == 7 * BPT
    assert kv.tables["a"] == [3, 1]  # back in other blocks, same contents
    assert torch.equal(kv.cache.read(kv._slots(kv.tables["a"], 7)), data)
    assert kv.stats()["host_kv_bytes"] == 0


def test_swap_refused_when_host_space_is_full():
    kv = make_paged(num_blocks=4, block_size=4, swap_bytes=3 * BPT)
    r = req("a", list(range(7)))
    assert kv.allocate(r, 7)
    r.num_computed_tokens = 7
    assert kv.swap_out(r) is None
    assert kv.tables["a"] == [0, 1]


def _batch(reqs):
    from kvscope.kv.base import StepBatch

    return StepBatch(reqs, [0] * len(reqs), torch.zeros(0), torch.zeros(0), [0] * (len(reqs) + 1))


def _check_invariants(kv: PagedStrategy) -> None:
    pool = kv.pool
    refs = [0] * pool.num_blocks
    for table in kv.tables.values():
        for b in table:
            refs[b] += 1
    assert refs == pool.ref_cnt, "reference counts disagree with the block tables"
    assert pool.num_free + pool.num_used == pool.num_blocks
    assert pool.num_used == sum(1 for r in refs if r > 0)
    assert all(r >= 0 for r in pool.ref_cnt)


ops = st.lists(
    st.tuples(
        st.sampled_from(["new", "grow", "fork", "free", "swap", "recompute"]),
        st.integers(0, 7),
        st.integers(1, 9),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.booleans())
def test_random_operations_never_leak_or_double_free(seq, caching):
    kv = make_paged(num_blocks=10, block_size=4, caching=caching, swap_bytes=12 * BPT)
    live: dict[str, Request] = {}
    swapped: dict[str, Request] = {}
    counter = 0
    for op, pick, n in seq:
        names = sorted(live)
        target = live[names[pick % len(names)]] if names else None
        if op == "new":
            counter += 1
            # A small vocabulary makes prefix hits and shared blocks frequent.
            r = req(f"r{counter}", [(counter * pick + i) % 3 for i in range(n * 2)])
            cached = kv.lookup_prefix(r)
            if kv.allocate(r, r.num_tokens):
                r.num_computed_tokens = r.num_tokens
                assert cached <= r.num_tokens - 1
                live[r.request_id] = r
                kv.end_step(_batch([r]))
        elif target is None:
            continue
        elif op == "grow":
            target.output_token_ids.extend([pick % 3] * n)
            if kv.allocate(target, target.num_tokens):
                target.num_computed_tokens = target.num_tokens
                kv.end_step(_batch([target]))
            else:
                target.output_token_ids = target.output_token_ids[:-n]
        elif op == "fork":
            counter += 1
            child = req(f"{target.request_id}#{counter}", target.prompt_token_ids)
            child.output_token_ids = list(target.output_token_ids)
            child.num_computed_tokens = target.num_computed_tokens
            kv.fork(target, child)
            live[child.request_id] = child
        elif op == "free":
            kv.free(live.pop(target.request_id))
        elif op == "swap":
            if kv.swap_out(target) is not None:
                swapped[target.request_id] = live.pop(target.request_id)
        elif op == "recompute":
            kv.free(target)
            target.num_computed_tokens = 0
            if kv.allocate(target, target.num_tokens):
                target.num_computed_tokens = target.num_tokens
                kv.end_step(_batch([target]))
            else:
                del live[target.request_id]
        if swapped and op in ("free", "recompute"):
            rid = sorted(swapped)[0]
            if kv.swap_in(swapped[rid]) is not None:
                live[rid] = swapped.pop(rid)
        _check_invariants(kv)
    for r in list(live.values()) + list(swapped.values()):
        kv.free(r)
    assert kv.pool.num_used == 0
    assert sum(kv.pool.ref_cnt) == 0
    assert kv.stats()["host_kv_bytes"] == 0
    assert not kv.tables
