"""Study specs: a YAML grid of models x strategies x workloads x rates x ... parsed into validated
dataclasses, and its expansion into :class:`Point` s with stable ids.

Every problem is a :class:`~kvscope.errors.ConfigError` whose message starts with the path of the
offending field (``strategies[2]: unknown strategy 'h3o' ...``, ``rates[1]: must be > 0 or 'inf'``),
so a user can fix the file without reading this module. Missing data packages are a
:class:`~kvscope.errors.DatasetError` raised while parsing, i.e. before any point runs.

Example::

    name: demo
    models: [smollm2-135m]
    strategies: [paged, "h2o:heavy_ratio=0.1,recent_ratio=0.1"]
    workloads:
      - {type: sharegpt, num_requests: 8, output_len: 32}
      - {type: fixed, num_requests: 8, input_len: 256, output_len: 32}
      - {type: ruler, task: niah_single_1, length: 1024, num_samples: 2}
      # ShareGPT with long RULER prompts among them (a quarter here); quality.ruler scores the
      # long ones' answers in the serving run and compares the short ones' tokens with full KV
      - {type: mixed, num_requests: 16, long_fraction: 0.25, length: 1024, output_len: 32, long_output_len: 16}
    rates: [1, 4, inf]          # requests/s; inf = all at once; "0.5x" = half the point's offline throughput
    burstiness: [1.0]           # gamma shape; 1 = Poisson
    kv_memory: [256MiB, 16MiB]  # bytes, size strings, or a fraction in (0, 1] of free device memory
    seeds: [0]
    device: cpu
    dtype: float32
    max_model_len: 2048
    engine: {max_num_seqs: 32}  # other EngineConfig fields
    slos: {ttft_ms: 2000, tpot_ms: 200}
    quality: {perplexity: true, ruler: true}
    # OpenAI-compatible servers measured on the same grid (see kvscope.study.external)
    systems: [{name: vllm, base_url: "http://127.0.0.1:8001/v1"}]
    # Optional: the study is the union of these grids, each overriding axes above (kvscope.study.grids)
    grids: [{strategies: [paged], rates: ["0.5x", "1x"]}, {models: [qwen2.5-0.5b], kv_memory: [256MiB]}]
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from kvscope.config import parse_dtype
from kvscope.errors import ConfigError, KVScopeError
from kvscope.study.data_packages import (  # check_data_packages: re-exported
    RULER_PACKAGES,
    SHAREGPT_PACKAGE,
    check_data_packages,  # noqa: F401
    check_datasets,
)
from kvscope.study.spec_fields import (  # parse_size: re-exported, the spec's KV memory values
    as_list,
    check_keys,
    fail,
    integer,
    number,
    parse_engine,
    parse_rate,
    parse_size,
    parse_slos,
    parse_strategy,
    relative_rate,
)
from kvscope.workload.text import PROSE_SOURCES

if TYPE_CHECKING:
    from kvscope.study.external import SystemSpec

@dataclass(frozen=True)
class WorkloadSpec:
    """One workload of the grid. ``kind`` is ``sharegpt``, ``fixed``, ``uniform``, ``trace``,
    ``ruler`` or ``mixed``; the other fields apply to the kinds named beside them (None = not used).

    ``mixed``: ``num_requests`` in all, ``round(num_requests x long_fraction)`` of them RULER
    samples of ``task`` (default ``niah_single_1``) at ``length``, answering in ``long_output_len``
    tokens (default RULER's), spread evenly among ShareGPT requests (``output_len``,
    ``max_prompt_len`` as for ``sharegpt``); see :mod:`kvscope.workload.mixed`.
    """

    kind: str
    num_requests: int | None = None  # sharegpt, fixed, uniform, mixed
    input_len: int | None = None  # fixed, uniform
    output_len: int | None = None  # fixed, uniform; sharegpt, ruler, mixed (short): cap (None = reply's / RULER's)
    range_ratio: float | None = None  # uniform
    source: str | None = None  # fixed, uniform: prose source
    max_prompt_len: int | None = None  # sharegpt, mixed
    path: str | None = None  # trace
    task: str | None = None  # ruler, mixed
    length: int | None = None  # ruler, mixed: RULER max_seq_length
    num_samples: int | None = None  # ruler
    long_fraction: float | None = None  # mixed: share of long (RULER) requests
    long_output_len: int | None = None  # mixed: tokens the long requests generate (None = RULER's)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def packages(self) -> list[tuple[str, str]]:
        """(module, install command) of the data packages this workload reads."""
        if self.kind == "sharegpt":
            return [SHAREGPT_PACKAGE]
        if self.kind in ("fixed", "uniform"):
            src = PROSE_SOURCES[self.source or "britannica"]
            return [(src.module, src.install)]
        if self.kind == "ruler":
            return list(RULER_PACKAGES)
        if self.kind == "mixed":
            return [SHAREGPT_PACKAGE, *RULER_PACKAGES]
        return []


_WORKLOAD_KEYS: dict[str, tuple[set[str], set[str]]] = {  # kind -> (required, optional)
    "sharegpt": ({"num_requests"}, {"output_len", "max_prompt_len"}),
    "fixed": ({"num_requests", "input_len", "output_len"}, {"source"}),
    "uniform": ({"num_requests", "input_len", "output_len"}, {"range_ratio", "source"}),
    "trace": ({"path"}, set()),
    "ruler": ({"task", "length"}, {"num_samples", "output_len"}),
    "mixed": ({"num_requests", "long_fraction", "length"}, {"task", "output_len", "long_output_len",
                                                             "max_prompt_len"}),
}


def _workload(raw: Any, path: str, base_dir: Path) -> WorkloadSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict) or "type" not in raw:
        raise fail(path, "must be a mapping with a 'type' (" + ", ".join(_WORKLOAD_KEYS) + ")")
    kind = raw["type"]
    if not isinstance(kind, str) or kind not in _WORKLOAD_KEYS:
        raise fail(f"{path}.type", f"unknown workload {kind!r}; choose one of {', '.join(_WORKLOAD_KEYS)}")
    required, optional = _WORKLOAD_KEYS[kind]
    check_keys(raw, required | optional | {"type"}, path)
    missing = sorted(required - set(raw))
    if missing:
        raise fail(f"{path}.{missing[0]}", f"is required for a {kind!r} workload")
    args: dict[str, Any] = {}
    for key in ("num_requests", "input_len", "output_len", "max_prompt_len", "length", "num_samples",
                "long_output_len"):
        if key in raw:
            args[key] = integer(raw[key], f"{path}.{key}")
    if kind == "mixed":
        from kvscope.workload.mixed import num_long_requests

        integer(args["num_requests"], f"{path}.num_requests", minimum=2)  # one short, one long
        fraction = number(raw["long_fraction"], f"{path}.long_fraction")
        try:
            num_long_requests(args["num_requests"], fraction)
        except ConfigError as e:
            raise fail(f"{path}.long_fraction", str(e)) from None
        args["long_fraction"] = fraction
    if "range_ratio" in raw:
        ratio = number(raw["range_ratio"], f"{path}.range_ratio")
        if not 0.0 <= ratio < 1.0:
            raise fail(f"{path}.range_ratio", f"must be in [0, 1), got {ratio}")
        args["range_ratio"] = ratio
    if "source" in raw:
        if raw["source"] not in PROSE_SOURCES:
            raise fail(f"{path}.source", f"unknown prose source {raw['source']!r}; choose one of "
                                          f"{', '.join(PROSE_SOURCES)}")
        args["source"] = raw["source"]
    if kind == "trace":
        trace = Path(str(raw["path"]))
        trace = trace if trace.is_absolute() else base_dir / trace
        if not trace.is_file():
            raise fail(f"{path}.path", f"no such trace file: {trace}")
        args["path"] = str(trace)
    if kind in ("ruler", "mixed"):
        from kvscope.workload.ruler import niah_tasks

        task = raw.get("task", "niah_single_1")
        try:
            tasks = niah_tasks()
        except KVScopeError:  # the RULER package is missing: reported by the package check
            tasks = [task]
        if task not in tasks:
            raise fail(f"{path}.task", f"unknown RULER task {task!r}; choose one of {', '.join(tasks)}")
        args["task"] = task
        if kind == "ruler":
            args.setdefault("num_samples", 4)
    return WorkloadSpec(kind=kind, **args)


@dataclass(frozen=True)
class QualitySpec:
    """Quality metrics computed at each point, besides the serving metrics.

    ``perplexity``: perplexity under the point's strategy on ``perplexity_sequences`` prose
    sequences of ``perplexity_len`` tokens (the first ``perplexity_prefix`` are the prompt, so
    eviction acts on them before the scored tokens are decoded). ``ruler``: RULER accuracy of the
    strategy on the samples of each ``ruler`` workload point. ``agreement``: the served requests'
    greedy tokens against those of full paged KV on the same requests (a mixed workload measures it
    for its short requests whenever ``ruler`` is on).
    """

    perplexity: bool = False
    perplexity_sequences: int = 2
    perplexity_len: int = 256
    perplexity_prefix: int = 128
    ruler: bool = False
    agreement: bool = False


def _quality(raw: Any) -> QualitySpec:
    if raw is None:
        return QualitySpec()
    names = {f.name for f in fields(QualitySpec)}
    check_keys(raw, names, "quality")
    args: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("perplexity", "ruler", "agreement"):
            if not isinstance(value, bool):
                raise fail(f"quality.{key}", f"must be true or false, got {value!r}")
            args[key] = value
        else:
            args[key] = integer(value, f"quality.{key}")
    q = QualitySpec(**args)
    if q.perplexity_prefix >= q.perplexity_len:
        raise fail("quality.perplexity_prefix", f"must be < perplexity_len ({q.perplexity_len})")
    return q


@dataclass(frozen=True)
class StudySpec:
    """A validated study: the axes of the grid and the settings shared by every point."""

    name: str
    models: list[str]
    strategies: list[str]
    workloads: list[WorkloadSpec]
    rates: list[float | str]  # requests/s (math.inf: all at once), or relative ("0.5x")
    burstiness: list[float] = field(default_factory=lambda: [1.0])
    kv_memory: list[int | float] = field(default_factory=lambda: [1 << 30])
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    slos: dict[str, float] = field(default_factory=dict)
    quality: QualitySpec = field(default_factory=QualitySpec)
    systems: list[SystemSpec] = field(default_factory=list)
    grids: list[StudySpec] = field(default_factory=list)  # sub-grids (kvscope.study.grids); [] = this one


_TOP_KEYS = {f.name for f in fields(StudySpec)}


def parse_spec(raw: Any, base_dir: str | Path = ".", check_packages: bool = True) -> StudySpec:
    """Validate a spec mapping (as loaded from YAML) into a :class:`StudySpec`.

    ``base_dir`` resolves relative trace paths. ``check_packages`` verifies that the data packages
    the workloads and quality metrics read are installed (:class:`DatasetError` otherwise).
    """
    from kvscope.study.external import parse_systems
    from kvscope.study.grids import parse_grids

    check_keys(raw, _TOP_KEYS, "")
    models = as_list(raw, "models")
    for i, m in enumerate(models):
        if not isinstance(m, str) or not m:
            raise fail(f"models[{i}]", f"must be a model name or path, got {m!r}")
    device = raw.get("device", "cpu")
    dtype = raw.get("dtype", "float32")
    # Checked for form only: a GPU spec can be written (and validated) on a machine without one.
    try:
        if not isinstance(device, str):  # torch.device(0) is a GPU; the spec names devices
            raise TypeError
        torch.device(device)
    except (RuntimeError, TypeError):
        raise fail("device", f"not a torch device: {device!r}") from None
    try:
        if not isinstance(dtype, str):
            raise ConfigError(f"must be a dtype name like 'float32', got {dtype!r}")
        parse_dtype(dtype)
    except ConfigError as e:
        raise fail("dtype", str(e)) from None
    max_model_len = raw.get("max_model_len")
    if max_model_len is not None:
        max_model_len = integer(max_model_len, "max_model_len")
    seeds = [integer(s, f"seeds[{i}]", minimum=0) for i, s in enumerate(as_list(raw, "seeds", [0]))]
    burst = []
    for i, b in enumerate(as_list(raw, "burstiness", [1.0])):
        if number(b, f"burstiness[{i}]") <= 0:
            raise fail(f"burstiness[{i}]", f"must be > 0, got {b!r}")
        burst.append(float(b))
    name = raw.get("name", "study")
    if not isinstance(name, str):
        raise fail("name", f"must be a string, got {name!r}")
    spec = StudySpec(
        name=name,
        models=models,
        strategies=_strategies(raw),
        workloads=[_workload(w, f"workloads[{i}]", Path(base_dir)) for i, w in enumerate(as_list(raw, "workloads"))],
        rates=[parse_rate(r, f"rates[{i}]") for i, r in enumerate(as_list(raw, "rates", ["inf"]))],
        burstiness=burst,
        kv_memory=[parse_size(m, f"kv_memory[{i}]") for i, m in enumerate(as_list(raw, "kv_memory", ["1GiB"]))],
        seeds=seeds,
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        engine=parse_engine(raw.get("engine")),
        slos=parse_slos(raw.get("slos")),
        quality=_quality(raw.get("quality")),
        systems=parse_systems(raw.get("systems"), models),
        grids=parse_grids(raw, base_dir, check_packages),
    )
    if check_packages:
        check_datasets(spec)
    return spec


def _strategies(raw: dict[str, Any]) -> list[str]:
    """The spec's strategies; ``[]`` is allowed beside ``systems``: a study of servers alone."""
    if raw.get("strategies") == [] and raw.get("systems"):
        return []
    return [parse_strategy(s, f"strategies[{i}]") for i, s in enumerate(as_list(raw, "strategies"))]


