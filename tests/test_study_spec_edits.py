"""A spec edited between runs, a grid rate that failed, seeds stopped at other steps: what the store runs and what
the report says follow the spec and the runs, not whatever rows the store happens to hold."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from study_helpers import _spec, make_world

from deltatune.study import Store, parse_spec, run_study
from deltatune.study.analyses import StudyData, convergence, load, mean_curves, performance
from deltatune.study.verdicts import still_improving


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_world(tmp_path_factory)


def test_runs_removed_from_the_spec_are_not_run_nor_reported(world: dict[str, str], tmp_path: Path) -> None:
    """Before: a seed and a method removed from the spec still trained, and the report averaged them."""
    db = tmp_path / "s.sqlite"
    both = {"lora": {"r": 4}, "bitfit": {}}
    run_study(
        parse_spec(_spec(world, tasks=[world["sent"]], methods=both, seeds=[1, 2])), db, max_runs=1, progress=False
    )
    smaller = parse_spec(_spec(world, tasks=[world["sent"]], methods={"lora": {"r": 4}}, seeds=[1]))
    assert run_study(smaller, db, progress=False)["pending"] == 0
    runs = Store(db).runs()
    assert {r["key"].split("/", 2)[2] for r in runs if r["status"] == "done"} == {"lora/s1"}
    data = load(db)
    assert [r["key"].split("/", 2)[2] for r in data.runs] == ["lora/s1"] and data.counts["done"] == 1


def test_a_rate_removed_from_the_grid_is_not_chosen(world: dict[str, str], tmp_path: Path) -> None:
    db = tmp_path / "g.sqlite"
    train = {"max_steps": 8, "batch_size": 8, "eval_every": 4, "max_length": 16, "patience": None}
    grid = {"tasks": [world["sent"]], "rates": {"lora": [1e-6, 3e-2]}}
    spec = _spec(world, tasks=[world["sent"]], methods={"lora": {"r": 4}}, train=train, lr_grid=grid)
    run_study(parse_spec(spec), db, max_runs=2, progress=False)  # the grid only
    rows = {r["job"]["train"]["lr"]: r["dev_score"] for r in Store(db).runs("done")}
    best = max(sorted(rows), key=rows.get)
    kept = [lr for lr in (1e-6, 3e-2) if lr != best]
    run_study(parse_spec(spec | {"lr_grid": {**grid, "rates": {"lora": kept}}}), db, progress=False)
    main = next(r for r in Store(db).runs("done") if r["key"].endswith("/s42"))
    assert main["lr"] == kept[0]  # before: the removed rate, the best of the old grid


def test_main_runs_wait_for_a_failed_grid_rate(world: dict[str, str], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Before: the choice was frozen without the failed rate, and after --retry-failed the report bolded a rate
    worse than the retried one as "the best"."""
    db = tmp_path / "f.sqlite"
    train = {"max_steps": 8, "batch_size": 8, "eval_every": 4, "max_length": 16, "patience": None}
    grid = {"tasks": [world["sent"]], "rates": {"lora": [1e-6, 3e-2]}}
    spec = parse_spec(_spec(world, tasks=[world["sent"]], methods={"lora": {"r": 4}}, train=train, lr_grid=grid))
    run_study(spec, db, max_runs=2, progress=False)
    with sqlite3.connect(db) as c:
        c.execute("UPDATE runs SET status = 'failed', error = 'OOM' WHERE key LIKE '%/lr0.03'")
    counts = run_study(spec, db)
    assert counts["done"] == 1 and counts["pending"] == 1 and not Store(db).meta("lr_choice")
    assert "1 runs wait on failed runs they depend on" in capsys.readouterr().err
    assert run_study(spec, db, retry_failed=True, progress=False)["done"] == 3


def _data(curves: dict[int, list[tuple[int, float]]]) -> StudyData:
    runs = [
        {"id": i, "model": "m", "task": "t", "method": "lora", "metric": "accuracy", "source_task": None, "job": {}}
        for i in curves
    ]
    points = {i: [{"step": s, "accuracy": v} for s, v in c] for i, c in curves.items()}
    return StudyData("x", {"models": ["m"], "methods": [{"label": "lora"}]}, runs, points, {"done": len(runs)})


