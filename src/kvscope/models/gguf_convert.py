"""One-time conversion of GGUF files to a cached float32 safetensors folder.

transformers dequantizes the GGUF (and undoes llama.cpp's q/k row permutation); afterwards every load
reads the cached folder with kvscope's own safetensors loader.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from kvscope.errors import ModelLoadError

# Bump when the cached layout changes, so that stale caches are not reused.
_CONVERSION_VERSION = "1"
_GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    """``$KVSCOPE_CACHE_DIR`` if set, else ``~/.cache/kvscope/models``."""
    env = os.environ.get("KVSCOPE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvscope" / "models"


def cache_dir_for(parts: list[Path], name: str) -> Path:
    """Cache folder of the GGUF made of ``parts`` (concatenated in order); keyed by path, size, mtime."""
    h = hashlib.sha256(_CONVERSION_VERSION.encode())
    for p in parts:
        st = p.stat()
        h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return cache_root() / f"{name}-{h.hexdigest()[:12]}"


def converted_gguf(parts: list[Path], name: str) -> Path:
    """Folder (config.json, model.safetensors, tokenizer files) holding the GGUF made of ``parts``.

    Converts on first use. The folder appears atomically (built under a temporary name, then
    renamed), so an interrupted conversion never leaves a partial cache behind.
    """
    for p in parts:
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {p}")
    _check_magic(parts[0])
    final = cache_dir_for(parts, name)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    _remove_orphans(final.parent, prefix)
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=final.parent))
    try:
        print(f"kvscope: converting {name} from GGUF to {final} (once; takes a while)", file=sys.stderr)
        gguf = parts[0] if len(parts) == 1 else _concatenate(parts, work / f"{name}.gguf")
        _convert(gguf, work / "model")
        try:
            os.rename(work / "model", final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            # Another process finished the same conversion first; its result is equally good.
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _check_magic(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (missing the 'GGUF' magic bytes)")


def _concatenate(parts: list[Path], out: Path) -> Path:
    with out.open("wb") as dst:
        for p in parts:
            with p.open("rb") as src:
                shutil.copyfileobj(src, dst, length=16 << 20)
    return out


def _convert(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except Exception as e:  # the GGUF reader and transformers raise many unrelated types on bad files
        raise ModelLoadError(f"{gguf}: cannot read GGUF ({type(e).__name__}: {e})") from e
    # The weights are dequantized now; without this the saved config would claim GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _remove_orphans(root: Path, prefix: str) -> None:
    """Delete temporary folders of conversions whose process is gone (killed mid-conversion)."""
    for stale in root.glob(f"{prefix}*"):
        try:
            pid = int(stale.name[len(prefix) :].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            continue
