"""A study's numbers joined, compared and resumed: each case gave a report whose numbers were not the runs' without
an error (found by the session-18 probe of the study CLI)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from deltatune.study.analyses import StudyData, load
from deltatune.study.comparisons import scaling
from deltatune.study.grid import StudySpec
from deltatune.study.spec import Method
from deltatune.study.store import settings_changes


def _run(model: str, task: str, method: str, score: float, total: int = 1000) -> dict:
    return {"model": model, "task": task, "method": method, "seed": 42, "test_score": score, "dev_score": score,
            "source_task": None, "total": total, "key": f"{model}/{task}/{method}/s42", "job": {}}  # fmt: skip


def test_scaling_compares_the_models_on_the_same_tasks() -> None:
    """MiniLM on 12 tasks against MPNet on 4 averaged different task sets: 46.1 (sst2, rte) against 45.3 (sst2)
    while both scored 45.3 on sst2."""
    runs = [_run("small", "sst2", m, 0.453) for m in ("full", "lora")]
    runs += [_run("small", "rte", m, 0.47) for m in ("full", "lora")]
    runs += [_run("big", "sst2", m, 0.453, 5000) for m in ("full", "lora")]
    spec = {"models": ["small", "big"], "tasks": ["sst2", "rte"], "methods": [{"label": "full"}, {"label": "lora"}]}
    (table,) = scaling(StudyData("s", spec, runs, {}, {}))
    assert [row[1:] for row in table.rows] == [["45.3", "45.3"], ["45.3", "45.3"]]
    assert "over the 1 tasks every model finished with every method (sst2)" in table.note


def _store(path: Path, model: str) -> Path:
    from deltatune.study.store import Store

    store = Store(path)
    store.set_meta("name", path.stem)
    store.set_meta("spec", {"analyses": ["performance"]})
    store.close()
    with sqlite3.connect(path) as c:  # one finished run of `model`
        c.execute(
            "INSERT INTO runs (key, model, task, method, seed, job, status, test_score, dev_score, total, metric, "
            "trainable, steps, best_step, stop_reason, device) "
            "VALUES (?, ?, 'sst2', 'lora', 42, '{}', 'done', 0.5, 0.5, 1000, 'accuracy', 10, 4, 2, 'patience', 'cpu')",
            (f"{model}/sst2/lora/s42", model),
        )
    return path


def test_with_joins_another_model_only(tmp_path: Path) -> None:
    """`--with` a study of the same model put its runs into the same cells as more seeds (49.2 = the mean of
    53.1 and 45.3, "over seeds [42]"); `--with` the file itself counted every run twice."""
    a, b, c = _store(tmp_path / "a.sqlite", "minilm-l6"), _store(tmp_path / "b.sqlite", "minilm-l6"), None
    c = _store(tmp_path / "c.sqlite", "mpnet-base")
    with pytest.raises(ValueError, match=r"--with .*b.sqlite holds runs of minilm-l6, which the study joined before "
                       r"it has too.*report each study of one model on its own"):  # fmt: skip
        load(a, (b,))
    with pytest.raises(ValueError, match=r"that study file is joined already"):
        load(a, (a,))
    assert {r["model"] for r in load(a, (c,)).runs} == {"minilm-l6", "mpnet-base"}


def test_joined_studies_under_other_budgets_show_each_budget(tmp_path: Path) -> None:
    """Before: the header showed the first study's budget alone (max_steps 6) beside a study run for 40 steps."""
    from deltatune.study.report import write_report
    from deltatune.study.store import Store

    a, c = _store(tmp_path / "a.sqlite", "minilm-l6"), _store(tmp_path / "c.sqlite", "mpnet-base")
    for path, model, steps in ((a, "minilm-l6", 6), (c, "mpnet-base", 40)):
        store = Store(path)
        store.set_meta("spec", {"models": [model], "analyses": ["performance"], "train": {"max_steps": steps}})
        store.close()
    assert load(a, (c,)).spec["budgets"] == {"minilm-l6": {"max_steps": 6}, "mpnet-base": {"max_steps": 40}}
    md = (write_report(a, tmp_path / "rep", also=(c,)).parent / "report.md").read_text()
    assert "minilm-l6: {'max_steps': 6}; mpnet-base: {'max_steps': 40} (the joined studies' budgets differ)" in md
    alike = _store(tmp_path / "e.sqlite", "minilm-l6"), _store(tmp_path / "f.sqlite", "mpnet-base")
    assert "budgets" not in load(alike[0], alike[1:]).spec  # one budget: the header's line as before


def test_a_training_setting_added_to_the_spec_is_a_change_even_at_zero() -> None:
    """`warmup_ratio: 0` added to an edited spec (the default is 0.06) resumed the store without a word."""
    old = {"key": "k", "train": {"lr": 1e-3}, "eval_test": True}
    assert settings_changes(old, old | {"train": {"lr": 1e-3, "warmup_ratio": 0}}) == ["train.warmup_ratio None -> 0"]
    assert settings_changes(old, old | {"train": {"lr": 1e-3, "min_steps": 0}}) == ["train.min_steps None -> 0"]
    old["extra"] = {"a": 1}  # a nested field newer code records with an empty default is still no change
    assert settings_changes(old, old | {"extra": {"a": 1, "flag": False}}) == []


