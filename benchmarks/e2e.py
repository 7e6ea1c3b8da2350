"""`python -m benchmarks.e2e`: one task, method and set of hyperparameters through three training paths.

(a) `deltatune train` (deltatune's own loop), (b) a DeltaModel under `transformers.Trainer` with
default arguments, (c) PEFT under `transformers.Trainer`. Each starts from the same backbone and
head (same seed), trains the same number of optimizer steps at the same global batch, learning
rate for the delta and for the head, linear schedule and warmup, and is scored by the same
function on the same dev sample. Reported per path: seconds in the training loop (checkpoint writing
included), CPU seconds of the whole path (loading, training, checkpoints, the dev evaluation: on a
shared machine the wall clock measures the neighbours, CPU time much less so), dev scores, and
the size of what each wrote as its checkpoint. JSON on stdout (and --out). Classification tasks
with LoRA on the query/value projections; a smoke run, e.g.

    python -m benchmarks.e2e --model minilm-l6 --task sst2 --max-train 256 --max-steps 40 --max-eval 200
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import deltatune as dt  # noqa: E402
from deltatune.data import load_task  # noqa: E402
from deltatune.train.objectives import objective_for  # noqa: E402
from deltatune.train.run import RunSpec, load_for_task, run, training_examples  # noqa: E402
from deltatune.train.trainer import TrainConfig, adamw, eval_sample, evaluate  # noqa: E402


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rows(head: Any, examples: list) -> list[dict[str, torch.Tensor]]:
    """Tokenized rows as a datasets user has them (plus a column Trainer must drop)."""
    rows = []
    for i, ex in enumerate(examples):
        batch = head.collate([ex])
        rows.append({k: v[0] for k, v in batch.items()} | {"idx": i})
    return rows


def _trainer_args(out: Path, a: argparse.Namespace) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=a.batch_size,
        max_steps=a.max_steps,
        warmup_steps=int(a.warmup_ratio * a.max_steps),
        lr_scheduler_type="linear",
        save_steps=a.max_steps,
        seed=a.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )


def _trainer_run(model: Any, optimizer: Any, head: Any, train: list, out: Path, a: argparse.Namespace) -> float:
    from transformers import DataCollatorWithPadding, Trainer

    trainer = Trainer(
        model=model,
        args=_trainer_args(out, a),
        train_dataset=_rows(head, train),
        data_collator=DataCollatorWithPadding(head.tokenizer),
        optimizers=(optimizer, None),
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--task", default="sst2")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--max-train", type=int, default=256)
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads) if a.threads else None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    task = load_task(a.task)
    if task.type not in ("classification", "pair_classification"):
        raise SystemExit(f"benchmarks.e2e compares classification runs; {a.task} is a {task.type} task")
    train = training_examples(task, None, a.max_train, a.seed)
    cfg = TrainConfig(
        lr=a.lr, head_lr=a.head_lr, batch_size=a.batch_size, max_steps=a.max_steps, epochs=None,
        eval_every=a.max_steps, patience=None, warmup_ratio=a.warmup_ratio, max_length=a.max_length,
        max_eval=a.max_eval, seed=a.seed, progress=False,
    )  # fmt: skip
    lora = dict(targets=("attn.q", "attn.v"), r=a.r, alpha=a.alpha)
    from accelerate.utils import set_seed

    work = Path(tempfile.mkdtemp(prefix="e2e-"))
    report: dict[str, Any] = {
        "args": vars(a),
        "note": "the data order differs between deltatune's loop and Trainer's sampler, PEFT's LoRA init from ours",
        "paths": {},
    }
    try:
        # (a) deltatune train (its loop time includes the one dev evaluation at the last step)
        spec = RunSpec(a.model, task, {"lora": dt.LoRAConfig(**lora)}, train=cfg, max_train=a.max_train)
        spec.output_dir = work / "a"
        cpu = time.process_time()
        _, result, _ = run(spec)
        from deltatune.backbones import load_tokenizer

        head = objective_for(task, load_tokenizer(a.model), lm=False, max_length=a.max_length)
        dev = eval_sample(list(task["dev"]), a.max_eval)
        report["paths"]["deltatune-train"] = {
            "train_s": round(result.train_seconds, 2),
            "path_cpu_s": round(time.process_time() - cpu, 2),
            "dev_final": {k: v for k, v in result.history[-1].items() if k not in ("elapsed", "lr")},
            "checkpoint_bytes": _bytes(work / "a" / "delta-lora"),
        }

        # (b) a DeltaModel under Trainer
        cpu = time.process_time()
        backbone, _, _ = load_for_task(a.model, task, seed=a.seed)
        set_seed(a.seed)  # as fit does before attaching: the same initial A
        dm = dt.attach(backbone, dt.LoRAConfig(**lora))  # train_head="auto": a classifier trains, as in PEFT
        from deltatune.train.hf import optimizer

        wall = _trainer_run(dm, optimizer(dm, a.lr, a.head_lr), head, train, work / "b", a)
        ckpt = work / "b" / f"checkpoint-{a.max_steps}"
        dev_final = evaluate(dm, head, dev, task, 64)
        report["paths"]["deltatune-Trainer"] = {
            "train_s": round(wall, 2),
            "path_cpu_s": round(time.process_time() - cpu, 2),
            "dev_final": dev_final,
            "checkpoint_bytes": (ckpt / "model.safetensors").stat().st_size,
            "checkpoint_folder_bytes": _bytes(ckpt),
        }

        # (c) PEFT under Trainer
        import peft

        cpu = time.process_time()
        backbone, _, _ = load_for_task(a.model, task, seed=a.seed)
        set_seed(a.seed)
        targets = sorted({n.rsplit(".", 1)[-1] for n in dt.resolve(backbone, ("attn.q", "attn.v"))})
        pm = peft.get_peft_model(
            backbone, peft.LoraConfig(r=a.r, lora_alpha=a.alpha, target_modules=targets, task_type="SEQ_CLS")
        )
        delta = [p for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n]
        rest = [p for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n]
        opt = adamw([{"params": delta, "lr": a.lr}, {"params": rest, "lr": a.head_lr}])
        wall = _trainer_run(pm, opt, head, train, work / "c", a)
        ckpt = work / "c" / f"checkpoint-{a.max_steps}"
        dev_final = evaluate(pm, head, dev, task, 64)
        report["paths"]["peft-Trainer"] = {
            "train_s": round(wall, 2),
            "path_cpu_s": round(time.process_time() - cpu, 2),
            "dev_final": dev_final,
            "checkpoint_bytes": (ckpt / "adapter_model.safetensors").stat().st_size,
            "checkpoint_folder_bytes": _bytes(ckpt),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return report


if __name__ == "__main__":
    main()
