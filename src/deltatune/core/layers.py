"""Facts about backbone layers that methods need but should not each rediscover."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

try:  # GPT-2 style layers store the weight transposed: (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a core dependency
    Conv1D = ()  # type: ignore[assignment,misc]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear` or a transformers `Conv1D`."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or transformers Conv1D)")


def is_transposed(module: nn.Module) -> bool:
    """True where the weight is stored (in, out), so a (out, in) update must be transposed."""
    return bool(Conv1D) and isinstance(module, Conv1D)


def stored_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor that holds a layer's weight (or bias), which a merge must change.

    Under a parametrization (random-subset, diff pruning, SAID or selective tuning reparametrize the weight
    as W + d, BitFit the bias) `module.weight` is computed on each read, so a merge written into it changed a temporary and
    was lost without a word (LoRA merged beside random-subset tuning: logits 2e-3 off the unmerged ones).
    The parametrization's original is W itself; merging into it keeps W + dW + d."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def is_quantized(tensor: torch.Tensor) -> bool:
    """A quantized weight held as a tensor subclass (torchao's `quantize_`: Int8Tensor, ...; bitsandbytes'
    Params4bit and Int8Params), which computes its matmul but supports no in-place arithmetic: a merge cannot
    write into it."""
    return type(tensor) not in (torch.Tensor, nn.Parameter) and callable(getattr(tensor, "dequantize", None))


def refuse_quantized(name: str, tensor: torch.Tensor) -> None:
    """One line for a method that would change a quantized weight entry by entry (W + D: diff pruning, random
    subset, selective, SAID): it holds no such values. Before, bitsandbytes weights failed inside torch ("Only
    Tensors of floating point ... can require gradients") or were left out without a word (random subset and
    SAID counted only floating tensors)."""
    if is_quantized(tensor):
        raise ValueError(
            f"{name} is quantized ({type(tensor).__name__}), and this method would train it entry by entry (W + D), "
            "which a quantized weight cannot hold; choose tensors left unquantized (param_names=('bias',), or the "
            "norms: 'layernorm'), a method on the layer's output (lora, dora, ia3, adapter), or attach before quantizing"
        )


def refuse_quantized_head(dm: Any, train_head: bool | None) -> None:
    """A task head loaded quantized cannot train: refused before a delta is built (`train_head` None: the
    DeltaModel's own setting). transformers 5's skip rule names "the last module" by its last parameter
    (`classifier.bias`), so a new classifier loaded in 4 bits; torch said only "only Tensors of floating point
    dtype can require gradients", after the delta was attached."""
    if not (dm.train_head if train_head is None else train_head):
        return
    head = set(dm.head_parameter_names())
    held = [n for n, p in dm.backbone.named_parameters() if n in head and not p.is_floating_point()]
    if held:
        module = held[0].rpartition(".")[0]
        raise ValueError(
            f"the task head {module!r} was loaded quantized ({type(dm.backbone.get_submodule(module)).__name__}) "
            f"and cannot train: load the model with BitsAndBytesConfig(..., llm_int8_skip_modules="
            f"[{module.split('.')[0]!r}]) to keep it unquantized (deltatune train --quantize does), or pass "
            "train_head=False"
        )


def bnb_bits(tensor: torch.Tensor) -> int | None:
    """4 or 8 for a bitsandbytes weight (QLoRA's `load_in_4bit`, `load_in_8bit`), else None. Its dtype is
    uint8/int8 and a 4-bit one's shape is its packed storage's ((n, 1), repacked on CPU at the first forward)."""
    return {"Params4bit": 4, "Int8Params": 8}.get(type(tensor).__name__)


def logical_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape a weight has as numbers: a 4-bit weight's packed storage reports another, and changes it."""
    state = getattr(tensor, "quant_state", None) if bnb_bits(tensor) == 4 else None
    return torch.Size(state.shape) if getattr(state, "shape", None) is not None else tensor.shape


def numel(tensor: torch.Tensor) -> int:
    """How many numbers a weight holds: a 4-bit weight packs two in a byte, and counted half of them in
    "all params" (17.3M of MiniLM's 22.7M, the trainable share a third too high)."""
    return logical_shape(tensor).numel()


def trainable_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a delta's parameters keep beside weights of `dtype`: float32 beside bfloat16 and float16, as PEFT's
    `autocast_adapter_dtype` keeps adapters. In bf16, AdamW's small steps round away: on a bf16 Llama only 17% of
    LoRA's entries ever moved in 20 steps at lr 1e-4 (2% at 1e-5), without an error. Every method computes with
    its float32 parameters on half-precision activations and returns the layer's dtype."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def delta_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of a delta on `module` (`trainable_dtype` of): its weight's, or, where the weight is
    stored as integers (bitsandbytes' 4-bit and 8-bit layers), the dtype the layer computes in (`compute_dtype`),
    else its first floating parameter's (the bias), else torch's default. A delta in uint8 failed: "Only Tensors
    of floating point and complex dtype can require gradients"."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return trainable_dtype(weight.dtype)
    compute = getattr(module, "compute_dtype", None)
    if isinstance(compute, torch.dtype) and compute.is_floating_point:
        return trainable_dtype(compute)
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return trainable_dtype(p.dtype if p is not None else torch.get_default_dtype())


def unpacked(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """A 4-bit weight's storage and state in bitsandbytes' own layout, from the one its CPU kernel repacks it to
    (as they are where it was not repacked). bitsandbytes' inverse leaves the scales of a weight without double
    quantization transposed (N, K/64 as K/64, N), in bf16: set right here."""
    if not getattr(state, "packing_format_for_cpu", False):
        return data, state
    import bitsandbytes.functional as bnbf

    inverse = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise ValueError(
            "this bitsandbytes repacked a 4-bit weight for its CPU kernel and offers no way back to its "
            "values; read them before the first forward in eval mode, or use bitsandbytes 0.50"
        )
    nested = state.original_nested
    data, state = inverse(data, state)
    if not nested:
        state.absmax = state.absmax.T.reshape(-1).float()
    return data, state


def keep_4bit_unpacked(backbone: nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel (AVX512-BF16 CPUs), which it
    does at a layer's first forward in eval mode without gradients, and then uses for every later call, in
    training too: that kernel has no backward, so after one evaluation a bias-free model (Llama) trained on
    with no gradient at all and no error (0 of 8 LoRA tensors got one), a model with biases failed in
    bitsandbytes ("a view of a leaf Variable..."), and saving (`state_dict`, which unpacks) left the scales of a
    weight without double quantization transposed: the model's outputs moved 3.5%. A weight repacked already is
    unpacked. Evaluation then takes bitsandbytes' general kernel, as training does."""
    for module in backbone.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or bnb_bits(weight) != 4:
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
        weight.data, weight.quant_state = unpacked(weight.data, weight.quant_state)


def bnb_dequantized(tensor: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """A bitsandbytes weight's values as floats, (out, in). On CPU, a 4-bit layer's first forward in eval mode
    repacks its storage for its own kernel, which bitsandbytes' `dequantize_4bit` does not read (values 26%
    off, no error): that layout is unpacked first, on copies. An 8-bit weight's scales move from the weight to
    `module.state` at its first forward."""
    import bitsandbytes.functional as bnbf  # only reached with a bitsandbytes weight, so it is installed

    if bnb_bits(tensor) == 4:
        data, state = unpacked(tensor.data.clone(), copy.deepcopy(tensor.quant_state))
        return bnbf.dequantize_4bit(data, state)
    scale = getattr(tensor, "SCB", None)
    if scale is None and module is not None:
        scale = getattr(getattr(module, "state", None), "SCB", None)
    return bnbf.int8_vectorwise_dequant(tensor.data, scale)


def loaded(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """`module.<name>` as plain numbers: a quantized weight dequantized, and where accelerate offloads it (on the
    meta device outside the module's own call, as in a delta's output hook) the stored tensor on the module's
    execution device. DoRA's norm reads it."""
    tensor = getattr(module, name)
    if bnb_bits(tensor):
        return bnb_dequantized(tensor, module).to(delta_dtype(module))
    if is_quantized(tensor):
        return tensor.dequantize()
    if tensor.device.type != "meta":
        return tensor
    hooks = getattr(module, "_hf_hook", None)
    for hook in getattr(hooks, "hooks", None) or [hooks]:  # accelerate's SequentialHook holds several
        weights = getattr(hook, "weights_map", None)
        try:
            return weights[name].to(hook.execution_device)  # a disk offload reads the file on each lookup
        except (KeyError, TypeError):
            continue
    return tensor


def weight_update(module: nn.Module, delta_out_in: torch.Tensor) -> torch.Tensor:
    """Lay out an (out, in) weight change the way `module.weight` stores it."""
    return delta_out_in.T if is_transposed(module) else delta_out_in


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a layer was called with, positional or by keyword."""
    if args:
        return args[0]
    for key in ("input", "hidden_states", "x"):
        if key in kwargs:
            return kwargs[key]
    raise TypeError("cannot find the input tensor of this call")


def map_hidden(output: Any, fn: Any) -> Any:
    """Apply `fn` to the hidden states of a module output that may be a tensor or a tuple."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"cannot find hidden states in a module output of type {type(output).__name__}")


def hidden_size_of(module: nn.Module) -> int:
    """Width of a module's output, for methods that add modules after it."""
    if is_linear(module):
        return linear_dims(module)[1]
    for attr in ("normalized_shape", "weight"):
        value = getattr(module, attr, None)
        if isinstance(value, tuple):
            return int(value[-1])
        if isinstance(value, torch.Tensor):
            return int(value.shape[-1] if value.dim() == 1 else value.shape[0])
    raise TypeError(f"cannot tell the output width of {type(module).__name__}; target a linear layer")


def param_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(module.parameters(), None)
    if p is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return delta_dtype(module), p.device


def check_in_memory(model: nn.Module) -> None:
    """Refuse a backbone whose weights are not in memory, before a delta reads them.

    Deltas are built from their targets' weights (device, dtype, and values for DoRA's magnitude or an SVD
    init) and merges write into them. accelerate's offloading (a `device_map` with "disk" or "cpu" entries)
    keeps those modules' weights on the meta device and loads them only inside each forward; a model built
    under `init_empty_weights` has none at all. Attaching there failed with torch's "Cannot copy out of meta
    tensor", and a merge or export would have had no weights to change."""
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if not empty:
        return
    owner = model.get_submodule(empty[0].rpartition(".")[0])
    if getattr(getattr(owner, "_hf_hook", None), "offload", False):
        raise ValueError(
            f"{len(empty)} of the model's weights are offloaded by accelerate (e.g. {empty[0]}: a device_map with "
            "'disk' or 'cpu' entries, or cpu_offload), so they are not in memory for a delta to be built on or "
            "merged into; load the model on devices that hold it all (device_map=None or one device, or more "
            "max_memory), or attach first and offload after (accelerate.dispatch_model(dm.backbone, device_map), "
            "cpu_offload): the delta then computes exactly, unmerged"
        )
    raise ValueError(
        f"the model's weights are not loaded ({empty[0]} and {len(empty) - 1} more are on the meta device, e.g. "
        "built under init_empty_weights); load them first (from_pretrained, or load_state_dict(state, assign=True))"
    )


PROJECTIONS = "target projections such as 'attn.q', 'attn.v', 'ffn.in' or their module names"


def linear_target(model: nn.Module, name: str, what: str, hint: str) -> nn.Module:
    """The linear layer `name` of `model`, or a one-line refusal naming what it is instead and `hint`.

    A quantized layer (torch's `quantize_dynamic`) is named with its module path: torch's
    dynamically quantized layer is also called `Linear`, and "a Linear, not a linear layer" said nothing."""
    module = model.get_submodule(name)
    if is_linear(module):
        return module
    cls = type(module)
    kind = (
        cls.__name__
        if cls.__module__.startswith(("torch.nn.", "transformers."))
        else f"{cls.__name__} ({cls.__module__})"
    )
    if "quantiz" in cls.__module__:  # torch's quantize_dynamic (bitsandbytes' layers are nn.Linear: they take deltas)
        hint = "a quantized layer carries no delta: attach to the model before quantizing it (quantize after merge_and_unload())"
    raise ValueError(f"{what} {name!r} is a {kind}, not a linear layer; {hint}")
