"""The models, inputs and training configurations every suite compares.

A configuration ("variant") is one way of training the same backbone: full fine-tuning, a
deltatune method, or PEFT's implementation of the same method on the same modules. PEFT targets
the exact module names deltatune resolves, so both sides train the same tensors. Frozen backbone
weights are shared between the copies of one suite (they never change), which keeps a dozen
SmolLM2 copies in memory; full fine-tuning gets a private copy.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import deltatune as dt
from deltatune.core.targeting import head_names, resolve
from deltatune.train.trainer import TrainConfig, _param_groups, adamw

DELTATUNE = ("lora", "ia3", "bitfit", "layernorm", "adapter", "prefix", "prompt")
DELTATUNE += ("dora", "loha", "lokr", "oft", "vera", "adalora", "random_subset")
PEFT = ("peft-lora", "peft-ia3", "peft-prefix", "peft-prompt", "peft-ln")
PEFT += ("peft-dora", "peft-loha", "peft-lokr", "peft-oft", "peft-vera", "peft-adalora")
# "floor": every weight frozen (the head trains where deltas train it), yet the backward pass runs
# through every layer: what any delta touching the first layer cannot avoid; no weight gradients
VARIANTS = ("full", "floor", *DELTATUNE, *PEFT)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A backbone and the batch shape it is measured at (full and --quick)."""

    name: str
    head: str  # "cls" or "causal-lm"
    batch: int
    seq: int
    quick_batch: int
    quick_seq: int

    def shape(self, quick: bool) -> tuple[int, int]:
        return (self.quick_batch, self.quick_seq) if quick else (self.batch, self.seq)


SPECS = {
    "minilm-l6": Spec("minilm-l6", "cls", 32, 128, 8, 64),
    "smollm2-135m": Spec("smollm2-135m", "causal-lm", 8, 256, 2, 64),
    # random tiny models: the smoke test, and anyone checking the harness without the real weights
    "tiny-bert": Spec("tiny-bert", "cls", 4, 16, 2, 16),
    "tiny-llama": Spec("tiny-llama", "causal-lm", 4, 16, 2, 16),
}


def load(name: str) -> nn.Module:
    """The backbone in train mode, with weights identical on every call."""
    if name not in SPECS:
        raise KeyError(f"unknown benchmark model {name!r}; known: {', '.join(SPECS)}")
    torch.manual_seed(0)
    if name.startswith("tiny-"):
        import transformers as tf

        if name == "tiny-bert":
            config = tf.BertConfig(
                vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
            )
            model = tf.BertForSequenceClassification(config)
        else:
            config = tf.LlamaConfig(
                vocab_size=128,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            )
            model = tf.LlamaForCausalLM(config)
    else:
        from deltatune.backbones import load_backbone

        model = load_backbone(name, SPECS[name].head, num_labels=2)
    return model.train()


def inputs(model: nn.Module, batch: int, seq: int, labels: bool = True, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random full-length token ids (timings do not depend on the text), with labels for the head."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab // 2), vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        is_cls = type(model).__name__.endswith("ForSequenceClassification")
        out["labels"] = torch.randint(0, 2, (batch,), generator=g) if is_cls else ids.clone()
    return out


def is_cls(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def share_frozen(model: nn.Module) -> nn.Module:
    """A copy whose backbone weights are the original's tensors (the task head is copied)."""
    heads = tuple(f"{h}." for h in head_names(model))
    memo: dict[int, Any] = {}
    for name, p in model.named_parameters():
        if not (heads and name.startswith(heads)):
            memo[id(p)] = p
    return copy.deepcopy(model, memo)


@dataclasses.dataclass
class Variant:
    """A model ready to train, with its optimizer and, for deltatune, its DeltaModel."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    delta_model: dt.DeltaModel | None = None

    def step(self, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
        """forward + backward + AdamW step, as a training loop does it."""
        model, opt = self.model, self.optimizer

        def run() -> None:
            loss = model(**batch).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        return run


def _deltatune_config(method: str, model: nn.Module) -> dt.DeltaConfig:
    kwargs: dict[str, Any] = {"targets": ("attn.q", "attn.v"), "r": 8, "alpha": 16.0} if method == "lora" else {}
    return dt.get_config(method, **kwargs)


def _peft_config(variant: str, model: nn.Module) -> Any:
    import peft

    task = "SEQ_CLS" if is_cls(model) else "CAUSAL_LM"
    if variant == "peft-lora":
        names = resolve(model, ("attn.q", "attn.v"))
        return peft.LoraConfig(task_type=task, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=names)
    same = {  # PEFT's settings for the defaults deltatune's methods use (see each method's file)
        "peft-dora": lambda: peft.LoraConfig(r=8, lora_alpha=16, use_dora=True),
        "peft-loha": lambda: peft.LoHaConfig(r=8, alpha=8),
        "peft-lokr": lambda: peft.LoKrConfig(r=8, alpha=8),
        "peft-oft": lambda: peft.OFTConfig(r=0, oft_block_size=32),
        "peft-vera": lambda: peft.VeraConfig(r=256),
        "peft-adalora": lambda: peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=8, total_step=1000),
    }
    if variant in same:
        config = same[variant]()
        config.task_type, config.target_modules = task, resolve(model, ("attn.q", "attn.v"))
        return config
    if variant == "peft-ia3":
        cfg = dt.IA3Config()
        names, ff = resolve(model, cfg.targets), resolve(model, cfg.feedforward)
        return peft.IA3Config(task_type=task, target_modules=names, feedforward_modules=ff)
    if variant == "peft-prefix":
        cfg = dt.PrefixConfig()
        return peft.PrefixTuningConfig(
            task_type=task, num_virtual_tokens=cfg.num_tokens, prefix_projection=True, encoder_hidden_size=cfg.mid_dim
        )
    if variant == "peft-prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=dt.PromptConfig().num_tokens)
    if variant == "peft-ln":
        return peft.LNTuningConfig(task_type=task, target_modules=resolve(model, ("ln",)))
    raise KeyError(f"unknown PEFT variant {variant!r}")


def build(variant: str, base: nn.Module, *, shared: bool = True, optimizer: bool = True) -> Variant:
    """One training configuration on a copy of `base` (frozen weights shared), or on `base` itself."""
    cls = is_cls(base)
    if variant == "full":
        model = copy.deepcopy(base) if shared else base
        for p in model.parameters():
            p.requires_grad_(True)
        opt = adamw(list(model.parameters()), lr=2e-5) if optimizer else None
        return Variant(variant, model, opt)
    model = share_frozen(base) if shared else base
    if variant == "floor":
        heads = tuple(f"{h}." for h in head_names(model)) if cls else ()
        params = [p for n, p in model.named_parameters() if heads and n.startswith(heads)]
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in params))
        model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_())
        return Variant(variant, model, adamw(params, lr=1e-3) if optimizer and params else None)
    if variant in DELTATUNE:
        dm = dt.attach(model, _deltatune_config(variant, model), name=variant, train_head=cls)
        opt = adamw(_param_groups(dm, dm, TrainConfig())) if optimizer else None
        return Variant(variant, dm, opt, dm)
    if variant in PEFT:
        import peft

        pm = peft.get_peft_model(model, _peft_config(variant, model))
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = adamw(params, lr=1e-3) if optimizer else None
        return Variant(variant, pm, opt)
    raise KeyError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
