"""H2O's prefill statistic on one attention layer at Llama-3.1-8B shapes (Hq 32, Hkv 8, D 128,
bf16): what the accumulated-attention column sums cost beside plain paged prefill attention.

Each row prefills ``B`` whole prompts of ``n`` tokens in one step, three ways:

* **paged** (the floor): ``paged_prefill_attention`` over 16-token block tables, no statistic;
* **torch**: ``h2o`` on the torch backend, ``EvictionAttention.attend``: the step's chunks in padded
  groups (``kv/eviction_prefill.py``), float32 probabilities ``[B, Hkv, G, n, T]`` from float32
  einsums, the output and the column sums from them;
* **triton**: ``h2o`` on the Triton backend, ``EvictionAttention.attend``: the prefill kernel with
  its log-sum-exp, then the column-sum kernel folding into the scores
  (``attention/triton_prefill_colsum.py``); its two kernels are also timed alone.

``h2o`` is the registry's strategy bound to a one-layer model; its requests are allocated through
it from a pool whose free list was shuffled (as after churn), so the slot lists are what the
engine passes. The two ``attend`` timings include the step's K/V write (two ``index_copy_``); the
step's set-up (``begin_step``: groups or slot tables, once per step for every layer) is timed apart
on the host. ``x32`` columns scale one layer to the model's 32: the attention share of a TTFT.

Correctness first: the Triton path's output and per-slot scores against the torch path's (relative
L2; bf16 output within bf16 rounding, scores within float32 rounding), paged's output against the
torch path's; the script stops if they disagree. Times: median of ``--repeats`` calls (CUDA events)
after warm-up. ``--tune`` sweeps the column-sum kernel's tiles on each row.

``--tiny``: Hq 4, Hkv 2, D 32 in float32 on the CPU under ``TRITON_INTERPRET=1`` (the interpreter
mis-multiplies bf16 ``tl.dot`` operands), wall-clock times: a smoke test, its times meaningless.
Writes ``prefill_statistic.json`` and ``.md`` to ``--out`` (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import bench_environment, sync, timed_ms  # noqa: E402
from ceilings import RESULTS, env_line  # noqa: E402

from kvscope.attention.triton_prefill import paged_prefill_attention  # noqa: E402
from kvscope.attention.triton_prefill_colsum import prefill_column_sums  # noqa: E402
from kvscope.kv.base import KVSetup, StepBatch  # noqa: E402
from kvscope.kv.registry import create  # noqa: E402
from kvscope.models.config import ModelConfig  # noqa: E402
from kvscope.request import Request  # noqa: E402
from kvscope.sampling_params import SamplingParams  # noqa: E402

PAGED_BLOCK = 16
SHAPES = [(32, 3072), (8, 1024), (1, 8192)]  # (batch, prompt tokens)
TINY_SHAPES = [(3, 40), (1, 64)]
TUNE_CONFIGS = [dict(block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in [
    (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 2), (256, 64, 8, 2),
    (64, 64, 4, 2),
]]


@dataclass(frozen=True)
class Setting:
    """Head shapes and dtype of a run; ``out_tol``/``score_tol``: the relative L2 within which the
    Triton path's output and scores must agree with the torch path's."""

    hq: int
    hkv: int
    d: int
    dtype: torch.dtype
    device: torch.device
    out_tol: float
    score_tol: float


FULL = Setting(32, 8, 128, torch.bfloat16, torch.device("cuda"), 1e-2, 1e-3)
TINY = Setting(4, 2, 32, torch.float32, torch.device("cpu"), 1e-5, 1e-5)


class Step:
    """``h2o`` (on ``backend``) holding ``batch`` fresh prompts of ``n`` tokens, one layer: ``attend()``
    runs the step's attention (K/V write, output, statistic) -> ``[B n, Hq, D]``; ``scores()`` the
    per-slot scores of every context token ``[B n, Hkv]``; ``begin()`` the step's set-up."""

    def __init__(self, s: Setting, backend: str, batch: int, n: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, seed: int) -> None:
        self.st = st = create("h2o")
        model = ModelConfig(arch="llama", vocab_size=1, hidden_size=s.hq * s.d, intermediate_size=1, num_layers=1,
                            num_heads=s.hq, num_kv_heads=s.hkv, head_dim=s.d, max_position_embeddings=n)
        slot_bytes = model.kv_bytes_per_token(s.dtype) + st.extra_slot_bytes(model)
        blocks = batch * -(-n // st.block_size) + 8
        st.bind(KVSetup(model, s.device, s.dtype, blocks * st.block_size * slot_bytes, n, batch, 0,
                        attention_backend=backend))
        ids = st.pool.allocate(st.pool.num_free)
        random.Random(seed).shuffle(ids)
        st.pool.free(ids)
        self.reqs = [Request(f"r{i}", [1] * n, SamplingParams(max_tokens=1)) for i in range(batch)]
        for r in self.reqs:
            assert st.allocate(r, n)
        pos = torch.arange(n, device=s.device).repeat(batch)
        self.batch = StepBatch(self.reqs, [n] * batch, torch.zeros_like(pos), pos, [i * n for i in range(batch + 1)])
        self.q, self.k, self.v = q, k, v
        self.att = st.begin_step(self.batch)

    def begin(self) -> None:
        self.att = self.st.begin_step(self.batch)

    def attend(self) -> torch.Tensor:
        return self.att.attend(0, self.q, self.k, self.v)

    def scores(self) -> torch.Tensor:
        return torch.cat([self.st.scores[0, self.st._slots(self.st.tables[r.request_id], len(r.prompt_token_ids))]
                          for r in self.reqs])

    def kernel_args(self) -> tuple:
        """The Triton path's kernel inputs: q, the layer's K and V, slot tables (one-token blocks),
        row offsets, lengths, max chunk, max context."""
        fp = self.att.folded_prefill
        kv = self.st.cache.kv[0]
        return self.q, kv[0], kv[1], fp.slots, fp.cu, fp.lens, fp.max_q, fp.max_ctx


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def paged_floor(s: Setting, batch: int, n: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: int):
    """``() -> out``: plain paged prefill of the same prompts over a shuffled 16-token block pool."""
    width = -(-n // PAGED_BLOCK)
    gen = torch.Generator().manual_seed(seed)
    tables = torch.randperm(batch * width, generator=gen).view(batch, width).to(s.device, torch.int32)
    slots = (tables.long()[:, :, None] * PAGED_BLOCK + torch.arange(PAGED_BLOCK, device=s.device)).flatten(1)[:, :n]
    kc = torch.zeros(batch * width * PAGED_BLOCK, s.hkv, s.d, device=s.device, dtype=s.dtype)
    vc = torch.zeros_like(kc)
    kc[slots.flatten()], vc[slots.flatten()] = k, v
    i32 = dict(device=s.device, dtype=torch.int32)
    cu, lens = torch.arange(batch + 1, **i32) * n, torch.full((batch,), n, **i32)
    return lambda: paged_prefill_attention(q, kc, vc, tables, cu, lens, s.d**-0.5, PAGED_BLOCK, n)


def ms(fn, s: Setting, warmup: int, repeats: int) -> float:
    return statistics.median(timed_ms(fn, s.device, warmup, repeats))


def host_ms(fn, s: Setting, repeats: int) -> float:
    """Wall-clock milliseconds of ``fn`` with the device synchronised around it (median)."""
    out = []
    for _ in range(repeats):
        sync(s.device)
        t0 = time.perf_counter()
        fn()
        sync(s.device)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def measure(s: Setting, batch: int, n: int, warmup: int, repeats: int, tune: bool) -> dict:
    seed = batch * 7 + n
    gen = torch.Generator(device=s.device).manual_seed(seed)
    q, k, v = (torch.randn(batch * n, h, s.d, device=s.device, generator=gen).to(s.dtype)
               for h in (s.hq, s.hkv, s.hkv))
    row: dict = {"batch": batch, "n": n}
    paged = paged_floor(s, batch, n, q, k, v, seed)
    steps = {b: Step(s, b, batch, n, q, k, v, seed) for b in ("torch", "triton")}
    # Correctness first: one attend each from fresh (zero) scores.
    outs = {b: st.attend() for b, st in steps.items()}
    scores = {b: st.scores() for b, st in steps.items()}
    row["check"] = {"out_vs_torch": rel_err(outs["triton"], outs["torch"]),
                    "scores_vs_torch": rel_err(scores["triton"], scores["torch"]),
                    "paged_vs_torch": rel_err(paged(), outs["torch"]),
                    "score_mass": scores["triton"].sum().item() / (batch * n * s.hq)}  # each row sums to 1
    print(json.dumps(row), flush=True)
    c = row["check"]
    if not (c["out_vs_torch"] < s.out_tol and c["paged_vs_torch"] < s.out_tol and c["scores_vs_torch"] < s.score_tol
            and abs(c["score_mass"] - 1) < 1e-3):
        raise SystemExit(f"the Triton path disagrees with the torch path: {row}")

    row["paged_ms"] = ms(paged, s, warmup, repeats)
    for b, st in steps.items():
        row[f"{b}_ms"] = ms(st.attend, s, warmup, repeats)
        row[f"{b}_begin_step_ms"] = host_ms(st.begin, s, repeats)
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    q_, kc, vc, tables, cu, lens, max_q, max_ctx = steps["triton"].kernel_args()
    lse = torch.empty(q_.shape[:2], device=s.device, dtype=torch.float32)
    fold = steps["triton"].st.scores[0]
    row["lse_prefill_ms"] = ms(lambda: paged_prefill_attention(q_, kc, vc, tables, cu, lens, s.d**-0.5, 1, max_q,
                                                               lse_out=lse), s, warmup, repeats)
    row["colsum_ms"] = ms(lambda: prefill_column_sums(q_, kc, tables, cu, lens, lse, s.d**-0.5, 1, max_ctx,
                                                      fold_scores=fold), s, warmup, repeats)
    if tune:
        row["tune"] = []
        for cfg in TUNE_CONFIGS:
            try:
                t = ms(lambda: prefill_column_sums(q_, kc, tables, cu, lens, lse, s.d**-0.5, 1, max_ctx,
                                                   fold_scores=fold, **cfg), s, warmup, repeats)
                row["tune"].append({"config": cfg, "ms": t})
            except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
                row["tune"].append({"config": cfg, "error": repr(e)[:200]})
            print(row["tune"][-1], flush=True)
    del steps
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def conclusion(rows: list[dict]) -> str:
    parts = [f"{r['batch']} x {r['n']}: torch {r['torch_ms'] / r['paged_ms']:.1f}x, triton "
             f"{r['triton_ms'] / r['paged_ms']:.2f}x paged (torch / triton {r['torch_ms'] / r['triton_ms']:.2f})"
             for r in rows]
    return "H2O prefill attention per layer against plain paged prefill: " + "; ".join(parts) + "."


def write_report(out: Path, result: dict) -> None:
    s = result["setting"]
    lines = [
        "# H2O's prefill statistic: column sums beside paged prefill attention (one layer)", "",
        f"**{result['conclusion']}**", "",
        env_line(result["environment"]),
        f"Heads Hq {s['hq']}, Hkv {s['hkv']}, D {s['d']}, {s['dtype']}; each row: `batch` whole prompts of `n` "
        f"tokens in one step. paged: `paged_prefill_attention`, {PAGED_BLOCK}-token blocks (no statistic). torch / "
        "triton: `h2o`'s `EvictionAttention.attend` on that backend (K/V write, output, column sums into the "
        "scores); triton's two kernels alone: prefill with log-sum-exp, column sums. begin_step: the step's "
        "set-up on the host (once per step for all layers). x32: one layer times 32, the attention share of a "
        f"Llama-3.1-8B TTFT. Median of {result['repeats']} calls after {result['warmup']} warm-up (CUDA events; "
        "--tiny: wall clock).", "",
        "| batch | n | paged ms | torch ms | triton ms | prefill+LSE ms | colsum ms | triton / paged | torch / triton "
        "| paged x32 s | torch x32 s | triton x32 s | begin_step torch ms | begin_step triton ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['batch']} | {r['n']} | {r['paged_ms']:.2f} | {r['torch_ms']:.2f} | {r['triton_ms']:.2f} "
            f"| {r['lse_prefill_ms']:.2f} | {r['colsum_ms']:.2f} | {r['triton_ms'] / r['paged_ms']:.2f} "
            f"| {r['torch_ms'] / r['triton_ms']:.2f} | {32 * r['paged_ms'] / 1e3:.2f} | {32 * r['torch_ms'] / 1e3:.2f} "
            f"| {32 * r['triton_ms'] / 1e3:.2f} | {r['torch_begin_step_ms']:.2f} | {r['triton_begin_step_ms']:.2f} |")
    lines += ["", "Correctness (before timing, relative L2 against the torch path; bounds: output "
              f"{s['out_tol']:.0e}, scores {s['score_tol']:.0e}; score mass: the scores' sum per (row, query head), 1 "
              "for a softmax):", ""]
    lines += [f"- {r['batch']} x {r['n']}: triton output {r['check']['out_vs_torch']:.1e}, scores "
              f"{r['check']['scores_vs_torch']:.1e}, score mass {r['check']['score_mass']:.6f}; paged output "
              f"{r['check']['paged_vs_torch']:.1e}" for r in result["results"]]
    tuned = [r for r in result["results"] if "tune" in r]
    if tuned:
        lines += ["", "## Column-sum kernel tiles (ms)", "",
                  "| config | " + " | ".join(f"{r['batch']} x {r['n']}" for r in tuned) + " |",
                  "|---|" + "---:|" * len(tuned)]
        for i, cfg in enumerate(TUNE_CONFIGS):
            cells = [f"{r['tune'][i]['ms']:.2f}" if "ms" in r["tune"][i] else "err" for r in tuned]
            lines.append(f"| `{cfg}` | " + " | ".join(cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_statistic.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def save_json(out: Path, result: dict) -> None:
    """The results so far (after every row, so that a cut-off run keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_statistic.json").write_text(json.dumps(result, indent=2) + "\n")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"32x3072,8x1024"`` -> ``[(32, 3072), (8, 1024)]``."""
    return [tuple(int(x) for x in part.split("x")) for part in text.split(",")]  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--shapes", type=parse_shapes, default=None, help="batch x prompt tokens, e.g. 32x3072,8x1024")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tune", action="store_true", help="also sweep the column-sum kernel's tiles")
    ap.add_argument("--tiny", action="store_true", help="tiny heads on the CPU under TRITON_INTERPRET=1 (smoke test)")
    args = ap.parse_args()
    if args.tiny and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--tiny runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    s = TINY if args.tiny else FULL
    shapes = args.shapes or (TINY_SHAPES if args.tiny else SHAPES)
    warmup, repeats = (1, 2) if args.tiny else (args.warmup, args.repeats)
    env = bench_environment(s.device)
    print(env_line(env), flush=True)
    result = {"benchmark": "prefill_statistic", "environment": env, "warmup": warmup, "repeats": repeats,
              "setting": {"hq": s.hq, "hkv": s.hkv, "d": s.d, "dtype": str(s.dtype), "out_tol": s.out_tol,
                          "score_tol": s.score_tol}, "results": []}
    for batch, n in shapes:
        row = measure(s, batch, n, warmup, repeats, args.tune)
        result["results"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tune"}), flush=True)
        save_json(args.out, result)
    result["conclusion"] = conclusion(result["results"])
    save_json(args.out, result)
    write_report(args.out, result)


if __name__ == "__main__":
    main()
