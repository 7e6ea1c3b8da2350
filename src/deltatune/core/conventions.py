"""How a `DeltaModel` meets what tools built around transformers models take for granted.

`transformers.Trainer` keeps the dataset columns, and finds the labels, by reading the forward
signature of the model's class; whatever `state_dict()` returns is what it checkpoints and what
`resume_from_checkpoint` loads back; users save with `save_pretrained` and load with
`from_pretrained`. PEFT meets these because Trainer special-cases `PeftModel`; a DeltaModel meets
them by itself, so a Trainer script runs unchanged:

- its class (one per backbone class, cached) advertises the backbone's forward signature plus
  `delta_ids`;
- its state is what training changes: the deltas and the backbone parameters that train (the
  task head when `train_head`). The frozen backbone weights come from where the backbone came
  from, so a checkpoint is delta-sized, and loading a state without them is complete;
- `save_pretrained`/`from_pretrained` write and read deltatune's own delta folders (`pretrained.py`);
- a tool that replaces its `forward` with one that computes the loss itself (TRL's fused LM head)
  is refused when a delta would then act wrongly without an error (`check_replaced_forward`).

Everything here knows the conventions, nothing knows a method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .delta import DeltaError
from .io import default_include_head
from .layers import numel
from .routing import row_names
from .settings import size_field

if TYPE_CHECKING:
    from .model import DeltaModel


# Backbone attributes that would persist or rewrite weights without the deltas, or inject another
# library's adapters beside them: reaching them through a DeltaModel names the call to use instead.
NOT_THROUGH_DELTAS = {
    "push_to_hub": "would upload the backbone without its deltas; dm.save_pretrained(folder), then upload the folder",
    "to_bettertransformer": "would swap the backbone's modules and lose the deltas; use the DeltaModel as it is",
    "reverse_bettertransformer": "is not needed: a DeltaModel never swaps modules",
    "load_adapter": "loads a PEFT adapter into the backbone beside the deltas; use deltatune.interop.import_peft",
    "add_adapter": "injects PEFT layers into the backbone; add a delta with dm.add(name, config)",
    "set_adapter": "switches PEFT adapters; use dm.set_active(names)",
    "enable_adapters": "switches PEFT adapters; use dm.enable(name)",
    "disable_adapters": "switches PEFT adapters; use dm.disable(name)",
    "get_adapter_state_dict": "reads PEFT adapters; use dm.delta_state_dict(name)",
    "unload": "is PEFT's; dm.detach() removes every delta and returns the backbone as it came",
}
# PeftModel's own calls, which a PEFT script keeps after its model line changed: the deltatune call instead of
# the backbone's "no attribute" (or transformers' PEFT integration answering for an adapter it never saw)
PEFT_CALLS = {
    "delete_adapter": "is PEFT's; dm.detach(name) removes one delta",
    "active_adapter": "is PEFT's; dm.tree() shows each delta, enabled or not",
    "active_adapters": "is PEFT's; dm.tree() shows each delta, enabled or not",
    "disable_adapter": "is PEFT's context manager; dm.disable(name), then dm.enable(name)",
    "merge_adapter": "is PEFT's; dm.merge(name), undone by dm.unmerge(name)",
    "unmerge_adapter": "is PEFT's; dm.unmerge(name)",
    "get_base_model": "is PEFT's; dm.backbone is the model the deltas were attached to",
    "peft_config": "is PEFT's; dm.delta(name).config is a delta's config",
    "get_nb_trainable_parameters": "is PEFT's; dm.trainable_parameters(), or dm.print_trainable_parameters()",
}


def trainable_line(trainable: int, model: nn.Module) -> str:
    """`trainable params: 74,498 || all params: 22,787,522 || trainable%: 0.3269`, as PEFT prints it (every tensor
    counted once, the deltas' included in all params)."""
    total = sum(numel(p) for p in {id(p): p for p in model.parameters()}.values())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}"


# Flags tools read off the model they train, answered by the DeltaModel, not its backbone: transformers' Trainer
# refuses a quantized model (bitsandbytes, QLoRA) as "purely quantized" unless this says adapters are loaded
OWN_FLAGS = {"_hf_peft_config_loaded": lambda dm: len(dm.deltas) > 0}


def refuse(name: str) -> None:
    """Raise the AttributeError that names the right call (hasattr() then answers False, as it should)."""
    if name in NOT_THROUGH_DELTAS:
        raise AttributeError(f"DeltaModel.{name}: the backbone's {name} {NOT_THROUGH_DELTAS[name]}")
    if name in PEFT_CALLS:
        raise AttributeError(f"DeltaModel.{name} {PEFT_CALLS[name]}")


