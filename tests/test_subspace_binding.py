"""A store holds one study's results: another study, an edited study.json or another folder cannot resume into it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_subspace import toy_study

from deltatune.cli import main
from deltatune.subspace.config import StudyConfig
from deltatune.subspace.pipeline import Study


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("binding")
    mp = pytest.MonkeyPatch()
    study = toy_study(root, mp)
    study.collect(["toya"])
    yield study
    mp.undo()


def _like(study: Study, workdir: Path, **changes: object) -> Study:
    cfg = StudyConfig.load(study.workdir)
    for key, value in changes.items():
        setattr(cfg, key, value)
    cfg.save(workdir)
    return Study(workdir, study.store.path, tokenizer=study.tokenizer, make_backbone=study.make_backbone)


def test_a_second_study_on_the_same_db_is_refused(collected: Study, tmp_path: Path) -> None:
    """Before: study B's collect skipped toya (A's rows), and B's find and report used A's solutions."""
    with pytest.raises(ValueError, match=r"other settings \(k_shot; k_shot: 8 there, 4 here\): it holds the results "
                                         r"of the study in .*; give this study its own --db"):  # fmt: skip
        _like(collected, tmp_path / "b", k_shot=4)
    _like(collected, tmp_path / "c")  # the same settings: a second folder may share the store (run.sh lanes)


def test_an_edited_study_json_or_a_changed_cfg_is_refused(collected: Study, tmp_path: Path) -> None:
    path = collected.workdir / "study.json"
    text = path.read_text()
    try:
        path.write_text(json.dumps({**json.loads(text), "d": 3}))
        with pytest.raises(ValueError, match=r"other settings \(d; d: 2 there, 3 here\): was study.json edited"):
            Study(collected.workdir)
    finally:
        path.write_text(text)
    collected.cfg.find_steps = 9  # a Python user's change: found spaces would mix with the others
    try:
        with pytest.raises(ValueError, match=r"\(find_steps; find_steps: 2 there, 9 here\)"):
            collected.find(["toya"], multi=False)
    finally:
        collected.cfg.find_steps = 2
    assert not collected.store.rows("subspace_spaces")


def test_a_relative_workdir_resumes_from_another_folder(collected: Study, tmp_path: Path) -> None:
    """Solution rows hold the path collect was given (relative to where it ran): find from another folder said
    'missing', or read another study's file that happened to lie at that relative path."""
    rows = collected.store.rows("subspace_solutions", task="toya")
    for r in rows:  # as `collect --workdir work` run in the study's parent folder writes them
        collected.store.put("subspace_solutions", **{**r, "path": os.path.relpath(r["path"], collected.workdir.parent)})
    decoy = tmp_path / "work" / "solutions" / "toya" / "lora.safetensors"  # another study at that relative path
    decoy.parent.mkdir(parents=True)
    decoy.write_bytes(b"not this study's")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        study = Study(collected.workdir, tokenizer=collected.tokenizer, make_backbone=collected.make_backbone)
        solutions = study.solutions(["toya"])
    finally:
        os.chdir(here)
    assert solutions[("toya", "lora")].vector.numel() == study.bank.layouts["lora"].size


def test_init_records_a_local_model_folder_by_its_absolute_path(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["subspace", "init", "--workdir", "w", "--model", "mine", "--tasks", "toya"]) == 0, (
            capsys.readouterr()
        )
    finally:
        os.chdir(here)
    assert StudyConfig.load(tmp_path / "w").model == str((tmp_path / "mine").resolve())


def test_data_edited_after_collect_is_refused_where_it_would_be_compared(collected: Study) -> None:
    """Before: optimize scored on the edited evaluation sample and divided by the solutions' scores on the old one."""
    dev = Path(os.environ["DELTATUNE_DATA"]) / "toya" / "dev.jsonl"
    text = dev.read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    dev.write_text("".join(json.dumps({**r, "label": 1 - r["label"]}) + "\n" for r in rows))
    try:
        fresh = Study(collected.workdir, tokenizer=collected.tokenizer, make_backbone=collected.make_backbone)
        with pytest.raises(ValueError, match=r"task 'toya''s data is not what its solutions were collected on"):
            fresh.data("toya")
        import sqlite3

        with sqlite3.connect(collected.store.path) as db:  # a method still to collect: it would train on the new
            db.execute("DELETE FROM subspace_solutions WHERE task = 'toya' AND method = 'adapter'")  # data
        with pytest.raises(ValueError, match=r"restore the data, or start a new --workdir"):
            fresh.collect(["toya"])
    finally:
        dev.write_text(text)
    collected.collect(["toya"])
    assert collected.store.one("subspace_solutions", task="toya", method="adapter")


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            {"find_step": 100},
            r"has a setting 'find_step' the subspace study does not know; did you mean 'find_steps'\?",
        ),
        ({"d": "4"}, r"study\.json: d must be int, got '4'; was it edited by hand\?"),
        ({"optimize_lr": True}, r"optimize_lr must be float, got True"),
    ],
)
def test_a_hand_edited_study_json_is_refused_by_the_key_it_breaks(tmp_path: Path, edit: dict, match: str) -> None:
    """Before: a misspelt key was dropped without a word (the study ran with the default), a quoted number
    failed deep inside a stage."""
    StudyConfig().save(tmp_path)
    path = tmp_path / "study.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ValueError, match=match):
        StudyConfig.load(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"is not valid JSON .*fix it or start a new --workdir"):
        StudyConfig.load(tmp_path)


def test_a_stage_killed_mid_write_leaves_no_file_behind_once_resumed(tmp_path: Path) -> None:
    """SIGKILL between writing a space's temporary file and renaming it: the space is absent (not half), and the
    next stage run removes the orphaned temporary file (before: it stayed in spaces/ for good)."""
    import subprocess
    import sys

    StudyConfig(tasks=["toya"]).save(tmp_path)
    target = tmp_path / "spaces" / "unified-toya.safetensors"
    code = (
        "import os, signal, torch\n"
        "from deltatune.subspace.flatten import save_vectors\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"save_vectors({str(target)!r}, {{'x': torch.zeros(3)}}, {{}})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == -9
    left = list((tmp_path / "spaces").iterdir())
    assert not target.exists() and len(left) == 1 and left[0].name.startswith(".unified-toya.safetensors.tmp-")
    Study(tmp_path)
    assert list((tmp_path / "spaces").iterdir()) == []


def test_a_deleted_file_is_redone_unless_later_results_were_made_from_it(tmp_path: Path) -> None:
    """Before: collect skipped a solution whose file was deleted (its row stayed) and find said the file was
    missing and to run collect, in a loop; the same for a space between find and optimize."""
    mp = pytest.MonkeyPatch()
    try:
        study = toy_study(tmp_path, mp)
        study.collect(["toya"])
        solution = study.workdir / "solutions" / "toya" / "lora.safetensors"
        solution.unlink()
        study.collect(["toya"])  # redone: nothing was made from it yet
        assert solution.exists()
        study.find(["toya"], multi=False)
        space = study.workdir / "spaces" / "unified-toya.safetensors"
        space.unlink()
        study.find(["toya"], multi=False)
        assert space.exists()
        study.optimize(["toya"], ["single"])
        space.unlink()
        with pytest.raises(ValueError, match=r"unified-toya\.safetensors is missing, and results were computed in "
                                             r"it: restore the file, or start a new --workdir"):  # fmt: skip
            study.find(["toya"], multi=False)
        solution.unlink()
        with pytest.raises(ValueError, match=r"lora\.safetensors is missing, and unified-toya were found from it"):
            study.collect(["toya"])
    finally:
        mp.undo()
