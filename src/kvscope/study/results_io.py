"""The one reader of a study's ``results.jsonl``, the row schema its consumers rely on, and the
folder lock that keeps two runs from writing one results file.

A results file is append-only JSONL, written by :func:`kvscope.study.runner.run_study` and read by
the runner (which points are done), the report, ``kvscope advise --results`` and
``adaptive:thresholds_from``. A line can be damaged: torn by a killed run, edited by hand, or
garbage. :func:`read_results_file` never raises on content: it keeps every line that is a row of
:data:`ROW_SCHEMA`, skips the others, and says which (line number and why) in
:attr:`ResultsRead.skipped`, in a logged warning and, through the report, in ``report.md``.

Writers hold :func:`results_lock` on the folder, so a second run on it fails at once.

A point run again (an errored point retried, or two old runs that wrote the same points) has
several rows with one ``id``; the reader keeps one per point (id and config): the newest ``ok``
row, else the newest row, so a retry supersedes its error and an error never hides a finished run.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvscope.constants import SYSTEM_PREFIX  # re-exported: rows of external servers
from kvscope.errors import KVScopeError

RESULTS_FILE = "results.jsonl"
#: Skipped line numbers listed in a message; the count is always complete.
MAX_LISTED = 20

log = logging.getLogger("kvscope.study")


class ResultsFolderError(KVScopeError):
    """A results path that cannot be used: not a folder, a missing folder, or one held by another run."""


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_number(v: Any) -> bool:
    # NaN is a legitimate metric value (json writes it as NaN); null means "not measured".
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _is_count(v: Any) -> bool:
    # Readers convert these with int(): no null, no NaN.
    return v is not None and _is_number(v) and math.isfinite(v) and v >= 0


def _is_kv(v: Any) -> bool:
    # Bytes (int >= 1) or a fraction of free device memory (float in (0, 1]).
    return (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)


def _is_rate(v: Any) -> bool:
    from kvscope.study.spec_fields import relative_rate

    # A relative rate ("0.5x") stays in the row of a point that failed before its offline measurement.
    return v == "inf" or (_is_number(v) and v is not None and v > 0) or bool(relative_rate(v))


def _is_strategy(v: Any) -> bool:
    from kvscope.errors import ConfigError
    from kvscope.kv.registry import parse_spec

    if not isinstance(v, str) or not v.strip():
        return False
    if v.startswith(SYSTEM_PREFIX):  # an external server's row (kvscope.study.external)
        return len(v) > len(SYSTEM_PREFIX)
    try:
        _, args = parse_spec(v)
    except ConfigError:
        return False
    # The report and the advisor turn these into the share of the KV a strategy keeps; None is a
    # strategy's "uncapped" (``infinigen:budget_ratio=None``), whose share they read as unknown.
    return all(args[k] is None or _is_number(args[k]) for k in _RATIO_ARGS if k in args)


_RATIO_ARGS = ("heavy_ratio", "recent_ratio", "budget_ratio")


@dataclass(frozen=True)
class FieldRule:
    """One field of a row: where (keys from the row down), what it must be, and whether it must be there."""

    path: tuple[str, ...]
    check: Callable[[Any], bool]
    expected: str
    required: bool = False


_METRIC_KEYS = ("completed", "failed", "total_input_tokens", "total_output_tokens", "duration",
                "output_throughput", "request_throughput", "request_goodput", "mean_ttft_ms", "median_ttft_ms",
                "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
                "mean_e2el_ms")
_QUALITY_LEAVES = (("perplexity", "perplexity"), ("ruler", "accuracy"), ("agreement", "match_fraction"))

#: The fields a row must have (``required``), and the types of those its readers use when present:
#: the report, ``advise`` and ``adaptive``'s derivation index these without further checks. The
#: runner writes more (traceback, phase_s, ...); those are kept as they are, unchecked.
ROW_SCHEMA: tuple[FieldRule, ...] = (
    FieldRule(("id",), _is_str, "a string", True),
    FieldRule(("status",), _is_str, "a string", True),
    FieldRule(("config",), _is_dict, "an object", True),
    FieldRule(("config", "model"), _is_str, "a string", True),
    FieldRule(("config", "strategy"), _is_strategy, "a strategy spec string (ratios as numbers)", True),
    FieldRule(("config", "workload"), _is_dict, "an object", True),
    FieldRule(("config", "workload", "kind"), _is_str, "a string", True),
    FieldRule(("config", "kv_memory"), _is_kv, "bytes >= 1 or a fraction in (0, 1]", True),
    FieldRule(("config", "rate"), _is_rate, "a number > 0, 'inf' or a relative rate ('0.5x')", True),
    FieldRule(("config", "engine"), _is_dict, "an object"),
    FieldRule(("error",), _is_str, "a string"),
    # null on an external system's row: what its server runs is not known
    FieldRule(("model_params",), lambda v: v is None or _is_count(v), "a count or null"),
    FieldRule(("environment",), _is_dict, "an object"),
    FieldRule(("environment", "device_name"), _is_str, "a string"),
    FieldRule(("metrics",), _is_dict, "an object"),
    *(FieldRule(("metrics", k), _is_number, "a number or null") for k in _METRIC_KEYS),
    FieldRule(("engine_stats",), _is_dict, "an object"),
    FieldRule(("engine_stats", "peak_kv_bytes_used"), _is_count, "a count"),
    FieldRule(("engine_stats", "kv_bytes_reserved"), _is_count, "a count"),
    FieldRule(("timeline_peaks",), _is_dict, "an object"),
    FieldRule(("timeline_peaks", "peak_host_kv_bytes"), _is_count, "a count"),
    FieldRule(("timeline_peaks", "peak_kv_bytes_used"), _is_count, "a count"),
    FieldRule(("timeline_peaks", "peak_num_running"), _is_count, "a count"),
    FieldRule(("quality",), _is_dict, "an object"),
    *(FieldRule(("quality", name), _is_dict, "an object") for name, _ in _QUALITY_LEAVES),
    *(FieldRule(("quality", name, leaf), _is_number, "a number or null") for name, leaf in _QUALITY_LEAVES),
)


def row_problem(row: Any) -> str | None:
    """Why ``row`` is not a results row (the first field that breaks :data:`ROW_SCHEMA`), or None.

    An ``ok`` row must also carry ``metrics``: every reader of a finished point reads them.
    """
    if not isinstance(row, dict):
        return f"not a JSON object (a {type(row).__name__})"
    for rule in ROW_SCHEMA:
        value: Any = row
        for key in rule.path:
            # Parents are checked first (the rules are in that order), so ``value`` is a dict here.
            if key not in value:
                value = _MISSING
                break
            value = value[key]
        name = ".".join(rule.path)
        if value is _MISSING:
            if rule.required:
                return f"{name}: missing"
            continue
        if not rule.check(value):
            return f"{name}: must be {rule.expected}, got {_short(value)}"
    if row["status"] == "ok" and "metrics" not in row:
        return "metrics: missing from an ok row"
    return None


_MISSING = object()


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class SkippedLine:
    """A line of a results file that is not a row: its number (from 1) and why."""

    line: int
    reason: str


@dataclass
class ResultsRead:
    """What :func:`read_results_file` found in one file.

    ``rows``: one row per point (id and config; see the module docstring), in the order of the lines kept.
    ``skipped``: the non-blank lines that are not rows. ``superseded``: rows replaced by a newer
    row of the same point.
    """

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)
    superseded: int = 0

    def skipped_note(self) -> str:
        """One sentence on the skipped lines (count, line numbers and the first reasons), or ''."""
        if not self.skipped:
            return ""
        n = len(self.skipped)
        listed = ", ".join(str(s.line) for s in self.skipped[:MAX_LISTED])
        more = f" and {n - MAX_LISTED} more" if n > MAX_LISTED else ""
        reasons = "; ".join(f"line {s.line}: {s.reason}" for s in self.skipped[:3])
        return (f"{n} unreadable line{'s' if n > 1 else ''} skipped in {self.path} "
                f"(line{'s' if n > 1 else ''} {listed}{more}): {reasons}{'; ...' if n > 3 else ''}")

    def notes(self) -> str:
        """What a reader of the rows should know about the file: skipped lines and superseded rows ('' if none)."""
        superseded = (f"{self.superseded} row{'s' if self.superseded > 1 else ''} superseded by a later row of the "
                      "same point (a retried or repeated point; the newest ok row is kept)." if self.superseded else "")
        skipped = f"{self.skipped_note()}." if self.skipped else ""
        return " ".join(p for p in (skipped, superseded) if p)

    def done_ids(self, retry_errors: bool = True) -> set[str]:
        """Ids of the points a rerun skips: those with an ``ok`` row (any row without ``retry_errors``)."""
        return {r["id"] for r in self.rows if r["status"] == "ok" or not retry_errors}


def spec_config(config: dict[str, Any]) -> dict[str, Any]:
    """A row's config as its spec wrote it: a relative-rate point's row records the absolute rate it
    ran at in ``rate`` and the spec's in ``rate_relative`` (:mod:`kvscope.study.relative_rates`)."""
    if "rate_relative" not in config:
        return config
    return {**{k: v for k, v in config.items() if k != "rate_relative"}, "rate": config["rate_relative"]}


