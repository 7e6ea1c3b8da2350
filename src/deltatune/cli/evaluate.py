"""`deltatune eval` (a saved delta on a task split), `predict` (texts in, labels out) and `merge`.

Each reads what the delta recorded at training (model, data, max length, labels, dev split) and
runs under those settings; a flag given on the command line wins and a note says so, because a
setting that changes silently changes the score (a LoRA delta: test .9483 at the max length 64 it
trained with, .9551 at 128).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import checks, foreign, predict_io
from .args import add_columns_argument, add_threads_argument, check_max_length, positive_int, set_threads
from .predict_io import DEFAULT_BATCH, DEFAULT_MAX_LENGTH, DEFAULT_MODEL, texts_to_examples

HELP_EVAL = "evaluate a saved delta on a task split (settings: those it was trained with)"
HELP_PREDICT = "predict labels (or generate text) for input texts with a saved delta"
HELP_MERGE = "merge a saved delta into its backbone and write a plain transformers model folder"
DELTA_HELP = (
    "a delta folder `deltatune train` wrote (runs/<run>/delta-lora), or a PEFT, AdapterHub or OpenDelta folder "
    "(with --model, unless the adapter names a base model on this machine)"
)


def saved_meta(delta: str, flag: str = "--delta ") -> dict[str, Any]:
    """The delta's delta.json, after checks whose errors name the flag and the folder to pass instead."""
    from ..core.io import META, read_meta

    path = Path(delta)
    if not path.exists():
        raise ValueError(f"{flag}{delta}: no such folder")
    if not (path / META).exists():
        inner = sorted(p for p in path.glob("delta-*") if (p / META).exists()) if path.is_dir() else []
        if inner:
            raise ValueError(f"{delta} is a run folder; pass one of its deltas: {flag}{inner[0]}")
        if (path / "head.safetensors").exists():
            raise ValueError(
                f"{delta} holds a head.safetensors from an older head-only run, without its settings; "
                "train it again (deltatune train --head-only) to get a delta-head folder"
            )
        if (path / "model" / "config.json").exists() and (path / "result.json").exists():
            raise ValueError(
                f"{delta} is a full fine-tuning run: no delta, its whole model is {path / 'model'} (a transformers "
                "folder: from_pretrained loads it; its scores are in result.json)"
            )
        if (path / "config.json").exists():  # `deltatune merge`'s output, or a backbone
            raise ValueError(
                f"{delta} is a model folder (config.json, no {META}): a merged model or a backbone, with no delta "
                f"to read; load it with transformers' from_pretrained, or train on it with --model {delta}"
            )
        raise ValueError(
            f"{delta} is not a delta folder (no {META}); pass {flag}a folder `deltatune train` wrote, "
            "e.g. runs/<run>/delta-lora"
        )
    return read_meta(path)


def _training(meta: dict[str, Any]) -> dict[str, Any]:
    return meta.get("metadata") or {}


def resolve(given: Any, flag: str, recorded: Any, fallback: Any, what: str) -> Any:
    """The flag's value when given (with a note when it differs from training), else the recorded one."""
    if given is None:
        if recorded is None:
            if fallback is not None:
                print(f"note: the delta does not record its {what}; using {flag} {fallback}", file=sys.stderr)
            return fallback
        return recorded
    if recorded is not None and given != recorded:
        print(f"note: {flag} {given} overrides the {recorded} this delta was trained with", file=sys.stderr)
    return given


