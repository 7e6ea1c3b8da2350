"""`deltatune eval` (a saved delta on a task split) and `deltatune predict` (texts in, labels out)."""

from __future__ import annotations

import argparse

HELP_EVAL = "evaluate a saved delta on a task split"
HELP_PREDICT = "predict labels (or generate text) for input texts with a saved delta"


def _load(model_name: str, delta: str, task):  # noqa: ANN001, ANN202
    from transformers.utils import logging as hf_logging

    from ..core.io import load_delta
    from ..train.run import load_for_task

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model, tokenizer, lm = load_for_task(model_name, task)
    dm = load_delta(model, delta)
    dm.eval()
    return dm, tokenizer, lm


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--task", required=True)
    p.add_argument("--delta", required=True, help="a delta folder written by `deltatune train` (runs/.../delta-lora)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)


def run_eval(args: argparse.Namespace) -> int:
    from ..data.tasks import load_task
    from ..train.heads import head_for
    from ..train.trainer import evaluate

    task = load_task(args.task)
    dm, tokenizer, lm = _load(args.model, args.delta, task)
    head = head_for(task, tokenizer, lm=lm, max_length=args.max_length)
    metrics = evaluate(dm, head, task[args.split], task, args.batch_size)
    print(
        f"{task.name} {args.split} ({len(task[args.split])} examples): "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )
    return 0


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="+", help="input texts (for pair tasks: 'first ||| second')")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--delta", required=True, help="a delta folder written by `deltatune train`")
    p.add_argument("--max-length", type=int, default=128)


def task_of(delta: str):  # noqa: ANN201
    """The (example-free) task a delta was trained for, from the metadata `deltatune train` stores."""
    from ..core.io import read_meta
    from ..data.tasks import Task

    info = read_meta(delta).get("metadata", {})
    if "task_type" not in info:
        raise ValueError(f"{delta} does not say which task it was trained for; use `deltatune eval` with --task")
    return Task(name=info.get("task", "task"), type=info["task_type"], labels=list(info.get("labels", [])))


def run_predict(args: argparse.Namespace) -> int:
    from ..data.tasks import Example
    from ..train.heads import GenerationHead, head_for

    task = task_of(args.delta)
    dm, tokenizer, lm = _load(args.model, args.delta, task)
    head = head_for(task, tokenizer, lm=lm, max_length=args.max_length)
    examples = [Example(*(t.split(" ||| ", 1) if " ||| " in t else (t, None))) for t in args.texts]
    if isinstance(head, GenerationHead):
        outputs = head.generate(dm, examples)
    else:
        batch = head.collate([Example(e.text, e.text_pair, 0 if task.type != "regression" else 0.0) for e in examples])
        raw = head.predict(dm, batch)
        outputs = [f"{v:.4f}" if task.type == "regression" else task.labels[v] for v in raw]
    for text, out in zip(args.texts, outputs, strict=True):
        print(f"{out}\t{text}")
    return 0


HELP_MERGE = "merge a saved delta into its backbone and write a plain transformers model folder"


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the backbone the delta was trained on (minilm-l6, a hub id or folder)")
    p.add_argument("delta", help="a delta folder (delta.safetensors + delta.json)")
    p.add_argument("out", help="a new folder for the merged model")


def run_merge(args: argparse.Namespace) -> int:
    task = task_of(args.delta)
    dm, tokenizer, _ = _load(args.model, args.delta, task)
    path = dm.export_merged(args.out, tokenizer=tokenizer)
    print(f"merged {args.delta} into {args.model}: {path} (loads with transformers' from_pretrained alone)")
    return 0