def test_mean_curves_average_seeds_at_the_steps_they_share_and_steps_to_90_is_per_seed() -> None:
    """Seeds stopped by patience at steps 6 and 40: steps 8-40 of the mean curve were one seed's alone."""
    long = [(s, 0.5 + 0.01 * s) for s in range(2, 42, 2)]
    short = [(2, 0.5), (4, 0.5), (6, 0.5)]
    assert [s for s, _ in mean_curves(_data({1: long, 2: short}), "m")[("t", "lora")]] == [2, 4, 6]
    table = convergence(_data({1: long, 2: short}))[0]
    assert table.rows[0][1] == "38 (1 of 2 seeds)"  # seed 1's own (90% of its 38-point gain: 86.2), seed 2 flat


def test_still_improving_reads_the_default_patience_when_the_spec_leaves_it() -> None:
    curve = [{"step": s} for s in (10, 20, 30, 40, 50)]
    run = {"stop_reason": "max_steps", "best_step": 20, "job": {"train": {}}}  # 3 evaluations after the best
    assert still_improving(run, curve)  # TrainConfig's patience 5 had not called it (before: LATE, 2)
    assert still_improving(run | {"job": {"train": {"patience": 5}}}, curve)


def test_a_cell_with_seeds_still_to_run_says_so(world: dict[str, str], tmp_path: Path) -> None:
    """Before: its mean of the finished seeds entered the average and % of full FT with no mark."""
    db = tmp_path / "p.sqlite"
    spec = parse_spec(_spec(world, tasks=[world["sent"]], methods={"full": {}, "lora": {"r": 4}}, seeds=[1, 2]))
    run_study(spec, db, max_runs=3, progress=False)
    table = performance(load(db))[0]
    cells = dict(zip(table.columns, table.rows[0], strict=True))
    assert "seeds" not in cells["full"]  # both of its seeds are done
    assert "(1 of 2 seeds)" in cells["lora"]
    assert table.rows[1][0] == "**average** (1 tasks; 1 cells with seeds still to run)"


def test_percent_of_full_ft_names_its_column_and_is_left_out_near_zero(world: dict[str, str], tmp_path: Path) -> None:
    db = tmp_path / "z.sqlite"
    methods = {"full@lr1e-3": {"lr": 1e-3}, "lora": {"r": 4}}
    run_study(parse_spec(_spec(world, tasks=[world["sent"]], methods=methods)), db, progress=False)
    rows = {r[0]: r[1:] for r in performance(load(db))[0].rows}
    assert "% of full@lr1e-3 FT" in rows  # before: no such row without a column named exactly `full`
    with sqlite3.connect(db) as c:  # an MCC or Pearson average near zero: a ratio to it is noise or flips sign
        c.execute("UPDATE runs SET test_score = 0.004 WHERE method = 'full@lr1e-3'")
    rows = {r[0]: r[1:] for r in performance(load(db))[0].rows}
    assert rows["% of full@lr1e-3 FT"] == ["-", "-"]


