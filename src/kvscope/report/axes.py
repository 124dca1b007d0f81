"""Drawing helpers shared by the report's plots: one style per strategy, series with error bars
over seeds, axis scaling (log where values span a decade, clipped to the bulk where one outlier
would flatten the rest), and the checks that a figure shows data."""
from __future__ import annotations

import io
import math
import statistics
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvscope.report.names import display_names, family, kept_fraction
from kvscope.report.rows import num

_MARKERS = "osD^vP*Xh<>"
_LINESTYLES = ("-", "--", ":", "-.")
#: Outlier fences, in interquartile ranges beyond the quartiles (Tukey's "far out" points).
FENCE_IQR = 3.0
#: Width below which a log-scaled bulk's IQR counts as this wide, so a tight bulk does not make
#: every modest departure an outlier (a quarter decade: a factor of 1.78).
MIN_LOG_IQR = 0.25


def styles(strategies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per strategy spec: label (display name), colour and marker, the same in every plot. Specs
    of one family (the same name at several budgets) share a colour and differ in marker and line."""
    import matplotlib

    families = sorted({family(s) for s in strategies})
    tab20 = matplotlib.colormaps["tab20"]
    # tab20 pairs each hue with a light twin: the ten dark ones first, so neighbours differ.
    colours = [tab20(i) for i in range(0, 20, 2)] + [tab20(i) for i in range(1, 20, 2)]
    names = display_names(sorted(strategies))
    members: dict[str, list[str]] = {}
    for s in sorted(strategies, key=lambda s: (family(s), kept_fraction(s) or 0.0, s)):
        members.setdefault(family(s), []).append(s)
    out = {}
    for i, fam in enumerate(families):
        for j, s in enumerate(members[fam]):
            out[s] = {"label": names[s], "color": colours[i % 20], "marker": _MARKERS[j % len(_MARKERS)],
                      "linestyle": _LINESTYLES[j % len(_LINESTYLES)]}
    return out


def series(ax: Any, xs: Sequence[float], groups: Sequence[Sequence[float]], style: dict[str, Any]) -> None:
    """The mean of each group of values (one per seed) at its x, joined by a line; with an error bar
    of one standard deviation where a group has several seeds."""
    pts = [(x, statistics.fmean(g), statistics.stdev(g) if len(g) > 1 else 0.0) for x, g in zip(xs, groups) if g]
    if not pts:
        return
    x, y, err = (list(v) for v in zip(*pts))
    ax.plot(x, y, **style)
    if any(err):  # no caps: they would be lines, which points_drawn counts as data
        ax.errorbar(x, y, yerr=err, fmt="none", ecolor=style.get("color"), capsize=0, linewidth=1)


def robust_limits(values: Sequence[float], log: bool) -> tuple[float, float] | None:
    """Axis limits that hold the bulk of ``values``, or None when no clipping is called for.

    Fences: :data:`FENCE_IQR` interquartile ranges below the first and above the third quartile,
    of log10(values) when ``log`` (the IQR at least :data:`MIN_LOG_IQR`), else of the values (no
    clipping when their IQR is 0: nothing tells the bulk from the rest). Values beyond the fences
    are clipped only when they would take over half the axis (the bulk spans less than half of
    the whole), since that is when they flatten the rest. The limits pad the values inside by 5%
    of their span (in log10 when ``log``)."""
    v = np.asarray([x for x in values if math.isfinite(x) and (x > 0 or not log)], dtype=float)
    if len(v) < 4:
        return None
    t = np.log10(v) if log else v
    q1, q3 = np.percentile(t, [25, 75])
    iqr = max(q3 - q1, MIN_LOG_IQR) if log else q3 - q1
    if iqr <= 0:
        return None
    inside = t[(t >= q1 - FENCE_IQR * iqr) & (t <= q3 + FENCE_IQR * iqr)]
    if len(inside) == len(t) or inside.max() - inside.min() >= 0.5 * (t.max() - t.min()):
        return None
    pad = 0.05 * (inside.max() - inside.min()) or 0.05 * abs(inside.max()) or 0.05
    lo, hi = inside.min() - pad, inside.max() + pad
    return (10**lo, 10**hi) if log else (lo, hi)


def spans_decade(values: Sequence[float]) -> bool:
    """All positive, and the largest at least 10x the smallest: a log axis reads better."""
    v = [x for x in values if math.isfinite(x)]
    return bool(v) and min(v) > 0 and max(v) >= 10 * min(v)


def fit_axis(ax: Any, axis: str = "y", bounded: bool = False) -> None:
    """Scale ``ax``'s ``axis`` ("x" or "y") to its data: clip to the bulk when outliers would flatten
    it, marking each clipped point with an arrow and its value; then log scale when the values shown
    span a decade. ``bounded`` metrics (shares in [0, 1]) are left as drawn."""
    if bounded:
        return
    i = 0 if axis == "x" else 1
    pts = [tuple(p) for line in ax.get_lines() for p in np.asarray(line.get_xydata(), dtype=float).reshape(-1, 2)]
    pts += [tuple(p) for c in _scatter(ax) for p in np.asarray(c.get_offsets(), dtype=float).reshape(-1, 2)]
    pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    vals = [p[i] for p in pts]
    positive = bool(vals) and min(vals) > 0
    limits = robust_limits(vals, log=positive)
    shown = vals if limits is None else [v for v in vals if limits[0] <= v <= limits[1]]
    if spans_decade(shown):
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        _plain_log_ticks(ax.xaxis if axis == "x" else ax.yaxis, max(shown) / min(shown))
    if limits is None:
        return
    (ax.set_xlim if axis == "x" else ax.set_ylim)(*limits)
    for p in dict.fromkeys(pts):  # one mark per clipped point, at the edge it lies beyond
        v = p[i]
        if limits[0] <= v <= limits[1]:
            continue
        edge = limits[1] if v > limits[1] else limits[0]
        xy = (p[0], edge) if i == 1 else (edge, p[1])
        sign = -1 if v > limits[1] else 1
        offset = (0, 18 * sign) if i == 1 else (18 * sign, 0)
        ax.annotate(f"{num(v)} (off scale)", xy=xy, xytext=offset, textcoords="offset points", fontsize=7,
                    ha="center", va="center", annotation_clip=False, arrowprops={"arrowstyle": "->", "lw": 0.8})


def _plain_log_ticks(axis: Any, span: float) -> None:
    """Log-axis labels as plain numbers (40, not 4x10^1); under two decades, 2x and 5x too, since
    one or two powers of ten alone leave the axis nearly unlabelled."""
    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _: Any) -> str:
        mantissa = round(v / 10 ** math.floor(math.log10(v)), 6)
        return num(v) if span < 100 and mantissa in (2.0, 5.0) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: num(v)))
    axis.set_minor_formatter(FuncFormatter(minor))


def _scatter(ax: Any) -> list[Any]:
    """The scatter (marker) collections of ``ax``: not error bars' line collections."""
    from matplotlib.collections import PathCollection

    return [c for c in ax.collections if isinstance(c, PathCollection)]


def points_drawn(ax: Any) -> int:
    """Data points drawn on a matplotlib ``Axes``: finite vertices of its lines and finite offsets
    of its scatter collections."""
    n = 0
    arrays = [line.get_xydata() for line in ax.get_lines()] + [c.get_offsets() for c in _scatter(ax)]
    for xy in arrays:
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        n += int(np.isfinite(xy).all(axis=1).sum())
    return n


def empty_panels(figure: Any) -> list[str]:
    """Titles (or y labels) of the panels of ``figure`` with no data point drawn; [] when every
    panel shows data. The report writer leaves out a figure with an empty panel."""
    return [ax.get_title() or ax.get_ylabel() or f"panel {i}" for i, ax in enumerate(figure.axes)
            if points_drawn(ax) == 0]


def pareto_front(points: Sequence[tuple[float, float]], lower_x_better: bool = False) -> list[int]:
    """Indices of the points no other point dominates, in ascending x.

    ``y`` is better higher; ``x`` higher too, or lower with ``lower_x_better`` (e.g. perplexity).
    A point dominates another when it is at least as good on both axes and better on one, so equal
    points are on the front together.
    """
    sign = -1.0 if lower_x_better else 1.0

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        ax, bx = sign * a[0], sign * b[0]
        return ax >= bx and a[1] >= b[1] and (ax > bx or a[1] > b[1])

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: points[i][0])


def png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # constrained layout already fits titles and the legend
    return buf.getvalue()


def grid(plt: Any, n: int, cols: int = 3, width: float = 5.0, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels, at most ``cols`` per row; returns it and its ``n`` axes."""
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 2, height * rows), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        fig.delaxes(ax)  # unused cells of the grid
    return fig, flat[:n]


def title(ax: Any, text: str) -> None:
    # Workload labels list every argument; wrapped, they stay inside their panel.
    ax.set_title(textwrap.fill(text, 60), fontsize=8)


def legend(fig: Any, axes: list[Any]) -> None:
    """One legend for the figure, outside the panels."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="outside right center")  # clear of the title
