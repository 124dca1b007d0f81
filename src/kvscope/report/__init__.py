"""Reports of a study's results (``kvscope study report``): a verdict and a decision table computed
from the rows, figures, and the per-metric guidance, as one self-contained HTML file and Markdown.

Modules: :mod:`~kvscope.report.rows` (metrics, grouping, thresholds), :mod:`~kvscope.report.names`
(budgets and display names from spec strings), :mod:`~kvscope.report.uncertainty` (intervals),
:mod:`~kvscope.report.decision` (the decision rule), :mod:`~kvscope.report.verdict` (its sentences),
:mod:`~kvscope.report.tables`, :mod:`~kvscope.report.axes` and :mod:`~kvscope.report.plots`
(figures), :mod:`~kvscope.report.render` (HTML and Markdown).
"""
from kvscope.report.axes import empty_panels, pareto_front, points_drawn, robust_limits
from kvscope.report.decision import Decision, decision_table
from kvscope.report.names import display_name, display_names, kept_fraction
from kvscope.report.plots import Plot, build_plots
from kvscope.report.render import write_report
from kvscope.report.rows import METRICS, NOISE, QUALITY_FLOOR
from kvscope.report.tables import guidance, mixed_table
from kvscope.report.verdict import verdict

__all__ = ["METRICS", "NOISE", "QUALITY_FLOOR", "Decision", "Plot", "build_plots", "decision_table", "display_name",
           "display_names", "empty_panels", "guidance", "kept_fraction", "mixed_table", "pareto_front", "points_drawn",
           "robust_limits", "verdict", "write_report"]