def quantize_of(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    """How to load the backbone (`load_for_task`'s quantize and mixed_precision): as the delta trained, quantized
    or not, unless --quantize says otherwise."""
    recorded, given = info.get("quantize"), getattr(args, "quantize", None)
    asked = recorded if given is None else None if given == "none" else given
    if asked != recorded:
        print(
            f"note: --quantize {given} overrides the {recorded or 'full precision'} backbone this delta was trained "
            "on; scores can differ from training's",
            file=sys.stderr,
        )
    precision = (info.get("train") or {}).get("mixed_precision") if asked else None
    return {"quantize": asked, "mixed_precision": precision}


def task_of(delta: str):  # noqa: ANN201
    """The (example-free) task a delta was trained for, from the metadata `deltatune train` stores."""
    from ..data.tasks import Task

    info = _training(saved_meta(delta))
    if "task_type" not in info:
        raise ValueError(f"{delta} does not say which task it was trained for; use `deltatune eval` with --task")
    return Task(name=info.get("task", "task"), type=info["task_type"], labels=list(info.get("labels", [])))


def _load(model_name: str, delta: str, task, loading: dict[str, Any] | None = None):  # noqa: ANN001, ANN202
    from transformers.utils import logging as hf_logging

    from ..train.run import load_for_task
    from ..train.saved import load_saved

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model, tokenizer, lm = load_for_task(model_name, task, **(loading or {}))
    dm = load_saved(model, delta)
    dm.eval()
    return dm, tokenizer, lm


def _model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"the backbone (default: the one the delta was trained on, else {DEFAULT_MODEL}; for a PEFT or "
        "AdapterHub folder, the base model it names when that loads offline)",
    )


def _max_length_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help=f"longest input in tokens (default: the delta's training max length, else {DEFAULT_MAX_LENGTH})",
    )


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delta", required=True, help=DELTA_HELP + "; --task then names the data")
    _model_argument(p)
    p.add_argument(
        "--task",
        default=None,
        help="a task name, folder or file (default: the data the delta was trained on)",
    )
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"], help="the split to score (default: dev)")
    add_columns_argument(p, "as the delta's training read them")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"rows per batch (default: the delta's training eval batch size, else {DEFAULT_BATCH})",
    )
    _max_length_argument(p)
    _quantize_argument(p)
    add_threads_argument(p)


def _quantize_argument(p: argparse.ArgumentParser) -> None:
    from .train import add_quantize_arguments

    add_quantize_arguments(
        p, "load the backbone quantized (4bit, 8bit) or not (none) (default: as the delta was trained)"
    )


def _with_labels(task, again, held: dict | None):  # noqa: ANN001, ANN202
    """`again` (the data loaded with the delta's labels) when every row names the same class in both.

    Data holding only some of the trained classes (a test file of positive reviews) infers fewer
    labels, so its indices differ from the head's; loaded with the delta's labels they agree. Rows
    given as indices against another label order would not: then the first load stands (and is refused).
    """
    from ..data.split import hold_out_dev

    if held and "dev" not in again.splits:
        again = hold_out_dev(again, held["fraction"], held["seed"])
    names = {s: [again.labels[e.label] for e in rows] for s, rows in again.splits.items()}
    if names == {s: [task.labels[e.label] for e in rows] for s, rows in task.splits.items()}:
        return again
    return task


def _by_name(task, labels: list[str]):  # noqa: ANN001, ANN202
    """`task` renumbered into `labels`, each row keeping its class name (the first load read it right)."""
    import dataclasses

    index = {name: i for i, name in enumerate(labels)}
    splits = {
        split: [dataclasses.replace(e, label=index[task.labels[e.label]]) for e in rows]
        for split, rows in task.splits.items()
    }
    return dataclasses.replace(task, labels=labels, splits=splits)