# -- a forward replaced by a tool --------------------------------------------------------------------
def computes_loss_without_forward(forward: Any) -> bool:
    """Whether `forward` is TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, SFTTrainer from TRL 1.x).

    Called with `fused_lm_head=True` (what SFTTrainer's `compute_loss` does), it runs `model.base_model` and
    multiplies the hidden states by `get_output_embeddings().weight` itself, and SFTTrainer takes the loss
    from the per-token log-probabilities it returns: the forward it replaced, `DeltaModel.forward`, is not
    called for training. It is told by that keyword, the contract SFTTrainer calls it with, here or in a
    function it wraps (accelerate wraps the forward in autocast when training starts).
    """
    for _ in range(16):  # a chain of functools.wraps wrappers, bounded
        func = getattr(forward, "__func__", forward)
        code = getattr(func, "__code__", None)
        if code is not None and "fused_lm_head" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
            return True
        forward = getattr(func, "__wrapped__", None)
        if forward is None:
            return False
    return False


def check_setattr(dm: DeltaModel, name: str, value: Any) -> None:
    """A new `forward` (check_replaced_forward), or `peft_config`, which PEFT sets on a model it injected its layers
    into (`get_peft_model(dm, ...)`, as `SFTTrainer(model=dm, peft_config=...)` calls it): its adapter trained
    beside the deltas and was left out of their saves, without an error (tiny Llama with TRL 1.16)."""
    if name == "forward":
        check_replaced_forward(dm, value)
    elif name == "peft_config":
        raise DeltaError(
            "PEFT is injecting its layers into a DeltaModel (get_peft_model(dm, ...), or SFTTrainer(model=dm, "
            "peft_config=...)): they would train beside the deltas and be left out of their saves. Pass peft_config="
            "None (dt.attach(model, lora_config) reads a PEFT LoraConfig), and rebuild the model: PEFT's layers are in it"
        )


