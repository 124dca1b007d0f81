"""KVUsage (read after every step for the peaks) agrees with stats() for every strategy, at every step."""
from __future__ import annotations

import pytest

from kvscope import LLM, SamplingParams

SPECS = ["paged", "contiguous", "h2o:heavy_ratio=0.2,recent_ratio=0.2", "streaming:budget=16", "snapkv:budget_ratio=0.3",
         "tova", "knorm", "offload", "infinigen:calibration=random,dense_layers=1", "adaptive:long_threshold=50",
         "adaptive:long=offload,long_threshold=50"]


@pytest.mark.parametrize("spec", SPECS)
def test_usage_matches_stats_every_step(spec):
    llm = LLM("dummy:tiny-llama", strategy=spec, kv_memory_bytes=4 << 20, max_model_len=256)
    eng = llm.engine
    assert "peak_kv_bytes_used" not in eng.stats()  # no peaks before the first step
    for i, n in enumerate((40, 23, 57)):
        eng.add_request([(5 * i + j) % 200 + 4 for j in range(n)], SamplingParams(max_tokens=8, ignore_eos=True))
    peaks = {"kv_bytes_used": 0, "kv_bytes_allocated": 0}
    while eng.has_unfinished_requests():
        eng.step()
        u, s = eng.kv.usage(), eng.kv.stats()
        assert (u.kv_bytes_used, u.kv_bytes_allocated, u.host_kv_bytes) == (
            s["kv_bytes_used"], s["kv_bytes_allocated"], s.get("host_kv_bytes"))
        for k in peaks:
            peaks[k] = max(peaks[k], s[k])
    st = eng.stats()
    assert st["peak_kv_bytes_used"] == peaks["kv_bytes_used"] > 0 or spec.startswith("offload")
    assert st["peak_kv_bytes_allocated"] == peaks["kv_bytes_allocated"]
    assert ("peak_host_kv_bytes" in st) == ("host_kv_bytes" in eng.kv.stats())
