"""`deltatune eval` and `predict` on folders PEFT (`save_pretrained`), AdapterHub (`save_adapter`) and OpenDelta
(`save_finetuned`) wrote.

Such a folder records the adapter and, at most, its base model's name and a classifier head; not the data,
the label names, the max length or the batch size a deltatune delta folder records. So the backbone comes
from --model (or a base model the adapter names that loads offline), the data and label names from --task
(predict without it prints class indices), and the settings from the flags or their defaults, each said in
a note. The head must be one the adapter was trained with: the one it saves (PEFT `modules_to_save`,
AdapterHub's static head, OpenDelta's trained classifier), or the backbone's own when --model is a classifier checkpoint of that many
classes; a freshly drawn head would score chance without an error, so that is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import foreign_opendelta
from .args import set_threads

PEFT, ADAPTERHUB, OPENDELTA = "PEFT", "AdapterHub", "OpenDelta"
BASE_FIELD = {PEFT: "base_model_name_or_path", ADAPTERHUB: "model_name", OPENDELTA: foreign_opendelta.FIELD}
CONFIG = "adapter_config.json"
MODELS = "minilm-l6, smollm2-135m or a model folder"


@dataclass
class Adapter:
    folder: str
    kind: str  # PEFT, ADAPTERHUB or OPENDELTA
    config: dict[str, Any]

    @property
    def base(self) -> Any:
        return self.config.get(self.base_field)

    @property
    def base_field(self) -> str:
        return BASE_FIELD[self.kind]

    def __str__(self) -> str:
        if self.kind == PEFT:
            return f"{self.folder} (a PEFT {self.config.get('peft_type')} adapter)"
        if self.kind == OPENDELTA:
            return f"{self.folder} (an OpenDelta {self.config.get('delta_type')} delta)"
        kind = self.config["config"].get("architecture") or "bottleneck"
        return f"{self.folder} (an AdapterHub {kind} adapter)"


def adapter(folder: str) -> Adapter | None:
    """The PEFT, AdapterHub or OpenDelta adapter in `folder`; None for anything else (a deltatune folder, a model
    folder, or no folder)."""
    path = Path(folder)
    if (path / "delta.json").exists():
        return None
    if (opendelta := foreign_opendelta.config(folder)) is not None:
        return Adapter(folder, OPENDELTA, opendelta)
    if not (path / CONFIG).is_file():
        return None
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / CONFIG} is not valid JSON ({err}); was it cut short?") from err
    if isinstance(config, dict) and "peft_type" in config:
        return Adapter(folder, PEFT, config)
    if isinstance(config, dict) and isinstance(config.get("config"), dict) and "model_class" in config:
        return Adapter(folder, ADAPTERHUB, config)
    raise ValueError(
        f"{path / CONFIG} is neither PEFT's (peft_type) nor AdapterHub's (config, model_class); pass --delta a "
        "folder `deltatune train` wrote, or a PEFT or AdapterHub adapter folder"
    )


def backbone(ad: Adapter, given: str | None) -> str:
    """--model, else the base model the adapter names when it loads offline (a folder, short name, cached id)."""
    from ..backbones import ALIASES, SHORT_NAMES
    from .args import check_model

    if given is not None:
        return given
    base = ad.base
    usable = isinstance(base, str) and base.strip() and (base in SHORT_NAMES or base in ALIASES or _local(base))
    if not usable:
        only = " (OpenDelta keeps the last part of the model's name only)" if ad.kind == OPENDELTA and base else ""
        raise ValueError(
            f"{ad} needs the backbone it was trained on: pass --model ({MODELS}); its {ad.base_field} is "
            f"{base!r}{only}, which deltatune cannot load offline"
        )
    check_model(base)
    print(f"note: no --model given; using the adapter's base model {base} ({ad.base_field})", file=sys.stderr)
    return base


def _local(name: str) -> bool:
    if (Path(name).expanduser() / "config.json").is_file():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed repo id is simply not cached
        return False


def _config(model: str) -> Any:
    from transformers import AutoConfig

    from ..backbones import model_path

    return AutoConfig.from_pretrained(model_path(model))


def own_head(model: str, rows: int) -> bool:
    """Whether `model` is a classifier checkpoint whose saved head has `rows` rows (loaded, not drawn)."""
    from ..train.own_head import saved_classifier

    config = _config(model)
    return saved_classifier(config) and config.num_labels == rows


def head_rows(ad: Adapter, model: str) -> int | None:
    """The number of classes of the classifier head the adapter saves; None when it saves none deltatune imports."""
    folder = Path(ad.folder)
    if ad.kind == ADAPTERHUB:
        from ..interop.adapterhub_common import HEAD_CONFIG, HEAD_WEIGHTS

        if not any((folder / n).exists() for n in HEAD_WEIGHTS) or not (folder / HEAD_CONFIG).is_file():
            return None
        try:
            head = json.loads((folder / HEAD_CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        static = isinstance(head, dict) and head.get("config") is None  # a flexible head is not imported
        return head["num_labels"] if static and isinstance(head.get("num_labels"), int) else None
    import torch
    from transformers import AutoModelForSequenceClassification

    from ..core.targeting import head_names
    from ..interop.peft_common import PREFIX, PROMPT_PREFIX, read_folder

    with torch.device("meta"):  # the classifier's parameter names, without weights
        skeleton = AutoModelForSequenceClassification.from_config(_config(model))
    heads = tuple(h + "." for h in head_names(skeleton))
    weights = [n for n, p in skeleton.named_parameters() if heads and n.startswith(heads) and p.dim() == 2]
    if not weights:
        return None
    if ad.kind == OPENDELTA:
        return foreign_opendelta.head_rows(
            ad.folder, weights[-1], ad.config.get("backbone_class"), type(skeleton).__name__
        )
    _, tensors = read_folder(folder)
    for key, value in tensors.items():
        inner = key.removeprefix(PREFIX) if key.startswith(PREFIX) else key.removeprefix(PROMPT_PREFIX)
        if inner.replace(".modules_to_save.default.", ".") == weights[-1]:
            return int(value.shape[0])
    return None


def head_classes(ad: Adapter, model: str) -> list[str] | None:
    """The class names the head was trained with, in its order: AdapterHub's head_config.json label2id, else the
    --model checkpoint's id2label; None when they are only transformers' defaults (LABEL_0, LABEL_1, ...)."""
    names: dict[int, str] = {}
    head = Path(ad.folder) / "head_config.json"
    if ad.kind == ADAPTERHUB and head.is_file():
        try:
            label2id = json.loads(head.read_text()).get("label2id") or {}
            names = {int(i): str(n) for n, i in label2id.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError):
            names = {}
    if not names:
        names = {int(i): str(n) for i, n in (getattr(_config(model), "id2label", None) or {}).items()}
    ordered = [names[i] for i in sorted(names)]
    if not ordered or sorted(names) != list(range(len(ordered))) or ordered == [f"LABEL_{i}" for i in sorted(names)]:
        return None
    return ordered


def check_classes(ad: Adapter, model: str, task) -> None:  # noqa: ANN001
    """The head's class i is scored as the task's label i: the same names in another order would swap them. Names
    compare without case or outer spaces (roberta-large-mnli's CONTRADICTION is GLUE MNLI's contradiction)."""
    classes = head_classes(ad, model)
    folded, labels = [c.strip().casefold() for c in classes or []], [str(n).strip().casefold() for n in task.labels]
    if classes is None or folded == labels:
        return
    if sorted(folded) == sorted(labels):
        raise ValueError(
            f"the head orders its classes {classes}, task {task.name!r} its labels {list(task.labels)}: scored as "
            'they are, classes would be swapped; give the task its labels in the head\'s order (meta.json "labels")'
        )
    print(
        f"note: the head was trained with the classes {classes}; they are scored as {task.name}'s labels "
        f"{list(task.labels)}, in that order",
        file=sys.stderr,
    )


def _no_head(ad: Adapter, model: str, rows: int) -> ValueError:
    saved = {
        PEFT: "PEFT saves it with modules_to_save, as task_type SEQ_CLS does",
        ADAPTERHUB: "save_adapter writes the model's own classifier as model_head.safetensors; a flexible head "
        "from add_classification_head is not imported",
        OPENDELTA: foreign_opendelta.NO_HEAD,
    }[ad.kind]
    return ValueError(
        f"{ad} saves no classifier head ({saved}), and {model} is no classifier checkpoint of {rows} classes: "
        "its scores would come from a randomly drawn head, so it is not run; save the adapter with its head"
    )


def check_head(ad: Adapter, model: str, task, rows: int | None) -> None:  # noqa: ANN001
    """Before loading: the saved head has the task's number of classes, or the backbone has such a head itself."""
    want = task.num_labels
    if rows is None and not own_head(model, want):
        raise _no_head(ad, model, want)
    if rows is not None and rows != want:
        labels = f" ({', '.join(map(str, task.labels))})" if task.type != "regression" else " (regression)"
        raise ValueError(
            f"{ad} has a classifier head of {rows} classes and task {task.name!r} has {want}{labels}: "
            "pass the task the adapter was trained for with --task"
        )


