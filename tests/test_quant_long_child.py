"""``quant`` as ``adaptive``'s long child: a running request handed over under pressure is
quantized into quant's own pool (:meth:`QuantStrategy.adopt`) exactly as the reference quantizers
would store its K/V, and the engine serves it there instead of preempting it."""
from __future__ import annotations

import math

import pytest
import torch

from kvscope import LLM, SamplingParams
from kvscope.engine.request import Request
from kvscope.kv import registry
from kvscope.kv.adaptive import AdaptiveStrategy
from kvscope.kv.base import Adoption, Handover
from test_quant import MODEL, SPECS, bound, expected_kv


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("held", [45, 64, 5])
def test_adopted_kv_dequantizes_to_the_reference_quantizer_exactly(spec, held):
    """45 tokens: a full KIVI group and a residual; 64: whole groups only; 5: the residual alone."""
    s = bound(spec)
    gen = torch.Generator().manual_seed(held)
    kv = torch.randn(MODEL.num_layers, 2, held, MODEL.num_kv_heads, MODEL.head_dim, generator=gen) * 2 + 0.3
    req = Request("r0", [1] * held, SamplingParams(max_tokens=4))
    req.num_computed_tokens = held
    assert s.adopt(Handover(req, held, [], lambda: kv)) is Adoption.COPIED
    assert len(s.tables["r0"]) == math.ceil(held / s.block_size)
    plan = s.cache.plan([s.tables["r0"]], [0], [held], *([[s._res_of["r0"]]] if s.kivi else []), torch.device("cpu"))
    for layer in range(MODEL.num_layers):
        got = s.cache.gather(layer, plan)[:, plan.tables[0]]
        torch.testing.assert_close(got, expected_kv(s, kv[layer], layer), rtol=0, atol=0)
    if s.kivi:
        assert s.stats()["residual_tokens"] == held % s.block_size
    s.free(req)
    assert s.pool.num_used == 0 and s.stats()["residual_slots"] == len(s._res_free)


@pytest.mark.parametrize("spec", ["quant:dtype=fp8", "quant:dtype=int8"])
def test_a_handover_the_pool_cannot_hold_is_refused_and_changes_nothing(spec):
    s = bound(spec, kv_memory=1 << 16)
    most = s.pool.num_blocks * s.block_size
    req = Request("big", [1] * (most + 1), SamplingParams(max_tokens=1))
    free = s.pool.num_free

    def never() -> torch.Tensor:
        raise AssertionError("a refused hand-over must not read the donor's K/V")

    assert s.adopt(Handover(req, most + 1, [], never)) is Adoption.REFUSED
    assert s.pool.num_free == free and "big" not in s.tables


def test_quant_is_a_long_child_without_a_budget():
    assert registry.facts("quant").long_child and "quant" in registry.long_children()
    a = AdaptiveStrategy(long="quant", long_args={"dtype": "int8"})
    assert a.long.kv_dtype == "int8" and a.long.block_size == 32  # its own KIVI groups, not adaptive's blocks
    with pytest.raises(Exception, match="no budget for long_budget_ratio"):
        AdaptiveStrategy(long="quant", long_budget_ratio=0.3)


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
def test_engine_quantizes_instead_of_preempting(dtype):
    """6 requests of 40 prompt tokens and 70 or 10 output tokens: the full child's share of the pool
    (240 tokens) runs out, so long-running requests move into quant's pool, at full length, and
    everything is freed at the end."""
    prompts = [[(7 * i + j) % 200 + 4 for j in range(40)] for i in range(6)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (70, 10) * 3]
    strategy = AdaptiveStrategy(long="quant", long_args={"dtype": dtype}, long_threshold=10_000, pressure=0.95,
                                long_share=0.6, block_size=4)
    llm = LLM("dummy:tiny-llama", strategy=strategy, kv_memory_bytes=600 * 512, max_model_len=128)
    outs = llm.generate(prompts, params, use_tqdm=False)
    st = llm.engine.stats()
    assert [len(o.outputs[0].token_ids) for o in outs] == [70, 10] * 3
    assert st["adaptive_offloaded_under_pressure"] > 0 and st["adaptive_long"] == "quant"
    assert st["blocks_used"] == 0 and st["kv_bytes_used"] == 0
    assert st["adaptive_requests_full"] == st["adaptive_requests_long"] == 0
