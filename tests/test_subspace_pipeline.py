"""The whole subspace study end to end on a tiny BERT and toy tasks, and its resumability."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_subspace import CONFIGS, toy_study

from deltatune.cli import main
from deltatune.subspace.pipeline import Study, landscape
from deltatune.subspace.report import build


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on busy shared cores: one thread is several times faster
    root = tmp_path_factory.mktemp("subspace")
    mp = pytest.MonkeyPatch()
    s = toy_study(root, mp)
    s.collect()
    s.find()
    s.optimize()
    s.transfer()
    yield s
    mp.undo()
    torch.set_num_threads(threads)


def _key(row: dict) -> tuple:
    return row["space"], row["stage"], row["task"], row["method"], row["source"]


def _results(study: Study) -> dict[tuple, float]:
    """Every result row's key -> when it was written: a stage that redoes work rewrites `created`."""
    return {_key(r): r["created"] for r in study.store.rows("subspace_results")}


def test_every_stage_writes_its_rows(study: Study) -> None:
    store, methods = study.store, study.cfg.methods
    solutions = store.rows("subspace_solutions")
    assert {(r["task"], r["method"]) for r in solutions} == {
        (t, m) for t in study.cfg.tasks for m in ["head", *methods]
    }
    spaces = {r["name"]: r for r in store.rows("subspace_spaces")}
    assert set(spaces) == {"unified-toya", "unified-toyb", "unified-toyc", "unified-multi", "pca", "random"}
    assert spaces["unified-multi"]["tasks"] == ["toya", "toyb"]  # the unseen task is not used to find it
    optimized = store.rows("subspace_results", stage="optimize")
    # single-task subspaces on every task, the three multi-task spaces on the unseen task
    assert len(optimized) == len(methods) * (3 + 3)
    assert all(math.isfinite(r["ratio"]) and len(r["meta"]["z"]) == 2 for r in optimized)
    transfers = store.rows("subspace_results", stage="transfer")
    assert len(transfers) == (3 + 1) * len(methods) * (len(methods) - 1)
    assert all(r["source"] != r["method"] for r in transfers)


def test_a_solution_vector_scores_as_collected_through_the_bank(study: Study) -> None:
    from deltatune.subspace.collect import load_solution

    sol = load_solution(study.store, "toya", "lora", study.cfg.seed)
    data = study.data("toya")
    metrics = study.bank.evaluate("lora", sol.vector, study.head("toya"), data.task, data.eval)
    assert metrics[data.task.primary_metric] == pytest.approx(sol.score)


def test_stages_resume_without_redoing_finished_work(study: Study) -> None:
    before = _results(study)
    spaces = {r["name"]: r["created"] for r in study.store.rows("subspace_spaces")}
    study.collect()
    study.find()
    study.optimize()
    study.transfer()
    after = _results(study)
    assert after == before
    assert {r["name"]: r["created"] for r in study.store.rows("subspace_spaces")} == spaces


def test_optimized_vector_reproduces_its_score_through_the_space(study: Study) -> None:
    row = study.store.one("subspace_results", space="unified-multi", stage="optimize", task="toyc", method="adapter")
    space, data = study.space("unified-multi"), study.data("toyc")
    vector = space.point("adapter", torch.tensor(row["meta"]["z"]))
    metrics = study.bank.evaluate("adapter", vector, study.head("toyc"), data.task, data.eval)
    assert metrics[data.task.primary_metric] == pytest.approx(row["score"])


def test_landscape_intrinsic_dimension_and_report(study: Study, tmp_path: Path) -> None:
    result = landscape(study, "toya", "lora", n=3, examples=8)
    grid = result["plane"]["metric"]
    assert len(grid) == 3 and all(len(row) == 3 and all(0 <= v <= 1 for v in row) for row in grid)
    assert {p["to"] for p in result["paths"]} == {"adapter", "prefix", "selective"}
    assert (study.workdir / "landscape" / "toya-lora.png").stat().st_size > 1000
    unseen = landscape(study, "toyc", "adapter", n=2, examples=4)  # the vectors optimized in the multi-task space
    assert unseen["space"] == "unified-multi" and set(unseen["points"]) == set(CONFIGS)
    study.intrinsic(["toya"])  # runs SAID at a few d, or says the delta never beat the head
    md, page = build(study.store, study.cfg.methods, tmp_path, [study.workdir / "landscape" / "toya-lora.png"])
    text = md.read_text()
    assert "Subspace optimization, single-task (seen)" in text and "| toya |" in text
    assert "data:image/png;base64," in page.read_text()


def test_a_landscape_through_another_basis_keeps_the_first_and_a_killed_plot_leaves_it_whole(study: Study) -> None:
    """Before: `--method adapter` overwrote toya.png (the LoRA row's figure) and a kill mid-savefig left half a PNG."""
    import matplotlib.figure

    landscape(study, "toya", "lora", n=2, examples=4)
    first = (study.workdir / "landscape" / "toya-lora.png").read_bytes()
    landscape(study, "toya", "adapter", n=2, examples=4)
    assert (study.workdir / "landscape" / "toya-lora.png").read_bytes() == first
    rows = study.store.rows("subspace_results", stage="landscape", task="toya")
    assert {r["method"]: Path(r["meta"]["png"]).name for r in rows} == {
        "lora": "toya-lora.png",
        "adapter": "toya-adapter.png",
    }

    def killed(self, target, **kw) -> None:  # noqa: ANN001 - writes part of the figure, then dies
        (target.write(b"\x89PNG half") if hasattr(target, "write") else Path(target).write_bytes(b"\x89PNG half"))
        raise KeyboardInterrupt

    mp = pytest.MonkeyPatch()
    mp.setattr(matplotlib.figure.Figure, "savefig", killed)
    try:
        with pytest.raises(KeyboardInterrupt):
            landscape(study, "toya", "lora", n=2, examples=4)
    finally:
        mp.undo()
    assert (study.workdir / "landscape" / "toya-lora.png").read_bytes() == first


