"""Strategy facts: one parser (the registry's), read by the report, the advisor and adaptive."""
from __future__ import annotations

import pytest

from kvscope.constants import DEFAULT_BUDGET_RATIO, QUALITY_FLOOR
from kvscope.kv.registry import available, facts, kept_share, long_children


@pytest.mark.parametrize("spec, share", [
    ("paged", 1.0), ("contiguous", 1.0), ("offload", 1.0),
    ("h2o", 0.2), ("h2o:heavy_ratio=0.05", 0.15), ("h2o:heavy_ratio=0.05,recent_ratio=0.05", 0.1),
    ("snapkv:budget_ratio=0.5", 0.5), ("tova", DEFAULT_BUDGET_RATIO), ("streaming", 0.2),
    ("infinigen:budget_ratio=0.1", 0.1), ("infinigen:budget_ratio=None", None),
    # A budget in tokens has no share without a prompt length (it used to read 0.2 in the report).
    ("streaming:budget=64", None), ("h2o:budget=32", None),
    ("system:vllm", None), ("nonesuch", None), ("h2o:heavy_ratio=2", None), ("adaptive", None),
])
def test_kept_share(spec: str, share: float | None) -> None:
    got = kept_share(spec)
    assert got == pytest.approx(share) if share is not None else got is None


def test_kept_share_of_an_absolute_budget_given_the_prompt() -> None:
    assert kept_share("streaming:budget=64", prompt_tokens=256) == 0.25
    assert kept_share("streaming:budget=64", prompt_tokens=32) == 1.0
    assert kept_share("h2o:heavy_ratio=0.1,recent_ratio=0.1", prompt_tokens=1000) == pytest.approx(0.2)


def test_facts_residence_and_roles() -> None:
    assert facts("offload").residence == "host" and facts("offload").lossless
    assert facts("infinigen").residence == "host" and not facts("infinigen").lossless
    assert facts("h2o").residence == "device" and facts("h2o").graph_decode
    assert facts("offload").graph_decode and not facts("pyramidkv").graph_decode
    assert facts("contiguous").reserves_context
    assert set(long_children()) == {n for n, c in available().items() if facts(n).long_child}
    assert {"h2o", "offload", "infinigen", "snapkv"} <= set(long_children())
    assert not ({"paged", "contiguous", "adaptive"} & set(long_children()))
    assert QUALITY_FLOOR == 0.8
