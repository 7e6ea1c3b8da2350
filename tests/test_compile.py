"""torch.compile: a compiled DeltaModel computes what the eager one computes, with every method and after
every switch deltatune offers (a stale compiled graph gives a wrong answer without an error).

Deltas are perturbed away from the identity first, so that a graph missing one differs. Most cases use
dynamo's "eager" or "aot_eager" backends (the same guards, the backward traced by AOTAutograd), a few
inductor; `CompileCounter` counts the graphs each call compiled, i.e. whether a switch recompiled.
"""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch._dynamo
from tiny import anatomy, logits, make_inputs, make_model, same_anatomy
from torch._dynamo.testing import CompileCounterWithBackend

import deltatune as dt
from deltatune.core.delta import DeltaError

SMALL = {"prompt": {"num_tokens": 3}, "prefix": {"num_tokens": 3, "mid_dim": 8}}
# one method per way of acting: output hooks (route-aware, generic), input hooks, parametrizations, weight updates
CORE = ["lora", "adapter", "prefix", "prompt", "bitfit", "dora", "diff_pruning"]
# the other family representatives, then every other registered method (SAID alone traces 7.6k ops: 10 s)
MORE = ["ia3", "parallel_adapter", "vera", "loha", "lokr", "compacter", "layernorm", "oft", "said"]
slow = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("DELTATUNE_SLOW_TESTS"), reason="DELTATUNE_SLOW_TESTS=1"),
]


def _methods() -> list:
    rest = [m for m in dt.METHODS if m not in CORE]
    return CORE + [pytest.param(m, marks=slow) for m in sorted(rest, key=lambda m: (m not in MORE, m))]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def perturb(module: torch.nn.Module, seed: int = 3, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def build(arch: str = "bert", head: str = "cls", *specs: tuple[str, str, dict]) -> dt.DeltaModel:
    """A DeltaModel with the deltas (name, method, settings) attached and perturbed; no dropout anywhere."""
    model = make_model(arch, head)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("dropout_prob", "attention_dropout"):  # 4.57's BERT sdpa attention reads a float, not a module
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    dm = dt.DeltaModel(model)
    for i, (name, method, settings) in enumerate(specs):
        dm.add(name, dt.get_config(method, **{**SMALL.get(method, {}), **settings}))
        perturb(dm.deltas[name], seed=10 + i)
    return dm


def compiled(dm: torch.nn.Module, backend: str = "eager") -> tuple[torch.nn.Module, CompileCounterWithBackend]:
    counter = CompileCounterWithBackend(backend)
    return torch.compile(dm, backend=counter), counter


def same(dm: dt.DeltaModel, cm: torch.nn.Module, inputs: dict, atol: float = 1e-5, **kwargs) -> float:
    """Compiled logits == eager logits (eval mode, no grad); returns the largest difference."""
    x = {k: v for k, v in inputs.items() if k != "labels"} | kwargs
    with torch.no_grad():
        eager, comp = dm(**x).logits, cm(**x).logits
    torch.testing.assert_close(comp, eager, atol=atol, rtol=1e-4)
    return (comp - eager).abs().max().item()


def grads(dm: dt.DeltaModel, model, inputs: dict, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training step's logits and gradients (diff pruning samples its gates: seeded)."""
    dm.train()
    dm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs)
    out.loss.backward()
    dm.eval()
    return out.logits.detach(), {n: p.grad.clone() for n, p in dm.named_parameters() if p.grad is not None}


def same_step(dm: dt.DeltaModel, cm: torch.nn.Module, inputs: dict) -> None:
    """A compiled training step gives the eager step's logits and the same gradients to the same tensors."""
    (eager_out, eager), (comp_out, comp) = grads(dm, dm, inputs), grads(dm, cm, inputs)
    torch.testing.assert_close(comp_out, eager_out, atol=1e-5, rtol=1e-4)
    assert eager and eager.keys() == comp.keys()
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], atol=1e-5, rtol=1e-4, msg=k)


# -- 1. every method: forward and a training step ---------------------------------------------------
@pytest.mark.parametrize("method", _methods())
def test_every_method_compiles_to_the_eager_forward_and_gradients(method: str) -> None:
    """A training step (the forward's logits and every gradient) through dynamo's graph: each hook and
    parametrization traced, each delta tensor a graph input. Eval-mode graphs: the switch tests below."""
    dm = build("bert", "cls", ("d", method, {}))
    inputs = make_inputs(dm.backbone)
    cm, counter = compiled(dm)
    same_step(dm, cm, inputs)
    assert counter.frame_count >= 1


