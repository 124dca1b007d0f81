"""The strategies the advisor weighs, and how a model name becomes shapes without loading weights."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvscope.errors import ConfigError, KVScopeError
from kvscope.kv.base import StrategyFacts
from kvscope.kv.registry import facts, parse_spec
from kvscope.models.config import ModelConfig
from kvscope.models.dummy import PRESETS, preset_config
from kvscope.models.hf_config import model_config_from_hf

# The KV budgets (fraction of the prompt kept) at which quality was measured (advise/quality.py),
# and the one budget of the strategies measured at a single budget.
BUDGETS = (0.1, 0.2, 0.5)
FIXED_BUDGET = 0.2


@dataclass(frozen=True)
class StrategyOption:
    """One candidate: an engine strategy spec and what the cost model needs to know about it.

    Attributes:
        spec: the engine's strategy string (``"h2o:heavy_ratio=0.05,recent_ratio=0.05"``).
        family: the strategy's registered name (matches measured rows with options, keys the
            measured quality table).
        budget_ratio: fraction of the prompt's tokens kept (on the device), read per decode step (on
            the device, every token kept: ``selects_per_step``) or fetched per step (on the host);
            None for strategies that keep and read every token.
        host_kv_bytes: host pool of a host strategy (bytes), None = the engine default.
        facts: the strategy's :class:`StrategyFacts`, read from ``spec`` (what the cost model
            branches on; never the name).
    """

    spec: str
    family: str
    budget_ratio: float | None = None
    host_kv_bytes: int | None = None
    facts: StrategyFacts = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "facts", facts(self.spec))

    @property
    def on_host(self) -> bool:
        """KV lives in host memory and is fetched over PCIe."""
        return self.facts.residence == "host"

    @property
    def evicts(self) -> bool:
        """KV on the device, cut down to a share of the prompt after the first decode step."""
        return (self.facts.residence == "device" and not self.facts.lossless and not self.facts.selects_per_step
                and self.budget_ratio is not None)

    @property
    def selects(self) -> bool:
        """KV on the device, all of it kept; each decode step reads a selected share (query-aware)."""
        return self.facts.residence == "device" and self.facts.selects_per_step and not self.facts.lossless

    @property
    def sparse_fetch(self) -> bool:
        """A host strategy that fetches a share of the context per step (speculating which)."""
        return self.on_host and not self.facts.lossless


def candidates(host_kv_bytes: int | None = None) -> list[StrategyOption]:
    """Every option the advisor weighs: paged, contiguous, h2o and infinigen at each measured
    budget, snapkv and streaming at the one budget their quality was measured at, offload.
    ``host_kv_bytes`` (bytes) is written into the offloading specs when given."""
    host = f"host_kv_bytes={host_kv_bytes}" if host_kv_bytes else ""
    out = [StrategyOption("paged", "paged"), StrategyOption("contiguous", "contiguous")]
    out += [StrategyOption(f"h2o:heavy_ratio={b / 2:g},recent_ratio={b / 2:g}", "h2o", b) for b in BUDGETS]
    out += [StrategyOption(f"{name}:budget_ratio={FIXED_BUDGET:g}", name, FIXED_BUDGET) for name in ("snapkv", "streaming")]
    out.append(StrategyOption("offload" + (f":{host}" if host else ""), "offload", None, host_kv_bytes))
    out += [StrategyOption(f"infinigen:budget_ratio={b:g}" + (f",{host}" if host else ""), "infinigen", b,
                           host_kv_bytes) for b in BUDGETS]
    return out


def option_from_spec(spec: str) -> StrategyOption | None:
    """The option a measured row's strategy string corresponds to, or None for strategies the cost
    model does not cover (other eviction policies, InfiniGen without a budget ratio, an external
    system's ``system:<name>``)."""
    try:
        name, args = parse_spec(spec)
    except ConfigError:  # not a strategy spec: a study's external system
        return None
    host = args.get("host_kv_bytes")
    try:  # a results file may hold any string; one the engine would refuse covers nothing
        f = facts(spec)
    except ConfigError:
        return None
    if f.lossless or (f.kept_share == 1.0 and not f.selects_per_step):  # every token kept (maybe quantized)
        return StrategyOption(spec, name, None, host if f.residence == "host" else None)
    if f.kept_share is None:  # no fixed share (a budget in tokens, a per-request choice)
        return None
    return StrategyOption(spec, name, round(f.kept_share, 6), host if f.residence == "host" else None)


def resolve_model(spec: str) -> ModelConfig:
    """Shapes of ``spec`` without loading weights: ``dummy:<preset>``, a preset name
    (``llama-3-8b``; the packaged ``smollm2-135m`` and ``qwen2.5-0.5b`` have presets of the same
    shapes), or a folder / ``config.json`` of a Hugging Face model."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"model: must be a model name or path, got {spec!r}")
    name = spec.removeprefix("dummy:")
    if name in PRESETS:
        return preset_config(name)
    path = Path(spec).expanduser()
    config = path / "config.json" if path.is_dir() else path
    if config.is_file() and config.suffix == ".json":
        try:
            return model_config_from_hf(json.loads(config.read_text()), name=path.name)
        except (OSError, ValueError, KVScopeError) as e:
            raise ConfigError(f"model: cannot read {config}: {e}") from None
    raise ConfigError(f"model: unknown model {spec!r}; use a preset ({', '.join(PRESETS)}), dummy:<preset>, "
                      "or a folder with config.json")