def read_results_file(path: str | Path, warn: bool = True) -> ResultsRead:
    """Read a results file (missing: no rows). Never raises on the file's content; an unreadable
    file (permissions, a folder) raises :class:`ResultsFolderError`. With ``warn``, logs a warning
    naming the skipped lines."""
    path = Path(path)
    out = ResultsRead(path)
    if not path.exists():
        return out
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ResultsFolderError(f"{path}: cannot read the results file ({e.strerror or e})") from None
    # (id, config) -> (line number, row). The runner's ids hash the config; keying on both keeps
    # hand-written rows that reuse an id for different configs, which are different points.
    kept: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    last = data.count(b"\n") + 1  # a damaged line here is most likely a write cut short by a kill
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            # Decoded line by line, so one bad byte costs its own line and no other.
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            out.skipped.append(SkippedLine(number, f"not UTF-8 (byte {e.start + 1})"))
            continue
        except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, nested too deeply
            torn = " (a torn last line?)" if number == last else ""
            out.skipped.append(SkippedLine(number, f"not JSON{torn}: {getattr(e, 'msg', None) or e}"))
            continue
        problem = row_problem(row)
        if problem is not None:
            out.skipped.append(SkippedLine(number, problem))
            continue
        key = (row["id"], json.dumps(spec_config(row["config"]), sort_keys=True, default=str))
        old = kept.get(key)
        if old is not None:
            out.superseded += 1
            if old[1]["status"] == "ok" and row["status"] != "ok":
                continue  # an error never hides a finished run of the same point
        kept[key] = (number, row)
    out.rows = [row for _, row in sorted(kept.values(), key=lambda item: item[0])]
    if warn and out.skipped:
        log.warning("kvscope: %s", out.skipped_note())
    return out


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results file (see :func:`read_results_file`; skipped lines are logged)."""
    return read_results_file(path).rows


def results_file(path: str | Path) -> Path:
    """The results file of ``path``: ``path`` itself when it names a ``.jsonl`` file, else
    ``results.jsonl`` inside the folder ``path``."""
    path = Path(path)
    return path if path.suffix == ".jsonl" else path / RESULTS_FILE


def existing_results_file(folder: str | Path) -> Path:
    """``results.jsonl`` of an existing results folder; :class:`ResultsFolderError` naming the
    folder when it is missing, not a folder, or holds no results file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ResultsFolderError(f"{folder}: {'not a folder' if folder.exists() else 'no such results folder'}")
    target = folder / RESULTS_FILE
    if not target.is_file():
        raise ResultsFolderError(f"{folder}: holds no {RESULTS_FILE} (not a study's results folder?)")
    return target


