"""Checks the report computes from the rows, beside the verdict: configurations whose numbers
rest on a strategy behaving other than its spec says.

A strategy that selects the tokens it reads per decode step reports the share of the context it
fetched per layer (``engine_stats.selected_fraction_per_layer``). When some layers fetch almost
nothing though the budget allows far more, the selection's threshold, not the budget, decides
what the model sees there: the row measures that threshold on this model, and its quality says
so. The check reads the stat, never the strategy's name, so any strategy reporting it is checked.
"""
from __future__ import annotations

from kvscope.report.names import display_names, kept_fraction
from kvscope.report.rows import Row, rate_text, scenario
from kvscope.report.tables import Table

#: A layer fetching less than this share of the context counts as starved ...
STARVED_SHARE = 0.01
#: ... when the budget allowed at least this share.
STARVING_BUDGET = 0.05

SPARSE_NOTE = (f"Rows where some layers fetched under {STARVED_SHARE:.0%} of the context per step though the "
               f"budget allowed at least {STARVING_BUDGET:.0%} (layers that fetch everything, such as dense "
               "early layers, are not counted). There the strategy's selection threshold, not its budget, "
               "decides what the model attends to, and that threshold was set on other models: for `infinigen`, "
               "InfiniGen's `alpha` of 4 starves Qwen2.5-0.5B's sink-heavy layers. Raise it and measure again "
               "before reading these rows' quality as the strategy's.")


def starved_selection_rows(rows: list[Row]) -> Table:
    """One line per row whose per-layer fetched share starves some layers (see the module docstring):
    model, strategy, workload, how many of its selecting layers starved, the least share, the budget
    and the row's RULER accuracy."""
    names = display_names(r["config"]["strategy"] for r in rows)
    head = ["model", "strategy", "workload", "starved layers", "least share", "budget", "RULER accuracy"]
    body = []
    for r in rows:
        shares = (r.get("engine_stats") or {}).get("selected_fraction_per_layer")
        budget = kept_fraction(r["config"]["strategy"])
        if not isinstance(shares, list) or budget is None or budget < STARVING_BUDGET:
            continue
        selecting = [s for s in shares if isinstance(s, (int, float)) and s < 1.0]
        starved = [s for s in selecting if s < STARVED_SHARE]
        if not starved:
            continue
        ruler = ((r.get("quality") or {}).get("ruler") or {}).get("accuracy")
        model, workload, _ = scenario(r["config"])
        body.append([model, names[r["config"]["strategy"]], workload, f"{len(starved)} of {len(selecting)}",
                     f"{min(starved):.2%}", f"{budget:.0%}", "-" if ruler is None else f"{ruler:.2f}"])
    return head, body


COMPILE_NOTE = ("Rows whose timed run first launched Triton kernel specialisations (compiled, or loaded from "
                "Triton's disk cache: tens of milliseconds to seconds each, during which the engine stepped "
                "nothing). Their latencies and goodput include that stall: the warm-up did not produce the "
                "shapes these runs did. Run them again before reading them as the strategy's.")


def compile_stall_rows(rows: list[Row]) -> Table:
    """One line per row whose timed run compiled Triton kernels (``triton_compiles.timed_run`` > 0):
    model, strategy, workload, KV pool, rate, how many, the first kernel's name and the row's mean TTFT."""
    names = display_names(r["config"]["strategy"] for r in rows)
    head = ["model", "strategy", "workload", "KV pool", "rate", "kernels compiled", "first", "mean TTFT ms"]
    body = []
    for r in rows:
        compiles = r.get("triton_compiles") or {}
        count = compiles.get("timed_run")
        if not isinstance(count, int) or count <= 0:
            continue
        model, workload, pool = scenario(r["config"])
        rate = r["config"].get("rate_relative") or r["config"]["rate"]
        first = (compiles.get("kernels") or ["?"])[0].split("[", 1)[0]
        ttft = (r.get("metrics") or {}).get("mean_ttft_ms")
        body.append([model, names[r["config"]["strategy"]], workload, pool, rate_text(rate), str(count), first,
                     "-" if ttft is None else f"{ttft:.0f}"])
    return head, body
