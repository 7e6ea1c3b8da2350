"""The study store: exclusive claims, dependent runs, recovering the runs of dead owners, the learning-rate
grid's choice, and a store that holds one study's settings only.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from study_helpers import _job, _spec, make_world

from deltatune.study import Store, parse_spec, run_study


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_world(tmp_path_factory)


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


def test_a_store_replaced_on_disk_mid_study_is_named_not_written_blind(tmp_path: Path) -> None:
    """`git stash` (or checkout, pull) of a committed store under a running study put another file at its path;
    the open connection wrote on into the unlinked one and SQLite then said 'attempt to write a readonly
    database': the runs finished in between were lost without a word about why (measured: two runs here)."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    store.add_jobs([_job("r1"), _job("r2")])
    run = store.claim("host:1:-")
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(path.read_bytes())
    copy.replace(path)  # what git does: a new file under the old name
    with pytest.raises(RuntimeError, match=r"s\.sqlite was replaced while this study ran \(a git checkout"):
        store.finish(run["id"], "host:1:-", {"metric": "accuracy", "dev_score": 0.5, "history": []})


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
            s.fail(job["id"], "h:1:-", "boom")  # 1e-1 failed on b
    assert job is None and s.blocked() == ["main"]  # a failed rate is unmeasured: the main run waits for it
    s.retry_failed()
    retried = s.claim("h:1:-")
    s.finish(retried["id"], "h:1:-", {"metric": "accuracy", "dev_score": 0.0, "history": []})
    job = s.claim("h:1:-")
    # all three tie at 0.5 mean: the smaller rate wins; the main run carries the choice
    assert job["key"] == "main" and job["train"]["lr"] == 1e-3 and job["lr_choice"]["lr"] == 1e-3
    assert s.meta("lr_choice")["m/lora"]["dev_scores"] == {"0.001": 0.5, "0.01": 0.5, "0.1": 0.5}


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


def test_a_store_committed_mid_run_resumes_that_run(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.sqlite")
    s.add_jobs([_job("mine"), _job("theirs")])
    s.claim(f"{socket.gethostname()}:999999999:1")  # this host's name, a process that is gone: rerun on any start
    s.claim("elsewhere:1:1")  # another host: it may still be running there
    assert s.recover() == ["mine"] and s.counts()["running"] == 1
    assert s.recover(other_hosts=True) == ["theirs"] and s.counts()["pending"] == 2


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