def all_requests_failed(row: dict[str, Any]) -> str | None:
    """Why a point that ran to the end still failed: none of its requests completed (each was
    refused or errored), with the requests' errors; None when at least one completed."""
    m = row.get("metrics") or {}
    failed = m.get("failed") or 0
    if m.get("completed") != 0 or failed <= 0:
        return None
    why = "; ".join(row.get("request_errors") or []) or "no request error recorded"
    return f"every request failed (all {failed}): {why}"


def check_results_target(path: str | Path) -> Path:
    """Check, before any work, that a study can write its results at ``path`` (a folder, or a
    ``.jsonl`` file in one) and return the results file. Raises :class:`ResultsFolderError`
    naming the path: a folder that is a file, a path under a file, a ``.jsonl`` that is a folder."""
    target = results_file(path)
    folder = target.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "/" always exists
    if not existing.is_dir():
        where = "" if existing == folder else f" (it is under {existing}, a file)"
        raise ResultsFolderError(f"{folder}: not a folder{where}; the results path names a folder that "
                                 "holds results.jsonl, spec.json and the report")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ResultsFolderError(f"{folder}: cannot write there (no write permission on {existing})")
    if target.exists() and not target.is_file():
        raise ResultsFolderError(f"{target}: not a file")
    return target


_HELD: dict[Path, list[Any]] = {}  # lock file -> [open file, depth]: re-entrant within a process


def lock_path(results: str | Path) -> Path:
    """The lock file of a results file: hidden, beside it (inside the results folder)."""
    results = Path(results)
    return results.parent / f".{results.name}.lock"


@contextmanager
def results_lock(results: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on a results file (``flock`` on :func:`lock_path`, inside its
    folder) for the ``with`` block; fail at once with :class:`ResultsFolderError` naming the folder
    when another process holds it. Re-entrant within one process (the CLI holds it across the run
    and the report; the runner takes it too). The kernel drops the lock when the process dies, so
    a killed run never leaves the folder locked."""
    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(results).resolve()
    if lock in _HELD:
        _HELD[lock][1] += 1
    else:
        f = open(lock, "a+", encoding="utf-8")  # noqa: SIM115 - held past this block, closed below
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise ResultsFolderError(
                f"{results.parent}: another kvscope study run is writing to this results folder"
                f"{f' (pid {holder})' if holder else ''}; wait for it to finish, or use another --results"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))  # for the message of a run that finds the folder locked
        f.flush()
        _HELD[lock] = [f, 1]
    try:
        yield results
    finally:
        _HELD[lock][1] -= 1
        if _HELD[lock][1] == 0:
            f = _HELD.pop(lock)[0]
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row: a single write of the whole line, flushed and fsynced, so a crash leaves at
    most one torn last line. A torn line left by a killed run is ended first, so the new row starts
    on a line of its own (the torn one is skipped by the reader and its point runs again)."""
    text = json.dumps(row, default=str) + "\n"
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
