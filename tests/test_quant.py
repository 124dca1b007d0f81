"""``quant``: the stored codes dequantize to what an independent quantizer gives, attention stays
within the quantization error, the pool holds 2-3.5x paged's tokens, and the engine serves it."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope import LLM, SamplingParams
from kvscope.attention.torch_ref import attend_causal
from kvscope.errors import ConfigError, RequestError
from kvscope.kv import registry
from kvscope.kv.base import KVSetup, StepBatch
from kvscope.kv.quant_codec import int_dequantize, int_quantize, pack_int4, unpack_int4
from kvscope.models.config import ModelConfig
from kvscope.request import Request
from kvscope.sampling_params import SamplingParams as SP

F16 = torch.float16


# ---- independent reference quantizers (loops over the groups, no shared code) ---------------------------
def ref_group(x: torch.Tensor, bits: int) -> torch.Tensor:
    """One group ``x`` (any shape) quantized asymmetrically and dequantized: float16 scale = range /
    levels, float16 zero = min, codes rounded with the stored scale/zero and clamped."""
    levels = 2**bits - 1
    lo, hi = float(x.min()), float(x.max())
    s = float(torch.tensor(max((hi - lo) / levels, 2.0**-14), dtype=torch.float32).to(F16))
    z = float(torch.tensor(lo, dtype=torch.float32).to(F16))
    q = torch.clamp(torch.round((x.float() - torch.tensor(z)) / torch.tensor(s)), 0, levels)
    return q * torch.tensor(s, dtype=torch.float32) + torch.tensor(z, dtype=torch.float32)


def ref_kivi(k: torch.Tensor, v: torch.Tensor, bits: int, vgroup: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G, H, D]`` block: keys per (head, channel) over the G tokens; values per (token, head,
    channel group)."""
    kd, vd = torch.empty_like(k, dtype=torch.float32), torch.empty_like(v, dtype=torch.float32)
    G, H, D = k.shape
    for h in range(H):
        for c in range(D):
            kd[:, h, c] = ref_group(k[:, h, c], bits)
        for t in range(G):
            for g in range(0, D, vgroup):
                vd[t, h, g : g + vgroup] = ref_group(v[t, h, g : g + vgroup], bits)
    return kd, vd


def ref_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, H, D]`` through float8_e4m3fn at per-head ``scale`` ``[H]``."""
    out = torch.empty_like(x, dtype=torch.float32)
    for h in range(x.shape[1]):
        y = torch.clamp(x[:, h].float() / scale[h], -448.0, 448.0)
        out[:, h] = y.to(torch.float8_e4m3fn).to(torch.float32) * scale[h]
    return out


# ---- a tiny model and a strategy driven step by step -------------------------------------------------------
MODEL = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=512)


def bound(spec: str, model: ModelConfig = MODEL, kv_memory: int = 1 << 20, max_num_seqs: int = 4):
    s = registry.create(spec)
    s.bind(KVSetup(model, torch.device("cpu"), torch.float32, kv_memory, 512, max_num_seqs, 0))
    return s


def drive(strategy, lengths: list[int], chunks: list[list[int]], seed: int = 0):
    """Write random K/V for requests of ``lengths`` in steps (``chunks[i]``: request i's new tokens
    per step, 0 = not scheduled) and return per request the K/V written ``[L][2, T, H, D]`` and the
    last step's (q, output, plan tables) per layer."""
    gen = torch.Generator().manual_seed(seed)
    L, H, D = MODEL.num_layers, MODEL.num_kv_heads, MODEL.head_dim
    reqs = [Request(f"r{i}", [1] * n, SP(max_tokens=1)) for i, n in enumerate(lengths)]
    chunks_of = [[[] for _ in range(L)] for _ in reqs]  # per request and layer, [2, n, H, D] pieces
    last = None
    for step in range(len(chunks[0])):
        active = [i for i in range(len(reqs)) if chunks[i][step]]
        batch_reqs = [reqs[i] for i in active]
        news = [chunks[i][step] for i in active]
        for r, n in zip(batch_reqs, news):
            assert strategy.allocate(r, r.num_computed_tokens + n)
        qs = [0]
        for n in news:
            qs.append(qs[-1] + n)
        batch = StepBatch(batch_reqs, news, torch.zeros(qs[-1], dtype=torch.long),
                          torch.zeros(qs[-1], dtype=torch.long), qs)
        attn = strategy.begin_step(batch)
        last = []
        for layer in range(L):
            k = torch.randn(qs[-1], H, D, generator=gen) * 2 + 0.5
            v = torch.randn(qs[-1], H, D, generator=gen)
            q = torch.randn(qs[-1], MODEL.num_heads, D, generator=gen)
            out = attn.attend(layer, q, k, v)
            for j, i in enumerate(active):
                chunks_of[i][layer].append(torch.stack([k[qs[j] : qs[j + 1]], v[qs[j] : qs[j + 1]]]))
            last.append((q, out, [(i, qs[j], qs[j + 1]) for j, i in enumerate(active)]))
        for r, n in zip(batch_reqs, news):
            r.num_computed_tokens += n
        strategy.end_step(batch)
    written = [torch.stack([torch.cat(pieces, dim=1) for pieces in per_layer]) for per_layer in chunks_of]
    return reqs, written, last


