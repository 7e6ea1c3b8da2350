"""A subspace study over a researcher's own data: files and folders, other column names, no dev split,
3 classes, pairs, regression; tasks added later. Tiny BERT, seconds."""

from __future__ import annotations

import csv
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from test_subspace import CONFIGS, WORDS, tiny_bert
from tiny import BAD, GOOD, NOUNS, make_tokenizer

from deltatune.cli import main
from deltatune.subspace.config import StudyConfig
from deltatune.subspace.pipeline import Study

SMALL = ["--k-shot", "4", "--dev-k", "2", "--n-eval", "8", "--max-length", "16", "--batch-size", "8", "--steps", "2",
         "--eval-every", "2", "--find-steps", "1", "--optimize-steps", "2", "--d", "2", "--hidden", "4",
         "--methods", "lora,adapter", "--method-arg", "lora.r=2", "--method-arg", "adapter.bottleneck=4"]  # fmt: skip


def _own_data(root: Path) -> dict[str, Path]:
    """A 3-class CSV with other column names and no dev split, a regression JSONL file, a pair-task folder."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "reviews.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Review", "Sentiment"])
        for _ in range(60):
            c = rng.randint(0, 2)
            writer.writerow(
                [f"the {rng.choice(NOUNS)} was {rng.choice([BAD, NOUNS, GOOD][c])}", ["neg", "mid", "pos"][c]]
            )
    rows = [{"text": f"the film was {rng.choice(GOOD + BAD)}", "label": round(5 * rng.random(), 2)} for _ in range(40)]
    (root / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "pairs").mkdir()
    for split, n in (("train", 40), ("dev", 12)):
        lines = []
        for _ in range(n):
            a, b = rng.choice(GOOD), rng.choice(GOOD + BAD)
            lines.append(json.dumps({"text": f"the movie was {a}", "text_pair": f"the plot was {b}",
                                     "label": "same" if b in GOOD else "other"}))  # fmt: skip
        (root / "pairs" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {"reviews": root / "reviews.csv", "scores": root / "scores.jsonl", "pairs": root / "pairs"}


def _files(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


@pytest.fixture()
def tokenizer():  # noqa: ANN201
    return make_tokenizer(WORDS + ["mid"])


def test_a_study_over_own_files_and_folders_reads_them_as_train_does(tmp_path: Path, capsys, tokenizer) -> None:  # noqa: ANN001
    data = _own_data(tmp_path / "data")
    before = _files(tmp_path / "data")
    work = tmp_path / "w"
    tasks = ",".join(str(p) for p in data.values())  # absolute paths: heads and solutions went into the data folder
    argv = ["subspace", "init", "--workdir", str(work), "--tasks", tasks, "--unseen", str(data["pairs"]), *SMALL]
    assert main([*argv, "--columns", "Review=text,Sentiment=label"]) == 2  # reviews.csv has no dev split
    err = capsys.readouterr().err  # own data is read at init: its faults are said before anything trains
    assert "task 'reviews' has no dev split" in err and "--dev-split 0.2" in err and not work.exists()
    assert main([*argv, "--columns", "Review=text,Sentiment=label", "--dev-split", "0.25"]) == 0, capsys.readouterr()
    cfg = StudyConfig.load(work)
    assert cfg.tasks == ["reviews", "scores", "pairs"] and cfg.unseen == ["pairs"]
    # resumed with the unseen task by its name (was: looked up in the collection, "unknown task 'pairs'")
    again = ["subspace", "init", "--workdir", str(work), "--tasks", tasks, "--unseen", "pairs", *SMALL]
    assert main([*again, "--columns", "Review=text,Sentiment=label", "--dev-split", "0.25"]) == 0, capsys.readouterr()
    assert cfg.sources == {k: str(v.resolve()) for k, v in data.items()}
    study = Study(work, tokenizer=tokenizer, make_backbone=lambda n: tiny_bert(tokenizer, n))
    reviews = study.data("reviews")
    assert reviews.task.labels == ["mid", "neg", "pos"] and reviews.task.num_labels == 3
    assert {id(e) for e in reviews.eval}.isdisjoint(id(e) for e in reviews.task["train"] + reviews.task["dev"])
    assert study.data("scores").task.type == "regression" and study.data("pairs").task.type == "pair_classification"
    study.collect()
    study.find()
    study.optimize()
    assert len(study.store.rows("subspace_results", stage="optimize")) == 3 * 2 + 3 * 2  # 3 single, 3 multi x pairs
    assert _files(tmp_path / "data") == before  # nothing written beside the user's data
    assert {p.name for p in (work / "heads").iterdir()} == {"reviews.safetensors", "scores.safetensors",
                                                            "pairs.safetensors"}  # fmt: skip
    # later stages take a task by the path it was given as, from another folder too
    assert study.cfg.task_names([str(data["reviews"]), "scores"]) == ["reviews", "scores"]
    # the Python stages too (before: find(["data/reviews.csv"]) looked for a solution of that path)
    assert {j[0] for j in study.optimize_jobs([str(data["reviews"])])} == {"unified-reviews"}
    with pytest.raises(ValueError, match=r"nope is not a task of this study \(reviews, scores, pairs\)"):
        study.find(["nope"])


@pytest.mark.parametrize(
    "tasks,extra,match",
    [
        ("{reviews},{other}", (), r"already has a task named 'reviews', read from .*; rename the folder or file"),
        ("{data}/nope.csv", (), r"--tasks .*nope\.csv: no such file or folder"),
        ("{multi}", (), r"a task named 'multi' .* would be confused with the study's own subspaces"),
        ("{reviews}", ("--dev-split", "1.5"), r"--dev-split must be a fraction between 0 and 1"),
    ],
)
def test_own_task_paths_that_cannot_be_told_apart_are_refused(tmp_path: Path, capsys, tasks, extra, match) -> None:  # noqa: ANN001
    import re

    data = _own_data(tmp_path / "data")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "reviews.csv").write_text(data["reviews"].read_text())
    (tmp_path / "multi").mkdir()
    (tmp_path / "multi" / "train.jsonl").write_text(data["scores"].read_text())
    text = tasks.format(reviews=data["reviews"], other=tmp_path / "other" / "reviews.csv", data=tmp_path / "data",
                        multi=tmp_path / "multi")  # fmt: skip
    code = main(["subspace", "init", "--workdir", str(tmp_path / "w"), "--tasks", text, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "w").exists()


def test_a_task_without_dev_or_with_too_few_examples_names_the_flag(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from deltatune.subspace.config import task_data

    data = _own_data(tmp_path / "data")
    code = main(["subspace", "init", "--workdir", str(tmp_path / "w"), "--tasks", str(data["scores"]), *SMALL])
    err = capsys.readouterr().err.strip()  # was: at collect, "task 'scores' has no split 'dev'; it has ['train']"
    assert code == 2 and err.endswith(
        "task 'scores' has no dev split (it has train), which every score of the study is measured on; start the "
        "study with --dev-split 0.2 to hold out 20% of train (seeded, stratified)"
    )
    cfg = StudyConfig(sources={"reviews": str(data["reviews"])}, columns={"Sentiment": "label", "Review": "text"},
                      dev_split=0.2, k_shot=30, dev_k=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"k=30 per class .*--k-shot 30 \(training\) and --dev-k 2"):
        task_data("reviews", cfg)


def test_collect_adds_a_task_until_a_multi_task_subspace_was_found_on_the_others(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    from test_subspace import write_task

    for name in ("toya", "toyb", "toyc", "toyd"):
        write_task(tmp_path / "tasks", name, seed=len(name))
    cfg = StudyConfig(
        tasks=["toya", "toyb"], unseen=["toyb"], methods=["lora"], method_args={"lora": {"r": 2}},
        sources={t: str(tmp_path / "tasks" / t) for t in ("toya", "toyb")},
        k_shot=4, dev_k=2, n_eval=8, max_length=16, batch_size=8, steps=2, eval_every=2, d=2, hidden=4, find_steps=1,
    )  # fmt: skip
    cfg.save(tmp_path / "w")
    study = Study(tmp_path / "w", tokenizer=tokenizer, make_backbone=lambda n: tiny_bert(tokenizer, n))
    study.collect([str(tmp_path / "tasks" / "toyc")])  # was: trained, but never part of the study
    assert StudyConfig.load(tmp_path / "w").tasks == ["toya", "toyb", "toyc"]
    study.collect()
    study.find()
    with pytest.raises(ValueError, match=r"pca, random, unified-multi of this study were found on its seen tasks "
                                         r"toya, toyc; adding toyd would leave it out"):  # fmt: skip
        study.collect([str(tmp_path / "tasks" / "toyd")])
    assert StudyConfig.load(tmp_path / "w").tasks == ["toya", "toyb", "toyc"]
    assert torch.get_num_threads() >= 1 and CONFIGS  # the shared fixtures' module is imported for its tiny model


def test_two_processes_adding_tasks_keep_both(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    """Each process read study.json when it started: the second one's save dropped the first one's task."""
    from test_subspace import write_task

    for name in ("toya", "toyb", "toyc"):
        write_task(tmp_path / "tasks", name, seed=len(name))
    StudyConfig(tasks=["toya"], methods=["lora"], method_args={"lora": {"r": 2}}, k_shot=4, dev_k=2, d=2,
                hidden=4, sources={"toya": str(tmp_path / "tasks" / "toya")}).save(tmp_path / "w")  # fmt: skip
    first, second = (Study(tmp_path / "w", tokenizer=tokenizer) for _ in range(2))
    assert first.add_tasks([str(tmp_path / "tasks" / "toyb")]) == ["toyb"]
    assert second.add_tasks([str(tmp_path / "tasks" / "toyc")]) == ["toyc"]
    assert StudyConfig.load(tmp_path / "w").tasks == ["toya", "toyb", "toyc"] == second.cfg.tasks


def test_a_dev_split_flag_that_no_task_needs_is_said_to_be_unused(tmp_path: Path) -> None:
    data = _own_data(tmp_path / "data")
    work = tmp_path / "w"
    argv = ["subspace", "init", "--workdir", str(work), "--tasks", str(data["pairs"]), *SMALL, "--dev-split", "0.2"]
    with pytest.warns(UserWarning, match="every task of the study has its own dev split, so --dev-split 0.2 is unused"):
        assert main(argv) == 0
    mixed = ["subspace", "init", "--workdir", str(tmp_path / "w2"), "--tasks", f"{data['pairs']},{data['scores']}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # scores.jsonl has no dev split: the flag holds one out
        assert main([*mixed, *SMALL, "--dev-split", "0.2"]) == 0
