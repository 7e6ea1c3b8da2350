"""Write tests/fixtures/adapterhub/: tiny base models, AdapterHub adapter folders and AdapterHub's logits.

Needs AdapterHub's `adapters` library, which pins transformers 4.57.x, so it runs in a venv of its own:

    python3 -m venv /work/venv-ah
    /work/venv-ah/bin/pip install torch==2.13.0 transformers==4.57.6 adapters==1.3.0 safetensors accelerate pytest
    PYTHONPATH=src /work/venv-ah/bin/python scripts/make_adapterhub_fixtures.py [out_folder]

For each case: the base model (a tiny random BERT or RoBERTa, hidden 32, 2 layers, saved once per
architecture as safetensors) gets the adapter, whose weights are perturbed (up-projections start at
zero, (IA)^3 at one: unperturbed, any import would pass), then `save_adapter` writes the folder and
the model's logits in eval mode on fixed inputs go to expected.safetensors. tests/test_adapterhub.py
checks deltatune's import against them without `adapters` (and, where it is installed, reruns this
into a temporary folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HIDDEN, LAYERS, VOCAB, LABELS = 32, 2, 100, 3


def _configs() -> dict[str, tuple[str, object, bool, bool]]:
    """case -> (architecture, AdapterHub config, use_safetensors, perturb the classifier too)."""
    import adapters as ah

    return {
        "seq_bn": ("bert", "seq_bn", True, True),
        "seq_bn_bin": ("bert", "seq_bn", False, False),
        "seq_bn_mh_leave_out": ("bert", ah.SeqBnConfig(mh_adapter=True, leave_out=[0], reduction_factor=4,
                                                        non_linearity="gelu", scaling=0.5), True, True),
        "double_seq_bn": ("bert", "double_seq_bn", True, True),
        "double_seq_bn_bin": ("bert", ah.DoubleSeqBnConfig(scaling=2.0, non_linearity="tanh", leave_out=[1]), False,
                              False),
        "houlsby_ffn_only": ("bert", ah.DoubleSeqBnConfig(mh_adapter=False, non_linearity="relu"), True, True),
        "par_bn": ("bert", "par_bn", True, True),
        "lora": ("bert", "lora", True, True),
        "lora_all_bin": ("bert", ah.LoRAConfig(r=4, alpha=12, attn_matrices=["q", "k", "v"], intermediate_lora=True,
                                               output_lora=True, leave_out=[0]), False, True),
        "ia3": ("bert", "ia3", True, True),
        "ia3_bin": ("bert", ah.IA3Config(alpha=2), False, True),
        "roberta_seq_bn": ("roberta", "seq_bn", True, True),
        "roberta_lora": ("roberta", "lora", True, True),
        "roberta_double_seq_bn": ("roberta", "double_seq_bn", True, True),
    }  # fmt: skip


def base_model(arch: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if arch == "bert":
        config = tf.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=LABELS)  # fmt: skip
        return tf.BertForSequenceClassification(config).eval()
    config = tf.RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=70, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, num_labels=LABELS)  # fmt: skip
    return tf.RobertaForSequenceClassification(config).eval()


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def make_all(out: Path) -> dict[str, torch.Tensor]:
    """Write every case under `out`; returns the expected logits (also written to out/expected.safetensors)."""
    import adapters as ah
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    for arch in ("bert", "roberta"):
        base_model(arch).save_pretrained(out / f"base_{arch}", safe_serialization=True)
    expected = dict(inputs())
    for i, (case, (arch, config, safe, head)) in enumerate(_configs().items()):
        model = AutoModelForSequenceClassification.from_pretrained(out / f"base_{arch}").eval()
        ah.init(model)
        model.add_adapter(case, config=config)
        model.set_active_adapters(case)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f".{case}." in name or (head and name.startswith("classifier")):
                    p.add_(torch.randn(p.shape, generator=g) * (0.5 if name.startswith("classifier") else 1.0))
            expected[case] = model(**inputs()).logits.detach().clone()
        model.save_adapter(str(out / case), case, use_safetensors=safe)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))
    return expected


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "tests" / "fixtures" / "adapterhub"
    make_all(target)
    print(f"wrote {target}")
