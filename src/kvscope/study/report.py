"""The study report's former home: the report is the package :mod:`kvscope.report`. These names
stay importable from here for user scripts written against the earlier module."""
from kvscope.report import (
    METRICS,
    NOISE,
    QUALITY_FLOOR,
    Plot,
    build_plots,
    decision_table,
    empty_panels,
    guidance,
    kept_fraction,
    mixed_table,
    pareto_front,
    points_drawn,
    write_report,
)

__all__ = ["METRICS", "NOISE", "QUALITY_FLOOR", "Plot", "build_plots", "decision_table", "empty_panels", "guidance",
           "kept_fraction", "mixed_table", "pareto_front", "points_drawn", "write_report"]
