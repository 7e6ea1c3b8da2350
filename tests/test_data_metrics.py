"""deltatune.data.metrics against hand-computed values, and compute_metrics' choice by task."""

from __future__ import annotations

import math
import sys

import pytest
from data_helpers import make_task, write_jsonl

from deltatune.data import compute_metrics, load_task
from deltatune.data import metrics as M


def test_classification_metrics_match_hand_computed_values():
    preds, refs = [0, 1, 1, 0], [0, 1, 0, 0]
    assert M.accuracy(preds, refs) == pytest.approx(0.75)
    # class 0: P=1, R=2/3 -> F1=0.8; class 1: P=1/2, R=1 -> F1=2/3
    assert M.macro_f1(preds, refs) == pytest.approx((0.8 + 2 / 3) / 2)
    # TP=1 TN=2 FP=1 FN=0: (1*2 - 1*0) / sqrt(2*1*3*2)
    assert M.matthews(preds, refs) == pytest.approx(2 / math.sqrt(12))


def test_macro_f1_averages_over_the_classes_that_occur():
    # a dev split (or a --max-eval sample) without class "c": perfect predictions are a macro-F1 of 1, not 2/3
    from deltatune.data import Task

    task = Task("t", "classification", ["a", "b", "c"])
    assert compute_metrics(task, [0, 1, 0, 1], [0, 1, 0, 1])["macro_f1"] == pytest.approx(1.0)
    # a wrongly predicted absent class still counts: class 2 has F1 0 (predicted, never true)
    assert compute_metrics(task, [0, 1, 2, 1], [0, 1, 0, 1])["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # an unknown label string is a miss of the true class, not a class of its own
    assert compute_metrics(task, ["a", "b", "zzz"], [0, 1, 1])["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_correlations_of_perfect_and_monotone_relations():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3, 4], [1, 4, 9, 16]) < 0.99
    assert M.pearson([2, 2, 2], [1, 2, 3]) == 0.0  # constant predictions: defined as 0, not nan


def test_bleu_identical_is_100_and_multiple_references_count():
    hyp = ["the cat sat on the mat today", "a dog barked loudly at the postman"]
    assert M.bleu(hyp, hyp) == pytest.approx(100.0)
    refs = [["a cat was sitting on a mat", "the cat sat on the mat today"], ["a dog barked loudly at the postman"]]
    assert M.bleu(hyp, refs) == pytest.approx(100.0)
    assert M.bleu(hyp, [r[0] for r in refs]) < 100.0


def test_rouge_l_of_a_known_pair():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 tokens of 6 and 6
    assert M.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    assert M.rouge_l(["the cat sat on the mat"], [["zzz", "the cat sat on the mat"]]) == pytest.approx(100.0)


def test_compute_metrics_chooses_by_task_and_accepts_examples_and_label_strings(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 1}]
    cola = load_task(
        make_task(tmp_path, "cola", {"type": "classification", "labels": ["unacceptable", "acceptable"]}, test=rows)
    )
    out = compute_metrics(cola, ["unacceptable", "acceptable", "garbage"], cola["test"])
    assert set(out) == {"accuracy", "macro_f1", "matthews"} and out["accuracy"] == pytest.approx(2 / 3)
    assert cola.primary_metric == "matthews"
    assert set(compute_metrics("regression", [1.0, 2.0], [1.5, 2.5])) == {"pearson", "spearman"}
    gen = load_task(
        write_jsonl(tmp_path / "g.jsonl", [{"source": "s", "target": "x y z w", "references": ["x y z w", "q"]}])
    )
    assert compute_metrics(gen, ["x y z w"], gen["train"]) == {
        "bleu": pytest.approx(100.0),
        "rouge_l": pytest.approx(100.0),
    }
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        compute_metrics(cola, [0, 1], cola["test"])


def test_metric_without_its_package_names_the_study_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match=r"deltatune\[study\]"):
        M.bleu(["a"], ["a"])


def test_an_unknown_label_string_is_a_miss_in_matthews_not_a_class(tmp_path):
    """`compute_metrics` with string predictions: 'garbage' (or 'Acceptable') became a third class in MCC,
    which scored 0.404 where counting it as wrong gives 0.258 (the probe's rows), as macro-F1 and accuracy do."""
    from sklearn.metrics import matthews_corrcoef

    gold = [0, 1, 1, 0, 1, 1, 1, 1]
    rows = [{"text": f"t{i}", "label": g} for i, g in enumerate(gold)]
    cola = load_task(
        make_task(tmp_path, "cola", {"type": "classification", "labels": ["unacceptable", "acceptable"]}, test=rows)
    )
    said = [
        "unacceptable",
        "acceptable",
        "garbage",
        "unacceptable",
        "acceptable",
        "Acceptable",
        "acceptable",
        "acceptable",
    ]
    wrong = [0, 1, 0, 0, 1, 0, 1, 1]  # the two unknown answers counted as the other class than the gold one
    assert compute_metrics(cola, said, cola["test"])["matthews"] == pytest.approx(matthews_corrcoef(gold, wrong))
    assert matthews_corrcoef(gold, wrong) != pytest.approx(matthews_corrcoef(gold, [0, 1, -1, 0, 1, -1, 1, 1]))