def _task_for_eval(args: argparse.Namespace, info: dict[str, Any]):  # noqa: ANN202
    from ..data.files import DataError
    from ..data.split import hold_out_dev
    from ..data.tasks import load_task

    source = args.task or info.get("task_source")
    if source is None:
        raise ValueError(f"{args.delta} does not record the data it was trained on; name it with --task")
    mapped = args.columns or info.get("columns")  # the columns as training read them, unless told otherwise
    task = load_task(source, columns=mapped)
    if info.get("task_type") not in (None, task.type):  # the head's shape would be named, not the cause
        raise ValueError(
            f"the delta was trained for {info['task_type']} and {source} is a {task.type} task; evaluate it on "
            f"{info['task_type']} data (--task)"
        )
    held = info.get("dev_split")
    # the dev split held out at training, rebuilt from its seed, on that data only: other data given
    # with --task was scored on a 'dev' fraction of itself (1 row of 3) and 'train' lost that fraction
    own = task.source == info.get("task_source")
    if held and "dev" not in task.splits and own:
        task = hold_out_dev(task, held["fraction"], held["seed"])
        if held.get("rows_sha") not in (None, task.meta["dev_split"]["rows_sha"]):  # re-sorted or edited since
            raise ValueError(
                f"{source} holds other rows (or the same in another order) than when the delta's dev split was held "
                "out of it: the split rebuilt now would mix rows the delta trained on into dev; score the file as "
                "it was, or another split (--split test)"
            )
    elif held and not own and args.split == "dev" and "dev" not in task.splits:
        raise ValueError(
            f"{source} has no dev split (it has {', '.join(task.splits)}); the delta's dev split was held out of "
            f"its own training data, so score this data whole with --split {next(iter(task.splits))}"
        )
    recorded = info.get("labels")
    if recorded and task.labels and list(recorded) != task.labels and set(task.labels) <= set(recorded):  # a subset,
        # or the same names in another order (sorted without meta.json): scored by name, not refused
        try:
            again = load_task(source, labels=recorded, columns=mapped)
        except DataError:  # integer rows that name classes ("1", "2") are no indices into numeric names
            again = _by_name(task, list(recorded))
        task = _with_labels(task, again, held if own else None)
    if recorded and task.labels and list(recorded) != task.labels:
        raise ValueError(
            f"the delta was trained with labels {recorded} but {source} has {task.labels}; "
            "evaluate it on data with the same labels (--task)"
        )
    if args.split not in task.splits:
        hint = "; hold one out at training with --dev-split" if args.split == "dev" else ""
        raise ValueError(f"{source} has no {args.split} split (it has {', '.join(task.splits)}){hint}")
    return task


def run_eval(args: argparse.Namespace) -> int:
    from ..train.evaluation import evaluate
    from ..train.objectives import objective_for

    set_threads(args.threads)
    if (ad := foreign.adapter(args.delta)) is not None:  # a PEFT, AdapterHub or OpenDelta folder
        return foreign.run_eval(args, ad)
    meta = saved_meta(args.delta)
    info = _training(meta)
    train = info.get("train") or {}
    model = resolve(args.model, "--model", info.get("model"), DEFAULT_MODEL, "model")
    max_length = resolve(args.max_length, "--max-length", train.get("max_length"), DEFAULT_MAX_LENGTH, "max length")
    batch = args.batch_size or train.get("eval_batch_size") or DEFAULT_BATCH
    if args.max_length is not None:  # a length asked for now (the recorded one ran at training)
        check_max_length(model, max_length)
    task = _task_for_eval(args, info)
    dm, tokenizer, lm = _load(model, args.delta, task, quantize_of(args, info))
    objective = objective_for(
        task, tokenizer, lm=lm, max_length=max_length, max_new_tokens=train.get("max_new_tokens", 48)
    )
    cap = train.get("max_eval")
    if args.split == "dev" and cap is not None and len(task["dev"]) > cap:
        print(f"note: training scored dev on a sample of {cap} (--max-eval); this is all of dev", file=sys.stderr)
    metrics = evaluate(dm, objective, task[args.split], task, batch)
    print(
        f"{task.name} {args.split} ({len(task[args.split])} examples, max length {max_length}): "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )
    return 0


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", help="input texts (for a delta trained on pairs: 'first ||| second')")
    p.add_argument("--delta", required=True, help=DELTA_HELP + "; --task then names the labels")
    p.add_argument(
        "--input",
        default=None,
        help="a file of rows to predict instead of texts: .jsonl, .csv, .tsv, .json, .parquet (a text column, and text_pair for pairs) "
        "or .txt (one text per line); - reads lines from stdin",
    )
    p.add_argument(
        "--output",
        default=None,
        help="write each row with its prediction to this .jsonl or .csv file (default: print 'prediction<TAB>text')",
    )
    p.add_argument(
        "--task",
        default=None,
        help="for a PEFT, AdapterHub or OpenDelta folder: the task whose label names to print (a task name, folder or file; "
        "default: class indices)",
    )
    add_columns_argument(p, "as the delta's training read them")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="rows per batch (default: the training eval batch)"
    )
    _model_argument(p)
    _max_length_argument(p)
    _quantize_argument(p)
    add_threads_argument(p)


