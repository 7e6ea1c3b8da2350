"""One `fit` of LoRA on a tiny dropout-free BERT, run by tests/test_multiprocess.py in 1 and in 2 processes.

Usage: python multiprocess_fit.py TASK_DIR OUT_DIR [stop-after=N] [resume] (under torchrun or accelerate
launch for several). stop-after=N: the main process dies right after writing its N-th checkpoint (the
launcher then stops the others), as a killed run would; resume: continue the run saved in OUT_DIR.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.data import load_task  # noqa: E402
from deltatune.train import TrainConfig, checkpoint, fit  # noqa: E402

WORDS = "good great fine nice bad awful poor sad movie film plot cast story score the was".split()


SAVES: list[int] = []  # checkpoints this process wrote (the main process writes them)


def _count_saves(die_after: int | None) -> None:
    save = checkpoint.save

    def counted(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        save(*args, **kwargs)
        SAVES.append(1)
        if len(SAVES) == die_after:
            raise SystemExit(f"stopped after checkpoint {die_after}")

    checkpoint.save = counted


def _report_process_group_at_shutdown() -> None:
    """Registered before `fit` so it runs after deltatune's exit hooks: is the process group still up when
    Python starts tearing down modules (where it was destroyed before, racing its gloo threads)?"""
    import torch.distributed as dist

    print(f"process group at shutdown: {'up' if dist.is_initialized() else 'down'}", flush=True)


def main(task_dir: str, out: str, *flags: str) -> None:
    atexit.register(_report_process_group_at_shutdown)
    stop = [int(f.split("=", 1)[1]) for f in flags if f.startswith("stop-after=")]
    _count_saves(stop[0] if stop else None)
    tokenizer = make_tokenizer(WORDS)
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=2, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = tf.BertForSequenceClassification(config)
    cfg = TrainConfig(lr=1e-2, batch_size=8, epochs=2.0, max_steps=None, eval_every=4, patience=None, progress=False)
    fit(model, tokenizer, load_task(task_dir), [dt.METHODS["lora"]()], cfg, output_dir=out, resume="resume" in flags)
    print(f"done {out} checkpoints={len(SAVES)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