@pytest.mark.parametrize("method, backend", [("lora", "aot_eager"), ("prompt", "eager"), ("prefix", "eager")])
def test_a_causal_lm_compiles_to_the_eager_forward_and_gradients(method: str, backend: str) -> None:
    """aot_eager: the backward traced by AOTAutograd (as inductor's is). Eval-mode forwards of prompt and
    prefix: every decoding step of `test_generate_after_compiling`."""
    dm = build("llama", "lm", ("d", method, {}))
    inputs = make_inputs(dm.backbone)
    cm, _ = compiled(dm, backend)
    if method == "lora":
        same(dm, cm, inputs)
    same_step(dm, cm, inputs)


@pytest.mark.parametrize(
    "arch, head, method",
    [("bert", "cls", "lora"), pytest.param("llama", "lm", "prefix", marks=slow)],
)
def test_inductor_forward_and_train_step(arch: str, head: str, method: str) -> None:
    dm = build(arch, head, ("d", method, {}))
    inputs = make_inputs(dm.backbone)
    cm, _ = compiled(dm, "inductor")
    same(dm, cm, inputs)
    same_step(dm, cm, inputs)


# -- 2. switches after the first compiled call ------------------------------------------------------
def test_enable_disable_and_set_active_recompile() -> None:
    dm = build("bert", "cls", ("a", "lora", {}), ("b", "adapter", {}), ("c", "bitfit", {"targets": ("ffn.out",)}))
    inputs = make_inputs(dm.backbone)
    cm, counter = compiled(dm)
    same(dm, cm, inputs)
    new = []
    for switch in (
        lambda: dm.disable("a"),
        lambda: dm.enable("a"),  # a state traced before: its graph again
        lambda: dm.set_active(["c"]),
        lambda: dm.set_active(["a", "b", "c"]),
        lambda: dm.disable("c"),
    ):
        before = counter.frame_count
        switch()
        same(dm, cm, inputs)
        new.append(counter.frame_count - before)
    assert new == [1, 0, 1, 0, 1]


@pytest.mark.parametrize("method", ["lora", "bitfit", "ia3", pytest.param("oft", marks=slow)])
def test_merge_and_unmerge_after_compiling(method: str) -> None:
    dm = build("bert", "cls", ("m", method, {}))
    inputs = make_inputs(dm.backbone)
    cm, counter = compiled(dm)
    same(dm, cm, inputs)
    dm.merge("m")
    same(dm, cm, inputs)
    assert counter.frame_count == 2  # merged: the hooks stand still, a graph of its own
    dm.unmerge("m")
    same(dm, cm, inputs)


@pytest.mark.parametrize(
    "method", ["lora", "prompt", *(pytest.param(m, marks=slow) for m in ("ia3", "prefix", "bitfit"))]
)
def test_adding_and_removing_a_delta_after_compiling(method: str) -> None:
    """The regression: a delta whose hooks land on modules that had none was left out of the compiled graph
    (torch's default skips guards on empty hook dicts): 9.1e-3 (LoRA), 2.7e-4 (IA3), 2.2e-2 (prompt), 1.5e-3
    (prefix) off the eager logits, no recompile; `core.compiled` makes dynamo guard on them."""
    dm = build("bert", "cls", ("a", "adapter", {}))
    inputs = make_inputs(dm.backbone)
    cm, counter = compiled(dm)
    before = logits(dm, inputs)
    same(dm, cm, inputs)
    dm.add("x", dt.get_config(method, **SMALL.get(method, {})))
    perturb(dm.deltas["x"], seed=5)
    assert (logits(dm, inputs) - before).abs().max() > 1e-4  # the delta changes the outputs
    same(dm, cm, inputs)
    assert counter.frame_count == 2
    dm.detach("x")
    same(dm, cm, inputs)
    dt.attach(dm, dt.get_config(method, **SMALL.get(method, {})), "y")
    perturb(dm.deltas["y"], seed=6)
    same(dm, cm, inputs)