def run_predict(args: argparse.Namespace) -> int:
    from ..train.objectives import objective_for

    set_threads(args.threads)
    if (ad := foreign.adapter(args.delta)) is not None:  # a PEFT, AdapterHub or OpenDelta folder
        return foreign.run_predict(args, ad)
    if args.task is not None:  # a delta folder records its task and labels
        raise ValueError(
            f"--task is for PEFT, AdapterHub and OpenDelta folders; {args.delta} records its own task and labels"
        )
    info = _training(saved_meta(args.delta))
    train = info.get("train") or {}
    task = task_of(args.delta)
    model = resolve(args.model, "--model", info.get("model"), DEFAULT_MODEL, "model")
    max_length = resolve(args.max_length, "--max-length", train.get("max_length"), DEFAULT_MAX_LENGTH, "max length")
    if args.max_length is not None:  # a length asked for now (the recorded one ran at training)
        check_max_length(model, max_length)
    if bool(args.texts) == bool(args.input):
        raise ValueError("give texts to predict, or --input FILE (not both)")
    predict_io.check_output(args.output)
    pairs = info.get("pairs")
    if args.input:
        read = predict_io.read_rows(args.input, args.columns or info.get("columns"), task.type == "generation")
        rows, texts = [row for row, _ in read], [m["text"] for _, m in read]
        if pairs is None:  # deltas saved before "pairs" was recorded
            pairs = task.type == "pair_classification"
        examples = predict_io.examples_from(read, pairs)
    else:
        texts = args.texts
        rows = [{"text": t} for t in texts]
        if pairs is None:
            pairs = task.type == "pair_classification" or all(" ||| " in t for t in texts)
        examples = texts_to_examples(texts, pairs)
    dm, tokenizer, lm = _load(model, args.delta, task, quantize_of(args, info))
    objective = objective_for(
        task, tokenizer, lm=lm, max_length=max_length, max_new_tokens=train.get("max_new_tokens", 48)
    )
    size = args.batch_size or train.get("eval_batch_size") or DEFAULT_BATCH
    return predict_io.emit(args, dm, task, objective, examples, rows, texts, size)


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the backbone the delta was trained on (minilm-l6, a hub id or folder)")
    p.add_argument("delta", help="a delta folder `deltatune train` wrote (runs/<run>/delta-lora)")
    p.add_argument("out", help="a new folder for the merged model")


def run_merge(args: argparse.Namespace) -> int:
    from ..core.delta import DeltaError
    from ..core.io import saved_config
    from ..methods import METHODS
    from ..train.saved import is_head_only

    meta = saved_meta(args.delta)
    method = meta["config"].get("method")
    if not is_head_only(meta) and not saved_config(meta).can_merge:  # *these* settings (a gelu low-rank adapter: no)
        mergeable = ", ".join(name for name, cls in METHODS.items() if cls.mergeable)
        raise ValueError(
            f"{args.delta} is a {method} delta, which adds computation no weight change expresses, so it cannot "
            f"be merged; use it as it is (deltatune predict --delta {args.delta} ...), or train a mergeable "
            f"method ({mergeable})"
        )
    checks.out_folder(args.out, "out")
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise ValueError(f"{args.out} exists and is not empty; give merge a new folder")
    task = task_of(args.delta)
    dm, tokenizer, _ = _load(args.model, args.delta, task)  # full precision: a quantized weight holds no merge
    if (bits := _training(meta).get("quantize")) is not None:
        print(f"note: the delta trained on a {bits} backbone; it merges into the full-precision weights, as QLoRA's do")
    try:
        path = dm.export_merged(args.out, tokenizer=tokenizer)
    except DeltaError as err:
        raise ValueError(f"cannot merge {args.delta}: {err}") from err
    print(f"merged {args.delta} into {args.model}: {path} (loads with transformers' from_pretrained alone)")
    return 0