def load(ad: Adapter, model: str, task, quantize: str | None = None):  # noqa: ANN001, ANN201
    """(DeltaModel with the adapter and its head, tokenizer, lm): the head checked to come from the adapter or
    checkpoint. `quantize` ("4bit", "8bit"; "none" or None: full precision) loads the backbone as QLoRA trained it."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..core.targeting import head_names
    from ..interop import import_adapterhub, import_opendelta, import_peft
    from ..train.run import load_for_task

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    backbone_model, tokenizer, lm = load_for_task(model, task, quantize=None if quantize == "none" else quantize)
    heads = tuple(h + "." for h in head_names(backbone_model))
    params = {n: p for n, p in backbone_model.named_parameters() if heads and n.startswith(heads) and not lm}
    before = {n: p.detach().clone() for n, p in params.items()}
    with (
        torch.no_grad()
    ):  # marked, so that what the import did not write shows (a drawn bias of zeros equals a saved one)
        for p in params.values():
            p.fill_(float("nan"))
    dm = {PEFT: import_peft, ADAPTERHUB: import_adapterhub, OPENDELTA: import_opendelta}[ad.kind](
        backbone_model, ad.folder
    )
    dm.eval()
    kept = [n for n, p in params.items() if torch.isnan(p).all()]
    with torch.no_grad():
        for n in kept:
            params[n].copy_(before[n])
    if kept and task.type != "generation" and not own_head(model, task.num_labels):  # neither saved nor loaded: drawn
        raise _no_head(ad, model, task.num_labels)
    return dm, tokenizer, lm


def _settings(args: argparse.Namespace, ad: Adapter, model: str) -> tuple[int, int]:
    """(max length, batch size): the flags, else the defaults (at most the model's positions), with a note."""
    from ..train.checks import check_max_length
    from .predict_io import DEFAULT_BATCH, DEFAULT_MAX_LENGTH

    batch = args.batch_size or DEFAULT_BATCH
    if args.max_length is not None:
        check_max_length(model, args.max_length)
        return args.max_length, batch
    config = _config(model).get_text_config()
    most = getattr(config, "max_position_embeddings", None)
    length = min(DEFAULT_MAX_LENGTH, most) if isinstance(most, int) and most > 0 else DEFAULT_MAX_LENGTH
    print(
        f"note: {ad.kind} adapters do not record the max length they were trained with; using --max-length {length}",
        file=sys.stderr,
    )
    return length, batch


def _task(args: argparse.Namespace):  # noqa: ANN202
    from ..data.tasks import load_task

    return load_task(args.task, columns=args.columns)


def run_eval(args: argparse.Namespace, ad: Adapter) -> int:
    from ..train.evaluation import evaluate
    from ..train.objectives import objective_for

    set_threads(args.threads)
    if args.task is None:
        raise ValueError(f"{ad} does not record the data it was trained on; name the task to score with --task")
    model = backbone(ad, args.model)
    if ad.kind == OPENDELTA:
        foreign_opendelta.check(ad.folder, ad.config, model, getattr(_config(model), "model_type", None))
    task = _task(args)
    if args.split not in task.splits:
        raise ValueError(
            f"{args.task} has no {args.split} split (it has {', '.join(task.splits)}); pick one with --split"
        )
    lm = _is_lm(model)
    if not lm and task.type != "generation":
        check_head(ad, model, task, head_rows(ad, model))
        if task.type != "regression" and head_classes(ad, model) is None:
            print(
                f"note: the head's class i is scored as {task.name}'s label i ({', '.join(task.labels)})",
                file=sys.stderr,
            )
        elif task.type != "regression":
            check_classes(ad, model, task)
    max_length, batch = _settings(args, ad, model)
    dm, tokenizer, lm = load(ad, model, task, args.quantize)
    objective = objective_for(task, tokenizer, lm=lm, max_length=max_length, max_new_tokens=48)
    metrics = evaluate(dm, objective, task[args.split], task, batch)
    print(
        f"{task.name} {args.split} ({len(task[args.split])} examples, max length {max_length}): "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )
    return 0


def _is_lm(model: str) -> bool:
    from ..train.run import is_causal_lm

    return is_causal_lm(model)


def _index_task(ad: Adapter, model: str, lm: bool):  # noqa: ANN202
    """Without --task: a task of the saved head's classes, named by index (or by the checkpoint's config)."""
    from ..data.tasks import Task
    from ..train.own_head import GENERIC_LABEL, label_names, saved_classifier

    name = Path(ad.folder).name or "adapter"
    if lm:
        return Task(name=name, type="generation")
    rows = head_rows(ad, model)
    config = _config(model)
    if rows is None:
        if not saved_classifier(config):
            raise _no_head(ad, model, getattr(config, "num_labels", 2))
        rows = config.num_labels
    if rows == 1:
        print("note: the adapter's head has one output: printing it as a regression score", file=sys.stderr)
        return Task(name=name, type="regression")
    named = label_names(config) if saved_classifier(config) and config.num_labels == rows else []
    classes = head_classes(ad, model) if ad.kind == ADAPTERHUB else None
    if classes and len(classes) == rows:
        labels = classes
        print(f"note: no --task given; labels as the adapter's head names them ({', '.join(labels)})", file=sys.stderr)
    elif named and not all(GENERIC_LABEL.fullmatch(n) for n in named):
        labels = named
        print(
            f"note: no --task given; labels as {model}'s config names its classes ({', '.join(labels)})",
            file=sys.stderr,
        )
    else:
        labels = [str(i) for i in range(rows)]
        print(
            f"note: {ad} records no label names; printing class indices 0-{rows - 1} (name them with --task)",
            file=sys.stderr,
        )
    return Task(name=name, type="classification", labels=labels)


def run_predict(args: argparse.Namespace, ad: Adapter) -> int:
    from ..train.objectives import objective_for
    from . import predict_io

    set_threads(args.threads)
    if bool(args.texts) == bool(args.input):
        raise ValueError("give texts to predict, or --input FILE (not both)")
    predict_io.check_output(args.output)
    model = backbone(ad, args.model)
    if ad.kind == OPENDELTA:
        foreign_opendelta.check(ad.folder, ad.config, model, getattr(_config(model), "model_type", None))
    lm = _is_lm(model)
    if args.task is not None:
        task = _task(args)
        if not lm and task.type != "generation":
            check_head(ad, model, task, head_rows(ad, model))
            if task.type != "regression":
                check_classes(ad, model, task)
    else:
        task = _index_task(ad, model, lm)
    max_length, size = _settings(args, ad, model)
    given_pairs = None if args.task is None else task.type == "pair_classification" or task.is_pair
    if args.input:
        # a generation adapter reads each row's `source` (the hint named the WebNLG category column)
        read = predict_io.read_rows(args.input, args.columns, task.type == "generation")
        rows, texts = [row for row, _ in read], [m["text"] for _, m in read]
        pairs = given_pairs if given_pairs is not None else all(isinstance(m.get("text_pair"), str) for _, m in read)
        examples = predict_io.examples_from(read, pairs)
    else:
        texts, rows = args.texts, [{"text": t} for t in args.texts]
        pairs = given_pairs if given_pairs is not None else all(" ||| " in t for t in texts)
        examples = predict_io.texts_to_examples(texts, pairs)
    dm, tokenizer, lm = load(ad, model, task, args.quantize)
    objective = objective_for(task, tokenizer, lm=lm, max_length=max_length, max_new_tokens=48)
    return predict_io.emit(args, dm, task, objective, examples, rows, texts, size)
