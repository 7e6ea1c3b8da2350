"""`deltatune eval` and `predict` on adapter folders PEFT and AdapterHub wrote, scored as those libraries score them.

PEFT folders are written here with `peft` on tiny BERTs (a classifier checkpoint and a bare encoder);
AdapterHub folders are the fixtures of tests/fixtures/adapterhub/ with AdapterHub's own logits, read
through a tokenizer whose token `t<i>` is id i, so the CLI sees the very inputs those logits were taken on.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from tiny import TOY_WORDS, ids_tokenizer, make_tokenizer, tiny_bert, write_toy_task

from deltatune.cli import main

peft = pytest.importorskip("peft")
FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT saved as a 2-class classifier checkpoint ("clf") and as a bare encoder ("bare"), one toy task."""
    root = tmp_path_factory.mktemp("foreign")
    tokenizer = make_tokenizer(TOY_WORDS)
    model = tiny_bert(tokenizer, seed=3)
    out = {"clf": root / "clf", "bare": root / "bare", "task": write_toy_task(root / "toy", n_dev=40)}
    model.save_pretrained(out["clf"])
    model.bert.save_pretrained(out["bare"])
    for key in ("clf", "bare"):
        tokenizer.save_pretrained(out[key])
    return out


def _peft_folder(
    base: Path, folder: Path, task_type: str | None, num_labels: int = 2, task: Path | None = None
) -> Path:
    """A PEFT LoRA over `base`, trained a few steps on `task`'s train split (with its head when SEQ_CLS)."""
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    config = peft.LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=["query", "value"])
    wrapped = peft.get_peft_model(model, config)
    if task is not None:
        texts, labels = _split(task, "train")
        batch = tf.AutoTokenizer.from_pretrained(base)(texts, padding=True, return_tensors="pt")
        optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=0.05)
        for _ in range(10):
            optimizer.zero_grad()
            wrapped(**batch, labels=torch.tensor(labels)).loss.backward()
            optimizer.step()
    wrapped.save_pretrained(folder)
    return folder


