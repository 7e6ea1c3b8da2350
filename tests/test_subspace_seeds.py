"""The subspace study with several solutions per (task, method): held-out subspaces on a tiny BERT and toy tasks.

The property that matters: a held-out subspace is found WITHOUT the solution it is compared with,
so single-task numbers stop being ~100% by construction. The finder is wrapped to record exactly
which solution vectors it received.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest
import torch
from test_subspace import toy_study

from deltatune.cli import main
from deltatune.subspace import find as find_module
from deltatune.subspace.collect import load_solution
from deltatune.subspace.config import StudyConfig
from deltatune.subspace.pipeline import Study
from deltatune.subspace.report import build, main_table, task_table
from deltatune.subspace.store import Store

SEEDS = [42, 43]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A two-seed study collected, found (every finder call recorded), optimized and transferred."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("seeds")
    mp = pytest.MonkeyPatch()
    calls: dict[str, dict] = {}
    real = find_module.find_unified

    def recording(bank, solutions, data, heads, **kw):  # noqa: ANN001, ANN202
        calls[kw["name"]] = {"solutions": dict(solutions), "sets": list(data), "steps": kw["steps"]}
        return real(bank, solutions, data, heads, **kw)

    mp.setattr(find_module, "find_unified", recording)
    study = toy_study(root, mp, solution_seeds=SEEDS)
    study.collect()
    study.find()  # held-out spaces by default: the study has a second seed
    study.optimize()
    study.transfer()
    yield study, calls
    mp.undo()
    torch.set_num_threads(threads)


def test_collect_stores_a_distinct_solution_per_seed_sharing_head_and_initial_delta(seeded) -> None:  # noqa: ANN001
    study, _ = seeded
    rows = study.store.rows("subspace_solutions")
    for task in study.cfg.tasks:
        assert {r["seed"] for r in rows if r["task"] == task and r["method"] == "head"} == {42}  # one head per task
        for method in study.cfg.methods:
            assert {r["seed"] for r in rows if (r["task"], r["method"]) == (task, method)} == set(SEEDS)
            a, b = (load_solution(study.store, task, method, s) for s in SEEDS)
            assert torch.equal(a.init, b.init)  # one anchor: only the training randomness differs
            assert not torch.equal(a.vector, b.vector)
    assert len({r["path"] for r in rows}) == len(rows)  # a file per head and per solution
    assert (study.workdir / "solutions" / "toya" / "lora.safetensors").exists()  # the study seed's old name


def test_collect_resumes_per_task_method_and_seed(seeded) -> None:  # noqa: ANN001
    study, _ = seeded
    before = {(r["task"], r["method"], r["seed"]): r["created"] for r in study.store.rows("subspace_solutions")}
    with sqlite3.connect(study.store.path) as db:
        db.execute("DELETE FROM subspace_solutions WHERE task = 'toyb' AND method = 'prefix' AND seed = 43")
    study.collect()
    after = {(r["task"], r["method"], r["seed"]): r["created"] for r in study.store.rows("subspace_solutions")}
    assert set(after) == set(before)
    assert [k for k in after if after[k] != before[k]] == [("toyb", "prefix", 43)]  # only the missing one redone


def test_a_held_out_space_never_receives_the_solution_it_is_compared_with(seeded) -> None:  # noqa: ANN001
    study, calls = seeded
    for task in study.cfg.tasks:
        held = [load_solution(study.store, task, m, 42).vector for m in study.cfg.methods]
        received = calls[f"heldout-{task}"]["solutions"]
        assert set(received) == {(f"{task}@43", m) for m in study.cfg.methods}
        assert not any(torch.equal(sol.vector, v) for sol in received.values() for v in held)
        # the in-sample space is the one that holds it: the check above can tell them apart
        in_sample = calls[f"unified-{task}"]["solutions"]
        assert all(any(torch.equal(sol.vector, v) for sol in in_sample.values()) for v in held)
        row = study.store.one("subspace_spaces", name=f"heldout-{task}")
        assert row["tasks"] == [f"{task}@43"] and row["meta"]["seeds"] == [43]
        assert set(study.space(f"heldout-{task}").vectors) == {(f"{task}@43", m) for m in study.cfg.methods}
    # the multi-task space learns from every seed of the seen tasks, nothing of the unseen one
    multi = calls["unified-multi"]
    assert multi["sets"] == ["toya", "toya@43", "toyb", "toyb@43"] and multi["steps"] == 2 * 4
    assert calls["unified-toya"]["steps"] == 2 and calls["heldout-toya"]["steps"] == 2  # find_steps per set
    assert study.store.one("subspace_spaces", name="pca")["tasks"] == multi["sets"]


def test_held_out_results_are_ratios_to_the_held_out_seeds_solution(seeded) -> None:  # noqa: ANN001
    study, _ = seeded
    methods, tasks = study.cfg.methods, study.cfg.tasks
    optimized = study.store.rows("subspace_results", stage="optimize")
    held = [r for r in optimized if r["space"].startswith("heldout-")]
    assert len(held) == len(tasks) * len(methods)
    for r in held:
        reference = study.store.one("subspace_solutions", task=r["task"], method=r["method"], seed=42)["score"]
        assert r["original"] == reference and r["ratio"] == pytest.approx(r["score"] / reference)
    transfers = [r for r in study.store.rows("subspace_results", stage="transfer") if r["space"].startswith("heldout-")]
    assert len(transfers) == len(tasks) * len(methods) * (len(methods) - 1)
    before = {(r["space"], r["stage"], r["task"], r["method"], r["source"]): r["created"]
              for r in study.store.rows("subspace_results")}  # fmt: skip
    study.find()
    study.optimize()
    study.transfer()
    assert {(r["space"], r["stage"], r["task"], r["method"], r["source"]): r["created"]
            for r in study.store.rows("subspace_results")} == before  # fmt: skip


def test_report_shows_held_out_beside_in_sample_rows(seeded, tmp_path: Path) -> None:  # noqa: ANN001
    study, _ = seeded
    methods = study.cfg.methods
    table = {row[0]: row for row in main_table(study.store, methods)}
    n = len(study.cfg.tasks)
    assert table["Subspace optimization, single-task (seen)"][1].endswith(f"({n})")
    held = table["Held-out seed: optimization, single-task (seen)"]
    assert all(cell.endswith(f"({n})") for cell in held[1 : 1 + len(methods)])
    rows = [r for r in study.store.rows("subspace_results", stage="optimize") if r["space"].startswith("heldout-")]
    scores = {(r["task"], r["method"], r["seed"]): r["score"] for r in study.store.rows("subspace_solutions")}
    lora = [r for r in rows if r["method"] == "lora"]
    expected = sum(r["score"] / ((scores[(r["task"], "lora", 42)] + scores[(r["task"], "lora", 43)]) / 2) for r in lora)
    mean_row = table["Held-out seed: optimization, % of the mean over seeds"]
    assert mean_row[1 + methods.index("lora")] == f"{100 * expected / len(lora):.1f} ({n})"
    assert table["Held-out seed: cross-method transfer, single-task"][-2].endswith(f"({n * 12})")
    # the task table shows the study seed's solution (not whichever seed was written last) and the seeds' mean
    cells = {row[0]: row for row in task_table(study.store, methods)}
    a = methods.index("adapter")
    assert cells["toya"][3 + a] == (
        f"{scores[('toya', 'adapter', 42)]:.3f} (mean "
        f"{(scores[('toya', 'adapter', 42)] + scores[('toya', 'adapter', 43)]) / 2:.3f} of 2 seeds)"
    )
    md, _ = build(study.store, methods, tmp_path)
    text = md.read_text()
    assert "In-sample rows" in text and "held-out seed's single-task subspaces" in text


def test_a_study_made_before_solution_seeds_loads_finds_no_held_out_space_and_reports(tmp_path: Path) -> None:
    work = tmp_path / "old"
    old = {k: v for k, v in dataclasses.asdict(StudyConfig(tasks=["sst2"])).items() if k != "solution_seeds"}
    work.mkdir()
    (work / "study.json").write_text(json.dumps(old))
    store = Store(work / "subspace.db")
    store.put("subspace_solutions", task="sst2", method="head", seed=42, score=0.6, metric="accuracy")
    store.put("subspace_solutions", task="sst2", method="lora", seed=42, score=0.8, metric="accuracy")
    store.put("subspace_results", space="unified-sst2", stage="optimize", task="sst2", method="lora", source="lora",
              score=0.8, original=0.8, ratio=1.0)  # fmt: skip
    study = Study(work)
    assert study.cfg.solution_seeds is None and study.cfg.seeds == [42] and study.cfg.other_seeds == []
    assert study.solution_set("sst2", 42) == "sst2"  # one seed: spaces name their solution sets as before
    with pytest.raises(ValueError, match="--solution-seeds"):
        study.find(heldout=True)
    md, _ = build(store, ["lora"], tmp_path / "report")
    text = md.read_text()
    assert "| Subspace optimization, single-task (seen) | 100.0 (1) |" in text
    assert "Held-out" not in text and "| sst2 | accuracy | 0.600 | 0.800 |" in text
    assert main(["subspace", "report", "--workdir", str(work), "--out", str(tmp_path / "r")]) == 0


def test_cli_init_takes_solution_seeds_and_refuses_bad_ones(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    work = tmp_path / "w"
    assert main(["subspace", "init", "--workdir", str(work), "--tasks", "toya", "--solution-seeds", "42,43,44"]) == 0
    assert json.loads((work / "study.json").read_text())["solution_seeds"] == [42, 43, 44]
    assert "solution seeds 42,43,44" in capsys.readouterr().out
    assert main(["subspace", "init", "--workdir", str(tmp_path / "x"), "--solution-seeds", "43,44"]) == 2
    assert "must include the study's --seed 42" in capsys.readouterr().err
    assert main(["subspace", "init", "--workdir", str(tmp_path / "y"), "--solution-seeds", "4x"]) == 2
    assert "not a comma list of integer seeds" in capsys.readouterr().err
    assert main(["subspace", "find", "--workdir", str(work), "--which", "heldot"]) == 2
    assert "--which heldot: not a kind of subspace" in capsys.readouterr().err


def test_report_compares_with_the_study_seeds_solution_not_the_last_written(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.put("subspace_solutions", task="sst2", method="head", seed=42, score=0.6, metric="accuracy", created=1.0)
    store.put("subspace_solutions", task="sst2", method="lora", seed=42, score=0.8, metric="accuracy", created=2.0)
    store.put("subspace_solutions", task="sst2", method="lora", seed=43, score=0.5, metric="accuracy", created=3.0)
    table = {row[0]: row for row in main_table(store, ["lora"])}
    assert table["The fixed task head alone, all tasks"][1] == "75.0 (1)"  # 0.6 / 0.8, not 0.6 / 0.5
    assert task_table(store, ["lora"])[1][3] == "0.800 (mean 0.650 of 2 seeds)"