def test_a_delta_added_behind_a_graph_break_is_seen() -> None:
    """A user's hook that breaks the graph: the later layers run in a resumed frame with guards of its own
    (a token read at the top of the call did not reach it: 5.1e-3 off, no recompile)."""
    dm = build("bert", "cls", ("a", "adapter", {}))
    dm.backbone.bert.encoder.layer[0].register_forward_hook(lambda m, a, o: torch._dynamo.graph_break())
    inputs = make_inputs(dm.backbone)
    cm, counter = compiled(dm)
    same(dm, cm, inputs)
    dm.add("x", dt.LoRAConfig(layers=[1]))
    perturb(dm.deltas["x"], seed=5)
    same(dm, cm, inputs)


def test_torchs_default_guards_are_undone_by_the_next_install() -> None:
    """Graphs traced while the option is back at torch's default are dropped when a delta is installed."""
    dm = build("bert", "cls", ("a", "adapter", {}))
    inputs = make_inputs(dm.backbone)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        cm, _ = compiled(dm)
        same(dm, cm, inputs)
        dm.add("x", dt.IA3Config())
        perturb(dm.deltas["x"], seed=5)
        assert not torch._dynamo.config.skip_nnmodule_hook_guards
        same(dm, cm, inputs)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_backbone_compiled_in_place(when: str) -> None:
    """`model.compile()` before the first delta (frozen already, so no requires_grad guard changed) or after
    it, then another delta: 4.6e-3 and 4.0e-3 off before the fix."""
    model = make_model("bert")
    inputs = make_inputs(model)
    model.requires_grad_(False)
    if when == "before":
        model.compile(backend="eager")
        logits(model, inputs)
    dm = dt.attach(model, dt.AdapterConfig(), train_head=False)
    perturb(dm.deltas["default"])
    if when == "after":
        model.compile(backend="eager")
    logits(dm, inputs)
    dm.add("x", dt.LoRAConfig())
    perturb(dm.deltas["x"], seed=5)
    comp = logits(dm, inputs)
    model._compiled_call_impl = None  # eager again, for the reference
    torch.testing.assert_close(comp, logits(dm, inputs), atol=1e-5, rtol=1e-4)


def test_attaching_to_torch_compiles_wrapper_is_refused_naming_the_order() -> None:
    """Deltas inside the wrapper went stale on the next add (4.0e-3) and saved under `_orig_mod.` names."""
    wrapped = torch.compile(make_model("bert"), backend="eager")
    before = anatomy(wrapped)
    with pytest.raises(DeltaError, match=r"_orig_mod.*attach to the model itself, then compile"):
        dt.attach(wrapped, "lora")
    assert not same_anatomy(before, anatomy(wrapped))  # nothing left on it


def test_loading_other_tensors_and_changing_them_in_place() -> None:
    dm = build("bert", "cls", ("a", "lora", {}), ("b", "adapter", {}))
    inputs = make_inputs(dm.backbone)
    cm, counter = compiled(dm)
    same(dm, cm, inputs)
    with torch.no_grad():
        next(iter(dm.deltas["a"].parameters())).mul_(3.0)  # parameters are graph inputs
    same(dm, cm, inputs)
    dm.load_delta_state_dict("b", {k: v * 0.5 for k, v in dm.delta_state_dict("b").items()})
    same(dm, cm, inputs)
    dm.load_state_dict({k: v + 0.01 for k, v in dm.state_dict().items()})  # Trainer's checkpoint path
    same(dm, cm, inputs)
    assert counter.frame_count == 1
    with tempfile.TemporaryDirectory() as folder:
        dm.save_delta(folder, "b")
        dm.detach("b")
        same(dm, cm, inputs)
        dt.load_delta(dm, folder, "b2")
        same(dm, cm, inputs)


def test_structural_changes_of_a_delta_recompile() -> None:
    """Diff pruning's prune (l0 gates -> a fixed mask), prefix's MLP dropped, AdaLoRA's ranks masked."""
    dm = build(
        "bert", "cls", ("p", "diff_pruning", {"sparsity": 0.5}), ("x", "prefix", {}),
        ("r", "adalora", {"init_r": 4, "target_r": 1, "tinit": 0, "tfinal": 0, "delta_t": 1}),
    )  # fmt: skip
    inputs = make_inputs(dm.backbone)
    cm, _ = compiled(dm)
    same(dm, cm, inputs)
    dm.deltas["p"].prune()
    same(dm, cm, inputs)
    dm.deltas["x"].drop_reparameterization()
    same(dm, cm, inputs)
    grads(dm, dm, inputs)  # the importances AdaLoRA's allocation reads
    dm.deltas["r"].on_step(1, 3)
    same(dm, cm, inputs)


