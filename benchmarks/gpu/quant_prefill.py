"""Paged prefill attention over quantized KV (``quant``: fp8, KIVI int8 and int4) against the bf16
paged prefill kernel, at Llama-3-8B attention shapes (Hq 32, Hkv 8, D 128, bf16).

Each format's cache is the strategy's own: ``paged`` and ``quant:dtype=...`` are created from the
registry and bound to a one-layer Llama-3-8B model config, so block sizes (paged and fp8 16; KIVI
the default group, 32), the value group, the fp8 scale (per tensor, calibrated on the write) and
the residual slots are what the engine would use. The same random K/V (in sequence order) are
written through each cache's own writer (``SlotKVCache.write``, ``FP8Cache.write``,
``KiviCache.write``, which quantizes every full block and leaves the last ``T % 32`` tokens in the
residual), into blocks drawn as a random permutation of the pool.

Correctness first: each kernel against a float64 reference, ``torch_ref.attend_causal`` per
sequence over the cache's own dequantized read-back (``cache.gather``: what the torch backend
attends to), on the varlen batch of ``prefill_attention.py`` (whole prompts, chunks after a cached
prefix, a single token; contexts that end inside a KIVI residual); the script stops if a kernel
disagrees. Each format's distance from the full-precision output is recorded beside it.

Then speed, per row ``(batch, chunk n, context T)`` as in ``prefill_attention.py``: device time per
launch, median over replays of a CUDA graph of ``CALLS`` launches; FLOPs ``4 D Hq`` per visible
(query, key) pair, the same count for every format (dequantization is extra work, not credited);
KV bytes read = each cached token's K/V once, as the strategy counts them (``decode_read_bytes``:
codes, scales and zeros, residual rows). K/V of most rows fit in L2: prefill is bound by
arithmetic, not by these bytes.

``--tiny``: Hq 4, Hkv 2, D 32 in float32 on the CPU under ``TRITON_INTERPRET=1`` (the interpreter
mis-multiplies bf16 ``tl.dot`` operands), wall-clock timing: a smoke test, its times meaningless.
Writes ``quant_prefill.json`` and ``.md`` to ``--out`` (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import bench_environment, matmul_ceiling, timed_ms  # noqa: E402
from ceilings import RESULTS, env_line  # noqa: E402
from decode_attention import CALLS, graph_us  # noqa: E402
from prefill_attention import CHECK_BATCH, flops  # noqa: E402

from kvscope.attention.torch_ref import attend_causal  # noqa: E402
from kvscope.attention.triton_kivi_prefill import kivi_paged_prefill_attention  # noqa: E402
from kvscope.attention.triton_prefill import fp8_paged_prefill_attention, paged_prefill_attention  # noqa: E402
from kvscope.kv.backend import KVSetup  # noqa: E402
from kvscope.kv.base import KVStrategy  # noqa: E402
from kvscope.kv.registry import create  # noqa: E402
from kvscope.kv.slot_cache import table_slots  # noqa: E402
from kvscope.models.config import ModelConfig  # noqa: E402

BASELINE = "paged"
SPECS = (BASELINE, "quant:dtype=fp8", "quant:dtype=int8", "quant:dtype=int4")
# (batch, chunk n, context T); 4 x 1000 at 3000 leaves 24 tokens of each context in KIVI's residual.
SHAPES = [(1, 4096, 4096), (1, 16384, 16384), (4, 2048, 2048), (1, 1024, 8192), (4, 1000, 3000), (32, 512, 512)]
TINY_SHAPES = [(1, 40, 40), (2, 16, 48)]
TINY_CHECK = ([7, 1, 40, 20], [7, 45, 40, 70])


@dataclass(frozen=True)
class Setting:
    """Head shapes and dtype of a run; the reference must agree within ``tol`` (relative)."""

    hq: int
    hkv: int
    d: int
    dtype: torch.dtype
    device: torch.device
    tol: float


# bf16 rounds q, the probabilities fed to tl.dot and the output (the KIVI GPU test's bound);
# float32 differs from the float64 reference by rounding alone.
FULL = Setting(32, 8, 128, torch.bfloat16, torch.device("cuda"), 2e-2)
TINY = Setting(4, 2, 32, torch.float32, torch.device("cpu"), 1e-5)


@dataclass
class Case:
    """One batch: ``q`` ``[sum(chunks), Hq, D]``, the context's K and V ``[sum(ctxs), Hkv, D]`` in
    sequence order, ``cu`` ``[B + 1]`` and ``lens`` ``[B]`` int32."""

    chunks: list[int]
    ctxs: list[int]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu: torch.Tensor
    lens: torch.Tensor


def make_case(s: Setting, chunks: list[int], ctxs: list[int], seed: int) -> Case:
    gen = torch.Generator(device=s.device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=s.device, generator=gen).to(s.dtype)

    i32 = dict(device=s.device, dtype=torch.int32)
    return Case(chunks, ctxs, randn(sum(chunks), s.hq, s.d), randn(sum(ctxs), s.hkv, s.d),
                randn(sum(ctxs), s.hkv, s.d), torch.tensor([0] + chunks, **i32).cumsum(0, dtype=torch.int32),
                torch.tensor(ctxs, **i32))


def bind(spec: str, s: Setting, case: Case) -> KVStrategy:
    """``spec`` bound to a one-layer model of ``s``'s heads, its pool large enough for ``case``: 8
    blocks per sequence beyond its context, so that KIVI's default residual (at most 1/8 of the
    pool) has one slot per sequence."""
    strategy = create(spec)
    model = ModelConfig(arch="llama", vocab_size=1, hidden_size=s.hq * s.d, intermediate_size=1, num_layers=1,
                        num_heads=s.hq, num_kv_heads=s.hkv, head_dim=s.d, max_position_embeddings=max(case.ctxs))
    batch, width = len(case.ctxs), -(-max(case.ctxs) // strategy.block_size)
    memory = (width + 8) * batch * strategy.block_size * model.kv_bytes_per_token(s.dtype)
    strategy.bind(KVSetup(model, s.device, s.dtype, memory, max(case.ctxs), batch, 0, attention_backend="triton"))
    return strategy


@dataclass
class Built:
    """A format's cache holding a case: ``run()`` launches its prefill kernel -> ``[Nq, Hq, D]``;
    ``read_back()`` the K/V ``[2, M, Hkv, D]`` the cache gives back (dequantized, the model's dtype);
    ``index[b]`` the rows of sequence ``b``'s context in it, in order."""

    run: Callable[[], torch.Tensor]
    read_back: Callable[[], torch.Tensor]
    index: list[torch.Tensor]


def build_paged(st: KVStrategy, case: Case, tables: list[list[int]], scale: float) -> Built:
    slots = torch.cat([table_slots(t, n, st.block_size, case.q.device) for t, n in zip(tables, case.ctxs)])
    st.cache.write(slots, torch.stack([case.k, case.v])[None])
    kv, tab = st.cache.kv[0], torch.tensor(tables, dtype=torch.int32, device=case.q.device)
    run = lambda: paged_prefill_attention(case.q, kv[0], kv[1], tab, case.cu, case.lens, scale,  # noqa: E731
                                          st.block_size, max(case.chunks))
    return Built(run, lambda: st.cache.read(slots)[0], sequence_index(case.ctxs, case.q.device))


def build_fp8(st: KVStrategy, case: Case, tables: list[list[int]], scale: float) -> Built:
    c = st.cache
    plan = c.plan(tables, [0] * len(tables), case.ctxs, case.q.device)
    c.write(0, case.k, case.v, plan)  # calibrates the per-tensor scales on this data, as a first write does
    tab = torch.tensor(tables, dtype=torch.int32, device=case.q.device)
    run = lambda: fp8_paged_prefill_attention(  # noqa: E731
        case.q, c.data[0, 0], c.data[0, 1], c.scale[0, 0], c.scale[0, 1], tab, case.cu, case.lens, scale,
        st.block_size, max(case.chunks))
    return Built(run, lambda: c.gather(0, plan), plan.tables)


def build_kivi(st: KVStrategy, case: Case, tables: list[list[int]], scale: float) -> Built:
    c, batch = st.cache, len(tables)
    gen = torch.Generator().manual_seed(batch)
    res = torch.randperm(c.residual.shape[2], generator=gen)[:batch].tolist()
    plan = c.plan(tables, [0] * batch, case.ctxs, res, case.q.device)
    c.write(0, case.k, case.v, plan)
    i32 = dict(dtype=torch.int32, device=case.q.device)
    tab, res_t = torch.tensor(tables, **i32), torch.tensor(res, **i32)
    run = lambda: kivi_paged_prefill_attention(case.q, c, 0, tab, res_t, case.cu, case.lens, scale,  # noqa: E731
                                               max(case.chunks))
    return Built(run, lambda: c.gather(0, plan), plan.tables)


BUILDERS = {BASELINE: build_paged, "quant:dtype=fp8": build_fp8, "quant:dtype=int8": build_kivi,
            "quant:dtype=int4": build_kivi}


def build(spec: str, s: Setting, case: Case, seed: int) -> tuple[KVStrategy, Built]:
    """The strategy of ``spec`` holding ``case``, each sequence's blocks a random draw from its pool."""
    st = bind(spec, s, case)
    width = -(-max(case.ctxs) // st.block_size)
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(st.pool.num_blocks, generator=gen)[: len(case.ctxs) * width]
    return st, BUILDERS[spec](st, case, blocks.view(len(case.ctxs), width).tolist(), s.d**-0.5)


def sequence_index(ctxs: list[int], device: torch.device) -> list[torch.Tensor]:
    starts = [sum(ctxs[:b]) for b in range(len(ctxs))]
    return [torch.arange(a, a + n, device=device) for a, n in zip(starts, ctxs)]


def reference(case: Case, kv: torch.Tensor, index: list[torch.Tensor], scale: float) -> torch.Tensor:
    """Float64 ``[Nq, Hq, D]``: each sequence's chunk through ``attend_causal`` over ``kv``
    ``[2, M, Hkv, D]`` at its rows ``index[b]``."""
    kv, q = kv.double(), case.q.double()
    out = torch.zeros_like(q)
    for b, rows in enumerate(index):
        s, e = int(case.cu[b]), int(case.cu[b + 1])
        out[s:e] = attend_causal(q[s:e], kv[0][rows], kv[1][rows], scale)
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def check_correctness(s: Setting, chunks: list[int], ctxs: list[int]) -> list[dict]:
    """Every format's kernel against the float64 reference over its cache's read-back; raises on
    failure. ``vs_full_precision``: the output's distance from attention over the unquantized K/V."""
    case = make_case(s, chunks, ctxs, seed=11)
    full = reference(case, torch.stack([case.k, case.v]), sequence_index(ctxs, s.device), s.d**-0.5)
    rows = []
    for spec in SPECS:
        st, built = build(spec, s, case, seed=12)
        out = built.run()
        row = {"spec": spec, "dtype": str(s.dtype), "heads": [s.hq, s.hkv, s.d], "block_size": st.block_size,
               "rel_err": rel_err(out, reference(case, built.read_back(), built.index, s.d**-0.5)),
               "vs_full_precision": rel_err(out, full), "nan": bool(out.isnan().any())}
        rows.append(row)
        print(row, flush=True)
        if row["nan"] or not row["rel_err"] < s.tol:
            raise SystemExit(f"{spec}'s prefill kernel disagrees with the reference: {row}")
    return rows


def device_us(fn: Callable[[], object], s: Setting) -> float:
    """Device microseconds per launch from CUDA-graph replays; on the CPU (``--tiny``) wall clock."""
    if s.device.type == "cuda":
        return graph_us([fn])
    return 1e3 * statistics.median(timed_ms(fn, s.device, warmup=1, repeats=2))


def measure_shape(s: Setting, batch: int, n: int, ctx: int) -> dict:
    case = make_case(s, [n] * batch, [ctx] * batch, seed=batch * 7 + n + ctx)
    row: dict = {"batch": batch, "n": n, "ctx": ctx, "flops": flops(batch, n, ctx, s.hq, s.d), "formats": {}}
    for spec in SPECS:
        st, built = build(spec, s, case, seed=batch + n)
        us = device_us(built.run, s)
        row["formats"][spec] = {"block_size": st.block_size, "ms": us / 1e3, "tflops": row["flops"] / us / 1e6,
                                "kv_bytes": batch * st.decode_read_bytes(ctx)}
        del st, built
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    base = row["formats"][BASELINE]
    for f in row["formats"].values():
        f["vs_paged"] = f["ms"] / base["ms"]
        f["kv_vs_paged"] = f["kv_bytes"] / base["kv_bytes"]
    return row


def short(spec: str) -> str:
    return spec.removeprefix("quant:dtype=")


def span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"


def conclusion(result: dict) -> str:
    """One line from the data: each format's time and KV bytes against paged's, over the rows."""
    rows = result["results"]
    parts = [f"{short(spec)} at {span([r['formats'][spec]['vs_paged'] for r in rows])} paged's time "
             f"(reading {span([r['formats'][spec]['kv_vs_paged'] for r in rows])} its KV bytes)"
             for spec in SPECS if spec != BASELINE]
    return (f"Quantized-KV prefill against bf16 paged over {len(rows)} shapes: " + "; ".join(parts) + ".")


def write_report(out: Path, result: dict) -> None:
    s = result["setting"]
    quant = [spec for spec in SPECS if spec != BASELINE]
    names = [short(spec) for spec in SPECS]
    lines = [
        "# Prefill attention over quantized KV (fp8, KIVI int8/int4) vs bf16 paged (Triton)", "",
        f"**{conclusion(result)}**", "",
        env_line(result["environment"]),
        f"Heads Hq {s['hq']}, Hkv {s['hkv']}, D {s['d']}, q in {s['dtype']}. Caches are the strategies' own "
        "(`paged`, `quant:dtype=fp8|int8|int4` at their defaults: block size "
        + ", ".join(f"{short(k)} {v}" for k, v in result["block_sizes"].items())
        + "; fp8 scales per tensor; KIVI value group min(32, D)), the same random K/V written through each "
        "cache's writer, blocks a random permutation of the pool. Each row: `batch` sequences with a chunk of "
        "`n` new tokens at context `T`.",
        f"Times: device time per launch, median over replays of a CUDA graph of {CALLS} launches (--tiny: wall "
        "clock). TFLOP/s counts 4 D Hq FLOPs per visible (query, key) pair for every format; bf16 matmul in this "
        f"run: {result['matmul']['tflop_per_s']:.0f} TFLOP/s. KV MB: each cached token's K/V read once, with "
        "scales, zeros and residual rows (the strategy's `decode_read_bytes`).",
        "",
        "| batch | n | T | GFLOP | " + " | ".join(f"{x} ms" for x in names) + " | "
        + " | ".join(f"{short(q)} / paged" for q in quant) + " |",
        "|---:|---:|---:|---:|" + "---:|" * (len(SPECS) + len(quant)),
    ]
    for r in result["results"]:
        f = r["formats"]
        lines.append(f"| {r['batch']} | {r['n']} | {r['ctx']} | {r['flops'] / 1e9:.1f} | "
                     + " | ".join(f"{f[spec]['ms']:.3f}" for spec in SPECS) + " | "
                     + " | ".join(f"{f[spec]['vs_paged']:.2f}" for spec in quant) + " |")
    lines += ["", "| batch | n | T | " + " | ".join(f"{x} TFLOP/s" for x in names) + " | "
              + " | ".join(f"{x} KV MB" for x in names) + " |",
              "|---:|---:|---:|" + "---:|" * (2 * len(SPECS))]
    for r in result["results"]:
        f = r["formats"]
        lines.append(f"| {r['batch']} | {r['n']} | {r['ctx']} | "
                     + " | ".join(f"{f[spec]['tflops']:.1f}" for spec in SPECS) + " | "
                     + " | ".join(f"{f[spec]['kv_bytes'] / 1e6:.1f}" for spec in SPECS) + " |")
    chunks, ctxs = result["check_batch"]
    lines += ["", f"Correctness (before timing; chunks {chunks} at contexts {ctxs}, relative error against a float64 "
              f"reference over the cache's own dequantized K/V, bound {s['tol']:.0e}; and against attention over the "
              "unquantized K/V, recorded):", ""]
    lines += [f"- `{c['spec']}`: {c['rel_err']:.1e}; vs full precision {c['vs_full_precision']:.1e}"
              for c in result["correctness"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_prefill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def save_json(out: Path, result: dict) -> None:
    """The results so far (after every row, so that a cut-off run keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_prefill.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="tiny heads on the CPU under TRITON_INTERPRET=1 (smoke test)")
    args = ap.parse_args()
    if args.tiny and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--tiny runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    s = TINY if args.tiny else FULL
    check = TINY_CHECK if args.tiny else CHECK_BATCH
    env = bench_environment(s.device)
    print(env_line(env), flush=True)
    result = {"benchmark": "quant_prefill", "environment": env, "check_batch": check,
              "setting": {"hq": s.hq, "hkv": s.hkv, "d": s.d, "dtype": str(s.dtype), "tol": s.tol},
              "correctness": check_correctness(s, *check)}
    result["block_sizes"] = {c["spec"]: c["block_size"] for c in result["correctness"]}
    print("every kernel correct", flush=True)
    result["matmul"] = matmul_ceiling(s.device)
    result["results"] = []
    for batch, n, ctx in TINY_SHAPES if args.tiny else SHAPES:
        row = measure_shape(s, batch, n, ctx)
        result["results"].append(row)
        print(json.dumps(row), flush=True)
        save_json(args.out, result)
    result["conclusion"] = conclusion(result)
    save_json(args.out, result)
    write_report(args.out, result)


if __name__ == "__main__":
    main()
