"""Numbers of the subspace study that could be wrong without an error: what the report averages and compares."""

from __future__ import annotations

from pathlib import Path

from deltatune.subspace.report import build, main_table, transfer_matrix
from deltatune.subspace.store import Store, share

METHODS = ["adapter", "lora"]


def _solution(store: Store, task: str, method: str, score: float, metric: str = "accuracy") -> None:
    store.put("subspace_solutions", task=task, method=method, seed=42, size=1, score=score, metric=metric, path="-")


def _result(store: Store, space: str, stage: str, task: str, method: str, source: str, score: float) -> None:
    original = store.one("subspace_solutions", task=task, method=method)["score"]
    store.put(
        "subspace_results", space=space, stage=stage, task=task, method=method, source=source, score=score,
        original=original, ratio=score / original,  # what stores written before `share` hold
    )  # fmt: skip


def test_a_share_of_a_non_positive_original_is_undefined_not_inverted(tmp_path: Path) -> None:
    """A regression task's Pearson after a short run can be negative: -0.04 against -0.05 read as 80%, and a
    worse -0.10 as 200%, averaged with the accuracy tasks' shares without a word."""
    assert share(0.5, 0.8) == 0.625 and share(-0.04, -0.05) is None and share(0.1, 0.0) is None
    store = Store(tmp_path / "s.db")
    for method, acc, corr in (("head", 0.5, -0.06), ("adapter", 0.8, -0.05), ("lora", 0.8, 0.04)):
        _solution(store, "sent", method, acc)
        _solution(store, "sts", method, corr, "pearson")
    for task, score in (("sent", 0.8), ("sts", -0.10)):
        for method in METHODS:
            _result(store, f"unified-{task}", "optimize", task, method, method, score)
            _result(store, f"unified-{task}", "transfer", task, method, "lora" if method == "adapter" else "adapter",
                    score)  # fmt: skip
    table = {row[0]: row for row in main_table(store, METHODS)}
    # the accuracy task alone counts for the adapter (its Pearson original is negative); LoRA's Pearson
    # original (0.04) is positive, so its -0.10 counts as -250%, a real loss, not a gain
    assert table["Subspace optimization, single-task (seen)"][1:4] == ["100.0 (1)", "-75.0 (2)", "-16.7 (3)"]
    assert transfer_matrix(store, METHODS)[2][1] == "100.0 (1)"  # lora -> adapter: the sts row left out
    assert table["The fixed task head alone, all tasks"][1] == "62.5 (1)"
    md, _ = build(store, METHODS, tmp_path / "r")
    assert "2 of 8 results are left out of the % tables: their method's own solution scored <= 0 (sts" in md.read_text()


def test_a_multi_task_subspace_with_more_dimensions_than_solutions_says_how_many_are_random(
    tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    """2 seen tasks x 1 seed give 2 directions; the other d - 2 of the multi-task and "PCA" subspaces are random
    completions, which the report's "PCA subspace (same d)" did not say."""
    import pytest
    from test_subspace import toy_study

    mp = pytest.MonkeyPatch()
    try:
        study = toy_study(tmp_path, mp, d=3, methods=["lora"], method_args={"lora": {"r": 2}})
        study.collect()
        study.find(single=False)
    finally:
        mp.undo()
    assert (
        "found from 2 solutions per method, fewer than d=3: 1 of their directions are random" in capsys.readouterr().err
    )


def test_a_task_s_head_does_not_depend_on_the_tasks_collected_before_it(tmp_path: Path) -> None:
    """transformers draws a new classifier head from the global RNG: unseeded, `collect --tasks bin` and
    `collect --tasks pairs,bin` gave `bin` different heads (0.39 against -0.08 summed weight on a tiny BERT),
    hence different solutions, whatever --seed said."""
    import pytest
    import torch
    from test_subspace import WORDS, tiny_bert, toy_study
    from tiny import make_tokenizer

    from deltatune.subspace.collect import load_head

    tokenizer = make_tokenizer(WORDS)

    def fresh_head(n: int) -> torch.nn.Module:  # a new head as transformers draws it: from the global RNG
        state = torch.get_rng_state()
        model = tiny_bert(tokenizer, n)  # (seeds itself; the head below is drawn from the state it found)
        torch.set_rng_state(state)
        torch.nn.init.normal_(model.classifier.weight, std=0.02)
        return model

    heads = []
    for order in (["toyb"], ["toya", "toyb"]):
        mp = pytest.MonkeyPatch()
        try:
            study = toy_study(tmp_path / "-".join(order), mp, methods=["lora"], method_args={"lora": {"r": 2}})
            study.make_backbone = fresh_head
            study.collect(order)
            heads.append(load_head(study.workdir, "toyb"))
        finally:
            mp.undo()
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
