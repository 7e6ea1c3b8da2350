"""Experiment trackers (`TrainConfig.report_to`, `deltatune train --report-to`) through accelerate's trackers.

accelerate drops a tracker whose package is missing with a debug line only: `report_to="wandb"` without wandb
trained without logging anything. Here such a run is refused before it trains; TensorBoard (through
tensorboardX, in the test extra) is read back and must hold what metrics.jsonl holds."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from tiny import TOY_WORDS, make_tokenizer, write_toy_task
from tiny import tiny_bert as _bert

import deltatune as dt
from deltatune.data import load_task
from deltatune.train import TrainConfig, fit, tracking
from deltatune.train.tracking import parse

FAST = {"epochs": 4, "batch_size": 16, "eval_every": 4, "max_length": 16, "progress": False, "patience": None}


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard event files under `folder`: {tag: {step: value}} (TFRecord read by hand)."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    out: dict[str, dict[int, float]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_report_to_is_checked_before_a_run() -> None:
    assert parse(None) == [] and parse("none") == [] and parse(" ") == []
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbord' in report_to; did you mean tensorboard\?"):
        parse("tensorbord")
    with pytest.raises(ValueError, match=r"unknown tracker 'none'"):  # "none" alone means none, not one of several
        parse("tensorboard,none")


def test_a_tracker_not_installed_is_refused_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate keeps only installed trackers and says so at debug level: the run logged nothing."""
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(
        ValueError, match=r"report_to 'wandb' needs the wandb package, which is not installed: pip install wandb"
    ):
        parse("wandb")
    with pytest.raises(ValueError, match=r"report_to 'tensorboard' needs the tensorboard \(or tensorboardX\) package"):
        parse(["tensorboard"])
    with pytest.raises(ValueError, match=r"report_to 'all' found no tracker installed"):
        parse("all")


def test_tensorboard_holds_every_evaluation_and_the_end(tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    tok = make_tokenizer(TOY_WORDS)
    task = load_task(write_toy_task(tmp_path / "toy"))
    cfg = TrainConfig(lr=2e-2, report_to="tensorboard", **FAST)
    out = tmp_path / "run"
    _, result = fit(_bert(tok), tok, task, [dt.METHODS["lora"]()], cfg, output_dir=out, test_examples=task["dev"])
    scalars = _scalars(out / "logs" / tracking.PROJECT)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 2
    for row in rows:  # each evaluation, at its step, as metrics.jsonl has it (float32 in the event file)
        assert scalars["dev/accuracy"][row["step"]] == pytest.approx(row["accuracy"], abs=1e-6)
        assert scalars["train/loss"][row["step"]] == pytest.approx(row["train_loss"], rel=1e-6)
        assert scalars["train/lr"][row["step"]] == pytest.approx(row["lr"], rel=1e-6)
    end = result.steps
    assert scalars["best/dev_accuracy"][end] == pytest.approx(result.best["accuracy"], abs=1e-6)
    assert scalars["best/step"][end] == result.best_step
    assert scalars["test/accuracy"][end] == pytest.approx(result.test["accuracy"], abs=1e-6)
    hparams = next((out / "logs").rglob("hparams.yml")).read_text()
    assert "train/lr: 0.02" in hparams and "deltas/lora/r: 8" in hparams
    saved = json.loads((out / "delta-lora" / "delta.json").read_text())
    assert "report_to" not in json.dumps(saved)  # how the run was shown is not a training setting


def test_a_file_tracker_without_an_output_dir_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    tok = make_tokenizer(TOY_WORDS)
    task = load_task(write_toy_task(tmp_path / "toy"))
    with pytest.raises(
        ValueError, match=r"report_to 'tensorboard' writes its logs beside the run: give fit\(\) an output_dir"
    ):
        fit(_bert(tok), tok, task, [dt.METHODS["lora"]()], TrainConfig(report_to="tensorboard", **FAST))


def test_cli_refuses_a_missing_tracker_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli import main

    folder = write_toy_task(tmp_path / "toy")
    code = main(["train", "--task", str(folder), "--report-to", "wandb,mlfow", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "unknown tracker 'mlfow' in report_to; did you mean mlflow?" in err or "needs the wandb package" in err
    assert not (tmp_path / "r").exists()


def test_a_study_spec_with_a_tracker_not_installed_is_refused_with_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate.tracking

    from deltatune.study.spec import SpecError, parse_spec

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    raw = {"name": "s", "tasks": ["sst2"], "methods": {"lora": {}}, "train": {"report_to": "wandb"}}
    with pytest.raises(SpecError, match=r"study spec: train.report_to: report_to 'wandb' needs the wandb package"):
        parse_spec(raw)