def test_runs_held_by_another_host_name_reclaim(world: dict[str, str], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    db = tmp_path / "h.sqlite"
    spec = parse_spec(_spec(world, tasks=[world["sent"]], methods={"lora": {"r": 4}}, seeds=[1, 2]))
    run_study(spec, db, max_runs=1, progress=False)
    with sqlite3.connect(db) as c:
        c.execute("UPDATE runs SET status = 'running', owner = 'elsewhere:12:-' WHERE status = 'pending'")
    assert run_study(spec, db)["running"] == 1
    assert "1 runs are held 'running' by a runner on another host" in capsys.readouterr().err


def test_a_preset_typo_is_answered_with_the_close_name() -> None:
    from deltatune.study.spec import load_spec

    with pytest.raises(FileNotFoundError, match="no study spec 'smoek': did you mean smoke?"):
        load_spec("smoek")


def test_grid_and_further_seed_tasks_take_a_task_folder_s_short_name(world: dict[str, str]) -> None:
    """`task_train.sent` took the short name of a task given as a folder; `lr_grid.tasks` and `more_seeds.tasks`
    refused it ("use some of ['/tmp/.../sent']")."""
    spec = parse_spec(
        _spec(
            world, lr_grid={"tasks": ["sent"], "rates": {"lora": [1e-3]}}, more_seeds={"seeds": [7], "tasks": ["sent"]}
        )
    )
    assert spec.lr_grid.tasks == [world["sent"]] and spec.more_seeds_tasks == [world["sent"]]


def test_a_method_default_rate_changed_between_runs_is_refused(
    world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release that changed BitFit's default rate trained seed 2 at 1e-2 beside seed 1 at 1e-3 in one cell."""
    import deltatune as dt

    db = tmp_path / "d.sqlite"
    raw = _spec(world, tasks=[world["sent"]], methods={"bitfit": {}}, seeds=[1, 2])
    raw["train"] = {k: v for k, v in raw["train"].items() if k != "lr"}  # the column takes the method's default
    run_study(parse_spec(raw), db, max_runs=1, progress=False)
    was = dt.METHODS["bitfit"].default_lr
    monkeypatch.setattr(dt.METHODS["bitfit"], "default_lr", was * 10)
    with pytest.raises(ValueError, match=rf"column bitfit .* trained its finished runs at lr {was:g} and would "):
        run_study(parse_spec(raw), db, progress=False)
    monkeypatch.setattr(dt.METHODS["bitfit"], "default_lr", was)
    assert run_study(parse_spec(raw), db, progress=False)["done"] == 2


def test_a_combined_method_whose_column_trains_at_another_rate_is_refused(world: dict[str, str]) -> None:
    """The column trained A at 5e-3 and every combined row trained A at its default 1e-3: the table compared them."""
    from deltatune.study.spec import SpecError

    combo = {"methods": ["prompt", "bitfit", "adapter"]}
    with pytest.raises(SpecError, match=r"methods\.adapter: column adapter trains at lr 0\.005, while the combination"):
        parse_spec(_spec(world, methods={"adapter": {"lr": 5e-3}}, combination=combo))
    grid = {"tasks": [world["sent"]], "rates": {"adapter": [1e-3, 3e-3]}}
    with pytest.raises(SpecError, match="column adapter takes its rate from lr_grid.*label the tuned column otherwise"):
        parse_spec(_spec(world, methods={"adapter": {}}, combination=combo, lr_grid=grid))
    spec = parse_spec(_spec(world, methods={"adapter@tuned": {"lr": 5e-3}}, combination=combo))
    single = next(j for j in spec.jobs() if j["label"] == "adapter")  # the combination's own A row
    assert single["train"]["lr"] == 1e-2  # the spec's rate for every run, as the combined rows have: not 5e-3


def test_a_k_shot_a_task_cannot_give_is_refused_with_the_spec(world: dict[str, str]) -> None:
    from deltatune.study.spec import SpecError

    with pytest.raises(
        SpecError, match=r"k_shot: .*sent: k=25 per class but these classes have fewer examples: 'positive'"
    ):
        parse_spec(_spec(world, k_shot=25))


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (("--workers", "4"), "--workers needs --executor process"),
        (("--executor", "process", "--address", "ray://x:1"), "--address names a Ray cluster: add --executor ray"),
    ],
)
def test_executor_flags_that_would_be_ignored_are_refused_before_planning(
    world: dict[str, str], tmp_path: Path, capsys, flags: tuple, match: str
) -> None:  # noqa: ANN001
    import yaml

    from deltatune.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(_spec(world)))
    assert main(["study", "run", str(spec), "--db", str(tmp_path / "s.sqlite"), *flags]) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "s.sqlite").exists()


def test_a_rate_the_spec_changes_is_named_as_the_spec_s_change(world: dict[str, str], tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    raw = _spec(world, tasks=[world["sent"]], methods={"bitfit": {}}, seeds=[1, 2])
    run_study(parse_spec(raw), db, max_runs=1, progress=False)
    raw["train"] = raw["train"] | {"lr": 2e-2}
    with pytest.raises(ValueError, match=r"other settings: train\.lr 0\.01 -> 0\.02"):  # not "the default changed"
        run_study(parse_spec(raw), db, progress=False)
