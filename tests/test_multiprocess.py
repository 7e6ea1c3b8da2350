"""Two processes train what one process trains: same delta, same logged curve, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import write_toy_task as _write_task

pytestmark = pytest.mark.plumbing  # process launches: the same under every transformers release (.ci/run)
HERE = Path(__file__).parent
SCRIPT = HERE / "multiprocess_fit.py"


def _run(launcher: list[str], task: Path, out: Path, *flags: str, ok: bool = True) -> str:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    proc = subprocess.run(
        [*launcher, str(SCRIPT), str(task), str(out), *flags], env=env, capture_output=True, text=True, timeout=600
    )
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc.stdout


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(tmp_path: Path, atol: float) -> list[dict]:
    """Runs `one` (1 process) and `two` (2 processes) logged the same curve and saved the same delta."""
    a, b = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4, 8, 12, 16]
    for ra, rb in zip(a, b, strict=True):
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-9)  # the schedule counts global steps
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=atol)
        assert ra["accuracy"] == rb["accuracy"]
    da, db = (load_file(str(tmp_path / run / "delta-lora" / "delta.safetensors")) for run in ("one", "two"))
    assert da.keys() == db.keys()
    for k in da:
        torch.testing.assert_close(db[k], da[k], rtol=0, atol=atol)
    return b


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on CPU")
def test_two_processes_train_what_one_process_trains(tmp_path: Path) -> None:
    task = _write_task(tmp_path / "toy", n_train=64, n_dev=24)
    one = _run([sys.executable], task, tmp_path / "one")
    two = _run(TORCHRUN, task, tmp_path / "two")
    assert one.count("done") == 1 and two.count("done") == 2  # both ranks ran to the end...
    # ...and ended their process group before Python's shutdown: left to module teardown, the gloo group's
    # threads were destroyed in an order set by what was imported, and with torchao installed rank 1 once
    # aborted there ("terminate called without an active exception", docs/ecosystem.md)
    assert two.count("process group at shutdown: down") == 2, two
    b = _assert_same_run(tmp_path, atol=1e-5)  # ...one wrote the curve
    assert [r["epoch"] for r in b] == [0.5, 1.0, 1.5, 2.0]  # 64 examples / global batch 8 = 8 steps an epoch


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on CPU")
def test_two_processes_stopped_mid_run_and_resumed_train_what_one_process_trains(tmp_path: Path) -> None:
    task = _write_task(tmp_path / "toy", n_train=64, n_dev=24)
    assert "checkpoints=3" in _run([sys.executable], task, tmp_path / "one")  # after the evaluations at 4, 8, 12
    # killed right after the checkpoint of step 4 (the first one, mid first epoch), then resumed
    _run(TORCHRUN, task, tmp_path / "two", "stop-after=1", ok=False)
    assert [r["step"] for r in _curve(tmp_path / "two")] == [4]
    resumed = _run(TORCHRUN, task, tmp_path / "two", "resume")
    assert resumed.count("done") == 2 and "checkpoints=2" in resumed  # it went on from step 4, not from 0
    _assert_same_run(tmp_path, atol=1e-6)


def _cli_train(launcher: list[str], model: Path, task: Path, out: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    flags = ["--batch-size", "8", "--max-steps", "4", "--eval-every", "2", "--quiet", "--threads", "1"]
    cmd = [*launcher, "-m", "deltatune.cli", "train", "--model", str(model), "--task", str(task), "--out", str(out)]
    return subprocess.run([*cmd, *flags], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on CPU")
def test_two_process_cli_train_of_a_classifier_exits_0_and_scores_as_one_process(tmp_path: Path) -> None:
    # the one-class check after training predicted on the main process alone: its gather waited for
    # the other process, which had returned, and the launch exited 1 after a successful run
    from multiprocess_fit import WORDS
    from tiny import make_tokenizer, tiny_bert

    tokenizer = make_tokenizer(WORDS)
    tiny_bert(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    # 23 dev rows: 12 and 11 per process, gathered without a repeated row, so the scores equal 1 process's
    task = _write_task(tmp_path / "toy", n_train=64, n_dev=23)
    one = _cli_train([sys.executable], tmp_path / "model", task, tmp_path / "one")
    two = _cli_train(TORCHRUN, tmp_path / "model", task, tmp_path / "two")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("lora on toy") == 1  # the banner: the main process alone prints
    best = [line for line in one.stdout.splitlines() if "best dev" in line]
    assert best and best == [line for line in two.stdout.splitlines() if "best dev" in line]
