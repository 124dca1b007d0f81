"""Checks a study run makes before its first point: every model resolves, and the results folder
belongs to this spec. A mistake found here costs nothing; found at a point, it costs every point
before it, and leaves error rows behind. :func:`check_point` makes the same checks for one point,
where the machine that runs it is not the one that checked the spec (a Ray worker)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvscope.errors import KVScopeError, ModelLoadError
from kvscope.study.results_io import ResultsFolderError

if TYPE_CHECKING:
    from kvscope.study.spec import Point

SPEC_FILE = "spec.json"


def check_model(name: str) -> None:
    """Resolve a model name as :func:`kvscope.models.loader.load_model` would, without loading
    weights: a dummy preset must exist, a packaged model must be installed, a folder must hold a
    readable ``config.json`` and safetensors weights, a file must be a ``.gguf``. Raises
    :class:`ModelLoadError` saying what is wrong (and what to install)."""
    from kvscope.models.dummy import preset_config
    from kvscope.models.hf_config import model_config_from_hf
    from kvscope.models.loader import DUMMY_PREFIX, load_model
    from kvscope.models.registry import PACKAGED
    from kvscope.models.safetensors_io import weight_files

    if name.startswith(DUMMY_PREFIX):
        preset_config(name[len(DUMMY_PREFIX):])
        return
    if name in PACKAGED:
        PACKAGED[name].locate()
        return
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        try:
            model_config_from_hf(json.loads(config.read_text(encoding="utf-8")), path.name)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{config}: not a readable model config ({type(e).__name__}: {e})") from None
        weight_files(path)
        return
    if path.is_file() and path.suffix == ".gguf":
        return
    # Anything else fails in load_model before it reads any weights; its message is the one to give.
    load_model(name)


def check_models(models: list[str]) -> None:
    """:func:`check_model` on each model of a spec; the error names the field (``models[1]: ...``)."""
    for i, name in enumerate(models):
        try:
            check_model(name)
        except KVScopeError as e:
            raise ModelLoadError(f"models[{i}]: {e}") from None


def check_point(point: Point) -> None:
    """Check that this machine can run ``point``: its model resolves (:func:`check_model`) and the
    data packages of its workload and quality metrics are installed. Raises
    :class:`ModelLoadError` or :class:`~kvscope.errors.DatasetError` saying what is missing."""
    from kvscope.study.spec import check_data_packages

    cfg = point.config
    try:
        check_model(cfg["model"])
    except KVScopeError as e:
        raise ModelLoadError(f"model {cfg['model']!r}: {e}") from None
    check_data_packages({"workload": point.workload}, cfg["quality"]["perplexity"])


def claim_folder(folder: Path, spec_json: dict[str, Any]) -> None:
    """Make ``folder`` this spec's: write ``spec.json`` when it has none; when it has one, the
    spec must be the same (the run then resumes), else :class:`ResultsFolderError` naming the folder
    and the fields that differ, since the two studies' rows would mix in one results file."""
    stored_path = folder / SPEC_FILE
    # Through JSON and back, so the comparison sees what the file would hold (tuples as lists, ...).
    new = json.loads(json.dumps(spec_json, default=str))
    if stored_path.exists():
        try:
            stored = json.loads(stored_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ResultsFolderError(f"{stored_path}: unreadable ({type(e).__name__}: {e}); it records which "
                                     "study the folder holds: restore it, or use another --results") from None
        if stored != new:
            keys = sorted(set(stored) | set(new)) if isinstance(stored, dict) else ["spec"]
            diff = [k for k in keys if not isinstance(stored, dict) or stored.get(k) != new.get(k)]
            raise ResultsFolderError(
                f"{folder}: holds the results of a different study spec (fields that differ from its {SPEC_FILE}: "
                f"{', '.join(diff)}); use another --results folder for this spec, or rerun the spec that wrote it")
        return
    stored_path.write_text(json.dumps(new, indent=1), encoding="utf-8")
