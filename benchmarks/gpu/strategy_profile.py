"""Where ``h2o``'s extra time per engine step goes, against ``paged`` at equal resident tokens: a
torch-profiler trace of back-to-back engine steps (CUDA graphs, async scheduling), per strategy.

For each strategy (profiled twice, alternating, the second kept) the same requests as ``strategy_overhead.py`` (``batch`` requests holding
``resident`` tokens of random KV, ``h2o`` evicting one token per layer and KV head every step) run
``engine.step()`` ``--steps`` times under the profiler after a warm-up. Per step it reports the wall
time, the host time inside ``engine.step`` (the engine's Python and launches), the device time
(the sum of kernel and copy durations), and the kernels by device time; the h2o-minus-paged table
names the kernels that make up the difference. When host time per step exceeds device time the
step is bound by the host; otherwise by the kernels listed.

A second pass per strategy, without torch's profiler, first times the same steps with no
profiler at all (async and synchronous scheduling: the gap the profile must explain), then takes
cProfile's host time by kvscope function, its own and with the torch ops it calls (which of the
engine's Python grows with the strategy) and, on CUDA, counts the
synchronizing CUDA calls of each kvscope call site per step (``torch.cuda.set_sync_debug_mode``):
a wait that async scheduling cannot hide shows there even when the profile's totals do not
explain a gap.

Writes ``strategy_profile.json`` and ``.md`` to ``--out``. ``--tiny``: a 2-layer model on the CPU.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import bench_environment  # noqa: E402
from ceilings import RESULTS, env_line  # noqa: E402
from strategy_overhead import MODEL, TINY_MODEL, attach, engine, inject, release, scheduling_ms  # noqa: E402

import kvscope  # noqa: E402
from kvscope.models.loader import load_model  # noqa: E402


SYNCS = {"cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize"}


def profile_steps(eng, reqs, device: torch.device, steps: int) -> dict:
    """Per-step wall, host and device milliseconds of ``steps`` back-to-back engine steps, and the
    device time of each kernel name (ms per step)."""
    _run_warm(eng, reqs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            with record_function("engine_step"):
                eng.step()
        sync()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    kernels: dict[str, float] = defaultdict(float)
    host = wait = 0.0
    for e in prof.events():
        if e.name == "engine_step" and e.device_type.name == "CPU":
            host += e.time_range.elapsed_us() / 1e3
        elif e.name in SYNCS:  # the host waiting for the device (reading a step back)
            wait += e.time_range.elapsed_us() / 1e3
        elif e.device_type.name == "CUDA" and e.name != "engine_step":  # a kernel or copy (the
            # range of record_function is mirrored on the device's timeline too: not work)
            kernels[e.name] += e.time_range.elapsed_us() / 1e3
    release(eng, reqs)
    per_step = {k: v / steps for k, v in kernels.items()}
    return {"wall_ms": wall, "host_ms": host / steps, "host_busy_ms": (host - wait) / steps,
            "device_ms": sum(per_step.values()),
            "kernels_ms": dict(sorted(per_step.items(), key=lambda kv: -kv[1]))}


PACKAGE = str(Path(kvscope.__file__).parent) + "/"


class SyncSites:
    """Counts the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` raised inside the context,
    by the innermost kvscope frame that made the call (``path:line`` inside the package)."""

    def __init__(self) -> None:
        self.sites: Counter[str] = Counter()

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
        if frames:
            where = f"{frames[-1].filename[len(PACKAGE):]}:{frames[-1].lineno}"
        else:  # a library's frame: named from its package down, not by this machine's path
            where = f"{filename.rsplit('site-packages/', 1)[-1]}:{lineno}"
        self.sites[where] += 1

    def __enter__(self) -> "SyncSites":
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        return self

    def __exit__(self, *exc) -> None:
        self._warnings.__exit__(*exc)


def host_pass(eng, reqs, steps: int, device: torch.device) -> dict[str, dict[str, float]]:
    """``steps`` engine steps without torch's profiler, after the same steps timed with no profiler
    at all (``unprofiled_ms``: median ms per step of 3 blocks, async and synchronous scheduling, the
    figures the profiled ones must explain). Then, per step: the synchronizing CUDA calls by kvscope
    call site (CUDA only; ``torch.cuda.set_sync_debug_mode``), and the host time of every kvscope
    function in ms, largest first, both its own (``host_functions_ms``: cProfile's tottime, which
    leaves out the torch ops it calls) and with what it calls (``host_cumulative_ms``: cumtime,
    torch ops and launches included). cProfile slows the host, so read them against each other,
    not against the step."""
    _run_warm(eng, reqs)
    unprofiled = scheduling_ms(eng, device, steps)
    debug = device.type == "cuda"
    prof = cProfile.Profile()
    with SyncSites() as found:
        if debug:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            prof.enable()
            for _ in range(steps):
                eng.step()
            prof.disable()
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode("default")
    release(eng, reqs)
    stats = pstats.Stats(prof).stats.items()

    def per_step(i: int) -> dict[str, float]:  # stat[2]: tottime, stat[3]: cumtime
        ms = {f"{path[len(PACKAGE):]}:{line}({fn})": stat[i] * 1e3 / steps
              for (path, line, fn), stat in stats if path.startswith(PACKAGE)}
        return dict(sorted(ms.items(), key=lambda kv: -kv[1]))

    return {"unprofiled_ms": unprofiled, "syncs_per_step": {k: v / steps for k, v in found.sites.most_common()},
            "host_functions_ms": per_step(2), "host_cumulative_ms": per_step(3)}


def _run_warm(eng, reqs) -> None:
    """:func:`attach` ``reqs``, then 5 warm-up steps."""
    attach(eng, reqs)
    for _ in range(5):
        eng.step()
    if eng.kv.cache.kv.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tiny", action="store_true", help="2-layer dummy model on the CPU (smoke test)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resident", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    model = TINY_MODEL if args.tiny else MODEL
    b, t = (2, 128) if args.tiny else (args.batch, args.resident)
    env = bench_environment(device)
    print(env_line(env), flush=True)
    loaded = load_model(model, device=device, dtype=torch.bfloat16)
    most = b * (t + 10 * args.steps)
    specs = (("paged", "paged"), ("h2o", f"h2o:budget={t},recent={t // 2}"))
    res = {}
    # Two rounds, the second kept: the first profile in a process measured `paged`'s host time at
    # twice its unprofiled step (64 x 1k on an H100); one-time costs of a first round fall outside the kept one.
    for rnd in (1, 2):
        for name, spec in specs:
            eng = engine(loaded, spec, most, False, model, device)
            res[name] = profile_steps(eng, inject(eng, b, t), device, args.steps)
            res[name]["async_scheduling"] = eng.async_scheduling
            print(f"round {rnd}", name, json.dumps({k: v for k, v in res[name].items() if k != "kernels_ms"}), flush=True)
            del eng
    for name, spec in specs:
        eng = engine(loaded, spec, most, False, model, device)
        found = host_pass(eng, inject(eng, b, t), args.steps, device)
        if device.type != "cuda":
            del found["syncs_per_step"]
        res[name] |= found
        print(name, "unprofiled ms per step:", json.dumps(found["unprofiled_ms"]), "synchronizing calls per step:",
              json.dumps(found.get("syncs_per_step")), flush=True)
        del eng
    result = {"benchmark": "strategy_profile", "environment": env, "model": model, "dtype": "bfloat16",
              "batch": b, "resident": t, "steps": args.steps, "results": res}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "strategy_profile.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "strategy_profile.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict, top: int = 12) -> str:
    p, h = r["results"]["paged"], r["results"]["h2o"]
    lines = [f"# Profile: `h2o` against `paged`, {r['batch']} x {r['resident']} resident tokens, engine steps", "",
             env_line(r["environment"]), "",
             f"{r['model']} (random weights), {r['dtype']}; {r['steps']} back-to-back `engine.step()` calls under "
             "torch.profiler after 5 warm-up steps (the second of two rounds), CUDA graphs, async scheduling "
             f"(paged {p['async_scheduling']}, h2o {h['async_scheduling']}). Per step: wall time, host time inside "
             "`engine.step`, the same less its waits for the device (`cudaEventSynchronize` and the like: "
             "the host's own work) and device time (kernels and copies).", "",
             "| strategy | wall ms | host ms | host busy ms | device ms |", "|---|---:|---:|---:|---:|"]
    for name, x in (("paged", p), ("h2o", h)):
        lines.append(f"| {name} | {x['wall_ms']:.2f} | {x['host_ms']:.2f} | {x['host_busy_ms']:.2f} | "
                     f"{x['device_ms']:.2f} |")
    diff = {k: h["kernels_ms"].get(k, 0.0) - p["kernels_ms"].get(k, 0.0) for k in set(h["kernels_ms"]) | set(p["kernels_ms"])}
    lines += ["", f"Device time by kernel, h2o minus paged (ms per step; the {top} largest differences):", "",
              "| kernel | paged ms | h2o ms | difference |", "|---|---:|---:|---:|"]
    for k, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]:
        lines.append(f"| `{k[:90]}` | {p['kernels_ms'].get(k, 0.0):.3f} | {h['kernels_ms'].get(k, 0.0):.3f} | {d:+.3f} |")
    if "unprofiled_ms" in p:
        lines += ["", "The same steps with no profiler (median ms per step of 3 blocks of "
                  f"{r['steps']}):", "", "| scheduling | paged ms | h2o ms | h2o over paged |", "|---|---:|---:|---:|"]
        lines += [f"| {m} | {p['unprofiled_ms'][m]:.2f} | {h['unprofiled_ms'][m]:.2f} | "
                  f"{h['unprofiled_ms'][m] / p['unprofiled_ms'][m] - 1:+.1%} |" for m in ("async", "sync")]
    for key, what in (("host_functions_ms", "cProfile's own time, without the torch ops it calls"),
                      ("host_cumulative_ms", "cProfile's cumulative time, torch ops and launches included")):
        if key not in p:
            continue
        fdiff = {k: h[key].get(k, 0.0) - p[key].get(k, 0.0) for k in set(h[key]) | set(p[key])}
        lines += ["", f"Host time by kvscope function, h2o minus paged ({what}; ms per step, under "
                  "cProfile's slowdown; the largest differences):", "",
                  "| function | paged ms | h2o ms | difference |", "|---|---:|---:|---:|"]
        for k, d in sorted(fdiff.items(), key=lambda kv: -abs(kv[1]))[:top]:
            lines.append(f"| `{k}` | {p[key].get(k, 0.0):.3f} | {h[key].get(k, 0.0):.3f} | {d:+.3f} |")
    if "syncs_per_step" in p:
        sites = sorted(set(p["syncs_per_step"]) | set(h["syncs_per_step"]))
        lines += ["", "Synchronizing CUDA calls per unprofiled step, by kvscope call site "
                  "(`torch.cuda.set_sync_debug_mode`):", "", "| call site | paged | h2o |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {p['syncs_per_step'].get(k, 0.0):.2f} | {h['syncs_per_step'].get(k, 0.0):.2f} |"
                  for k in sites] or ["| (none) | 0 | 0 |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