def check_replaced_forward(dm: DeltaModel, forward: Any = None) -> None:
    """Refuse a forward that computes the loss without `DeltaModel.forward` when a delta would then train wrongly.

    Under TRL's fused LM head two kinds of delta are silently lost: one that acts on the output embedding
    (LM head) module through hooks (the head's weight is read, the module never called: LoRA on `lm_head`
    never trains), and one whose loss term `DeltaModel.forward` adds (AdaLoRA's orthogonality, diff pruning's
    L0 penalty). Deltas inside the transformer, reparametrized weights and prompts are unaffected.
    `forward` is the one being installed; None checks the one installed now (a delta being added).
    """
    forward = dm.__dict__.get("forward") if forward is None else forward
    if forward is None or not computes_loss_without_forward(forward):
        return
    get_head = getattr(dm.backbone, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, delta in dm.deltas.items():
        hooked = delta.hooked_modules()
        if head is not None and any(m is head for m in hooked):
            why = "it acts when the LM head is called, and the fused head only reads the head's weight"
            fix = "target modules other than the LM head, or "
        elif any(m is dm.backbone for m in hooked):
            why, fix = "it acts when the whole model is called, and the fused head calls model.base_model", ""
        elif delta.has_loss_term():
            why, fix = "DeltaModel.forward adds its loss term, which the fused loss leaves out", ""
        else:
            continue
        raise DeltaError(
            f"TRL's fused LM head (SFTTrainer) computes the loss without calling DeltaModel.forward, so delta "
            f"{name!r} ({delta.config.method}) would train wrongly without an error: {why}; {fix}train with "
            "transformers.Trainer(model=dm, ...) on the same tokenized data"
        )


def check_added(dm: DeltaModel, name: str) -> None:
    """`check_replaced_forward` for a delta just added (after SFTTrainer patched the forward); it is detached
    again when refused, so the model stays as it was."""
    try:
        check_replaced_forward(dm)
    except DeltaError:
        dm.detach(name)
        raise


# -- state: what training changes -------------------------------------------------------------------
def _trained(dm: DeltaModel) -> set[str]:
    return {n for n, p in dm.backbone.named_parameters() if p.requires_grad}


def _saved(dm: DeltaModel) -> set[str]:
    """What `state_dict()` keeps of the backbone: what trains, and a task head new for the task even when
    frozen (`default_include_head`): Trainer checkpoints go through `state_dict()`, and a resume in a new
    process draws another random head, so a checkpoint without it silently gives other outputs."""
    keep = _trained(dm)
    if default_include_head(dm):
        keep |= set(dm.head_parameter_names())
    return keep


# the attribute under which FSDP1 (`FullyShardedDataParallel`) holds the module it wraps: a DeltaModel inside it keeps
# the frozen tensors in `state_dict()`, which FSDP1's full state dict asserts are there (an AssertionError before)
FSDP1_WRAPPED = "_fsdp_wrapped_module."


def register_state_hooks(dm: DeltaModel) -> None:
    """`state_dict()` drops frozen backbone tensors; `load_state_dict` does not miss them."""

    def drop_frozen(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if FSDP1_WRAPPED in prefix:  # FSDP1's own hook runs next and fails on any missing parameter of its unit
            return
        start = prefix + "backbone."
        keep = _saved(dm)
        for key in [k for k in state if k.startswith(start)]:
            if key[len(start) :] not in keep:
                del state[key]

    prefixes: list[str] = []

    def remember_prefix(module: nn.Module, state: Any, prefix: str, *args: Any) -> None:
        prefixes.append(prefix)
        _check_delta_shapes(dm, state, prefix)

    def forgive_frozen(module: nn.Module, incompatible: Any) -> None:
        prefix = prefixes.pop() if prefixes else ""
        start = prefix + "backbone."
        keep = _trained(dm)
        incompatible.missing_keys[:] = [
            k for k in incompatible.missing_keys if not k.startswith(start) or k[len(start) :] in keep
        ]
        _check_delta_names(dm, incompatible, prefix)

    dm.register_state_dict_post_hook(drop_frozen)
    dm.register_load_state_dict_pre_hook(remember_prefix)
    dm.register_load_state_dict_post_hook(forgive_frozen)


def _check_delta_names(dm: DeltaModel, incompatible: Any, prefix: str) -> None:
    """A state whose deltas have other names than the model's (Trainer's `resume_from_checkpoint` into a model whose
    delta was added as "lora", the checkpoint's being "default"): the load is not strict, so the delta started
    fresh beside the checkpoint's optimizer state, with only transformers' log of missing and unexpected keys."""
    start = prefix + "deltas."
    other = sorted({k[len(start) :].split(".", 1)[0] for k in incompatible.unexpected_keys if k.startswith(start)})
    other = [n for n in other if n not in dm.deltas]
    if not other:
        return
    missing = set(incompatible.missing_keys)
    own = [k for k in dm.state_dict() if k.startswith("deltas.")]
    gone = [
        n
        for n in dm.deltas
        if (ks := [k for k in own if k.startswith(f"deltas.{n}.")]) and missing >= {prefix + k for k in ks}
    ]
    if gone:
        raise DeltaError(
            f"the state holds delta {', '.join(map(repr, other))} and nothing of this model's delta "
            f"{', '.join(map(repr, gone))}: the names differ, so nothing would load into it; attach the delta under "
            f"the state's name (dm.add({other[0]!r}, ...), or dt.attach(model, ..., name={other[0]!r}))"
        )


def _check_delta_shapes(dm: DeltaModel, state: Any, prefix: str) -> None:
    """A state whose delta tensors have other shapes (a checkpoint of LoRA r=16 into r=8) failed in torch's
    multi-line "size mismatch for deltas.default.layers.bert__encoder__layer__0__...A"; this names the delta,
    its method and settings, and the call that builds a delta as it was saved."""
    own = {**dict(dm.named_parameters()), **dict(dm.named_buffers())}
    start = prefix + "deltas."
    for key, value in state.items() if isinstance(state, dict) else ():
        if not key.startswith(start) or not hasattr(value, "shape"):
            continue
        here = own.get(key[len(prefix) :])
        if here is not None and tuple(here.shape) != tuple(value.shape):
            name = key[len(start) :].split(".", 1)[0]
            config = dm.deltas[name].config if name in dm.deltas else None
            size = size_field(type(config)) if config is not None else None
            what = config.method if config is not None else "a delta"
            what += f", {size}={getattr(config, size)}" if size else ""
            raise DeltaError(
                f"the state's {key} has shape {tuple(value.shape)}, but delta {name!r} here ({what}) holds "
                f"{tuple(here.shape)}: the state was written by a delta with other settings; attach it with those, "
                "or load the delta's own folder (dt.load_delta(model, folder)), which builds it as it was saved"
            )


# -- generating with a fixed-size KV cache ---------------------------------------------------------------
_FIXED = ("Static", "Hybrid", "SlidingWindow")  # the cache classes transformers sizes in advance
_GROWING = (None, "dynamic", "dynamic_full", "offloaded")  # cache_implementation values that grow with the input


def generation_cache(dm: DeltaModel, delta_ids: Any, kwargs: dict[str, Any]) -> None:
    """Generate with a dynamic KV cache where a delta does not fit a fixed-size one, or refuse a request for one.

    A static cache (`cache_implementation="static"`, "hybrid", ...) is allocated for the prompt and the new
    tokens; prompt tuning's virtual tokens and prefix tuning's keys do not fit it (methods say so with
    `static_cache = False`): generate failed with "index_copy_(): index 7 is out of bounds for dimension 2 with
    size 7" (prompt) and "The size of tensor a (13) must match the size of tensor b (10)" (prefix) on tiny
    Llama. Asked for in the call, that is refused in one line; where it is only the checkpoint's default
    (Gemma 3's generation_config says "hybrid"), the call uses the dynamic cache, which gives the same tokens.
    """
    if delta_ids is None:
        names = {n for n, d in dm.deltas.items() if d.enabled}
    else:
        names = {n for row in row_names(delta_ids) for n in row if n in dm.deltas}
    for name in sorted(names):
        dm.deltas[name].check_generation(kwargs)  # prompt tuning: a cache that holds the prompt already
    odd = [n for n in sorted(names) if not getattr(type(dm.deltas[n].config), "static_cache", True)]
    if not odd:
        return
    given = kwargs.get("generation_config")
    asked = kwargs.get("cache_implementation") or getattr(given, "cache_implementation", None)
    cache = kwargs.get("past_key_values")
    if cache is not None and any(k in type(cache).__name__ for k in _FIXED):
        asked = type(cache).__name__
    if asked not in _GROWING and "Dynamic" not in str(asked):
        method = dm.deltas[odd[0]].config.method
        raise DeltaError(
            f"delta {odd[0]!r} ({method}) cannot generate with a fixed-size KV cache ({asked!r}): the cache is "
            f"sized for the prompt and the new tokens, and {method} tuning adds positions it has no room for; "
            "generate with cache_implementation='dynamic' (the default)"
        )
    default = getattr(getattr(dm.backbone, "generation_config", None), "cache_implementation", None)
    if asked is None and default not in _GROWING:
        kwargs["cache_implementation"] = "dynamic"


def check_head_trains(dm: DeltaModel) -> None:
    """`train_head=True` on a language model whose head is its input embeddings (GPT-2, Llama with
    tie_word_embeddings): the head's weight is listed under the embeddings, so no head parameter trains and the
    run trained the deltas alone, without a word. Said once, when asked for."""
    from .targeting import head_names

    heads = head_names(dm.backbone)
    if heads and not dm.head_parameter_names():
        import warnings

        warnings.warn(
            f"train_head=True, but this model's head ({', '.join(heads)}) shares its weight with the input embeddings "
            "(tie_word_embeddings), so no head parameter trains: load the model with tie_word_embeddings=False to "
            "train a head of its own, or attach a delta to it (targets='head')",
            stacklevel=4,
        )


def with_terms(dm: DeltaModel, out: Any) -> Any:
    """`out` with the acting deltas' loss terms added to its loss (computed inside the call, where the rows of a
    routed batch say which deltas acted)."""
    if getattr(out, "loss", None) is not None and (extra := dm.regularization()) is not None:
        out.loss = out.loss + extra
    elif "loss" in getattr(out, "__dataclass_fields__", ()) and out.loss is None:
        warn_terms_left_out(dm)
    return out


def warn_terms_left_out(dm: DeltaModel) -> None:
    """A training forward that returned no loss, where a delta acting in it has a loss term: the caller computes the
    loss (Trainer's `label_smoothing_factor` or `compute_loss_func` pops the labels, a loop of one's own), so the
    term `DeltaModel.forward` adds to `outputs.loss` was left out: diff pruning's L0 penalty (16720 with it, 1.10
    without) never pruned, without an error. Said once per model."""
    if not (dm.training and torch.is_grad_enabled()) or dm.__dict__.get("_terms_warned"):
        return
    named = [f"{n!r} ({d.config.method})" for n, d in dm.deltas.items() if d.acting and d.has_loss_term()]
    if named:
        import warnings

        dm.__dict__["_terms_warned"] = True
        warnings.warn(
            f"the model returned no loss (no labels were passed: the loss is computed outside it, as Trainer's "
            f"label_smoothing_factor or compute_loss_func does), so the loss term of delta {', '.join(named)} is not "
            "in it and that part of the method does not train: add dm.regularization() to the loss you compute",
            stacklevel=7,  # past forward, the signed class's forward and torch's call: the caller's line
        )
