"""A tree view of a backbone that marks where each delta sits and how many parameters it adds.

Repeated blocks (the 12 identical layers of an encoder) are folded into one line after the
first, so that the tree of a real model fits on a screen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .model import DeltaModel


def _own_params(module: nn.Module) -> int:
    """A module's own parameters, counting those a parametrization moved under `.parametrizations`."""
    own = sum(p.numel() for p in module.parameters(recurse=False))
    wrapped = getattr(module, "parametrizations", None)
    if wrapped is not None:
        own += sum(p.original.numel() for p in wrapped.values())
    return own


def _type_name(module: nn.Module) -> str:
    """`ParametrizedLinear` is torch's dynamic subclass; show the class the model was built with."""
    name = type(module).__name__
    return name.removeprefix("Parametrized") if hasattr(module, "parametrizations") else name


def _marks(dm: DeltaModel) -> dict[str, list[str]]:
    marks: dict[str, list[str]] = {}
    for name, delta in dm.deltas.items():
        state = "" if delta.enabled else ", off"
        state += ", merged" if delta.merged else ""
        for site, count in delta.sites.items():
            marks.setdefault(site, []).append(f"{delta.config.method}:{name} +{count:,}{state}")
    return marks


def _signature(module: nn.Module, prefix: str, marks: dict[str, list[str]]) -> tuple:
    """Structure of a subtree plus its delta marks with layer numbers removed, to fold repeats."""
    items = []
    for sub, child in module.named_modules():
        full = f"{prefix}.{sub}" if sub else prefix
        if ".parametrizations" in full:
            continue
        items.append((sub, _type_name(child), tuple(m.split(" +")[0] for m in marks.get(full, []))))
    return tuple(items)


def render(dm: DeltaModel, max_depth: int = 8, fold: bool = True) -> str:
    marks = _marks(dm)
    lines: list[str] = []

    def walk(module: nn.Module, name: str, prefix: str, depth: int) -> None:
        label = name.rsplit(".", 1)[-1] if name else _type_name(module)
        own = _own_params(module)
        text = f"{label} ({_type_name(module)}" + (f", {own:,} params)" if own else ")")
        if name in marks:
            text += "  <- " + "; ".join(marks[name])
        if depth >= max_depth:
            below = sum(d.sites[site] for d in dm.deltas.values() for site in d.sites if site.startswith(name + "."))
            lines.append(prefix + text + (f"  (+{below:,} delta parameters inside)" if below else ""))
            return
        lines.append(prefix + text)
        children = [(n, c) for n, c in module.named_children() if n != "parametrizations"]
        i = 0
        while i < len(children):
            child_name, child = children[i]
            full = f"{name}.{child_name}" if name else child_name
            walk(child, full, prefix + "  ", depth + 1)
            j = i + 1
            if fold and isinstance(module, nn.ModuleList):
                sig = _signature(child, full, marks)
                while j < len(children) and _signature(children[j][1], f"{name}.{children[j][0]}", marks) == sig:
                    j += 1
                if j > i + 1:
                    lines.append(f"{prefix}  {children[i + 1][0]}-{children[j - 1][0]}: same as {child_name}")
            i = j

    walk(dm.backbone, "", "", 0)
    total = sum(p.numel() for p in dm.backbone.parameters())
    summary = [f"backbone parameters: {total:,}"]
    for name, delta in dm.deltas.items():
        n = sum(p.numel() for p in delta.parameters())
        summary.append(f"delta {name!r} ({delta.config.method}): {n:,} parameters ({100 * n / max(total, 1):.3f}%)")
    summary.append(f"trainable now: {dm.trainable_parameters():,}")
    return "\n".join(lines + [""] + summary)
