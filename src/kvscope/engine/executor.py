"""Where an engine's steps run when they are not this process's alone: rank 0 of a tensor-parallel
group (``kvscope.distributed``). The engine's one hook for it: ``LLMEngine(..., executor=...)``."""
from __future__ import annotations

from dataclasses import dataclass

from kvscope.engine.model_runner import ModelRunner
from kvscope.kv.backend import TensorParallel
from kvscope.kv.manager import KVManager


@dataclass(frozen=True)
class StepExecutor:
    """What replaces the engine's single-process defaults.

    Attributes:
        manager: the scheduler's view of the strategy (instead of the strategy itself). Every
            scheduler-side call the engine makes goes through it, the scheduler's and the engine's
            own ``fork`` and ``free``, so that it can record them for the other ranks.
        runner: runs each step instead of a :class:`ModelRunner` of the engine's model (and makes
            the other ranks run it too).
        tensor_parallel: the group, handed to the strategy in ``KVSetup.tensor_parallel``.
    """

    manager: KVManager
    runner: ModelRunner
    tensor_parallel: TensorParallel
