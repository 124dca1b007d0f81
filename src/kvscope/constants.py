"""Constants shared by several layers (the KV strategies, the study, the advisor, adaptive).

One place, so that the report, the advisor and ``adaptive``'s derivation cannot disagree.
"""
from __future__ import annotations

#: Least quality a lossy strategy must keep, relative to full KV (the advisor's default
#: ``--quality-floor``, the report's mixed-workload verdict, ``adaptive``'s derivation).
QUALITY_FLOOR = 0.8

#: Share of a prompt's KV a budget-driven strategy keeps when its spec gives no budget (the H2O
#: paper's 20%): the eviction policies' default, InfiniGen's fetch budget, ``adaptive``'s long child.
DEFAULT_BUDGET_RATIO = 0.2

#: Prefix of an external serving system's strategy in study rows (``system:vllm``): not a kvscope
#: strategy, so nothing about its KV is known.
SYSTEM_PREFIX = "system:"

#: The full-KV strategy: the engine's default and the lossless reference a study compares with.
FULL_KV_STRATEGY = "paged"
DEFAULT_STRATEGY = FULL_KV_STRATEGY

#: ``adaptive``'s long child when neither its arguments nor a derivation name one.
DEFAULT_LONG_CHILD = "h2o"

#: The strategy the study's mixed workloads were built to judge (the report's mixed-workload table
#: compares it with every other strategy of a scenario).
MIXED_WORKLOAD_SUBJECT = "adaptive"
