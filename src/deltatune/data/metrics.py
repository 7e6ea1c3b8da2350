"""Task metrics, computed by the maintained reference implementations rather than re-derived here.

scikit-learn (accuracy, macro-F1, Matthews), scipy (Pearson, Spearman), sacrebleu (corpus BLEU) and
rouge-score (ROUGE-L) are imported only when a metric is called, so `deltatune` itself imports
without them (`pip install "deltatune[study]"` brings them).

Scales follow the usual reporting of each task family: classification and regression metrics are
fractions in [0, 1] (MCC and correlations in [-1, 1]), as scikit-learn and scipy return them;
generation metrics are in [0, 100], as sacrebleu returns BLEU and as E2E/WebNLG tables print ROUGE-L.

Primary metric (the one model selection and summary tables use): accuracy for classification,
Matthews correlation for CoLA, Pearson for regression (STS-B; GLUE also reports Spearman, which
`compute_metrics` returns alongside), corpus BLEU for generation. A task's meta.json may override
both with `"metrics": [...]` and `"primary_metric": "..."`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

INSTALL_HINT = 'pip install "deltatune[study]"'

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
REGRESSION_METRICS = ("pearson", "spearman")
GENERATION_METRICS = ("bleu", "rouge_l")


def _require(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this metric needs {package}: {INSTALL_HINT} (or pip install {package})") from err


def _pair(predictions: Sequence, references: Sequence) -> tuple[list, list]:
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")
    if not predictions:
        raise ValueError("no predictions to score")
    return predictions, references


def accuracy(predictions: Sequence, references: Sequence) -> float:
    predictions, references = _pair(predictions, references)
    metrics = _require("sklearn.metrics", "scikit-learn")
    return float(metrics.accuracy_score(references, predictions))


def macro_f1(predictions: Sequence, references: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean of per-class F1 over `labels` (default: the classes in references or predictions)."""
    predictions, references = _pair(predictions, references)
    metrics = _require("sklearn.metrics", "scikit-learn")
    labels = list(labels) if labels is not None else None
    return float(metrics.f1_score(references, predictions, labels=labels, average="macro", zero_division=0))


def matthews(predictions: Sequence, references: Sequence) -> float:
    """Matthews correlation coefficient (the CoLA metric): 0 for constant predictions, 1 when all correct."""
    predictions, references = _pair(predictions, references)
    metrics = _require("sklearn.metrics", "scikit-learn")
    return float(metrics.matthews_corrcoef(references, predictions))


def _correlation(name: str, predictions: Sequence, references: Sequence) -> float:
    predictions, references = _pair(predictions, references)
    if len(predictions) < 2:
        raise ValueError(f"{name} correlation needs at least 2 predictions, got {len(predictions)}")
    stats = _require("scipy.stats", "scipy")
    x = [float(p) for p in predictions]
    y = [float(r) for r in references]
    if len(set(x)) == 1 or len(set(y)) == 1:
        return 0.0  # undefined for a constant input; scipy would warn and return nan, which breaks model selection
    value = float(getattr(stats, f"{name}r")(x, y)[0])
    return 0.0 if math.isnan(value) else value


def pearson(predictions: Sequence, references: Sequence) -> float:
    return _correlation("pearson", predictions, references)


def spearman(predictions: Sequence, references: Sequence) -> float:
    return _correlation("spearman", predictions, references)


