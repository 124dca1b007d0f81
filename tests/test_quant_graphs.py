"""Captured decode steps of ``quant``'s KIVI dtypes (``int8``/``int4``) against the eager steps.

Two levels, both through Triton's interpreter in one child process (``TRITON_INTERPRET=1`` must be
set before triton is first imported; see tests/test_triton_decode.py):

* the write: :func:`~kvscope.attention.triton_kivi_write.kivi_write` and the eager
  :meth:`KiviCache.write` given the same new tokens, step after step across group boundaries, rows
  of different lengths and a padding row, leave bit-identical codes, scales, zeros and residuals;
* the engine: an engine whose decode steps run :class:`~kvscope.kv.quant_graphs.KiviGraphs`' static
  steps through ``GraphRunner(capture=False)`` gives the eager engine's greedy tokens and logits
  (to float rounding: the static steps' split count differs) and the same codes and scales.

Plus, without the interpreter: which configurations get graph steps, the torch codec's scale
division (IEEE on every device), and the write kernel compiled for an H100 (sm_90), whose
divisions are IEEE's too.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NAMES = ("kq", "vq", "k_scale", "k_zero", "v_scale", "v_zero", "residual")
# (bits, group_size, head_dim, kv heads, dtype): value groups of 32 and 64 channels, and of 16 (head_dim < G).
WRITES = [(4, 32, 32, 2, "float32"), (4, 64, 64, 2, "float32"), (8, 32, 32, 2, "float32"),
          (8, 64, 128, 1, "bfloat16"), (4, 32, 16, 2, "float16")]
ENGINES = ["quant:dtype=int4", "quant:dtype=int4,group_size=64", "quant:dtype=int8"]


def _cache(bits: int, G: int, D: int, H: int, dtype: torch.dtype, blocks: int, slots: int, device: str = "cpu"):
    from kvscope.kv.quant_cache import KiviCache
    from kvscope.models.config import ModelConfig

    m = ModelConfig(arch="llama", vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=2, num_heads=H,
                    num_kv_heads=H, head_dim=D, max_position_embeddings=512)
    return KiviCache(m, blocks, G, slots, torch.device(device), dtype, bits, min(G, D))


def write_sequence(bits: int, G: int, D: int, H: int, dtype_name: str, seed: int, device: str = "cpu") -> dict:
    """Three rows (starting 3 and 2 tokens before a group's end, and 5 into one) and a padding row
    write ``G + 3`` decode tokens each, through both writes; the first step whose storage differs."""
    from kvscope.attention.triton_kivi_write import kivi_write

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    static = _cache(bits, G, D, H, dtype, 16, 4, device)
    # Earlier tokens; only the rows' own offsets are ever read.
    static.residual.copy_(torch.randn(static.residual.shape, generator=gen))
    eager = copy.deepcopy(static)
    order = torch.randperm(16, generator=gen).tolist()
    tables, done, res = [order[0:4], order[4:8], order[8:12]], [G - 3, 2 * G - 2, 5], [2, 0, 3]
    filled = 0
    for step in range(G + 3):
        # Half the channels as multiples of 0.5 in [0, 15]: int4 groups spanning exactly 0..15 get
        # scale 1, so their codes hit exact halves, where rounding must go to even as torch.round does.
        k, v = (torch.randn(4, H, D, generator=gen) * 3 for _ in range(2))
        for x in (k, v):
            x[..., : D // 2] = torch.randint(0, 31, (4, H, D // 2), generator=gen) / 2
        k, v = k.to(device, dtype), v.to(device, dtype)
        plan = eager.plan(tables, done, [1, 1, 1], res, torch.device(device))
        eager.write(1, k[:3], v[:3], plan)
        filled += plan.done_blocks.numel()
        slots = torch.tensor([t[d // G] * G + d % G for t, d in zip(tables, done)] + [-1], dtype=torch.int32,
                             device=device)
        kivi_write(k, v, static, 1, slots, torch.tensor(res + [1], dtype=torch.int32, device=device))
        diff = [n for n in NAMES if not torch.equal(getattr(static, n), getattr(eager, n))]
        if diff:
            return {"first_diff": [step, diff], "filled": filled}
        done = [d + 1 for d in done]
    return {"first_diff": None, "filled": filled, "layer0_untouched": not static.kq[0].any().item()}


def ties() -> dict:
    """One int4 group completed by its new token, two key channels at rounding ties: channel 0
    spans 0..15 (scale 1, zero 0) with values at halves; channel 1 spans 0..34.2919921875, whose
    scale 34.2919921875 / 15 = 2.2861328125 lies midway between two float16 values."""
    from kvscope.attention.triton_kivi_write import kivi_write
    from kvscope.kv.quant_codec import unpack_int4

    c = _cache(4, 32, 16, 1, torch.float32, 2, 1)
    c.residual[1, :, 0, :31, 0, 0] = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.5, 14.5] + [7.0] * 25)
    k = torch.zeros(1, 1, 16)
    k[0, 0, :2] = torch.tensor([15.0, 34.2919921875])
    kivi_write(k, torch.zeros(1, 1, 16), c, 1, torch.tensor([1 * 32 + 31], dtype=torch.int32),
               torch.tensor([0], dtype=torch.int32))
    return {"codes": unpack_int4(c.kq[1, 1, :, 0])[[0, 1, 2, 3, 4, 5, 31], 0].tolist(),
            "scale": c.k_scale[1, 1, 0, 1].item()}


def engine_runs(path: str) -> dict:
    """Per spec of ``ENGINES``: an eager engine and one on static steps, the same greedy requests."""
    from hf_ref import make_tiny_checkpoint

    from kvscope import LLM, SamplingParams
    from kvscope.attention import decode_splits
    from kvscope.engine.cuda_graph import GraphRunner
    from kvscope.kv.quant_graphs import KiviGraphs

    # Split these short contexts as long ones split on a GPU: eager steps then choose their split
    # count from the step's widest table, static steps from max_model_len, so the two paths differ.
    decode_splits._PROGRAMS_PER_SM, decode_splits._MIN_SPLIT_TOKENS = 64, 16
    make_tiny_checkpoint("llama", path)
    # Decode positions 28..36, 59..65, 45..55: the first completes its group at 31 (G=32), the
    # second at 63 (both G), while the others do not; three rows in bucket 4 (a padding row), then 2 and 1.
    prompts = [[5 + i for i in range(n)] for n in (28, 59, 45)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True) for n in (10, 8, 12)]
    out = {}
    for spec in ENGINES:
        kw = {"strategy": spec, "kv_memory_bytes": 4 << 20, "max_model_len": 128, "attention_backend": "triton"}
        eager_llm = LLM(path, **kw)
        eager = eager_llm.generate(prompts, params, use_tqdm=False)
        llm = LLM(path, **kw)
        e = llm.engine
        graphs = KiviGraphs(e.kv, [1, 2, 4], 128, e.config.torch_device)
        buckets, load = [], graphs.load

        def record(batch, size, load=load, buckets=buckets):
            buckets.append([len(batch.requests), size])
            load(batch, size)

        graphs.load = record
        e.runner.graphs = GraphRunner(e.model, graphs, e.config.torch_device, capture=False)
        static = llm.generate(prompts, params, use_tqdm=False)
        rel = max(((torch.stack(a.outputs[0].logits) - torch.stack(b.outputs[0].logits)).abs().max()
                   / torch.stack(b.outputs[0].logits).abs().max()).item() for a, b in zip(static, eager))
        ce, cs = eager_llm.engine.kv.cache, e.kv.cache
        out[spec] = {
            "eager": [o.token_ids for o in eager], "static": [o.token_ids for o in static], "rel": rel,
            "buckets": buckets, "replays": e.runner.graph_replays,
            "same": [n for n in NAMES[:-1] if torch.equal(getattr(ce, n), getattr(cs, n))],
            # The new tokens' K/V come from projections of 4 rows instead of 3: equal up to rounding.
            "residual_diff": (ce.residual - cs.residual).abs().max().item(),
            "splits": {s: step.attention.num_splits for s, (step, _) in e.runner.graphs._steps.items()},
            "freed": e.kv.stats()["kv_bytes_used"] == 0}
    return out


def _child_main(path: str) -> None:
    """Entry point of the interpreter process: one JSON line with every result."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    out: dict = {"ties": ties(), "engine": engine_runs(path)}
    out["write"] = {"-".join(map(str, case)): write_sequence(*case, seed=i) for i, case in enumerate(WRITES)}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreted(triton_interpreter, tmp_path_factory) -> dict:
    here = Path(__file__)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(here.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    code = f"import {here.stem} as t; t._child_main({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rounding_goes_half_to_even(interpreted):
    # Codes (x - 0) / 1 rounded half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4, 14.5 -> 14.
    assert interpreted["ties"]["codes"] == [0, 0, 2, 2, 4, 14, 15]
    # The scale, divided exactly (a float32 reciprocal's product lands above the midpoint), then
    # to float16's even neighbour: 2.28515625 = 1170 / 512, not 2.287109375 = 1171 / 512.
    assert interpreted["ties"]["scale"] == 2.28515625


@pytest.mark.parametrize("case", WRITES, ids=["-".join(map(str, c)) for c in WRITES])
def test_static_write_is_the_eager_write_bit_for_bit(interpreted, case):
    res = interpreted["write"]["-".join(map(str, case))]
    assert res["first_diff"] is None, res
    # Every row completed a group, the first two twice over G + 3 steps: 5 quantized blocks; no
    # write reached another layer.
    assert res["filled"] == 5 and res["layer0_untouched"]


@pytest.mark.parametrize("spec", ENGINES)
def test_static_steps_equal_eager_steps(interpreted, spec):
    res = interpreted["engine"][spec]
    assert res["static"] == res["eager"] and [len(t) for t in res["eager"]] == [10, 8, 12]
    assert res["rel"] < 1e-5, res["rel"]  # float32 logits, different split counts
    assert res["same"] == list(NAMES[:-1]) and res["residual_diff"] < 1e-5
    # One prefill step, then every decode step on a static step: 3 rows x 7, 2 x 2, 1 x 2.
    assert res["buckets"] == [[3, 4]] * 7 + [[2, 2]] * 2 + [[1, 1]] * 2 and res["replays"] == 11
    assert res["splits"]["4"] > 1 and res["freed"]


def test_quant_graph_steps_need_the_triton_backend():
    """Every dtype has graph steps on the Triton backend (KIVI's with the residual slots); the
    torch backend keeps every step eager."""
    from kvscope.kv import registry
    from kvscope.kv.base import KVSetup
    from kvscope.kv.quant_graphs import KiviGraphs
    from kvscope.models.config import ModelConfig

    model = ModelConfig(arch="llama", vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=1,
                        num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    for spec in ("quant:dtype=fp8", "quant:dtype=int8", "quant:dtype=int4,group_size=64"):
        for backend in ("triton", "torch"):
            s = registry.create(spec)
            s.bind(KVSetup(model, torch.device("cpu"), torch.float32, 1 << 20, 256, 4, 0, attention_backend=backend,
                           cuda_graph_sizes=[1, 2, 4]))
            graphs = s.decode_graphs()
            assert (graphs is not None) == (backend == "triton"), (spec, backend)
            assert isinstance(graphs, KiviGraphs) == (backend == "triton" and "fp8" not in spec)
            assert s.facts().graph_decode
            if backend == "triton":  # fp8 replays once a prefill has calibrated every layer; KIVI at once
                assert s.graph_ready(None) == ("fp8" not in spec)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_codec_divides_exactly_on_every_device(device):
    """The torch codec's scale at the same midpoint: IEEE division on CUDA as on the CPU (torch
    would multiply by a Python divisor's float32 reciprocal there and round up)."""
    from kvscope.kv.quant_codec import int_quantize

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.zeros(32, 1, device=device)
    x[-1] = 34.2919921875
    assert int_quantize(x, 4, dim=0)[1].item() == 2.28515625


def test_write_kernel_compiles_for_sm90_with_ieee_division():
    """Compiled for an H100 (no GPU needed): the divisions are ``div.rn.f32`` (IEEE, as the torch
    codec's tensor division on CUDA), none approximate, so the codes are the eager path's there too."""
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend")
    from kvscope.attention.triton_kivi_write import _kivi_write_kernel

    const = {"G": 32, "D": 128, "BITS": 4, "VG": 32}
    ptrs = {"k_ptr": "*bf16", "v_ptr": "*bf16", "slots_ptr": "*i32", "res_slots_ptr": "*i32", "res_ptr": "*bf16",
            "kq_ptr": "*u8", "vq_ptr": "*u8"}
    sig = {n: "constexpr" if n in const else ptrs.get(n, "*fp16" if n.endswith("_ptr") else "i32")
           for n in _kivi_write_kernel.arg_names}
    ptx = triton.compile(ASTSource(fn=_kivi_write_kernel, signature=sig, constexprs=const),
                         target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", WRITES, ids=["-".join(map(str, c)) for c in WRITES])
def test_static_write_is_the_eager_write_bit_for_bit_on_cuda(case):
    """The compiled kernel against the torch codec on the GPU: what the interpreter cannot show."""
    res = write_sequence(*case, seed=7, device="cuda")
    assert res["first_diff"] is None and res["filled"] == 5, res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ENGINES)
def test_kivi_graphs_equal_eager_on_cuda(tmp_path, spec):
    """KIVI decode steps replayed from CUDA graphs give the eager steps' tokens and float32 logits
    (split counts differ, hence the tolerance)."""
    import random

    from hf_ref import make_tiny_checkpoint

    from kvscope import LLM, SamplingParams

    path = tmp_path / "llama"
    make_tiny_checkpoint("llama", path)
    rng = random.Random(6)
    prompts = [[rng.randrange(4, 256) for _ in range(n)] for n in (5, 30, 33, 1, 64, 60)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, return_logits=True)
              for n in (40, 7, 13, 20, 3, 11)]
    runs = {}
    for eager in (True, False):
        llm = LLM(str(path), device="cuda", strategy=spec, attention_backend="triton", enforce_eager=eager,
                  kv_memory_bytes=8 << 20, max_model_len=256, max_num_seqs=8)
        runs[eager] = llm.generate(prompts, params, use_tqdm=False)
        replays = llm.engine.stats()["cuda_graph_replays"]
        assert (replays == 0) if eager else (replays >= 39), replays
    assert [o.token_ids for o in runs[False]] == [o.token_ids for o in runs[True]]
    for a, b in zip(runs[False], runs[True]):
        x, y = torch.stack(a.outputs[0].logits), torch.stack(b.outputs[0].logits)
        assert torch.allclose(x, y, atol=1e-4, rtol=0), (x - y).abs().max()
