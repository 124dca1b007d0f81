"""kvscope: one LLM inference engine with pluggable KV-cache strategies, and the harness that
characterises them."""
from kvscope.engine.outputs import CompletionOutput, RequestOutput
from kvscope.llm import LLM
from kvscope.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput", "__version__"]
