"""Every method x every architecture (classification head everywhere, LM heads where they exist).

The properties here hold for any delta method whatever its math, so they are checked
generically: what is special to one method lives in that method's own test file.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
from tiny import CASES, anatomy, logits, loss, make_inputs, make_model, same_anatomy, same_state, state

import deltatune as dt

ALL = [(m, a, h) for m in dt.METHODS for a, h in CASES]
IDENTITY = [(m, a, h) for m, a, h in ALL if getattr(dt.METHODS[m], "identity_at_init", False)]


def _ids(case: tuple) -> str:
    return "-".join(case)


def _delta_params(dm: dt.DeltaModel) -> dict[str, torch.nn.Parameter]:
    return {f"{n}.{k}": p for n, d in dm.deltas.items() for k, p in d.named_parameters()}


def _step(dm: dt.DeltaModel, inputs: dict, lr: float = 1e-2) -> float:
    params = [p for p in dm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    opt.zero_grad()
    value = loss(dm, inputs)
    value.backward()
    opt.step()
    return value.item()


@pytest.mark.parametrize("method,arch,head", IDENTITY, ids=map(_ids, IDENTITY))
def test_output_equals_backbone_at_init(method: str, arch: str, head: str) -> None:
    model = make_model(arch, head)
    inputs = make_inputs(model)
    before = logits(model, inputs)
    dm = dt.attach(model, dt.METHODS[method]())
    torch.testing.assert_close(logits(dm, inputs), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,arch,head", ALL, ids=map(_ids, ALL))
def test_only_delta_parameters_get_gradients_and_change(method: str, arch: str, head: str) -> None:
    model = make_model(arch, head)
    inputs = make_inputs(model)
    base = state(model)
    dm = dt.attach(model, dt.METHODS[method](), train_head=False)
    delta = _delta_params(dm)
    assert delta, "the delta has no parameters"
    before = {k: p.detach().clone() for k, p in delta.items()}
    _step(dm, inputs)
    assert all(p.grad is None for p in model.parameters()), "a backbone parameter received a gradient"
    assert all(p.grad is not None for p in delta.values()), "a delta parameter received no gradient"
    assert any(not torch.equal(before[k], p) for k, p in delta.items()), "no delta parameter changed"
    assert dm.trainable_parameters() == sum(p.numel() for p in delta.values())
    dm.detach()
    assert same_state(base, state(model)), "the backbone changed although it was frozen"


@pytest.mark.parametrize("method,arch,head", ALL, ids=map(_ids, ALL))
def test_detach_restores_backbone_bitwise(method: str, arch: str, head: str) -> None:
    model = make_model(arch, head)
    inputs = make_inputs(model)
    base, out, shape = state(model), logits(model, inputs), anatomy(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    dm = dt.attach(model, dt.METHODS[method](), train_head=False)
    for _ in range(2):
        _step(dm, inputs)
    assert dm.detach() is model
    assert same_state(base, state(model))
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    left = same_anatomy(shape, anatomy(model))  # classes, attributes, hooks of every kind, buffers
    assert not left, left
    assert torch.equal(logits(model, inputs), out)


@pytest.mark.parametrize("method,arch,head", ALL, ids=map(_ids, ALL))
def test_deep_copy_is_a_model_of_its_own(method: str, arch: str, head: str) -> None:
    """A `best = copy.deepcopy(dm)` snapshot keeps its outputs while the original trains on, and detaching
    either leaves the other whole (a plain deep copy kept the original's hook closures: it read the
    original's delta weights, and its detach reached the original). So does a copy of the `model` the
    delta was attached to (users keep that name): it shared the deltas' hooks (LoRA, tiny BERT: 0.025)."""
    model = make_model(arch, head)
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS[method](), train_head=False)
    _step(dm, inputs)
    out = logits(dm, inputs)
    twin, snapshot = copy.deepcopy(dm), copy.deepcopy(model)
    assert torch.equal(logits(twin, inputs), out) and torch.equal(logits(snapshot, inputs), out)
    for _ in range(2):
        _step(dm, inputs)
    trained = logits(dm, inputs)
    assert not torch.equal(trained, out), "training the original changed nothing; the test would prove nothing"
    assert torch.equal(logits(twin, inputs), out), "the copy follows the original's training"
    assert torch.equal(logits(snapshot, inputs), out), "the backbone's copy follows the original's training"
    shape = anatomy(dm.backbone)
    twin.detach()
    assert not same_anatomy(shape, anatomy(dm.backbone)), "the copy's detach reached the original"
    assert torch.equal(logits(dm, inputs), trained)
    copy.deepcopy(dm).detach()
    original = weakref.ref(dm)
    del dm
    gc.collect()
    assert original() is None, "a copy keeps the original alive"


def test_pickling_a_delta_model_names_the_formats_to_use(tmp_path) -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"]())
    with pytest.raises(TypeError, match=r"save_pretrained\(folder\).*state_dict\(\)"):
        pickle.dumps(dm)
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(dm, tmp_path / "unused.pt")


@pytest.mark.parametrize("method,arch,head", ALL, ids=map(_ids, ALL))
def test_few_steps_reduce_loss_on_a_fixed_batch(method: str, arch: str, head: str) -> None:
    model = make_model(arch, head)
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS[method]())
    first = loss(dm, inputs).item()
    for _ in range(8):
        _step(dm, inputs)
    assert loss(dm, inputs).item() < first


@pytest.mark.parametrize("method", list(dt.METHODS))
def test_delta_state_dict_holds_exactly_the_delta(method: str) -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS[method]())
    sd = dm.delta_state_dict("default")
    assert sum(v.numel() for v in sd.values()) == dm.delta_parameters("default") > 0
    assert not any(k in dict(dm.backbone.named_parameters()) for k in sd)
