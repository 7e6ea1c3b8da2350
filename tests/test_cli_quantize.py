"""`deltatune train --quantize 4bit` (QLoRA from the command line), and eval/predict/merge of what it saved.

The backbone loads quantized by bitsandbytes with the head left unquantized (transformers' own rule kept a new
classifier as a random 4-bit layer nothing could train), the run records how it loaded, and eval and predict
load the same way so they reproduce training's scores; merge loads full precision, as QLoRA users merge.
The tiny BERT is 64 wide: bitsandbytes' CPU 4-bit kernel needs whole blocks of 64 inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from cli_helpers import WORDS, _delta_meta, _folder, _train
from tiny import make_tokenizer

from deltatune.cli import build_parser, main

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = make_tokenizer(WORDS)
    folder = tmp_path_factory.mktemp("tiny-bert-64")
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    tf.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _unquantized_count(model_dir: Path) -> int:
    return sum(p.numel() for p in tf.AutoModelForSequenceClassification.from_pretrained(model_dir).parameters())


@pytest.mark.parametrize("flag", [["--quantize", "4bit"], ["--load-in-8bit"]])
def test_a_delta_trains_on_a_quantized_backbone_and_eval_reloads_it_so(
    tmp_path: Path, model_dir: Path, flag: list[str], capsys: pytest.CaptureFixture
) -> None:
    bits = "4bit" if "4bit" in flag else "8bit"
    task = _folder(tmp_path / "mine")
    assert _train(model_dir, task, tmp_path / "r", "--max-steps", "24", "--max-length", "8", *flag) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert json.loads((tmp_path / "r" / "run.json").read_text())["quantize"] == bits
    delta = tmp_path / "r" / "delta-lora"
    assert _delta_meta(delta)["quantize"] == bits
    # every number counted once: a 4-bit weight's packed storage holds two per byte
    assert f"of {_unquantized_count(model_dir):,} (" in out
    # the head trained: a quantized head would hold no float weights to save, nor take gradients
    head = {k: v for k, v in result.items() if k.startswith("trainable")}
    assert result["trainable_parameters"] == 2 * 2 * (64 * 8 + 8 * 64) + (64 * 2 + 2), head
    assert main(["eval", "--delta", str(delta), "--split", "test"]) == 0
    captured = capsys.readouterr()
    assert f"accuracy {result['test']['accuracy']:.4f}" in captured.out and captured.err == ""
    assert main(["eval", "--delta", str(delta), "--split", "test", "--quantize", "none"]) == 0
    assert f"note: --quantize none overrides the {bits} backbone" in capsys.readouterr().err
    assert main(["predict", "--delta", str(delta), "the film was so very good"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("neg", "pos")
    assert main(["merge", str(model_dir), str(delta), str(tmp_path / "merged")]) == 0
    assert f"trained on a {bits} backbone; it merges into the full-precision weights" in capsys.readouterr().out
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in merged.parameters())


def test_quantize_flags_are_one_setting_and_full_fine_tuning_on_them_is_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    parse = build_parser().parse_args
    assert parse(["train", "--load-in-4bit"]).quantize == parse(["train", "--quantize", "4bit"]).quantize == "4bit"
    assert (
        parse(["train"]).quantize is None and parse(["eval", "--delta", "d", "--quantize", "none"]).quantize == "none"
    )
    with pytest.raises(SystemExit):
        parse(["train", "--load-in-4bit", "--load-in-8bit"])
    assert "not allowed with argument" in capsys.readouterr().err
    task = _folder(tmp_path / "mine")
    assert _train(model_dir, task, tmp_path / "r", "--full", "--quantize", "4bit") == 2
    err = capsys.readouterr().err.strip()
    assert "--full trains every weight, which a 4bit quantized backbone cannot hold; drop --quantize" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "r").exists()


def test_bitsandbytes_missing_is_one_line_naming_the_install(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import importlib.util

    from deltatune import quantization

    real = importlib.util.find_spec
    monkeypatch.setattr(
        quantization.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    assert _train(model_dir, _folder(tmp_path / "mine"), tmp_path / "r", "--load-in-4bit") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("needs bitsandbytes: pip install bitsandbytes (or deltatune[quantize])")
    assert len(err.splitlines()) == 1


def test_resuming_a_quantized_run_at_full_precision_is_refused_by_name(tmp_path: Path, model_dir: Path) -> None:
    """The checkpoint's backbone loaded another way: said as such, not as "another backbone (--model)"."""
    import deltatune as dt
    from deltatune.backbones import load_backbone, load_tokenizer
    from deltatune.data import load_task
    from deltatune.train import TrainConfig, fit

    task, tokenizer = load_task(_folder(tmp_path / "mine")), load_tokenizer(str(model_dir))
    cfg = TrainConfig(batch_size=16, max_steps=4, eval_every=2, patience=None, progress=False)

    def train(quantize: str | None, resume: bool = False) -> object:
        model = load_backbone(str(model_dir), quantize=quantize)
        return fit(model, tokenizer, task, [dt.LoRAConfig()], cfg, output_dir=tmp_path / "r", resume=resume)

    train("4bit")
    with pytest.raises(ValueError, match=r"other settings: quantize '4bit' \(now None\); resume with") as err:
        train(None, resume=True)
    assert "another backbone" not in str(err.value)
    train("4bit", resume=True)


def test_a_study_runs_every_column_on_the_quantized_backbone_and_refuses_full_fine_tuning(
    tmp_path: Path, model_dir: Path
) -> None:
    """`quantize: 4bit` in a study spec: each run trains its delta on the 4-bit backbone and records it, and
    the report's budget line says so; a spec with full fine-tuning or another value is refused by field."""
    from deltatune.study import parse_spec, run_study
    from deltatune.study.spec import SpecError

    raw = {
        "name": "qlora",
        "models": [str(model_dir)],
        "tasks": [str(_folder(tmp_path / "mine"))],
        "methods": {"lora": {"r": 4}, "head": {}},
        "train": {"max_steps": 4, "batch_size": 16, "eval_every": 2, "max_length": 8},
        "quantize": "4bit",
        "threads": 1,
    }
    for bad, says in [
        ({"quantize": "3bit"}, r"quantize: '3bit' is not one of 4bit, 8bit; write `quantize: 4bit`"),
        ({"methods": {"full": {}, "lora": {}}}, r"quantize: full fine-tuning cannot train a quantized backbone"),
    ]:
        with pytest.raises(SpecError, match=says):
            parse_spec(raw | bad)
    db = tmp_path / "q.sqlite"
    assert run_study(parse_spec(raw), db, progress=False)["done"] == 2
    lora = next((tmp_path / "q.runs").rglob("delta-lora"))
    assert _delta_meta(lora)["quantize"] == "4bit"
    assert json.loads((lora.parent / "run.json").read_text())["quantize"] == "4bit"
