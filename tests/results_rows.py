"""Hand-written results rows of the shape ``kvscope study run`` writes, for tests of their readers.

The grid: ``dummy:tiny-llama`` on the CPU, fixed 16 + 4 token requests, a 1 MiB pool, all at once;
``paged`` and ``h2o`` finished (so ``kvscope advise`` has two measured strategies to compare),
``contiguous`` failed, and ``paged`` again at 4 req/s (a rate the advice below does not ask about).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvscope.study import expand, parse_spec

H2O = "h2o:heavy_ratio=0.1,recent_ratio=0.1"
SPEC: dict[str, Any] = {
    "name": "rows",
    "models": ["dummy:tiny-llama"],
    "strategies": ["paged", H2O, "contiguous"],
    "workloads": [{"type": "fixed", "num_requests": 2, "input_len": 16, "output_len": 4}],
    "rates": ["inf", 4],
    "kv_memory": ["1MiB"],
}
# `kvscope advise` arguments for the case the "inf" rows cover.
ADVISE_ARGS = ["advise", "--model", "dummy:tiny-llama", "--hardware", "cpu", "--prompt-len", "16", "--output-len",
               "4", "--rate", "inf", "--num-requests", "2", "--kv-memory", "1MiB", "--quality-floor", "0", "--json"]


def rows() -> list[dict[str, Any]]:
    """One row per point of :data:`SPEC`, in grid order, except (contiguous, 4 req/s): 5 rows."""
    out = []
    for point in expand(parse_spec(SPEC, check_packages=False)):
        cfg = point.config
        strategy = cfg["strategy"]
        if strategy == "contiguous" and cfg["rate"] != "inf":
            continue
        row: dict[str, Any] = {"id": point.id, "study": "rows", "config": cfg,
                               "environment": {"device": "cpu", "device_name": "x86_64"}}
        if strategy == "contiguous":
            row.update(status="error", error="RuntimeError: boom", traceback="...")
        else:
            fast = 1.5 if strategy == H2O else 1.0
            row.update(status="ok", model_params=164160, request_errors=[],
                       metrics={"completed": 2, "failed": 0, "total_input_tokens": 32, "total_output_tokens": 8,
                                "duration": 0.1, "output_throughput": 80.0 * fast, "request_throughput": 20.0 * fast,
                                "request_goodput": None, "mean_ttft_ms": 10.0, "median_ttft_ms": 10.0,
                                "p90_ttft_ms": 11.0, "p99_ttft_ms": 12.0, "mean_tpot_ms": 2.0, "median_tpot_ms": 2.0,
                                "p90_tpot_ms": 2.5, "p99_tpot_ms": 3.0, "mean_e2el_ms": 16.0},
                       engine_stats={"peak_kv_bytes_used": 20480, "kv_bytes_reserved": 1 << 20},
                       timeline_peaks={"peak_kv_bytes_used": 20480, "peak_num_running": 2},
                       quality={"perplexity": {"perplexity": 300.0 * fast}})
        out.append(row)
    return out


def lines(rs: list[dict[str, Any]]) -> list[bytes]:
    """Each row as the runner writes it: one line of JSON, newline included."""
    return [(json.dumps(r) + "\n").encode() for r in rs]


def write_folder(folder: Path, content: bytes) -> Path:
    """A results folder holding ``content`` as its results.jsonl; returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.jsonl"
    path.write_bytes(content)
    return path


def regime_row(strategy: str, goodput: float | None, *, kv_memory: int = 24 << 20, rate: float | str = "inf",
               seed: int = 0, requests: int = 16, duration: float | None = None, ppl: float | None = None,
               ruler: float | None = None, ruler_samples: int = 8, tpot_ms: float = 50.0,
               p99_ttft_ms: float = 500.0) -> dict[str, Any]:
    """One ``ok`` row of a mixed-workload point with the given goodput (req/s over ``duration`` s
    of ``requests`` requests, all completed; by default the duration in which all of them were
    good) and quality, for tests of the report's decisions."""
    duration = duration or (requests / goodput if goodput else 8.0)
    cfg = expand(parse_spec({**SPEC, "strategies": [strategy], "kv_memory": [kv_memory], "rates": [rate],
                             "seeds": [seed], "slos": {"ttft_ms": 2000, "tpot_ms": 200},
                             "workloads": [{"type": "mixed", "num_requests": requests, "long_fraction": 0.5,
                                            "length": 512}]}, check_packages=False))[0].config
    quality: dict[str, Any] = {}
    if ppl is not None:
        quality["perplexity"] = {"perplexity": ppl, "tokens_scored": 512}
    if ruler is not None:
        quality["ruler"] = {"accuracy": ruler, "num_samples": ruler_samples}
    return {"id": f"{strategy}-{kv_memory}-{rate}-{seed}", "study": "rows", "status": "ok", "config": cfg,
            "environment": {"device": "cpu", "device_name": "x86_64"}, "model_params": 164160,
            "metrics": {"completed": requests, "failed": 0, "duration": duration, "request_goodput": goodput,
                        "output_throughput": 10.0, "median_ttft_ms": 100.0, "p99_ttft_ms": p99_ttft_ms,
                        "median_tpot_ms": tpot_ms, "p99_tpot_ms": tpot_ms},
            "engine_stats": {"peak_kv_bytes_used": 1 << 20}, "quality": quality}