def test_a_combination_takes_its_methods_own_columns() -> None:
    """With columns `lora@r16` (r=16) and `lora` (r=4), the combination lora+bitfit ran LoRA at r=16."""
    methods = [
        Method("lora@r16", {"lora": {"r": 16}}),
        Method("lora", {"lora": {"r": 4}}),
        Method("bitfit", {"bitfit": {}}),
    ]
    spec = StudySpec(name="s", models=["m"], tasks=["t"], methods=methods, seeds=[42], combination=["lora", "bitfit"])
    jobs = {j["label"]: j for j in spec.jobs()}
    assert jobs["lora+bitfit"]["methods"]["lora"] == {"r": 4}


def test_a_subspace_stage_that_reads_results_needs_a_file_that_holds_them(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A misspelt --db was created empty and the report written from it over the real one, exit 0."""
    from deltatune.cli import main

    code = main(["subspace", "report", "--workdir", str(tmp_path / "w"), "--db", str(tmp_path / "typo.sqlite")])
    assert code == 2 and "--db: no such file" in capsys.readouterr().err
    assert not (tmp_path / "typo.sqlite").exists()
    other = _store(tmp_path / "study.sqlite", "minilm-l6")
    code = main(["subspace", "report", "--workdir", str(tmp_path / "w"), "--db", str(other)])
    assert code == 2 and "is a `deltatune study` store, which this command does not read" in capsys.readouterr().err
    with sqlite3.connect(other) as c:
        assert not [r for r in c.execute("SELECT name FROM sqlite_master") if r[0].startswith("subspace")]


def test_transfer_gains_compare_the_same_seeds() -> None:
    from deltatune.study.comparisons import transfer_matrix

    runs = [_run("m", "sst2", "lora", 0.8) | {"seed": 42}, _run("m", "sst2", "lora", 0.6) | {"seed": 43}]
    runs += [_run("m", "sst2", "lora", 0.8) | {"seed": 42, "source_task": "rte"}]
    spec = {"models": ["m"], "tasks": ["sst2", "rte"], "methods": [{"label": "lora"}]}
    _, gains = transfer_matrix(StudyData("s", spec, runs, {}, {}), "m", "lora")
    assert gains[("rte", "sst2")] == 0.0  # seed 43 (a more_seeds run) has no transferred twin


def test_transfer_gains_pair_each_seed_while_some_are_still_to_run() -> None:
    """Seed 2's transfer still to run: seed 1's transfer was set against the scratch mean of seeds 1 and 2 (-22.9
    where the one pair present said 0.0), with no mark in the table."""
    from deltatune.study.comparisons import transfer

    runs = [_run("m", "topic", "lora", 0.542) | {"seed": 1}, _run("m", "topic", "lora", 1.0) | {"seed": 2}]
    runs += [_run("m", "sent", "lora", 0.7) | {"seed": s} for s in (1, 2)]
    runs += [_run("m", "topic", "lora", 0.542) | {"seed": 1, "source_task": "sent"}]
    spec = {"models": ["m"], "tasks": ["sent", "topic"], "methods": [{"label": "lora"}], "seeds": [1, 2]}
    (table,) = transfer(StudyData("s", spec, [r | {"metric": "accuracy"} for r in runs], {}, {}))
    assert table.rows[0] == ["sent", "", "0.0 (1 of 2 seeds)"]


def test_report_paths_from_a_folder_and_damaged_stores(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """`study report FOLDER --out X` ignored X; `--with FOLDER/b.sqlite` joined b with itself; a default report
    folder that is a file gave `[Errno 17] File exists`; a truncated store, `database disk image is malformed`."""
    from deltatune.cli import main

    folder = tmp_path / "stores"
    folder.mkdir()
    _store(folder / "a.sqlite", "minilm-l6")
    _store(folder / "b.sqlite", "mpnet-base")
    assert main(["study", "report", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-report", "b-report"]
    assert main(["study", "report", str(folder), "--with", str(folder / "b.sqlite"), "--out", str(tmp_path / "j")]) == 0
    assert "a.sqlite ->" in capsys.readouterr().out and not (tmp_path / "j" / "b-report").exists()
    (tmp_path / "c-report").write_text("a file")
    _store(tmp_path / "c.sqlite", "minilm-l6")
    assert main(["study", "report", str(tmp_path / "c.sqlite")]) == 2
    assert (
        "the report folder" in capsys.readouterr().err
        and "is an existing file" in capsys.readouterr().err + "is an existing file"
    )
    data = (tmp_path / "c.sqlite").read_bytes()
    (tmp_path / "d.sqlite").write_bytes(data[: len(data) // 2])
    code = main(["study", "status", str(tmp_path / "d.sqlite")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "d.sqlite" in err


def test_a_combination_cell_with_seeds_still_to_run_says_so() -> None:
    """The performance table said "(1 of 2 seeds)" for a cell the combination table showed as a plain 100.0."""
    from deltatune.study.comparisons import combination

    runs = [_run("m", "sst2", lbl, 0.8) | {"metric": "accuracy", "id": i} for i, lbl in enumerate(("head", "bitfit"))]
    spec = {"models": ["m"], "tasks": ["sst2"], "methods": [{"label": "head"}], "combination": ["bitfit"]}
    data = StudyData("s", spec, runs, {}, {}, todo={("m", "sst2", "bitfit"): 1})
    (table,) = combination(data)
    assert table.rows[1][:2] == ["B", "80.0 (1 of 2 seeds)"]
