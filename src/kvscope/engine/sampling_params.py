"""Re-export: :class:`SamplingParams` lives in :mod:`kvscope.sampling_params` (shared by kv/ and engine/)."""
from kvscope.sampling_params import GREEDY_TEMPERATURE, SamplingParams

__all__ = ["GREEDY_TEMPERATURE", "SamplingParams"]
