"""benchmarks/scheduler_replay.py: the engine's scheduler over whole blocks, counted by hand."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import scheduler_replay  # noqa: E402


def test_counts_of_a_run_with_one_preemption():
    """Two requests of 3 prompt and 3 output tokens, 3 blocks of 4 tokens. Step 1 prefills both
    (6 tokens, a block each); step 2 decodes both (4 tokens fit their block); in step 3 each needs a
    second block, only one is free: B (admitted last) is preempted, A decodes and finishes; step 4
    recomputes B's 5 tokens (its prompt and 2 sampled) and it finishes."""
    r = scheduler_replay.replay([(3, 3), (3, 3)], num_blocks=3, block_size=4, max_num_seqs=2,
                                max_num_batched_tokens=16)
    assert r == {"num_blocks": 3, "pool_tokens": 12, "steps": 4, "steps_with_prefill": 2,
                 "steps_with_under_512_prefill_tokens": 2, "pure_decode_steps": 2, "preemptions": 1,
                 "prefill_tokens": 11, "recomputed_tokens": 5, "decode_rows": 3}


def test_an_ample_pool_prefills_once_and_never_preempts():
    lengths = [(600, 4), (20, 9), (7, 30)]
    r = scheduler_replay.replay(lengths, num_blocks=1000, block_size=16, max_num_seqs=8, max_num_batched_tokens=512)
    # 627 prompt tokens in 512-token chunks: two steps carry prefill, the first one 512 tokens.
    assert r["preemptions"] == 0 and r["recomputed_tokens"] == 0 and r["prefill_tokens"] == 627
    assert r["steps_with_prefill"] == 2 and r["steps_with_under_512_prefill_tokens"] == 1
    # The longest request needs 30 steps after its prefill step; decode rows = outputs less the first tokens.
    assert r["decode_rows"] == sum(o - 1 for _, o in lengths)
