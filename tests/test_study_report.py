"""The study report: its tables (combination, scaling, rates), the marks on its cells (still improving,
at majority, scored on dev) and its numbers (convergence, spreads), and older stores read unchanged.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from study_helpers import _job, _spec, make_world

from deltatune.study import Store, parse_spec, run_study
from deltatune.study.report import write_report


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_world(tmp_path_factory)


def test_combination_table_has_every_subset_in_the_papers_order(world: dict[str, str], tmp_path: Path) -> None:
    raw = _spec(world, tasks=[world["sent"]], methods={"head": {}}, combination={"methods": ["prompt", "bitfit"]})
    raw["analyses"] = ["combination"]
    raw["combination"]["configs"] = {"prompt": {"num_tokens": 2}}
    db = tmp_path / "c.sqlite"
    assert run_study(parse_spec(raw), db, progress=False)["done"] == 4
    md = (write_report(db).parent / "report.md").read_text()
    table = md[md.index("### Combination") :]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["none", "B", "P", "P+B"]
    assert "| 23.7 |" in table and "| 86.5 |" in table  # the paper's none and P+B beside ours


def test_a_run_stopped_by_its_bound_at_its_best_is_still_improving() -> None:
    from deltatune.study.verdicts import still_improving

    curve = [{"step": s} for s in (10, 20, 30, 40)]
    assert still_improving({"stop_reason": "max_steps", "best_step": 40}, curve)
    assert still_improving({"stop_reason": "max_epochs", "best_step": 30}, curve)
    no_patience = {"job": {"train": {"patience": None}}}  # then the best in the last LATE (2) evaluations counts
    assert not still_improving({"stop_reason": "max_steps", "best_step": 10} | no_patience, curve)  # plateaued
    patient = {"stop_reason": "max_steps", "best_step": 20, "job": {"train": {"patience": 3}}}
    assert still_improving(patient, curve)  # 2 evaluations after the best: patience 3 had not called it
    assert not still_improving(patient | {"job": {"train": {"patience": 2}}}, curve)
    assert not still_improving({"stop_reason": "patience", "best_step": 40}, curve)
    assert not still_improving({"stop_reason": "diverged", "best_step": 40}, curve)


def test_a_cell_is_marked_at_majority_only_when_no_seed_beat_it() -> None:
    from deltatune.study.verdicts import MARK_MAJORITY, cell_marks

    low, high = {"id": 1, "dev_score": 0.6, "majority": 0.6}, {"id": 2, "dev_score": 0.7, "majority": 0.6}
    assert cell_marks([low], {}) == MARK_MAJORITY and cell_marks([low, high], {}) == ""
    assert cell_marks([{"id": 3, "dev_score": 0.1, "majority": None, "job": {}}], {}) == ""  # regression: no baseline


def test_the_report_shows_each_methods_rate_and_the_grid(world: dict[str, str], tmp_path: Path) -> None:
    train = {"max_steps": 4, "batch_size": 8, "eval_every": 2, "max_length": 16, "patience": None}
    grid = {"tasks": [world["sent"]], "rates": {"lora": [1e-3, 1e-2]}}
    spec = parse_spec(_spec(world, methods={"lora": {"r": 4}, "full": {"lr": 1e-3}}, train=train, lr_grid=grid))
    db = tmp_path / "rates.sqlite"
    run_study(spec, db, progress=False)
    chosen = Store(db).meta("lr_choice")["tiny-bert/lora"]["lr"]
    md = (write_report(db).parent / "report.md").read_text()
    rate_row = next(line for line in md.splitlines() if line.startswith("| learning rate"))
    assert rate_row == f"| learning rate | 0.001 | {chosen:g} |"  # full: its fixed rate; lora: the grid's choice
    assert "Learning rate per method (dev grid)" in md and f"**{chosen:g}: " in md
    assert "| stopped by | max_steps 2 | max_steps 2 |" in md
    perf = md.split("### Performance")[1].split("###")[0]
    assert perf.count("| sent") == 1  # the grid's runs are not extra rows or seeds


def test_two_study_files_report_as_one_scaling_study(world: dict[str, str], tmp_path: Path) -> None:
    one = tmp_path / "a" / "one.sqlite"
    run_study(parse_spec(_spec(world, tasks=[world["sent"]], methods={"lora": {"r": 4}})), one, progress=False)
    other_model = tmp_path / "tiny-bert-2"
    import shutil

    shutil.copytree(world["model"], other_model)
    two = tmp_path / "b" / "two.sqlite"
    spec = _spec(world, name="two", models=[str(other_model)], tasks=[world["sent"]], methods={"lora": {"r": 4}})
    run_study(parse_spec(spec), two, progress=False)
    md = (write_report(one, tmp_path / "joined", also=(two,)).parent / "report.md").read_text()
    assert "### Scaling" in md and "| tiny-bert (" in md and "| tiny-bert-2 (" in md
    assert "- 2 runs done" in md


def test_a_report_leaves_an_older_store_unchanged(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    s = Store(db)
    s.add_jobs([_job("r1") | {"train": {}}])
    s.set_meta("spec", {"analyses": ["performance"]})
    job = s.claim("h:1:-")
    s.finish(job["id"], "h:1:-", {"metric": "accuracy", "dev_score": 0.5, "test_score": 0.5, "history": []})
    s.close()
    conn = sqlite3.connect(db)  # as written before stop_reason, majority and lr were recorded
    for column in ("stop_reason", "majority", "lr"):
        conn.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    md = (write_report(db, tmp_path / "rep").parent / "report.md").read_text()
    assert db.read_bytes() == before and "- 1 runs done" in md
    Store(db).close()  # a runner opening it adds the columns
    assert {"stop_reason", "majority", "lr"} <= {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(runs)")}


def test_convergence_counts_steps_to_the_best_score_not_to_the_last() -> None:
    from deltatune.study.analyses import steps_to_90

    stopped_by_patience = [(50, 50.0), (100, 80.0), (150, 90.0), (200, 70.0), (250, 70.0)]
    assert steps_to_90(stopped_by_patience) == 150  # 90% of the best gain (40 points) is 86
    assert steps_to_90([(50, 50.0), (100, 51.0)]) is None


def test_a_cell_scored_on_dev_is_marked_dev_in_the_report(world: dict[str, str], tmp_path: Path) -> None:
    notest = tmp_path / "notest"
    shutil.copytree(world["sent"], notest)
    (notest / "test.jsonl").unlink()
    raw = _spec(
        world,
        tasks=[world["topic"], str(notest)],
        methods={"bitfit": {}},
        combination={"methods": ["bitfit"]},
        analyses=["performance", "combination"],
    )
    raw["train"] = raw["train"] | {"max_steps": 2}
    db = tmp_path / "dev.sqlite"
    assert run_study(parse_spec(raw), db, progress=False)["done"] == 4  # bitfit and head-only on both tasks
    md = (write_report(db).parent / "report.md").read_text()
    performance, combination = md.split("### Combination")
    row = next(line for line in performance.splitlines() if line.startswith("| notest"))
    assert "(dev)" in row and "(dev)" not in next(line for line in md.splitlines() if line.startswith("| topic"))
    assert "not a test score" in performance
    # the combination table shows the same cells: marked there too (columns: delta, topic, notest, average)
    cells = next(line for line in combination.splitlines() if line.startswith("| B |")).split("|")
    assert "(dev)" in cells[3] and "(dev)" not in cells[2]
    assert "not a test score" in combination


def test_two_seeds_that_agree_show_a_zero_spread_not_a_lone_score() -> None:
    """A cell of two seeds with equal scores read as one run ("87.8"): the spread is shown whenever seeds are."""
    from deltatune.study.analyses import fmt, mean_std

    assert fmt(*mean_std([87.8, 87.8])) == "87.8 ± 0.0"
    assert fmt(*mean_std([86.0, 86.4])) == "86.2 ± 0.3"
    assert fmt(*mean_std([87.8])) == "87.8"
    assert fmt(*mean_std([])) == "-"
