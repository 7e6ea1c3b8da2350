"""`deltatune eval` and `predict` on OpenDelta `save_finetuned` folders, scored as OpenDelta scores them.

The folders are tests/fixtures/opendelta/ (OpenDelta 0.3.2's own saves over a tiny random BERT classifier, with its
outputs), read through a tokenizer whose token `t<i>` is id i: the CLI sees the fixture's very inputs, whose
predictions are OpenDelta's; on more texts they are those of `import_opendelta`, which test_opendelta.py holds to
OpenDelta's outputs.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from tiny import ids_tokenizer

from deltatune.cli import main
from deltatune.interop import import_opendelta

FIXTURES = Path(__file__).parent / "fixtures" / "opendelta"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_opendelta_fixtures import CONFIGS  # noqa: E402

EXPECTED = load_file(str(FIXTURES / "expected.safetensors"))
CASES = ("lora", "adapter", "bitfit", "low_rank_adapter", "parallel_adapter", "soft_prompt")


def _model() -> tf.BertForSequenceClassification:
    config = tf.BertConfig(**CONFIGS["bert"][1])
    model = tf.BertForSequenceClassification(config)
    model.load_state_dict(load_file(str(FIXTURES / "base_bert.safetensors")))
    return model.eval()


@pytest.fixture(scope="module")
def od(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The fixtures' BERT as a classifier checkpoint and a bare encoder, texts (the fixture's two inputs first), a task."""
    root = tmp_path_factory.mktemp("opendelta")
    model = _model()
    tokenizer = ids_tokenizer(model.config.vocab_size)
    out = {"clf": root / "clf", "bare": root / "bare", "task": root / "task", "task3": root / "task3"}
    model.save_pretrained(out["clf"])
    model.bert.save_pretrained(out["bare"])
    for key in ("clf", "bare"):
        tokenizer.save_pretrained(out[key])
    rows = [[i for i, m in zip(ids.tolist(), mask.tolist(), strict=True) if m]
            for ids, mask in zip(EXPECTED["bert.input.input_ids"], EXPECTED["bert.input.attention_mask"], strict=True)]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rows += [torch.randint(3, 100, (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (38,), generator=g)]
    out["texts"] = [" ".join(f"t{i}" for i in r) for r in rows]
    for key, labels in (("task", ["a", "b"]), ("task3", ["a", "b", "c"])):
        out[key].mkdir()
        (out[key] / "dev.jsonl").write_text("".join(json.dumps({"text": t, "label": 0}) + "\n" for t in out["texts"]))
        (out[key] / "meta.json").write_text(json.dumps({"type": "classification", "labels": labels}))
    return out


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([[int(w[1:]) for w in text.split()]])


def _logits(folder: Path, texts: list[str], delta: bool = True) -> torch.Tensor:
    """import_opendelta's logits on `texts`, one at a time (no padding)."""
    dm = import_opendelta(_model(), folder).eval()
    if not delta:
        dm.disable("default")
    with torch.no_grad():
        return torch.cat([dm(input_ids=_ids(t)).logits for t in texts])


def _centred(case: str, texts: list[str], tmp_path: Path) -> Path:
    """The case's folder with its saved classifier's bias moved so that half of `texts` fall in each class (the tiny
    random model puts them all in one): a prediction that the delta did not shape would show."""
    folder = tmp_path / case
    folder.mkdir()
    shutil.copy(FIXTURES / case / "config.json", folder)
    saved = torch.load(FIXTURES / case / "pytorch_model.bin", weights_only=True, map_location="cpu")
    margin = _logits(FIXTURES / case, texts).diff(dim=-1).squeeze(-1).sort().values
    middle = len(texts) // 2
    saved["classifier.bias"] = saved["classifier.bias"] - torch.tensor([0.0, (margin[middle - 1] + margin[middle]) / 2])
    save_file({k: v.contiguous() for k, v in saved.items()}, str(folder / "model.safetensors"))
    return folder


def _said(out: str) -> list[str]:
    return [line.split("\t")[0] for line in out.splitlines()]


@pytest.mark.parametrize("case", CASES)
def test_opendelta_folders_predict_and_score_as_opendelta_did(od, case, tmp_path, capsys) -> None:  # noqa: ANN001
    two = _logits(FIXTURES / case, od["texts"][:2])  # the fixture's inputs: OpenDelta's own logits
    assert (two - EXPECTED[case]).abs().max().item() <= 1e-5
    folder = _centred(case, od["texts"], tmp_path)
    want = _logits(folder, od["texts"]).argmax(-1).tolist()
    assert want.count(0) == len(want) // 2  # both classes: the comparison says something
    assert want != _logits(folder, od["texts"], delta=False).argmax(-1).tolist()  # and the delta shapes them
    common = ["--delta", str(folder), "--model", str(od["clf"])]
    assert main(["predict", *common, "--task", str(od["task"]), *od["texts"]]) == 0
    out, err = capsys.readouterr()
    assert _said(out) == [["a", "b"][p] for p in want]
    assert "OpenDelta adapters do not record the max length" in err and "--max-length 64" in err
    assert main(["eval", *common, "--task", str(od["task"])]) == 0
    accuracy = re.search(r"accuracy (\d\.\d{4})", capsys.readouterr().out)[1]
    assert accuracy == "0.5000"  # every row's label is 0: half are predicted 0
    assert main(["predict", *common, *od["texts"][:6]]) == 0  # no --task: class indices
    out, err = capsys.readouterr()
    assert _said(out) == [str(p) for p in want[:6]] and "class indices" in err


def test_the_backbone_the_folder_names_or_one_line_asking_for_model(od, tmp_path, capsys) -> None:  # noqa: ANN001
    """OpenDelta records only the last part of the model's name (`backbone_checkpoint_name`); the fixtures' is ''."""
    folder = tmp_path / "lora"
    shutil.copytree(FIXTURES / "lora", folder)
    config = json.loads((folder / "config.json").read_text())
    for name in ("", "bert-tiny-not-here"):
        (folder / "config.json").write_text(json.dumps(config | {"backbone_checkpoint_name": name}))
        assert main(["predict", "--delta", str(folder), "t5 t6"]) == 2
        err = capsys.readouterr().err.strip()
        assert "(an OpenDelta lora delta) needs the backbone it was trained on: pass --model" in err
        assert f"its backbone_checkpoint_name is {name!r}" in err and len(err.splitlines()) == 1
        assert ("keeps the last part of the model's name" in err) == bool(name)
    (folder / "config.json").write_text(json.dumps(config | {"backbone_checkpoint_name": str(od["clf"])}))
    assert main(["predict", "--delta", str(folder), *od["texts"][:4]]) == 0
    out, err = capsys.readouterr()
    assert f"using the adapter's base model {od['clf']} (backbone_checkpoint_name)" in err
    assert _said(out) == [str(p) for p in _logits(FIXTURES / "lora", od["texts"][:4]).argmax(-1).tolist()]


def test_a_folder_without_its_classifier(od, tmp_path, capsys) -> None:  # noqa: ANN001
    """The classifier frozen in OpenDelta (not saved): over a bare encoder the head would be drawn, so refused; over
    the classifier checkpoint it was trained on, that checkpoint's own head scores."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copy(FIXTURES / "adapter" / "config.json", folder)
    saved = torch.load(FIXTURES / "adapter" / "pytorch_model.bin", weights_only=True, map_location="cpu")
    save_file({k: v for k, v in saved.items() if not k.startswith("classifier.")}, str(folder / "model.safetensors"))
    for command in (["eval", "--task", str(od["task"])], ["predict", "t5 t6"]):
        assert main([command[0], "--delta", str(folder), "--model", str(od["bare"]), *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert "(an OpenDelta adapter delta) saves no classifier head (OpenDelta saves it when" in err
        assert "randomly drawn head" in err and len(err.splitlines()) == 1
    assert main(["predict", "--delta", str(folder), "--model", str(od["clf"]), *od["texts"][:6]]) == 0
    want = _logits(folder, od["texts"][:6]).argmax(-1).tolist()
    assert _said(capsys.readouterr().out) == [str(p) for p in want]


def test_wrong_folders_and_tasks_get_one_line_each(od, tmp_path, capsys) -> None:  # noqa: ANN001
    compacter = tmp_path / "compacter"
    shutil.copytree(FIXTURES / "lora", compacter)
    config = json.loads((compacter / "config.json").read_text())
    (compacter / "config.json").write_text(json.dumps(config | {"delta_type": "compacter"}))
    model = ["--model", str(od["clf"])]
    cases = [
        (["eval", "--delta", str(FIXTURES / "lora"), *model, "--task", str(od["task3"])], "head of 2 classes and task"),
        (["eval", "--delta", str(FIXTURES / "lora"), *model], "does not record the data"),
        (["predict", "--delta", str(compacter), *model, "t5"], "holds OpenDelta Compacter"),
        (
            ["predict", "--delta", str(FIXTURES / "gpt2_bitfit"), *model, "t5"],
            "saved from a GPT2LMHeadModel (gpt2) and",
        ),
        # a transformers model folder's config.json is no OpenDelta checkpoint: the deltatune refusal, as before
        (["predict", "--delta", str(od["clf"]), *model, "t5"], "is a model folder (config.json, no delta.json)"),
    ]
    for argv, wanted in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert wanted in err and len(err.splitlines()) == 1 and "error:" in err, (argv, err)
