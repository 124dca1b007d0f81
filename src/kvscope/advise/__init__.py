"""``kvscope advise``: recommend a KV strategy from measured study rows or an analytical cost model.

Modules: :mod:`hardware` (machines), :mod:`workload` (requests), :mod:`options` (the strategies
weighed, model shapes), :mod:`quality` (measured quality per budget), :mod:`simulate` (scheduler
replay), :mod:`cost_model` (step times, memory, predictions), :mod:`measured` (study rows that
cover a case), :mod:`advisor` (the decision).
"""
from kvscope.advise.advisor import Advice, SLOs, advise
from kvscope.advise.cost_model import CostModel, Prediction
from kvscope.advise.hardware import Hardware, hardware_preset
from kvscope.advise.options import StrategyOption, candidates, resolve_model
from kvscope.advise.simulate import EngineLimits
from kvscope.advise.workload import Workload, fixed_workload, sharegpt_workload, trace_workload

__all__ = ["Advice", "CostModel", "EngineLimits", "Hardware", "Prediction", "SLOs", "StrategyOption", "Workload",
           "advise", "candidates", "fixed_workload", "hardware_preset", "resolve_model", "sharegpt_workload",
           "trace_workload"]
