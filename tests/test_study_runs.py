"""The study runner on tiny random models: running, recording, resuming after kill -9, transfer, the
executors, capped evaluation samples, budget matching and the per-method learning rate.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers as tf
from study_helpers import _spec, make_world

from deltatune.study import Store, parse_spec, run_study
from deltatune.study.report import write_report


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_world(tmp_path_factory)


def test_study_runs_records_and_reports(world: dict[str, str], tmp_path: Path) -> None:
    spec = parse_spec(
        _spec(world, methods={"lora": {"r": 4}, "full": {}}, analyses=["performance", "convergence", "efficiency"])
    )
    db = tmp_path / "tiny.sqlite"
    assert run_study(spec, db, progress=False) == {"pending": 0, "running": 0, "done": 4, "failed": 0}
    store = Store(db)
    runs = store.runs()
    assert all(r["steps"] == 6 and r["trainable"] > 0 and r["peak_memory"] > 0 for r in runs)
    full = next(r for r in runs if r["method"] == "full")
    lora = next(r for r in runs if r["method"] == "lora")
    assert full["trainable"] == full["total"] > lora["trainable"]
    assert (db.parent / lora["delta_path"] / "delta-lora" / "delta.safetensors").exists()
    assert 0 < lora["checkpoint_bytes"] < full["checkpoint_bytes"]
    curves = store.curves()
    assert [p["step"] for p in curves[lora["id"]]] == [2, 4, 6]
    assert run_study(spec, db, progress=False)["done"] == 4  # a second start finds nothing to do
    assert store.runs()[0]["attempts"] == 1
    html = write_report(db).read_text()
    assert html.count("data:image/png;base64,") == 2 and "Performance" in html and "% of full FT" in html
    assert "Efficiency" in (db.parent / "tiny-report" / "report.md").read_text()


def test_transfer_starts_from_the_source_delta(world: dict[str, str], tmp_path: Path) -> None:
    raw = _spec(
        world, methods={"lora": {"r": 4}}, transfer={"tasks": [world["sent"], world["topic"]], "methods": ["lora"]}
    )
    raw["analyses"] = ["performance", "transfer"]
    db = tmp_path / "t.sqlite"
    counts = run_study(parse_spec(raw), db, progress=False)
    assert counts["done"] == 4 and counts["failed"] == 0
    runs = {r["key"]: r for r in Store(db).runs()}
    moved = next(r for k, r in runs.items() if "sent->topic" in k)
    assert moved["source_task"] == "sent" and moved["task"] == "topic"  # 2 labels -> 3: the head was re-initialised
    assert "Transfer (lora)" in write_report(db).read_text()


@pytest.mark.plumbing
def test_process_pool_runs_each_run_once(world: dict[str, str], tmp_path: Path) -> None:
    spec = parse_spec(_spec(world, methods={"bitfit": {}}))
    db = tmp_path / "p.sqlite"
    assert run_study(spec, db, executor="process", workers=2, progress=False)["done"] == 2
    assert [r["attempts"] for r in Store(db).runs()] == [1, 1]


@pytest.mark.plumbing
def test_ray_executor_runs_a_study(world: dict[str, str], tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        spec = parse_spec(_spec(world, methods={"bitfit": {}}))
        assert run_study(spec, tmp_path / "r.sqlite", executor="ray", workers=2, progress=False)["done"] == 2
    finally:
        ray.shutdown()


@pytest.mark.plumbing
def test_kill_9_mid_study_then_resume_records_every_run_once(world: dict[str, str], tmp_path: Path) -> None:
    raw = _spec(world, methods={"lora": {"r": 4}, "bitfit": {}, "full": {}})
    raw["train"] = raw["train"] | {"max_steps": 16, "eval_every": 4}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(raw))
    db = tmp_path / "k.sqlite"
    args = ["study", "run", str(spec_file), "--db", str(db), "--quiet"]
    code = "import sys; from deltatune.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    try:
        while time.time() < deadline:  # kill while a run is in flight and at least one is recorded
            if db.exists():
                try:
                    with sqlite3.connect(db, timeout=5) as c:
                        status = dict(c.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
                except sqlite3.OperationalError:  # the file exists a moment before its tables do
                    status = {}
                if status.get("done", 0) >= 1 and status.get("running", 0) == 1:
                    break
            time.sleep(0.05)
        else:
            pytest.fail(
                f"the runner never got going: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}"
            )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    store = Store(db)
    interrupted = [r["key"] for r in store.runs("running")]
    assert len(interrupted) == 1 and store.counts()["done"] < 6
    counts = run_study(parse_spec(raw), db, progress=False)
    assert counts == {"pending": 0, "running": 0, "done": 6, "failed": 0}
    runs = store.runs()
    assert len({r["key"] for r in runs}) == 6
    assert [r["attempts"] for r in runs if r["key"] in interrupted] == [2]
    assert all(r["attempts"] == 1 for r in runs if r["key"] not in interrupted)
    curves = store.curves()
    assert all([p["step"] for p in curves[r["id"]]] == [4, 8, 12, 16] for r in runs)


def test_capped_dev_and_test_are_random_samples_not_the_first_rows(tmp_path: Path) -> None:
    from deltatune.study.executors import _load_task

    folder = tmp_path / "sorted"
    folder.mkdir()
    rows = [{"text": f"the movie was {'good' if i >= 30 else 'bad'}", "label": int(i >= 30)} for i in range(60)]
    for split in ("train", "dev", "test"):  # sorted by label, as mr, subj and mpqa are in the collection
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = _load_task(str(folder), cap=20)
    for split in ("dev", "test"):
        labels = [ex.label for ex in task[split]]
        assert len(labels) == 20 and 5 <= sum(labels) <= 15
    assert [ex.text for ex in task["dev"]] == [ex.text for ex in _load_task(str(folder), cap=20)["dev"]]


def test_parameter_budget_picks_the_closest_size(world: dict[str, str]) -> None:
    from deltatune.study.executors import _budget_config

    model = tf.AutoModelForSequenceClassification.from_pretrained(world["model"], num_labels=2)
    # LoRA on q and v of 2 layers of width 32: 4 x r x (32 + 32) = 256 r parameters
    assert _budget_config(model, "lora", {}, 2000) == {"r": 8}  # 2048 is closer than 1792
    assert _budget_config(model, "lora", {"alpha": 8.0}, 100) == {"alpha": 8.0, "r": 1}
    assert not any(p.requires_grad is False for p in model.parameters())  # probes were detached


def test_study_chooses_each_methods_rate_on_dev_and_reuses_the_grid_run(world: dict[str, str], tmp_path: Path) -> None:
    train = {"max_steps": 12, "batch_size": 8, "eval_every": 4, "max_length": 16, "patience": None}
    grid = {"tasks": [world["sent"]], "rates": {"lora": [1e-6, 3e-2], "head": [1e-6, 3e-2]}}
    spec = parse_spec(_spec(world, methods={"lora": {"r": 4}, "head": {}}, train=train, lr_grid=grid))
    db = tmp_path / "lr.sqlite"
    assert run_study(spec, db, progress=False)["done"] == 4 + 4
    store = Store(db)
    runs = {r["key"]: r for r in store.runs()}
    choice = store.meta("lr_choice")
    sent, topic = Path(world["sent"]).name, Path(world["topic"]).name
    for label in ("lora", "head"):
        grid_runs = {lr: runs[f"tiny-bert/{sent}/{label}/s42/lr{lr:g}"] for lr in (1e-6, 3e-2)}
        best = max(sorted(grid_runs), key=lambda lr: grid_runs[lr]["dev_score"])  # ties: the smaller rate
        assert choice[f"tiny-bert/{label}"]["lr"] == best
        main = runs[f"tiny-bert/{sent}/{label}/s42"]
        assert main["lr"] == best and main["delta_path"] == grid_runs[best]["delta_path"]  # reused, not retrained
        assert main["dev_score"] == grid_runs[best]["dev_score"]
        other = runs[f"tiny-bert/{topic}/{label}/s42"]
        assert other["lr"] == best and other["stop_reason"] == "max_steps" and other["steps"] == 12
    assert max(r["id"] for r in runs.values() if "/lr" in r["key"]) < min(
        r["id"] for r in runs.values() if "/lr" not in r["key"]
    )  # the grid runs first


def test_a_run_cut_short_continues_from_its_checkpoint_to_the_same_result(
    world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped study reclaimed its running runs from step 0 (an STS-B run lost an hour at each restart).
    The run now continues from its last evaluation's checkpoint and ends where an uninterrupted one does; a
    checkpoint written under other settings (an edited spec) is dropped and the run starts afresh."""
    from deltatune.study import executors
    from deltatune.train import checkpoint

    job = parse_spec(_spec(world, methods={"lora": {"r": 4}})).jobs()[0]
    whole = json.loads(executors.execute(json.dumps(job | {"output_dir": str(tmp_path / "whole")})))
    save, saves = checkpoint.save, []

    def save_then_stop(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the study stopped after the run's second evaluation

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    cut = job | {"output_dir": str(tmp_path / "cut")}
    with pytest.raises(KeyboardInterrupt):
        executors.execute(json.dumps(cut))
    later: list[int] = []
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: (later.append(1), save(*a, **k)))
    resumed = json.loads(executors.execute(json.dumps(cut)))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # noqa: E731
    assert strip(resumed["history"]) == strip(whole["history"]) and resumed["dev_score"] == whole["dev_score"]
    assert later == []  # it went on from the second evaluation's checkpoint; from step 0 it saved both again
    other = job | {"output_dir": str(tmp_path / "cut"), "train": {**job["train"], "lr": 0.5}}
    assert "error" not in json.loads(executors.execute(json.dumps(other)))  # the old checkpoint is not its own