def load_spec(path: str | Path, check_packages: bool = True) -> StudySpec:
    """Read and validate a YAML study spec."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an integer of over 4300 digits
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return parse_spec(raw, base_dir=path.parent, check_packages=check_packages)


@dataclass(frozen=True)
class Point:
    """One configuration of the grid. ``config`` is JSON-serialisable (an infinite rate is
    ``"inf"``); ``id`` is a hash of its canonical JSON, so it is the same in every run."""

    config: dict[str, Any]

    @property
    def id(self) -> str:
        canonical = json.dumps(self.config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def rate(self) -> float:
        """Requests/s of an absolute rate (ConfigError for a relative one, which the runner resolves)."""
        if self.relative_rate is not None:
            raise ConfigError(f"rate: {self.config['rate']!r} is relative to the offline throughput")
        return math.inf if self.config["rate"] == "inf" else float(self.config["rate"])

    @property
    def relative_rate(self) -> float | None:
        """The multiple of the offline request throughput a relative rate (``"0.5x"``) asks for, else None."""
        return relative_rate(self.config["rate"])

    @property
    def workload(self) -> WorkloadSpec:
        w = dict(self.config["workload"])
        return WorkloadSpec(**w)


def expand(spec: StudySpec) -> list[Point]:
    """Every grid point, in a fixed order: models, strategies, kv_memory, workloads, rates,
    burstiness, seeds (the last varies fastest); then the external systems' points. A spec with
    ``grids`` expands each sub-grid in turn (a point two grids share runs once)."""
    if spec.grids:
        from kvscope.study.external import system_points

        points = {p.id: p for sub in spec.grids for p in expand(sub)}
        return list(points.values()) + system_points(spec, _shared(spec))
    shared = _shared(spec)
    points = []
    for model, strategy, kv, workload, rate, burst, seed in itertools.product(
        spec.models, spec.strategies, spec.kv_memory, spec.workloads, spec.rates, spec.burstiness, spec.seeds
    ):
        points.append(Point({
            "model": model,
            "strategy": strategy,
            "kv_memory": kv,
            "workload": workload.to_dict(),
            "rate": "inf" if rate == math.inf else rate,
            "burstiness": burst,
            "seed": seed,
            **shared,
        }))
    from kvscope.study.external import system_points

    return points + system_points(spec, shared)


def _shared(spec: StudySpec) -> dict[str, Any]:
    """The settings every point of ``spec`` carries besides its grid coordinates."""
    return {
        "device": spec.device,
        "dtype": spec.dtype,
        "max_model_len": spec.max_model_len,
        "engine": spec.engine,
        "slos": spec.slos,
        # Fields added after a study's rows were written are left out at their default, so those
        # rows' point ids (hashes of the config) stay valid.
        "quality": {k: v for k, v in asdict(spec.quality).items() if k != "agreement" or v},
    }
