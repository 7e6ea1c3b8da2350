"""The structure the code promises: methods register themselves, the core names no method."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.core import registry
from deltatune.core.delta import Delta, DeltaConfig, Hooks, setting
from deltatune.core.settings import config_from_dict, size_field

SRC = Path(__file__).resolve().parents[1] / "src" / "deltatune"
ROOT = SRC.parents[1]


def test_a_new_method_is_one_class_that_registers_itself() -> None:
    @dataclasses.dataclass
    class ScaleConfig(DeltaConfig):  # defined here, in no file of the library
        method: ClassVar[str] = "test_scale_out"
        family: ClassVar[str] = "addition"
        factor: float = setting(2.0, gt=0)
        width: int = setting(1, size=True)

        def build(self) -> Delta:
            return ScaleDelta(self)

    class ScaleDelta(Delta):
        def attach(self, model: torch.nn.Module, hooks: Hooks) -> None:
            hooks.on_output(model.get_submodule(self.targets(model, ("ffn.out",))[0]), lambda m, a, k, o: o * 2.0)

    try:
        assert dt.METHODS["test_scale_out"] is ScaleConfig
        assert size_field(ScaleConfig) == "width"  # what the study's budget matching reads
        assert config_from_dict({"method": "test_scale_out", "factor": 3.0}).factor == 3.0  # delta.json, specs, CLI
        with pytest.raises(ValueError, match="factor"):
            config_from_dict({"method": "test_scale_out", "factor": -1.0})
        model = make_model("bert")
        inputs = make_inputs(model)
        before = logits(model, inputs)
        dm = dt.attach(model, dt.get_config("test_scale_out"))
        assert not torch.allclose(logits(dm, inputs), before)
        dm.detach()
    finally:
        registry.METHODS.pop("test_scale_out", None)


def test_a_method_name_cannot_be_claimed_twice() -> None:
    with pytest.raises(ValueError, match="taken by"):

        @dataclasses.dataclass
        class Impostor(DeltaConfig):
            method: ClassVar[str] = "lora"

    assert dt.METHODS["lora"] is dt.LoRAConfig


def test_can_merge_is_a_property_of_the_settings() -> None:
    low = dt.METHODS["lowrank_adapter"]
    assert not low().can_merge  # its default non-linearity is gelu
    assert low(non_linearity="identity").can_merge
    assert dt.METHODS["lora"]().can_merge and not dt.METHODS["prompt"]().can_merge


def _literals(path: Path) -> list[tuple[int, str]]:
    """String constants in a file, except those assigned to PAPER_* / LETTERS (data about the paper)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and (t.id.startswith("PAPER_") or t.id == "LETTERS") for t in node.targets
        ):
            skip |= {id(n) for n in ast.walk(node)}
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip
    ]


def test_no_method_is_named_in_core_study_scripts_or_shared_test_helpers() -> None:
    files = [*(SRC / "core").glob("*.py"), *(SRC / "study").glob("*.py"), ROOT / "scripts" / "method_table.py"]
    files += [ROOT / "tests" / "tiny.py", *(ROOT / "tests").glob("conftest.py")]
    named = [
        f"{path.relative_to(ROOT)}:{line}: {value!r}"
        for path in files
        for line, value in _literals(path)
        if value in dt.METHODS
    ]
    assert not named, "special cases by method name (declare it on the config instead):\n" + "\n".join(named)


# -- the import graph ---------------------------------------------------------------------------------
# Lower layers never import higher ones; a package may import its own layer only if it is itself.
LAYERS = [
    {"deltatune.version", "deltatune.core"},
    {"deltatune.methods", "deltatune.backbones", "deltatune.quantization", "deltatune.data"},
    {"deltatune.interop", "deltatune.train"},
    {"deltatune.study", "deltatune.subspace"},
    {"deltatune.cli"},
    {"deltatune"},
]


def _module_names() -> dict[str, Path]:
    names = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import that can run, at module level or inside a function; `if TYPE_CHECKING:` blocks never run."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the deltatune modules it imports (`from . import x` imports the module x, not the package)."""
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
            if subs:
                edges |= subs
            if len(subs) < len(node.names) and target in modules:
                edges.add(target)
        graph[name] = edges - {name}
    return graph


def _layer(module: str) -> int:
    for depth in range(module.count("."), -1, -1):
        package = ".".join(module.split(".")[: depth + 1])
        for i, layer in enumerate(LAYERS):
            if package in layer:
                return i
    raise AssertionError(f"{module} is in no layer of LAYERS; add it")


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_runs_up_the_layers() -> None:
    upward = [
        f"{src} imports {dst}"
        for src, dsts in import_graph().items()
        for dst in dsts
        if _layer(dst) > _layer(src) and not dst.startswith(src + ".")  # a package's __init__ imports its own modules
    ]
    assert not upward, "imports running upward:\n" + "\n".join(sorted(upward))


def test_no_private_name_is_imported_across_packages() -> None:
    """`from ..core.io import _x` in study/ is a seam nobody promised to keep: make it public or keep it home."""
    modules = _module_names()
    found = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in _runtime_imports(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if not target.startswith("deltatune") or target.split(".")[:2] == name.split(".")[:2]:
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            private += [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            found += [f"{name} imports {target}.{p}" for p in private]
    assert not found, "\n".join(found)


def test_every_method_file_is_found_and_registers_a_method() -> None:
    """A new method is one file: methods/__init__ discovers the family folders' files, no import list."""
    import deltatune.methods as methods

    files = {
        f"deltatune.methods.{family}.{path.stem}"
        for family in methods.FAMILIES
        for path in (SRC / "methods" / family).glob("*.py")
        if not path.stem.startswith("_")
    }
    registered = {cls.__module__ for cls in dt.METHODS.values()}
    assert files == registered
    assert all(getattr(methods, cls.__name__) is cls for cls in dt.METHODS.values())
    listed = re.findall(
        r"^from \.(?:addition|specification|reparameterization)\.", (SRC / "methods" / "__init__.py").read_text(), re.M
    )
    assert not listed, "methods/__init__.py lists method files by name again"
