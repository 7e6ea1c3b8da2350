"""Shared by the test_cli_{train,delta_commands,flags}.py files: toy review data written as JSONL folders
or CSV files, a tiny BERT saved to a folder, and `deltatune train` run on them quickly.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from tiny import BAD, GOOD, make_tokenizer, tiny_bert

from deltatune.cli import main

NOUNS = ["movie", "film", "plot", "cast", "story", "score"]
WORDS = GOOD + BAD + NOUNS + ["the", "was", "and", "so", "very"]
FAST = ["--lr", "0.02", "--head-lr", "0.02", "--batch-size", "16", "--eval-every", "8", "--quiet"]


def _rows(n: int, seed: int, pairs: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        row = {"text": f"the {rng.choice(NOUNS)} was so very {rng.choice(GOOD if label == 'pos' else BAD)}"}
        if pairs:
            row["text_pair"] = f"the {rng.choice(NOUNS)}"
        rows.append(row | {"label": label})
    return rows


def _folder(root: Path, pairs: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 64, 0), ("dev", 24, 1), ("test", 20, 2)):
        rows = _rows(n, seed, pairs)
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _csv(path: Path, n: int = 80) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["text", "label"])
        writer.writeheader()
        writer.writerows(_rows(n, 5))
    return path


def make_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT and its tokenizer of the toy words, saved to a folder: each file's `model_dir`."""
    tokenizer = make_tokenizer(WORDS)
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _train(model_dir: Path, task: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", str(model_dir), "--task", str(task), "--out", str(out), *FAST, *extra])


def _delta_meta(delta: Path) -> dict:
    return json.loads((delta / "delta.json").read_text())["metadata"]
