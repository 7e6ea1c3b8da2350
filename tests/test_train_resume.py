"""`deltatune train` stopped mid-way and resumed reaches what the uninterrupted run reaches, bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TOY_WORDS as WORDS
from tiny import make_tokenizer
from tiny import tiny_bert as _bert
from tiny import write_toy_task as _write_task

import deltatune as dt
from deltatune.data import load_task
from deltatune.train import TrainConfig, checkpoint, fit


class Stop(Exception):
    pass


def _fit(task, tokenizer, out: Path, eval_every: int, resume: bool = False, method: str = "lora"):  # noqa: ANN001, ANN202
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=16, eval_every=eval_every, patience=None, progress=False)
    config = dt.METHODS[method](**({"init_r": 4, "target_r": 2, "tfinal": 4} if method == "adalora" else {}))
    return fit(_bert(tokenizer), tokenizer, task, [config], cfg, output_dir=out, resume=resume)


@pytest.mark.parametrize(
    ("eval_every", "method"),
    [(3, "lora"), (4, "lora"), (3, "adalora")],
    ids=["mid-epoch", "epoch-boundary", "adalora-mid-schedule"],  # adalora: its importance averages resume too
)
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(
    eval_every: int, method: str, tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    task = load_task(_write_task(tmp_path / "toy"))  # 64 examples / batch 8: 8 steps an epoch, 16 steps = 2 epochs
    tokenizer = make_tokenizer(WORDS)
    _, whole = _fit(task, tokenizer, tmp_path / "whole", eval_every, method=method)

    save, saves = checkpoint.save, []

    def save_then_crash(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        save(*args, **kwargs)
        saves.append(1)
        if len(saves) == 3:
            raise Stop  # killed right after its third checkpoint (mid second epoch or at its start)

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(Stop):
        _fit(task, tokenizer, tmp_path / "cut", eval_every, method=method)
    monkeypatch.setattr(checkpoint, "save", save)
    _, resumed = _fit(task, tokenizer, tmp_path / "cut", eval_every, resume=True, method=method)

    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert strip(lines) == strip(whole.history)
    a = load_file(str(tmp_path / "whole" / f"delta-{method}" / "delta.safetensors"))
    b = load_file(str(tmp_path / "cut" / f"delta-{method}" / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_names_the_fix(tmp_path: Path) -> None:
    """The refusal came after metrics.jsonl was emptied: a finished run's curve was lost to a stray --resume."""
    task = load_task(_write_task(tmp_path / "toy"))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.jsonl").write_text('{"step": 4}\n')
    for out in (tmp_path / "none", tmp_path / "done"):
        with pytest.raises(FileNotFoundError, match="drop --resume"):
            _fit(task, make_tokenizer(WORDS), out, 4, resume=True)
    assert not (tmp_path / "none").exists() and (tmp_path / "done" / "metrics.jsonl").read_text() == '{"step": 4}\n'


def test_resume_with_other_settings_is_refused_not_mixed_in(tmp_path: Path) -> None:
    # the checkpoint restores the step budget, schedule and data order: a larger max_steps was ignored and
    # another lr or batch size trained on under the old schedule, and run.json then recorded the new flags
    task = load_task(_write_task(tmp_path / "toy"))
    tokenizer = make_tokenizer(WORDS)
    _fit(task, tokenizer, tmp_path / "run", 4)
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=32, eval_every=4, patience=None, progress=False)
    curve = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"other settings: max_steps 16 \(now 32\); .*drop --resume"):
        fit(_bert(tokenizer), tokenizer, task, [dt.LoRAConfig()], cfg, output_dir=tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == curve  # a refusal leaves the run as it was
    same = TrainConfig(lr=1e-2, batch_size=8, max_steps=16, eval_every=4, patience=None, progress=False)
    lora = dt.LoRAConfig(alpha=4.0)  # same tensors, another scale: it would load and train on silently
    with pytest.raises(ValueError, match=r"other settings: deltas \{'lora': \{.*'alpha': 16\.0.*\(now .*'alpha': 4\.0"):
        fit(_bert(tokenizer), tokenizer, task, [lora], same, output_dir=tmp_path / "run", resume=True)
    fit(_bert(tokenizer), tokenizer, task, [dt.LoRAConfig()], same, output_dir=tmp_path / "run", resume=True)


def test_resume_on_another_backbone_or_other_rows_is_refused(tmp_path: Path) -> None:
    """`--resume` with another `--model` of the same shapes, or another file of the same name and size, went on
    without a word: the saved delta reported the checkpoint's best dev score and scored 0.45 (or 0.0) on eval."""
    task = load_task(_write_task(tmp_path / "toy"))
    tokenizer = make_tokenizer(WORDS)
    _fit(task, tokenizer, tmp_path / "run", 4)
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=16, eval_every=4, patience=None, progress=False)
    with pytest.raises(ValueError, match=r"other settings: another backbone \(--model\); .*drop --resume"):
        fit(_bert(tokenizer, seed=1), tokenizer, task, [dt.LoRAConfig()], cfg, output_dir=tmp_path / "run", resume=True)
    flipped = load_task(_write_task(tmp_path / "other" / "toy", seed=1))  # same name and size, other rows
    with pytest.raises(ValueError, match=r"other training or dev rows \(--task, or its files changed\)"):
        fit(_bert(tokenizer), tokenizer, flipped, [dt.LoRAConfig()], cfg, output_dir=tmp_path / "run", resume=True)
    fit(_bert(tokenizer), tokenizer, task, [dt.LoRAConfig()], cfg, output_dir=tmp_path / "run", resume=True)
