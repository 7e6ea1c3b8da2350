"""Tiny randomly initialised models of every family deltatune maps, built in the tests themselves.

Each is small enough that a forward and backward take milliseconds, yet keeps the real module
tree (names, Conv1D, cross-attention, tied embeddings) that targeting and hooks must handle.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers as tf

VOCAB = 100
NUM_LABELS = 3
GOOD, BAD = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]  # the toy sentiment tasks' words
NOUNS = ["movie", "film", "plot", "cast", "story", "score"]
TOY_WORDS = GOOD + BAD + NOUNS + ["the", "was", "Answer:", "positive", "negative", "name", "food", "area", "eat", "it"]

# the settings of a Llama-like decoder with grouped-query attention (tests/modern.py builds its kin from them)
GQA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_CONFIGS = {
    "bert": lambda: tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    ),
    "roberta": lambda: tf.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=70,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
    "distilbert": lambda: tf.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, pad_token_id=0
    ),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
    ),
    "llama": lambda: tf.LlamaConfig(**GQA),
    "t5": lambda: tf.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    ),
    "bart": lambda: tf.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    ),
}

ARCHS = tuple(_CONFIGS)
CAUSAL = ("gpt2", "llama")
SEQ2SEQ = ("t5", "bart")
LM_ARCHS = CAUSAL + SEQ2SEQ
# (arch, head) pairs every method must work on: a classification head everywhere, an LM where one exists.
CASES = [(a, "cls") for a in ARCHS] + [(a, "lm") for a in LM_ARCHS]


def make_config(arch: str) -> tf.PretrainedConfig:
    config = _CONFIGS[arch]()
    config.num_labels = NUM_LABELS
    return config


def make_model(arch: str, head: str = "cls", seed: int = 0) -> torch.nn.Module:
    """A tiny model in eval mode (no dropout), so that outputs are comparable call to call."""
    config = make_config(arch)
    torch.manual_seed(seed)
    if head == "cls":
        model = tf.AutoModelForSequenceClassification.from_config(config)
    elif head == "lm" and arch in CAUSAL:
        model = tf.AutoModelForCausalLM.from_config(config)
    elif head == "lm" and arch in SEQ2SEQ:
        model = tf.AutoModelForSeq2SeqLM.from_config(config)
    else:
        raise ValueError(f"no {head} head for {arch}")
    return model.eval()


def make_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded inputs (the second row is shorter) with labels for the model's head."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    lengths = [seq - 2 * (i % 2) for i in range(batch)]
    eos = config.eos_token_id if config.model_type in SEQ2SEQ else None
    for i, n in enumerate(lengths):
        if eos is not None:
            ids[i, n - 1] = eos
        ids[i, n:] = config.pad_token_id
        mask[i, n:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        inputs["labels"] = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    elif name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        labels = ids.clone()
        labels[mask == 0] = -100
        inputs["labels"] = labels
    else:
        inputs["labels"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"} | _decoder_inputs(model, inputs)).logits


def _decoder_inputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Seq2seq LMs need decoder inputs when called without labels."""
    labels = inputs.get("labels")
    if model.config.is_encoder_decoder and labels is not None and labels.dim() == 2:
        return {"decoder_input_ids": labels}
    return {}


def perturbed(dm: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """`dm` in eval mode with every trainable tensor moved off its init (many deltas start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return dm.eval()


def loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).loss


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a state dict, for bitwise comparisons later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def anatomy(model: torch.nn.Module) -> dict[str, object]:
    """What a module tree is besides its weights: each module's class, attribute names and hooks of every
    kind (forward, pre, backward, state-dict, load), its buffers (persistent or not) and torch's global hooks.

    A delta that leaves any of these behind after detach changes the backbone for whoever holds it next.
    """
    from torch.nn.modules import module as torch_module

    modules = {}
    for name, module in model.named_modules():
        hooks = {k: [(i, id(h)) for i, h in v.items()] for k, v in vars(module).items() if "hooks" in k and v}
        modules[name] = (type(module), sorted(vars(module)), hooks)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    global_hooks = {
        k: len(v) for k, v in vars(torch_module).items() if k.startswith("_global") and hasattr(v, "__len__")
    }
    return {"modules": modules, "buffers": buffers, "global": global_hooks}


def same_anatomy(a: dict[str, object], b: dict[str, object]) -> list[str]:
    """The differences between two `anatomy` snapshots, in words (empty: the same)."""
    diffs = []
    for name in sorted(set(a["modules"]) | set(b["modules"])):
        before, after = a["modules"].get(name), b["modules"].get(name)
        if before is None or after is None:
            diffs.append(f"module {name!r} {'added' if before is None else 'removed'}")
            continue
        for label, x, y in zip(("class", "attributes", "hooks"), before, after, strict=True):
            if x != y:
                extra = sorted(set(y) - set(x)) if isinstance(x, list) else ""
                diffs.append(f"{name or '<root>'}: {label} differ {extra}")
    if a["buffers"].keys() != b["buffers"].keys() or not all(
        torch.equal(v, b["buffers"][k]) for k, v in a["buffers"].items()
    ):
        diffs.append("buffers differ")
    if a["global"] != b["global"]:
        diffs.append(f"torch's global hooks differ: {a['global']} -> {b['global']}")
    return diffs


def write_toy_task(folder: Path, n_train: int = 64, n_dev: int = 24, seed: int = 0) -> Path:
    """A two-class sentiment task ("the movie was great": positive) as jsonl train/dev + meta.json."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            word = rng.choice(GOOD if label else BAD)
            rows.append({"text": f"the {rng.choice(NOUNS)} was {word}", "label": label})
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    meta = {"name": folder.name, "type": "classification", "labels": ["negative", "positive"], "license": "test"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def tiny_bert(tokenizer, num_labels: int = 2, seed: int = 0) -> torch.nn.Module:  # noqa: ANN001
    """A 2-layer BERT classifier over `tokenizer`'s vocabulary, seeded: what the training, CLI and subspace
    tests train on toy tasks written with `make_tokenizer` words."""
    torch.manual_seed(seed)
    config = tf.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=num_labels, pad_token_id=0,
    )  # fmt: skip
    return tf.BertForSequenceClassification(config)


def make_tokenizer(words: list[str]):  # noqa: ANN201 - a transformers fast tokenizer
    """A word-level tokenizer over `words` (+ [PAD]=0, [UNK]=1, </s>=2, [CLS]=3): offline and exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, "[CLS]": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>", cls_token="[CLS]"
    )


def ids_tokenizer(size: int):  # noqa: ANN201 - a transformers fast tokenizer
    """Token `t<i>` is id i (0 pad, 1 unknown), no special tokens added: a text spells its input ids, so a CLI
    run on such texts sees the very inputs a fixture's outputs were taken on."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1} | {f"t{i}": i for i in range(2, size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