def test_cli_refuses_to_resume_a_study_with_other_settings(study: Study, capsys: pytest.CaptureFixture) -> None:
    code = main(["subspace", "collect", "--workdir", str(study.workdir), "--d", "7"])
    assert code == 2 and "other settings (d)" in capsys.readouterr().err
    assert main(["subspace", "report", "--workdir", str(study.workdir), "--out", str(study.workdir / "r")]) == 0
    assert "Multi-task subspace, unseen tasks" in capsys.readouterr().out


def test_projections_trained_from_scratch_form_their_own_spaces(study: Study, tmp_path: Path) -> None:
    before = _results(study)
    study.find(init="random")
    spaces = {r["name"]: r for r in study.store.rows("subspace_spaces")}
    scratch = {n for n in spaces if n.startswith("scratch-")}
    assert scratch == {"scratch-toya", "scratch-toyb", "scratch-toyc", "scratch-multi"}
    assert all(
        spaces[n]["meta"]["init"] == "random" and spaces[n]["meta"]["steps"] == 3 for n in scratch - {"scratch-multi"}
    )
    assert spaces["scratch-multi"]["meta"]["steps"] == 3 * 2 and spaces["unified-multi"]["meta"]["init"] == "joint"
    study.optimize()
    study.transfer()
    rows = study.store.rows("subspace_results")
    new = [r for r in rows if _key(r) not in before]
    methods = len(study.cfg.methods)
    assert {r["space"] for r in new} == scratch  # nothing that was done is redone
    assert sum(r["stage"] == "optimize" for r in new) == (3 + 1) * methods
    assert sum(r["stage"] == "transfer" for r in new) == (3 + 1) * methods * (methods - 1)
    md, _ = build(study.store, study.cfg.methods, tmp_path, [])
    text = md.read_text()
    assert "From-scratch projections: optimization, single-task (seen)" in text
    assert "From-scratch projections: multi-task, unseen tasks" in text


def test_said_runs_are_kept_per_step_budget(study: Study) -> None:
    from deltatune.subspace.store import Store

    study.store.put("subspace_intrinsic", task="toya", d=16, steps=2, score=0.5, reference=0.9, ratio=0.5, seconds=1)
    study.store.put("subspace_intrinsic", task="toya", d=16, steps=50, score=0.8, reference=0.9, ratio=0.9, seconds=1)
    assert {r["steps"]: r["score"] for r in study.store.rows("subspace_intrinsic", task="toya", d=16)} == {
        2: 0.5,
        50: 0.8,
    }
    # a store written before budgets were recorded is rebuilt with them: its runs kept, budget unknown
    import sqlite3

    old = study.workdir / "old.db"
    with sqlite3.connect(old) as db:
        db.execute("CREATE TABLE subspace_intrinsic (task TEXT, d INTEGER, score REAL, reference REAL, ratio REAL, "
                   "seconds REAL, created REAL, PRIMARY KEY (task, d))")  # fmt: skip
        db.execute("INSERT INTO subspace_intrinsic VALUES ('sst2', 64, 0.6, 0.7, 0.86, 3.0, 1.0)")
    rows = Store(old).rows("subspace_intrinsic")
    assert [(r["task"], r["d"], r["score"], r["steps"]) for r in rows] == [("sst2", 64, 0.6, None)]


def test_invariants_transfer_uses_the_receiver_s_basis_and_pca_is_orthonormal(study: Study) -> None:
    """Invariants a silent slip would break: a transfer row is the source's optimized z run through the
    receiving method's basis and divided by the receiver's own solution; a vector through its own method
    scores its optimize row; PCA bases are orthonormal up to the method's scale; the warm start reconstructs
    each solution it was found from (tanh's near-linear range costs < 1%)."""
    space, data, head = study.space("unified-multi"), study.data("toyc"), study.head("toyc")
    rows = study.store.rows("subspace_results", space="unified-multi", task="toyc")
    optimized = {r["method"]: r for r in rows if r["stage"] == "optimize"}
    for r in (r for r in rows if r["stage"] == "transfer"):
        z = torch.tensor(optimized[r["source"]]["meta"]["z"])
        assert r["meta"]["z"] == optimized[r["source"]]["meta"]["z"]
        metrics = study.bank.evaluate(r["method"], space.point(r["method"], z), head, data.task, data.eval)
        assert metrics[data.task.primary_metric] == pytest.approx(r["score"])
        assert r["original"] == study.original("toyc", r["method"])
    for method, r in optimized.items():
        vector = space.point(method, torch.tensor(r["meta"]["z"]))
        assert study.bank.evaluate(method, vector, head, data.task, data.eval)[data.task.primary_metric] == r["score"]
    pca = study.space("pca")
    for method, basis in pca.bases.items():
        q = basis / pca.meta["scales"][method]
        assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-5)
    single = study.space("unified-toya")
    assert max(single.meta["relative_error"].values()) < 0.05
