"""A study's inputs beyond its settings: a task's or a model's files that changed after runs of them were done."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from study_helpers import _spec, make_world

from deltatune.study import Store, parse_spec, run_study
from deltatune.study.inputs import META


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_world(tmp_path_factory)


def _own(world: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Copies of the world's model and sentiment task that a test may edit."""
    shutil.copytree(world["sent"], tmp_path / "sent")
    shutil.copytree(world["model"], tmp_path / "tiny-bert")
    return {"model": str(tmp_path / "tiny-bert"), "sent": str(tmp_path / "sent")}


def _study(own: dict[str, str]):  # noqa: ANN202
    return parse_spec(_spec({**own, "topic": ""}, tasks=[own["sent"]], methods={"lora": {"r": 4}}, seeds=[1, 2]))


def test_a_task_file_edited_after_runs_of_it_were_done_is_refused(world: dict[str, str], tmp_path: Path) -> None:
    """Before: the resumed study scored seed 2 on the new test file and averaged it with seed 1's on the old."""
    own, db = _own(world, tmp_path), tmp_path / "s.sqlite"
    assert run_study(_study(own), db, progress=False, max_runs=1)["done"] == 1
    test = Path(own["sent"]) / "test.jsonl"
    text = test.read_text()
    test.write_text(text.replace('"label": 1', '"label": 0', 3))
    with pytest.raises(ValueError, match=r"task 'sent': test.jsonl changed since this store's finished runs of it"):
        run_study(_study(own), db, progress=False)
    assert Store(db).counts()["done"] == 1  # nothing ran
    test.write_text(text)  # restored (a new modification time, the same bytes): the study resumes
    assert run_study(_study(own), db, progress=False)["done"] == 2


def test_a_new_split_in_a_task_folder_is_refused_after_runs(world: dict[str, str], tmp_path: Path) -> None:
    own, db = _own(world, tmp_path), tmp_path / "s.sqlite"
    (Path(own["sent"]) / "test.jsonl").unlink()
    run_study(_study(own), db, progress=False, max_runs=1)
    shutil.copy(Path(world["sent"]) / "test.jsonl", Path(own["sent"]) / "test.jsonl")
    with pytest.raises(ValueError, match="test.jsonl is new since"):
        run_study(_study(own), db, progress=False)


def test_a_model_folder_of_the_same_name_with_other_weights_is_refused(world: dict[str, str], tmp_path: Path) -> None:
    own, db = _own(world, tmp_path), tmp_path / "s.sqlite"
    run_study(_study(own), db, progress=False, max_runs=1)
    model = tf.BertModel.from_pretrained(own["model"])
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight.add_(0.01)
    model.save_pretrained(own["model"])
    with pytest.raises(ValueError, match="model 'tiny-bert': model.safetensors changed"):
        run_study(_study(own), db, progress=False)


def test_files_changed_before_any_run_finished_and_stores_without_a_record_run_on(
    world: dict[str, str], tmp_path: Path
) -> None:
    own, db = _own(world, tmp_path), tmp_path / "s.sqlite"
    store = Store(db)
    run_study(_study(own), db, progress=False, max_runs=0)  # planned, nothing done: the files may still change
    (Path(own["sent"]) / "dev.jsonl").write_text((Path(own["sent"]) / "dev.jsonl").read_text() + "\n")
    run_study(_study(own), db, progress=False, max_runs=1)
    store.set_meta(META, {})  # a store written before inputs were recorded: nothing to compare, recorded now
    assert run_study(_study(own), db, progress=False)["done"] == 2
    assert set(store.meta(META)) == {"model:tiny-bert", "task:sent"}
