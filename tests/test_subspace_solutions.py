"""Solutions a subspace cannot be found from, and files that are not what the study wrote: one line naming the
solution or file, where they gave torch's SVD error, a NaN basis, a method at 100% everywhere, or other tensors."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_subspace import toy_study

from deltatune.subspace.baselines import pca_space, random_space
from deltatune.subspace.collect import Solution, load_solution
from deltatune.subspace.find import find_unified
from deltatune.subspace.flatten import Layout
from deltatune.subspace.pipeline import Study
from deltatune.subspace.space import space_path

METHODS = ["lora", "adapter"]
LAYOUTS = {"lora": Layout(("a",), ((6,),)), "adapter": Layout(("b",), ((8,),))}


def _solutions() -> dict[tuple[str, str], Solution]:
    g = torch.Generator().manual_seed(0)
    return {
        (t, m): Solution(t, m, torch.randn(lay.size, generator=g), torch.zeros(lay.size), lay, 0.8)
        for t in ("t1", "t2", "t3")
        for m, lay in LAYOUTS.items()
    }


def _broken(kind: str) -> tuple[dict, list[str], int]:
    sols, tasks, d = _solutions(), ["t1", "t2", "t3"], 2
    lora = sols[("t2", "lora")]
    if kind == "nan":
        lora.vector[3] = float("nan")
    elif kind == "unmoved":  # training diverged at the first step: the initial delta was kept
        lora.vector = lora.init.clone()
    elif kind == "missing":
        del sols[("t2", "lora")]
    elif kind == "size":
        lora.vector, lora.init = torch.randn(5), torch.zeros(5)
    elif kind == "twice":
        tasks = ["t1", "t2", "t1"]
    elif kind == "d0":
        d = 0
    elif kind == "d_above":
        d = 7
    return sols, tasks, d


CASES = {
    "nan": "the lora solution of 't2' holds NaN",
    "unmoved": "the lora solution of 't2' equals its initial delta",
    "missing": "no lora solution for 't2'",
    "size": "the lora solution of 't2' has 5 numbers",
    "twice": "task 't1' is listed twice",
    "d0": "at least one dimension",
    "d_above": "larger than the lora delta's 6 numbers",
}


@pytest.mark.parametrize(
    ("finder", "kind"),
    # find_unified takes its tasks as a mapping's keys: none is there twice
    [(f, k) for f in ("pca", "random", "unified") for k in CASES if (f, k) != ("unified", "twice")],
)
def test_solutions_no_subspace_can_be_found_from_are_refused_naming_them(finder: str, kind: str) -> None:
    sols, tasks, d = _broken(kind)
    with pytest.raises(ValueError, match=CASES[kind]):
        if finder == "unified":  # refused before the bank, the data or the heads are read
            data = dict.fromkeys(tasks)
            find_unified(SimpleNamespace(methods=METHODS), sols, data, {}, name="x", d=d)  # type: ignore[arg-type]
        else:
            (pca_space if finder == "pca" else random_space)(sols, tasks, METHODS, d)


def test_a_solution_whose_training_diverged_is_not_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It kept its initial delta, and every table then showed that method at 100% of itself, no mark."""
    study = toy_study(tmp_path, monkeypatch, tasks=["toya"], unseen=[], lrs={"lora": 1e37})
    with pytest.raises(ValueError, match=r"lora on toya \(seed 42\) diverged: the loss became nan"):
        study.collect()
    assert not study.store.rows("subspace_solutions", method="lora")


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Study:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("solutions")
    mp = pytest.MonkeyPatch()
    study = toy_study(root, mp, tasks=["toya", "toyb"], unseen=[])
    study.collect()
    study.find(multi=False)
    yield study
    mp.undo()
    torch.set_num_threads(threads)


def _copy(study: Study, tmp_path: Path) -> Study:
    shutil.copytree(study.workdir, tmp_path / "work")
    return Study(tmp_path / "work", tokenizer=study.tokenizer, make_backbone=study.make_backbone)


def test_a_file_that_is_not_a_solution_is_refused_naming_it(collected: Study, tmp_path: Path) -> None:
    study = _copy(collected, tmp_path)
    target = study.workdir / "solutions" / "toya" / "lora.safetensors"
    shutil.copy(study.workdir / "heads" / "toya.safetensors", target)  # before: "error: solution" (a KeyError)
    with pytest.raises(ValueError, match=r"lora\.safetensors is not a lora solution of 'toya': it lacks solution"):
        load_solution(study.store, "toya", "lora", study.cfg.seed, study.workdir)
    target.write_bytes(target.read_bytes()[:40])  # truncated: before, a SafetensorError that named no file
    with pytest.raises(ValueError, match=r"lora\.safetensors is not a lora solution.*truncated or replaced"):
        load_solution(study.store, "toya", "lora", study.cfg.seed, study.workdir)


def test_a_solution_of_another_layout_of_the_same_size_is_refused(collected: Study, tmp_path: Path) -> None:
    """A file copied in from a study of other targets: its numbers went to this study's tensors, no error."""
    from safetensors import safe_open

    from deltatune.subspace.flatten import save_vectors

    study = _copy(collected, tmp_path)
    path = study.workdir / "solutions" / "toya" / "lora.safetensors"
    sol = load_solution(study.store, "toya", "lora", study.cfg.seed, study.workdir)
    with safe_open(str(path), framework="pt") as f:
        meta = __import__("json").loads(f.metadata()["meta"])
    meta["layout"]["names"] = [n.replace("query", "key") for n in meta["layout"]["names"]]
    save_vectors(path, {"solution": sol.vector, "init": sol.init}, meta)
    with pytest.raises(ValueError, match="the lora solution of 'toya' .*the delta layouts differ"):
        study.solutions(["toya"])


def test_another_subspace_s_file_under_a_name_is_refused(collected: Study, tmp_path: Path) -> None:
    study = _copy(collected, tmp_path)
    shutil.copy(space_path(study.workdir, "unified-toyb"), space_path(study.workdir, "unified-toya"))
    with pytest.raises(ValueError, match="holds subspace 'unified-toyb', not 'unified-toya'"):
        study.space("unified-toya")
    shutil.copy(study.workdir / "heads" / "toya.safetensors", space_path(study.workdir, "unified-toya"))
    with pytest.raises(ValueError, match="is not a subspace"):  # before: KeyError: 'methods'
        study.space("unified-toya")


def test_intrinsic_dim_caps_its_search_at_what_said_moves_and_redoes_runs_of_unknown_budget(
    collected: Study, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A --d-max above SAID's values trained every d below it, then failed on SAID's own limit; a run stored
    before budgets were recorded (steps NULL) was read as a run at today's budget."""
    from deltatune.subspace.intrinsic import said_capacity

    study = _copy(collected, tmp_path)
    capacity = said_capacity(study.make_backbone(2), study.cfg.seed)
    with sqlite3.connect(study.store.path) as db:  # four toy steps beat no head: give d90 a gain to recover
        db.execute("update subspace_solutions set score = 1.0 where task = 'toya' and method = 'lora'")
    study.store.put("subspace_intrinsic", task="toya", d=16, steps=None, score=1.0, reference=1.0, ratio=1.0, seconds=0)
    study.intrinsic(tasks=["toya"], d_max=capacity * 4)
    assert f"the search stops at d = {capacity:,}" in capsys.readouterr().err
    runs = study.store.rows("subspace_intrinsic", task="toya")
    assert max(r["d"] for r in runs) <= capacity
    assert any(r["d"] == 16 and r["steps"] == study.cfg.said_steps for r in runs)  # redone at a known budget
