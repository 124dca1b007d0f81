"""A workload's lengths through kvscope's scheduler at several pool sizes, with no model: how many
steps a run takes, how many of them carry prefill (which run eagerly: only pure decode steps
replay CUDA graphs), how often requests are preempted and how many prompt tokens are recomputed.
A benchmark of scheduling, not of speed: every count is exact for the synchronous engine.

The engine's :class:`~kvscope.engine.scheduler.Scheduler` runs as is over a block-accounting KV
manager (``--block-size`` tokens a block, as ``paged`` allocates); after each step every scheduled
request has computed what it was given, and one whose sequence is complete samples a token and
finishes at its output length (EOS ignored). Defaults: the 256 ShareGPT length pairs of
``end_to_end.py``'s W2 and its engine limits, in the 2 GiB pool of Llama-3.1-8B shapes (1,024
blocks of 16 tokens: 16,384 tokens) and an ample one.

Writes benchmarks/results/scheduler_replay.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from envinfo import environment  # noqa: E402

from kvscope.engine.scheduler import Scheduler  # noqa: E402
from kvscope.kv.manager import KVManager  # noqa: E402
from kvscope.request import Request, RequestStatus  # noqa: E402
from kvscope.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LENGTHS = Path(__file__).parent / "gpu" / "sharegpt_lengths.json"


class BlockCount(KVManager):
    """Whole blocks of ``block_size`` tokens per request out of ``num_blocks``; no tensors."""

    name = "block-count"

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.used = 0
        self.held: dict[str, int] = {}

    def max_request_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def allocate(self, request: Request, num_tokens: int) -> bool:
        need = math.ceil(num_tokens / self.block_size) - self.held.get(request.request_id, 0)
        if self.used + need > self.num_blocks:
            return False
        if need > 0:
            self.used += need
            self.held[request.request_id] = self.held.get(request.request_id, 0) + need
        return True

    def free(self, request: Request) -> None:
        self.used -= self.held.pop(request.request_id, 0)

    def stats(self) -> dict[str, Any]:
        return {"blocks_used": self.used}


def replay(lengths: list[tuple[int, int]], num_blocks: int, block_size: int, max_num_seqs: int,
           max_num_batched_tokens: int) -> dict[str, Any]:
    """Run ``lengths`` (prompt, output) to completion; returns the step and token counts."""
    kv = BlockCount(num_blocks, block_size)
    sched = Scheduler(kv, max_num_seqs, max_num_batched_tokens)
    for i, (p, o) in enumerate(lengths):
        req = Request(str(i), list(range(1, p + 1)), SamplingParams(max_tokens=o, ignore_eos=True))
        req.max_total_tokens = p + o
        sched.add(req)
    steps = prefill_steps = prefill_tokens = decode_rows = 0
    small_prefill_steps = 0  # under 512 prefill tokens: bound by launches when eager, not by FLOPs
    while sched.num_unfinished:
        out = sched.schedule()
        if not out.requests:
            raise RuntimeError(f"no request can run in {num_blocks} blocks of {block_size} tokens")
        steps += 1
        prefill = sum(n for n in out.num_new_tokens if n > 1)
        decode_rows += sum(1 for n in out.num_new_tokens if n == 1)
        prefill_tokens += prefill
        prefill_steps += prefill > 0
        small_prefill_steps += 0 < prefill < 512
        for req, n in zip(out.requests, out.num_new_tokens):
            req.num_computed_tokens += n
            if req.num_computed_tokens >= req.num_tokens:
                req.output_token_ids.append(0)
                if req.num_tokens >= req.max_total_tokens:
                    req.status = RequestStatus.FINISHED
                    sched.remove(req)
                    kv.free(req)
    prompts = sum(p for p, _ in lengths)
    return {"num_blocks": num_blocks, "pool_tokens": num_blocks * block_size, "steps": steps,
            "steps_with_prefill": prefill_steps, "steps_with_under_512_prefill_tokens": small_prefill_steps,
            "pure_decode_steps": steps - prefill_steps, "preemptions": sched.num_preemptions,
            "prefill_tokens": prefill_tokens, "recomputed_tokens": prefill_tokens - prompts,
            "decode_rows": decode_rows}


def markdown(r: dict[str, Any]) -> str:
    e = r["environment"]
    rows = [f"| {x['pool_tokens']:,} | {x['steps']:,} | {x['steps_with_prefill']:,} "
            f"({x['steps_with_under_512_prefill_tokens']:,}) | {x['pure_decode_steps']:,} | {x['preemptions']:,} | "
            f"{x['recomputed_tokens']:,} |" for x in r["pools"]]
    small, large = min(r["pools"], key=lambda x: x["pool_tokens"]), max(r["pools"], key=lambda x: x["pool_tokens"])
    lead = (f"**In a pool of {small['pool_tokens']:,} tokens the run takes {small['steps']:,} steps, "
            f"{small['steps_with_prefill']:,} of them with prefill (run eagerly), and {small['preemptions']:,} "
            f"preemptions recompute {small['recomputed_tokens']:,} tokens; in {large['pool_tokens']:,} tokens, "
            f"{large['steps']:,} steps, {large['steps_with_prefill']:,} with prefill, {large['preemptions']:,} "
            "preemptions.**")
    return "\n".join([
        "# Scheduler replay: steps, prefill steps and preemptions by pool size",
        "",
        lead,
        "",
        f"Computed {e['date']}, commit {e['commit']}, {len(r['lengths'])} requests "
        f"({sum(p for p, _ in r['lengths']):,} prompt and {sum(o for _, o in r['lengths']):,} output tokens) "
        f"from `{r['lengths_file']}`; blocks of {r['block_size']} tokens, max_num_seqs {r['max_num_seqs']}, "
        f"max_num_batched_tokens {r['max_num_batched_tokens']}. Exact counts of the synchronous engine's "
        "scheduler, no model.",
        "",
        "| pool tokens | steps | steps with prefill (under 512 prefill tokens) | pure decode steps | preemptions | "
        "recomputed tokens |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=Path, default=LENGTHS, help="JSON list of [prompt, output] pairs")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--blocks", default="1024,65536", help="pool sizes in blocks, comma-separated")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    lengths = [tuple(x) for x in json.loads(args.lengths.read_text())[: args.requests]]
    pools = [replay(lengths, int(b), args.block_size, args.max_num_seqs, args.max_num_batched_tokens)
             for b in args.blocks.split(",")]
    name = args.lengths.name if args.lengths == LENGTHS else str(args.lengths)
    result = {"benchmark": "scheduler_replay", "environment": environment(), "lengths_file": name,
              "lengths": lengths, "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens, "pools": pools}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scheduler_replay.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / "scheduler_replay.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
