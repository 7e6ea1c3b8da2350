"""Real tasks for delta tuning: loading and validation, few-shot sampling, and metrics.

`load_task("sst2")` reads the shared task collection ($DELTATUNE_DATA, or shared/data/tasks beside
the checkout); folders, JSONL/CSV files and Hugging Face `datasets` objects load the same way.
Metrics need the `study` extra (`pip install "deltatune[study]"`); loading needs nothing beyond the core.
"""

from .fewshot import few_shot, few_shot_task
from .metrics import (
    METRICS,
    accuracy,
    bleu,
    compute_metrics,
    macro_f1,
    matthews,
    metric_names,
    pearson,
    primary_metric,
    rouge_l,
    spearman,
)
from .tasks import (
    SPLITS,
    TASK_TYPES,
    DataError,
    Example,
    Task,
    candidate_roots,
    data_root,
    format_task_table,
    list_tasks,
    load_task,
)

__all__ = [
    "METRICS",
    "SPLITS",
    "TASK_TYPES",
    "DataError",
    "Example",
    "Task",
    "accuracy",
    "bleu",
    "candidate_roots",
    "compute_metrics",
    "data_root",
    "few_shot",
    "few_shot_task",
    "format_task_table",
    "list_tasks",
    "load_task",
    "macro_f1",
    "matthews",
    "metric_names",
    "pearson",
    "primary_metric",
    "rouge_l",
    "spearman",
]
