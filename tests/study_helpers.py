"""Shared by the test_study_*.py files: a tiny BERT and two toy tasks a study runs on, a spec of them,
and a store job.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny import BAD, GOOD, make_tokenizer

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


def make_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny BERT saved as a model folder (the runner loads it by path) and two toy tasks: each file's `world`."""
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