def _peft_predictions(base: Path, folder: Path, texts: list[str]) -> list[int]:
    """What PEFT itself predicts after loading the folder onto a fresh base model."""
    model = tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model = peft.PeftModel.from_pretrained(model, folder).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(base)
    batch = tokenizer(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.argmax(-1).tolist()


def _split(task: Path, split: str = "dev") -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in (task / f"{split}.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def _accuracy(out: str) -> str:
    return re.search(r"accuracy (\d\.\d{4})", out)[1]


@pytest.mark.parametrize("base, task_type", [("bare", "SEQ_CLS"), ("clf", None)])
def test_eval_and_predict_give_what_peft_itself_predicts(bases, base, task_type, tmp_path, capsys) -> None:  # noqa: ANN001
    """A saved head (SEQ_CLS: modules_to_save), or none over a classifier checkpoint's own head."""
    folder = _peft_folder(bases[base], tmp_path / "adapter", task_type, task=bases["task"])
    texts, labels = _split(bases["task"])
    want = _peft_predictions(bases[base], folder, texts)
    assert len(set(want)) == 2  # both classes predicted: the accuracy says something
    accuracy = sum(p == y for p, y in zip(want, labels, strict=True)) / len(labels)
    common = ["--delta", str(folder), "--model", str(bases[base])]
    capsys.readouterr()
    assert main(["eval", *common, "--task", str(bases["task"])]) == 0
    out, err = capsys.readouterr()
    assert _accuracy(out) == f"{accuracy:.4f}" and "dev (40 examples, max length 128)" in out
    assert "do not record the max length" in err
    assert main(["predict", *common, "--task", str(bases["task"]), *texts]) == 0, capsys.readouterr().err[-300:]
    said = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert said == [["negative", "positive"][p] for p in want]
    assert main(["predict", *common, *texts[:5]]) == 0  # no --task: class indices, and a note says so
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(p) for p in want[:5]]
    assert "class indices" in err or "config names" in err


def test_the_base_model_the_adapter_names_is_used_without_model(bases, tmp_path, capsys) -> None:  # noqa: ANN001
    folder = _peft_folder(bases["bare"], tmp_path / "adapter", "SEQ_CLS")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(bases["bare"])
    assert main(["predict", "--delta", str(folder), "the movie was good"]) == 0
    assert f"using the adapter's base model {bases['bare']}" in capsys.readouterr().err
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "someone/not-here"}))
    assert main(["eval", "--delta", str(folder), "--task", str(bases["task"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass --model" in err and "'someone/not-here'" in err and "base_model_name_or_path" in err
    assert len(err.splitlines()) == 1


def test_an_adapter_without_a_head_over_a_drawn_head_is_refused(bases, tmp_path, capsys) -> None:  # noqa: ANN001
    """No modules_to_save over a bare encoder: the classifier would be random, the score chance."""
    folder = _peft_folder(bases["bare"], tmp_path / "adapter", None)
    for command in (["eval", "--task", str(bases["task"])], ["predict", "the plot was bad"]):
        assert main([command[0], "--delta", str(folder), "--model", str(bases["bare"]), *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert "saves no classifier head" in err and "randomly drawn head" in err and len(err.splitlines()) == 1


def test_wrong_inputs_get_one_line_each(bases, tmp_path, capsys) -> None:  # noqa: ANN001
    three = _peft_folder(bases["bare"], tmp_path / "three", "SEQ_CLS", num_labels=3)
    model = ["--model", str(bases["bare"])]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "adapter_config.json").write_text('{"r": 8}')
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "adapter_config.json").write_text('{"peft_type": ')
    cases = [
        (["eval", "--delta", str(three), *model, "--task", str(bases["task"])], "head of 3 classes"),
        (["eval", "--delta", str(three), *model], "--task"),
        (["eval", "--delta", str(three), *model, "--task", str(bases["task"]), "--split", "test"], "no test split"),
        (["predict", "--delta", str(three), *model], "give texts"),
        (["predict", "--delta", str(three), *model, "x", "--output", str(tmp_path / "o.txt")], ".jsonl or .csv"),
        (["predict", "--delta", str(junk), *model, "x"], "neither PEFT's"),
        (["predict", "--delta", str(cut), *model, "x"], "not valid JSON"),
    ]
    for argv, wanted in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert wanted in err and len(err.splitlines()) == 1 and "error:" in err, (argv, err)
    assert not (tmp_path / "o.txt").exists()


# --- AdapterHub -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """base_bert with a tokenizer, the fixtures' inputs as texts, AdapterHub's logits, a 3-class task of those texts."""
    root = tmp_path_factory.mktemp("adapterhub")
    base = root / "base"
    shutil.copytree(FIXTURES / "base_bert", base)
    config = json.loads((base / "config.json").read_text())
    ids_tokenizer(config["vocab_size"]).save_pretrained(base)
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    texts = [
        " ".join(f"t{i}" for i, m in zip(ids.tolist(), mask.tolist(), strict=True) if m)
        for ids, mask in zip(expected["input_ids"], expected["attention_mask"], strict=True)
    ]
    task = root / "task"
    task.mkdir()
    rows = [{"text": t, "label": 0} for t in texts]
    (task / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task / "meta.json").write_text(json.dumps({"type": "classification", "labels": ["a", "b", "c"]}))
    return {"base": base, "texts": texts, "expected": expected, "task": task, "config": config}


@pytest.mark.parametrize("case", ["seq_bn", "lora", "par_bn", "ia3_bin"])
def test_adapterhub_folders_predict_and_score_as_adapterhub_did(hub, case, capsys) -> None:  # noqa: ANN001
    want = hub["expected"][case].argmax(-1).tolist()
    common = ["--delta", str(FIXTURES / case), "--model", str(hub["base"])]
    assert main(["predict", *common, "--task", str(hub["task"]), *hub["texts"]]) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [["a", "b", "c"][p] for p in want]
    assert "--max-length 64" in err  # the default 128, cut to the model's 64 positions
    assert main(["eval", *common, "--task", str(hub["task"])]) == 0
    assert _accuracy(capsys.readouterr().out) == f"{want.count(0) / len(want):.4f}"
    assert main(["predict", *common, *hub["texts"]]) == 0  # no --task: class indices (the names are LABEL_i)
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(p) for p in want] and "class indices" in err


def test_an_adapterhub_folder_without_its_head_over_a_bare_encoder_is_refused(hub, tmp_path, capsys) -> None:  # noqa: ANN001
    bare = tmp_path / "bare"
    shutil.copytree(hub["base"], bare)
    (bare / "config.json").write_text(json.dumps(hub["config"] | {"architectures": ["BertModel"]}))
    headless = tmp_path / "seq_bn"
    shutil.copytree(FIXTURES / "seq_bn", headless)
    (headless / "model_head.safetensors").unlink()
    assert main(["eval", "--delta", str(headless), "--model", str(bare), "--task", str(hub["task"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "AdapterHub" in err and "saves no classifier head" in err and len(err.splitlines()) == 1
    # the base model the adapter names is a path on the machine that wrote it: --model is asked for by name
    moved = tmp_path / "moved"
    shutil.copytree(FIXTURES / "seq_bn", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps(config | {"model_name": str(tmp_path / "gone")}))
    assert main(["eval", "--delta", str(moved), "--task", str(hub["task"])]) == 2
    err = capsys.readouterr().err
    assert "pass --model" in err and "model_name" in err


def test_a_head_whose_classes_are_the_tasks_in_another_order_is_refused(hub, tmp_path, capsys) -> None:  # noqa: ANN001
    """AdapterHub's head_config.json names the head's classes: scored against a task that lists the same names in
    another order, every prediction would land on the wrong class without an error."""
    swapped = tmp_path / "lora"
    shutil.copytree(FIXTURES / "lora", swapped)
    head = json.loads((swapped / "head_config.json").read_text())
    for order, code in ((["c", "b", "a"], 2), (["a", "b", "c"], 0), (["x", "y", "z"], 0)):
        (swapped / "head_config.json").write_text(json.dumps(head | {"label2id": {n: i for i, n in enumerate(order)}}))
        assert main(["eval", "--delta", str(swapped), "--model", str(hub["base"]), "--task", str(hub["task"])]) == code
        err = capsys.readouterr().err
        if code == 2:
            assert "the head orders its classes ['c', 'b', 'a'], task 'task' its labels ['a', 'b', 'c']" in err
        elif order[0] == "x":  # other names: said, and scored in order
            assert "the head was trained with the classes ['x', 'y', 'z']" in err
        else:
            assert "classes" not in err


def test_predict_names_classes_as_the_adapterhub_head_does_and_refuses_a_swapped_task(hub, tmp_path, capsys) -> None:  # noqa: ANN001
    named = tmp_path / "lora"
    shutil.copytree(FIXTURES / "lora", named)
    head = json.loads((named / "head_config.json").read_text())
    (named / "head_config.json").write_text(json.dumps(head | {"label2id": {"a": 0, "b": 1, "c": 2}}))
    want = hub["expected"]["lora"].argmax(-1).tolist()
    assert main(["predict", "--delta", str(named), "--model", str(hub["base"]), *hub["texts"]]) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [["a", "b", "c"][p] for p in want]
    assert "labels as the adapter's head names them (a, b, c)" in err
    (named / "head_config.json").write_text(json.dumps(head | {"label2id": {"b": 0, "a": 1, "c": 2}}))
    args = ["predict", "--delta", str(named), "--model", str(hub["base"]), "--task", str(hub["task"]), "t5"]
    assert main(args) == 2 and "classes would be swapped" in capsys.readouterr().err


def test_head_classes_spelt_in_another_case_are_the_tasks_classes(hub, tmp_path, capsys) -> None:  # noqa: ANN001
    """roberta-large-mnli's id2label says CONTRADICTION/NEUTRAL/ENTAILMENT, GLUE's MNLI entailment/neutral/contradiction:
    the same classes in another order, which a case-sensitive comparison took for other names (a note, then swapped)."""
    head_path = FIXTURES / "lora" / "head_config.json"
    head = json.loads(head_path.read_text())
    swapped = tmp_path / "lora"
    shutil.copytree(FIXTURES / "lora", swapped)
    common = ["eval", "--delta", str(swapped), "--model", str(hub["base"]), "--task", str(hub["task"])]
    for label2id, code in (({"C": 0, "B": 1, "A": 2}, 2), ({" A": 0, "B": 1, "c": 2}, 0)):
        (swapped / "head_config.json").write_text(json.dumps(head | {"label2id": label2id}))
        assert main(common) == code
        err = capsys.readouterr().err
        assert ("classes would be swapped" in err) == (code == 2) and "trained with the classes" not in err
    # transformers' generic names, in any key order, name no classes
    (swapped / "head_config.json").write_text(
        json.dumps(head | {"label2id": {"LABEL_1": 1, "LABEL_0": 0, "LABEL_2": 2}})
    )
    assert main(common) == 0 and "class i is scored as" in capsys.readouterr().err


def test_predict_input_with_a_peft_causal_lm_adapter_reads_each_row_s_source(tmp_path, capsys) -> None:  # noqa: ANN001
    """The hint asked for a `text` column (`--columns category=text`, which would generate from the category)."""
    tokenizer = make_tokenizer(TOY_WORDS)
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "llama"), lora).save_pretrained(
        tmp_path / "adapter"
    )
    rows = [{"category": "film", "source": "the movie was good", "target": "good"}] * 3
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = [
        "--delta",
        str(tmp_path / "adapter"),
        "--model",
        str(tmp_path / "llama"),
        "--input",
        str(tmp_path / "in.jsonl"),
    ]
    assert main(["predict", *args, "--output", str(out)]) == 0, capsys.readouterr().err[-300:]
    assert len(out.read_text().splitlines()) == 3