def _reference_lists(references: Sequence) -> list[list[str]]:
    out = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"reference {i} must be a string or a non-empty list of strings, got {ref!r}")
        out.append(refs)
    return out


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], **kwargs: Any) -> float:
    """sacrebleu corpus BLEU (0-100). Each reference is a string or a list of strings (any number per sentence)."""
    predictions, references = _pair(predictions, references)
    sacrebleu = _require("sacrebleu", "sacrebleu")
    refs = _reference_lists(references)
    depth = max(len(r) for r in refs)
    # sacrebleu wants one stream per reference position; None pads sentences with fewer references.
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(depth)]
    return float(sacrebleu.corpus_bleu([str(p) for p in predictions], streams, **kwargs).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]], use_stemmer: bool = False) -> float:
    """Mean ROUGE-L F-measure (0-100) of rouge-score; with several references the best one counts per sentence."""
    predictions, references = _pair(predictions, references)
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    refs = _reference_lists(references)
    total = sum(scorer.score_multi(r, str(p))["rougeL"].fmeasure for p, r in zip(predictions, refs, strict=True))
    return 100.0 * total / len(predictions)


METRICS = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
    "bleu": bleu,
    "rouge_l": rouge_l,
}


def _describe(task: Any) -> tuple[str, str, dict]:
    """(type, name, meta) of a Task, or of a bare type string such as "regression"."""
    if isinstance(task, str):
        return task, "", {}
    return task.type, getattr(task, "name", ""), getattr(task, "meta", None) or {}


def metric_names(task: Any) -> list[str]:
    """The metrics reported for a task (a Task or a task type string)."""
    task_type, name, meta = _describe(task)
    if meta.get("metrics"):
        unknown = [m for m in meta["metrics"] if m not in METRICS]
        if unknown:
            raise ValueError(f"task {name!r}: meta.json names unknown metric(s) {unknown}; known: {list(METRICS)}")
        return list(meta["metrics"])
    if task_type == "regression":
        return list(REGRESSION_METRICS)
    if task_type == "generation":
        return list(GENERATION_METRICS)
    if task_type in ("classification", "pair_classification"):
        return [*CLASSIFICATION_METRICS, "matthews"] if name == "cola" else list(CLASSIFICATION_METRICS)
    raise ValueError(f"unknown task type {task_type!r}")


def primary_metric(task: Any) -> str:
    """accuracy; matthews for CoLA; pearson for regression; bleu for generation (meta.json may override)."""
    _, name, meta = _describe(task)
    if meta.get("primary_metric"):
        return str(meta["primary_metric"])
    names = metric_names(task)
    return "matthews" if "matthews" in names and name == "cola" else names[0]


def _label_index(value: Any, labels: Sequence[str]) -> Any:
    """Class predictions may come as indices or as label strings (e.g. decoded by a generative model)."""
    if isinstance(value, str):
        return labels.index(value) if value in labels else -1  # an unknown string is simply wrong
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    return value


def compute_metrics(task: Any, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """All of a task's metrics. `references` may be the Examples of a split, or bare labels / reference texts."""
    task_type, _, _ = _describe(task)
    predictions, references = _pair(predictions, references)
    labels = list(getattr(task, "labels", []) or [])
    if task_type == "generation":
        refs = [(r.references or (r.label,)) if hasattr(r, "references") else r for r in references]
    else:
        refs = [r.label if hasattr(r, "references") else r for r in references]
    if task_type in ("classification", "pair_classification"):
        predictions = [_label_index(p, labels) for p in predictions]
        refs = [_label_index(r, labels) for r in refs]
    out = {}
    for name in metric_names(task):
        if name == "macro_f1" and labels:
            # average over the classes that occur (in the references or the predictions), as sklearn and
            # GLUE do: a class absent from both would add an F1 of 0, so perfect predictions on a dev
            # split (or a --max-eval sample) lacking a class scored 0.67; -1 (an unknown label string) is
            # no class, only a miss
            seen = set(refs) | set(predictions)
            out[name] = macro_f1(predictions, refs, labels=[i for i in range(len(labels)) if i in seen])
        elif name == "matthews" and labels:  # -1 is a miss here too, not a third class (it raised 0.26 to 0.40)
            missed = [p if p != -1 else (r + 1) % len(labels) for p, r in zip(predictions, refs, strict=True)]
            out[name] = matthews(missed, refs)
        else:
            out[name] = METRICS[name](predictions, refs)
    return out
