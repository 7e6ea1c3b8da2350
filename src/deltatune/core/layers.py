"""Facts about backbone layers that methods need but should not each rediscover."""

from __future__ import annotations

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
    """A quantized weight held as a tensor subclass (torchao's `quantize_`: Int8Tensor, ...), which computes
    its matmul but supports no in-place arithmetic: a merge cannot write into it."""
    return type(tensor) not in (torch.Tensor, nn.Parameter) and callable(getattr(tensor, "dequantize", None))


def loaded(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """`module.<name>` as plain numbers: a quantized weight dequantized, and where accelerate offloads it (on the
    meta device outside the module's own call, as in a delta's output hook) the stored tensor on the module's
    execution device. DoRA's norm reads it."""
    tensor = getattr(module, name)
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
    return (p.dtype if p.is_floating_point() else torch.get_default_dtype()), p.device


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

    A quantized layer (torch's `quantize_dynamic`, bitsandbytes, ...) is named with its module path: torch's
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
    if "quantiz" in cls.__module__ or "bitsandbytes" in cls.__module__:
        hint = "a quantized layer carries no delta: attach to the model before quantizing it (quantize after merge_and_unload())"
    raise ValueError(f"{what} {name!r} is a {kind}, not a linear layer; {hint}")