def test_train_and_eval_modes_switch_dropout() -> None:
    dm = build("bert", "cls", ("a", "lora", {"dropout": 0.5}))
    inputs = make_inputs(dm.backbone)
    cm, _ = compiled(dm)
    same(dm, cm, inputs)
    dm.train()
    with torch.no_grad():
        torch.manual_seed(0)
        eager = dm(**inputs).logits
        torch.manual_seed(0)
        comp = cm(**inputs).logits
        torch.manual_seed(1)
        other = cm(**inputs).logits
    torch.testing.assert_close(comp, eager)  # the same dropout masks: the eager backend draws as eager does
    assert (comp - other).abs().max() > 1e-4  # and dropout acts
    dm.eval()
    same(dm, cm, inputs)


ROUTED = [("a", "lora", {}), ("b", "adapter", {}), ("c", "bitfit", {})]
PROMPTS = [("a", "prompt", {}), ("b", "prompt", {}), ("c", "lora", {})]  # one prompt per row: rows stay one length


@pytest.mark.parametrize(
    "backend, specs",
    [
        pytest.param("eager", ROUTED, id="rows-eager"),
        pytest.param("inductor", ROUTED, marks=slow, id="rows-inductor"),
        pytest.param("eager", PROMPTS, marks=slow, id="prompts-eager"),
    ],
)
def test_mixed_batches_follow_their_delta_ids(backend: str, specs: list) -> None:
    """Rows routed to their own deltas (route-aware LoRA, generic rows for the adapter, BitFit's rows recomputed,
    prompts prepended per row) and new delta_ids between calls: each new list is guarded, one more graph."""
    dm = build("bert", "cls", *specs)
    for n in "bc":
        dm.disable(n)
    inputs = make_inputs(dm.backbone, batch=2)
    cm, counter = compiled(dm, backend)
    for ids in (["a", "b"], ["b", "a"], [["a", "c"], "b"]):
        same(dm, cm, inputs, delta_ids=ids)
    if specs is ROUTED:
        assert counter.frame_count == 3  # one graph per list (before: a graph break at every routed module)


@pytest.mark.parametrize(
    "specs", [pytest.param(ROUTED, marks=slow, id="rows"), pytest.param(PROMPTS, marks=slow, id="prompts")]
)
def test_a_training_step_on_a_mixed_batch(specs: list) -> None:
    dm = build("bert", "cls", *specs)
    inputs = make_inputs(dm.backbone, batch=2)
    cm, _ = compiled(dm)
    ids = ["b", ["a", "c"]]
    (eager_out, eager), (comp_out, comp) = (grads(dm, functools.partial(m, delta_ids=ids), inputs) for m in (dm, cm))
    torch.testing.assert_close(comp_out, eager_out, atol=1e-5, rtol=1e-4)
    assert eager.keys() == comp.keys() and all(torch.allclose(comp[k], eager[k], atol=1e-5) for k in eager)


@pytest.mark.parametrize("method", ["prefix", pytest.param("prompt", marks=slow), pytest.param("lora", marks=slow)])
def test_generate_after_compiling(method: str) -> None:
    """`cm.generate` is the DeltaModel's own (eager) generate; a backbone compiled in place compiles every
    decoding step, with the prompt or prefix in the KV cache."""
    dm = build("llama", "lm", ("d", method, {}))
    inputs = make_inputs(dm.backbone)
    x = {"input_ids": inputs["input_ids"].flip(1), "attention_mask": inputs["attention_mask"].flip(1)}  # left-padded
    kw = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    eager = dm.generate(**x, **kw)
    cm, _ = compiled(dm)
    assert torch.equal(cm.generate(**x, **kw).sequences, eager.sequences)  # runs the DeltaModel's generate
    dm.backbone.compile(backend="eager")  # every decoding step compiled (what transformers' compiled generate does)
    out = dm.generate(**x, **kw)
    assert torch.equal(out.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(eager.scores), atol=1e-5, rtol=1e-4)
    dm.disable("d")
    off = dm.generate(**x, **kw)
    dm.backbone._compiled_call_impl = None
    torch.testing.assert_close(torch.stack(off.scores), torch.stack(dm.generate(**x, **kw).scores))
