"""Sub-grids of a study spec: ``grids:``, a list of mappings each overriding some axes of the
top-level spec; the study is then the union of these grids instead of the top-level one.

A full product of every axis wastes most of a GPU budget: a rate sweep is wanted for the serving
models with random weights, RULER and perplexity only for the packaged models with real weights,
InfiniGen at five budgets perhaps on one model only. Each entry may set ``models``, ``strategies``,
``workloads``, ``rates``, ``burstiness``, ``kv_memory``, ``seeds`` and ``quality``; every other
setting (device, dtype, engine, SLOs, ...) is the top level's, and external ``systems`` run on the
top-level axes. An entry is validated as the spec it makes, its errors named by their place
(``grids[1].strategies[0]: unknown strategy ...``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvscope.errors import ConfigError, DatasetError
from kvscope.study.spec_fields import check_keys, fail

if TYPE_CHECKING:
    from kvscope.study.spec import StudySpec

GRID_KEYS = {"models", "strategies", "workloads", "rates", "burstiness", "kv_memory", "seeds", "quality"}


def parse_grids(raw: dict[str, Any], base_dir: str | Path, check_packages: bool) -> list[StudySpec]:
    """The sub-grids of the spec mapping ``raw`` (already validated at its top level), each as a
    spec of its own without systems or grids; [] when ``raw`` has no ``grids``."""
    from kvscope.study.spec import parse_spec

    grids = raw.get("grids")
    if grids is None:
        return []
    if not isinstance(grids, list) or not grids:
        raise fail("grids", f"must be a non-empty list of mappings of axes ({', '.join(sorted(GRID_KEYS))})")
    top = {k: v for k, v in raw.items() if k not in ("grids", "systems")}
    out = []
    for i, entry in enumerate(grids):
        check_keys(entry, GRID_KEYS, f"grids[{i}]")
        try:
            out.append(parse_spec({**top, **entry}, base_dir, check_packages))
        except (ConfigError, DatasetError) as e:
            # The top level is valid, so the problem is in a field this entry sets.
            raise type(e)(f"grids[{i}].{e}") from None
    return out


def grid_models(spec: StudySpec) -> list[str]:
    """The models the points of ``spec`` load, in grid order, once each."""
    grids = spec.grids or [spec]
    return list(dict.fromkeys(m for g in grids for m in g.models))
