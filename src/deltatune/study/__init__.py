"""`deltatune study`: the Delta Tuning empirical study as a product.

A spec (YAML/TOML) names models, tasks, methods, seeds and budgets; the runner expands it into runs
recorded in one SQLite file (resumable after any crash) and executes them sequentially, in a process
pool or on Ray; the report turns the file into the paper's tables and plots (HTML and Markdown).
"""

from .runner import run_study
from .spec import StudySpec, load_spec, parse_spec, presets
from .store import Store

__all__ = ["Store", "StudySpec", "load_spec", "parse_spec", "presets", "run_study"]