def expected_kv(strategy, kv: torch.Tensor, layer: int) -> torch.Tensor:
    """What the reference quantizers make of one request's written K/V ``[2, T, H, D]``."""
    out = kv.clone()
    if strategy.kivi:
        G = strategy.block_size
        for b in range(kv.shape[1] // G):
            sl = slice(b * G, (b + 1) * G)
            out[0, sl], out[1, sl] = ref_kivi(kv[0, sl], kv[1, sl], strategy.bits, strategy.value_group)
        return out
    scale = strategy.cache.scale[layer]
    return torch.stack([ref_fp8(kv[0], scale[0]), ref_fp8(kv[1], scale[1])])


SPECS = ["quant:dtype=fp8", "quant:dtype=fp8,scale=head", "quant:dtype=int8", "quant:dtype=int4",
         "quant:dtype=int8,group_size=64", "quant:dtype=int4,group_size=64"]
# Three requests, chunked prefills that straddle blocks, then decode steps across a block boundary.
LENGTHS = [70, 45, 33]
CHUNKS = [[40, 30, 1, 1, 1, 1], [0, 45, 1, 1, 1, 1], [33, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("spec", SPECS)
def test_stored_kv_dequantizes_to_the_reference_quantizer_exactly(spec):
    s = bound(spec)
    reqs, written, _ = drive(s, LENGTHS, CHUNKS)
    for r, kv in zip(reqs, written):
        t = r.num_computed_tokens
        plan = s.cache.plan([s.tables[r.request_id]], [0], [t],
                            *([[s._res_of[r.request_id]]] if s.kivi else []), torch.device("cpu"))
        for layer in range(MODEL.num_layers):
            got = s.cache.gather(layer, plan)[:, plan.tables[0]]
            torch.testing.assert_close(got, expected_kv(s, kv[layer], layer), rtol=0, atol=0)
    if s.kivi:  # the residual holds the tail: fewer than a group per request, bit-exact
        assert s.stats()["residual_tokens"] == sum(r.num_computed_tokens % s.block_size for r in reqs)
    else:  # calibrated on the first write: vLLM's amax / 200 (K) and amax / 100 (V)
        k0 = written[0][0, 0, :40]
        k2 = written[2][0, 0, :33]
        amax = torch.cat([k0, k2]).abs().amax(dim=(0, 2))
        want = amax / 200 if "head" in spec else amax.max().expand(2) / 200
        torch.testing.assert_close(s.cache.scale[0, 0], want)


@pytest.mark.parametrize("spec", SPECS)
def test_attention_is_within_the_quantization_error(spec):
    """|out - exact| <= max|dV| + (exp(2 delta) - 1) max|V|, delta = scale x max_t |q . dK_t|:
    logits moved by at most delta change each probability by a factor within exp(+-2 delta)."""
    s = bound(spec)
    _, written, last = drive(s, LENGTHS, CHUNKS, seed=1)
    G = MODEL.num_heads // MODEL.num_kv_heads
    for layer, (q, out, rows) in enumerate(last):
        for i, a, b in rows:
            kv = written[i][layer]
            deq = expected_kv(s, kv, layer)
            exact = attend_causal(q[a:b], kv[0], kv[1], s.scale)
            for h in range(MODEL.num_heads):
                dk, dv = (deq - kv)[0, :, h // G], (deq - kv)[1, :, h // G]
                delta = s.scale * (q[a:b, h] @ dk.T).abs().max()
                limit = dv.abs().max() + math.expm1(2 * float(delta)) * kv[1, :, h // G].abs().max()
                err = (out[a:b, h] - exact[:, h]).abs().max()
                assert err <= limit + 1e-5
                assert err > 0 or float(delta) == 0  # quantized: not the exact result


def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert pack_int4(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 6)),
       bits=st.sampled_from([4, 8]), mag=st.floats(1e-3, 1e3), offset=st.floats(-100, 100))
def test_int_quantizer_error_bound(seed, shape, bits, mag, offset):
    """|x - x'| <= scale / 2 + float16 rounding of the zero and of the range (2^-11 relative each)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * mag + offset
    x = x.float()
    codes, scale, zero = int_quantize(x, bits, dim=1)
    assert int(codes.max()) <= 2**bits - 1
    err = (int_dequantize(codes, scale, zero) - x).abs()
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    limit = scale.float() / 2 + lo.abs() * 2**-11 + (hi - lo) * 2**-10 + 1e-6 * (1 + x.abs().amax())
    assert bool((err <= limit).all())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mag=st.floats(1e-2, 1e3))
def test_fp8_error_bound(seed, mag):
    """Within the calibrated range, e4m3 keeps 3 mantissa bits: relative error 2^-4, or 2^-10 x
    scale below its normal range."""
    from kvscope.kv.quant_codec import FP8_K_RANGE, fp8_dequantize, fp8_quantize, fp8_scale

    x = torch.randn(7, 2, 8, generator=torch.Generator().manual_seed(seed)) * mag
    scale = fp8_scale(x, FP8_K_RANGE, per_head=True)[:, None]
    err = (fp8_dequantize(fp8_quantize(x, scale), scale) - x).abs()
    assert bool((err <= x.abs() * 2**-4 + 2**-10 * scale + 1e-7).all())


# ---- capacity: the byte accounting, by hand -----------------------------------------------------------------
SMOL = ModelConfig(arch="llama", vocab_size=64, hidden_size=576, intermediate_size=64, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64, max_position_embeddings=4096)  # SmolLM2-135M's KV shapes


@pytest.mark.parametrize("spec,bits,block,extra", [
    # fp8: 1 byte per element, 16-token blocks; fixed: float32 K and V scales per layer and head.
    ("quant:dtype=fp8", 8, 16, 30 * 2 * 3 * 4),
    # int8 G=32: codes + per block float16 key scale/zero (per channel) and value scale/zero (per
    # token, 2 groups of 32 channels); fixed: 2 residual slots of 32 tokens at 2 B/element.
    ("quant:dtype=int8,residual_slots=2", 8, 32, 2 * 32 * 30 * 2 * 3 * 64 * 2),
    ("quant:dtype=int4,residual_slots=2", 4, 32, 2 * 32 * 30 * 2 * 3 * 64 * 2),
    ("quant:dtype=int4,group_size=64,residual_slots=2", 4, 64, 2 * 64 * 30 * 2 * 3 * 64 * 2),
])
def test_pool_holds_more_tokens_than_paged_for_the_same_memory(spec, bits, block, extra):
    mem = 64 << 20
    setup = KVSetup(SMOL, torch.device("cpu"), torch.bfloat16, mem, 4096, 2, 0)
    paged = registry.create("paged")
    paged.bind(setup)
    paged_tokens = paged.stats()["num_blocks"] * 16
    assert paged_tokens == mem // (30 * 2 * 3 * 64 * 2 * 16) * 16  # 2 bytes per element
    s = registry.create(spec)
    s.bind(setup)
    L, H, D = 30, 3, 64
    per_block = L * (2 * block * H * D * bits // 8)
    if bits == 4 or "int8" in spec:
        per_block += L * (2 * 2 * H * D + 2 * 2 * block * H * (D // block))
    want = (mem - extra) // per_block * block
    st_ = s.stats()
    assert st_["tokens_capacity"] == want and st_["bytes_per_token"] == per_block / block
    assert st_["kv_bytes_reserved"] == want // block * per_block + extra <= mem
    # The memory is real: the cache's tensors are exactly what the accounting reserves.
    tensors = [t for t in vars(s.cache).values() if isinstance(t, torch.Tensor)]
    assert sum(t.numel() * t.element_size() for t in tensors) == st_["kv_bytes_reserved"]
    ratio = want / paged_tokens
    print(f"{spec}: {want} tokens vs paged {paged_tokens} ({ratio:.2f}x), {st_['kv_bits']} bits/element")
    # 16 / kv_bits more tokens in what the fixed bytes leave, to within the last block's rounding.
    assert ratio == pytest.approx(16 / st_["kv_bits"] * (mem - extra) / mem, rel=5e-3)
    assert ratio > {"fp8": 1.99, "int8": 1.7, "int4": 3.0}[spec.split("=")[1].split(",")[0]]
    assert st_["kv_bits"] == (8 if "fp8" in spec else bits + (32 / block + 32 / min(block, 64)) / 2)


# ---- facts, arguments, the engine ---------------------------------------------------------------------------
def test_facts():
    for spec, bits in [("quant:dtype=fp8", 8.0), ("quant:dtype=int8", 9.0), ("quant:dtype=int4", 5.0),
                       ("quant:dtype=int4,group_size=64", 4.5)]:
        f = registry.facts(spec)
        assert not f.lossless and f.kept_share == 1.0 and f.kv_bits == bits and f.pool_independent
        # Every dtype's decode steps are captured (tests/test_graph_runner.py, tests/test_quant_graphs.py).
        assert f.graph_decode and f.residence == "device" and f.long_child  # adopt: tests/test_quant_long_child.py
    assert registry.available()["quant"].args_for_share(0.2) is None


@pytest.mark.parametrize("spec,arg", [("quant:dtype=int2", "dtype"), ("quant:dtype=int4,group_size=16", "group_size"),
                                      ("quant:dtype=int8,scale=head", "scale"), ("quant:dtype=fp8,scale=row", "scale"),
                                      ("quant:dtype=fp8,group_size=32", "group_size"),
                                      ("quant:dtype=int8,residual_slots=0", "residual_slots")])
def test_bad_arguments_name_the_argument(spec, arg):
    with pytest.raises(ConfigError, match=arg):
        registry.create(spec)


PROMPTS = [[(7 * i + j) % 200 + 4 for j in range(40 + 9 * i)] for i in range(3)]


@pytest.mark.parametrize("spec", ["quant:dtype=fp8", "quant:dtype=int8", "quant:dtype=int4,residual_slots=1"])
def test_serves_through_the_engine_and_frees_its_blocks(spec):
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = LLM("dummy:tiny-llama", strategy="paged", kv_memory_bytes=1 << 20).generate(PROMPTS, sp, use_tqdm=False)
    llm = LLM("dummy:tiny-llama", strategy=spec, kv_memory_bytes=1 << 20)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    same = sum(a == b for r, o in zip(ref, outs) for a, b in zip(r.outputs[0].token_ids, o.outputs[0].token_ids))
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs) and same >= 18  # of 36
    st_ = llm.engine.stats()
    assert st_["blocks_used"] == 0 and st_["kv_bytes_allocated"] == 0
    with pytest.raises(RequestError, match="fork"):  # declared unsupported
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, n=2), use_tqdm=False)


@pytest.mark.slow
def test_fp8_agrees_with_paged_on_smollm2(smollm2):
    """SmolLM2 under fp8 KV against paged: teacher-forced on paged's greedy text, the share of
    positions whose greedy choice is paged's token (free-running texts diverge for good after one
    different token, so their common prefix is printed, not judged)."""
    from kvscope.bench.quality import agreement

    tok = smollm2.tokenizer
    prompts = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):\n    ",
                                       "Water boils at", "The three primary colors are")]
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    kw = dict(device="cpu", dtype="float32", kv_memory_bytes=64 << 20)
    ref = LLM(model="smollm2-135m", strategy="paged", **kw).generate(prompts, sp, use_tqdm=False)
    llm = LLM(model="smollm2-135m", strategy="quant:dtype=fp8", **kw)
    free = agreement(ref, llm.generate(prompts, sp, use_tqdm=False))
    forced = [SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, return_logits=True,
                             forced_token_ids=list(r.outputs[0].token_ids)) for r in ref]
    outs = llm.generate(prompts, forced, use_tqdm=False)
    same = [int(row.argmax()) == t for o, r in zip(outs, ref)
            for row, t in zip(o.outputs[0].logits, r.outputs[0].token_ids)]
    share = sum(same) / len(same)
    print(f"fp8 vs paged on SmolLM2: teacher-forced agreement {sum(same)}/{len(same)} = {share:.1%}; free-running "
          f"first divergences {[p['first_divergence'] for p in free['per_request']]} of 32")
    assert len(same) == 32 * len(prompts) and share >= 0.85


def test_the_cost_model_sees_the_saving_through_kv_bits():
    from kvscope.advise import fixed_workload
    from kvscope.advise.cost_model import CostModel
    from kvscope.advise.hardware import H100
    from kvscope.advise.options import option_from_spec, resolve_model

    cm = CostModel(resolve_model("llama-3-8b"), H100, kv_memory=8 << 30)
    paged, fp8, int4 = (option_from_spec(s) for s in ("paged", "quant:dtype=fp8", "quant:dtype=int4"))
    assert fp8.budget_ratio is None and not fp8.evicts  # keeps every token: not an eviction
    per_token = 2 * 32 * 8 * 128 * 2  # Llama-3-8B, bfloat16
    assert cm.pool_tokens(paged) == (8 << 30) // per_token
    assert cm.pool_tokens(fp8) == (8 << 30) // (per_token // 2)
    assert cm.pool_tokens(int4) == int((8 << 30) // (per_token * 5 / 16))
    work = fixed_workload(1024, 64, rate=4.0)
    pred, full = cm.predict(int4, work), cm.predict(paged, work)
    assert pred.feasible and pred.quality.source == "unknown"  # lossy, not measured: never called lossless
    assert cm.token_bytes(int4) == per_token * 5 / 16 and cm.token_bytes(paged) == per_token
    assert full.max_concurrent < pred.max_concurrent or full.max_concurrent == cm.limits.max_num_seqs


def test_the_report_does_not_take_a_quantized_cache_for_full_kv():
    from kvscope.report.names import display_names, is_full_kv

    assert is_full_kv("paged") and not is_full_kv("quant:dtype=fp8") and not is_full_kv("quant:dtype=int4")
    names = display_names(["quant:dtype=fp8", "quant:dtype=int4"])
    assert len(set(names.values())) == 2  # told apart by their arguments
