"""Studies: a YAML grid of configurations, run resumably into JSONL, reported as HTML/Markdown."""
from kvscope.study.presets import PRESETS, preset
from kvscope.study.results_io import read_results
from kvscope.study.runner import run_study
from kvscope.study.spec import Point, StudySpec, expand, load_spec, parse_spec

__all__ = ["PRESETS", "Point", "StudySpec", "expand", "load_spec", "parse_spec", "preset", "read_results",
           "run_study"]
