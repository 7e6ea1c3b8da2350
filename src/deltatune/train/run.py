"""One training run from names: backbone + task + methods -> trained delta, metrics, files.

This is what `deltatune train`, `quickstart` and the study runner share, so that a run started from
the command line and one started by a sweep are the same run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..core import atomic
from ..core.delta import DeltaConfig
from ..core.model import DeltaModel
from ..data.fewshot import few_shot
from ..data.tasks import Task, load_task
from . import own_head
from .distributed import is_main_process
from .trainer import TrainConfig, TrainResult, fit

CAUSAL_TYPES = {"gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt", "phi", "gemma"}


@dataclasses.dataclass
class RunSpec:
    model: str
    task: str | Task
    methods: dict[str, DeltaConfig] = dataclasses.field(default_factory=dict)
    full_finetune: bool = False
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    k_shot: int | None = None
    max_train: int | None = None
    output_dir: str | Path | None = None
    resume: bool = False  # continue the run in output_dir from its last checkpoint
    dev_split: float | None = None  # hold out this fraction of train as dev (data without a dev split)
    test: bool = False  # score the kept state on the test split, when the task has one
    # start from the deltas another run saved (its output_dir): they train on, with its head when the labels match
    init_from: str | Path | None = None
    quantize: str | None = None  # "4bit"/"8bit": the backbone's linear layers by bitsandbytes (QLoRA)

    @property
    def label(self) -> str:
        return "full" if self.full_finetune else ("+".join(self.methods) or "head")


def is_causal_lm(model_name: str) -> bool:
    """Whether a backbone *name* loads as a causal LM (before loading it); for a loaded model, `heads.has_lm_head`."""
    from transformers import AutoConfig

    from ..backbones import model_path

    config = AutoConfig.from_pretrained(model_path(model_name))
    archs = getattr(config, "architectures", None) or []
    if own_head.saved_classifier(config):  # a decoder saved as a classifier trains through its own head
        return False
    return config.model_type in CAUSAL_TYPES or any(a.endswith("ForCausalLM") for a in archs)


def load_for_task(
    model_name: str,
    task: Task,
    seed: int | None = None,
    quantize: str | None = None,
    mixed_precision: str | None = None,
) -> tuple[nn.Module, Any, bool]:
    """The backbone with the head the task needs, its tokenizer, and whether it is a causal LM.

    A new task head is drawn from the global RNG while loading; `seed` fixes it, so two runs with
    one seed start from the same head and reach the same metrics. `quantize`: see `load_backbone`.
    """
    from ..backbones import load_backbone, load_tokenizer

    if seed is not None:
        from accelerate.utils import set_seed

        set_seed(seed)
    from ..quantization import check_quantize

    check_quantize(quantize)  # bitsandbytes missing: said before the tokenizer and config load
    tokenizer = load_tokenizer(model_name)
    lm = is_causal_lm(model_name)
    bits = {"quantize": quantize, "mixed_precision": mixed_precision}
    if lm:
        model = load_backbone(model_name, "causal-lm", **bits)
    elif task.type == "generation":
        raise ValueError(f"{task.name!r} is a generation task; use a causal LM backbone such as smollm2-135m")
    else:
        from transformers import AutoConfig

        from ..backbones import model_path

        head = "regression" if task.type == "regression" else "cls"
        extra, rows = own_head.plan(model_name, AutoConfig.from_pretrained(model_path(model_name)), task)
        model = load_backbone(model_name, head, num_labels=task.num_labels, **bits, **extra)
        own_head.align(model, rows, task)
    if tokenizer.pad_token is None:  # decoder-only tokenizers often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, lm


def training_examples(task: Task, k_shot: int | None, max_train: int | None, seed: int) -> list:
    """The training split, or its k-shot sample per class, or a random subset of `max_train` (seeded)."""
    train = task["train"]
    if k_shot is not None:
        return few_shot(train, k_shot, seed=seed)
    if max_train is not None:
        import random

        return random.Random(seed).sample(list(train), min(max_train, len(train)))
    return train


def _model_ref(name: str) -> str:
    """A local model folder as an absolute path (valid from any directory); a short name or hub id as given."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def start_from(model: nn.Module, run_dir: str | Path, task: Task) -> DeltaModel:
    """`model` carrying the deltas a run saved in `run_dir`, to train further on `task` (transfer).

    The saved task head comes along only when the source task had the same labels and type; otherwise
    the model keeps the head it was loaded with (drawn fresh for this task's labels).
    """
    from ..core.entry import load_delta
    from ..core.io import read_meta
    from .saved import is_head_only

    folders = [f for f in sorted(Path(run_dir).glob("delta-*")) if not is_head_only(read_meta(f))]
    if not folders:
        raise FileNotFoundError(f"no delta-*/ folder in {run_dir}: the source run saved no delta to start from")
    dm = DeltaModel(model)
    for folder in folders:
        source = read_meta(folder).get("metadata") or {}
        same = source.get("labels") == task.labels and source.get("task_type") == task.type
        load_delta(dm, folder, folder.name.removeprefix("delta-"), head=same)
    return dm


def run(spec: RunSpec) -> tuple[nn.Module, TrainResult, Task]:
    """The one training entry from names: the CLI, quickstart and the study (transfer runs included) call it."""
    if spec.full_finetune and spec.quantize is not None:
        raise ValueError(
            f"full fine-tuning trains every weight, which a {spec.quantize} quantized backbone cannot hold; drop the "
            "quantization, or train a delta on it (a method such as lora)"
        )
    task = spec.task if isinstance(spec.task, Task) else load_task(spec.task)
    if spec.dev_split is not None:
        from ..data.split import hold_out_dev

        task = hold_out_dev(task, spec.dev_split)
    train = training_examples(task, spec.k_shot, spec.max_train, spec.train.seed)
    model, tokenizer, _ = load_for_task(spec.model, task, spec.train.seed, spec.quantize, spec.train.mixed_precision)
    if spec.init_from is not None:  # the deltas come from the source run; spec.methods names them
        model = start_from(model, spec.init_from, task)
    model, result = fit(
        model,
        tokenizer,
        task,
        {} if spec.init_from is not None else spec.methods,
        spec.train,
        full_finetune=spec.full_finetune,
        output_dir=spec.output_dir,
        train_examples=train,
        resume=spec.resume,
        test_examples=task["test"] if spec.test and "test" in task.splits else None,
        metadata={"model": _model_ref(spec.model), "k_shot": spec.k_shot, "max_train": spec.max_train}
        | ({"init_from": str(spec.init_from)} if spec.init_from is not None else {})
        | ({"quantize": spec.quantize} if spec.quantize is not None else {}),
    )
    if spec.output_dir is not None and is_main_process():  # one writer under a multi-process launch
        info = {
            "model": spec.model,
            "task": task.name,
            "task_type": task.type,
            "labels": task.labels,
            "label": spec.label,
            "methods": {n: c.to_dict() for n, c in spec.methods.items()},
            "train": dataclasses.asdict(spec.train),
            "k_shot": spec.k_shot,
            "max_train": spec.max_train,
            "task_source": task.source,
            "dev_split": task.meta.get("dev_split"),
            "columns": task.meta.get("columns"),
            "test": result.test,
            "init_from": None if spec.init_from is None else str(spec.init_from),
            "quantize": spec.quantize,
        }
        atomic.write_file(Path(spec.output_dir) / "run.json", json.dumps(info, indent=2))
    return model, result, task
