"""Careless use of the Python API: each misuse either works correctly or is refused in one line, state unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.core.delta import DeltaError


def _perturbed(dm: dt.DeltaModel) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for delta in dm.deltas.values():
            for p in delta.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("first", ["oft", "ia3", "lora"])
def test_unmerging_out_of_order_is_refused_and_the_reverse_order_restores_the_weights(first: str) -> None:
    model = make_model("bert")
    before = copy.deepcopy(model.state_dict())
    settings = {"feedforward": ()} if first == "ia3" else {}
    second = "dora" if first == "lora" else "lora"
    dm = dt.attach(model, dt.get_config(first, targets=("attn.v",), **settings), first)
    dm.add(second, dt.get_config(second, targets=("attn.v",)))
    _perturbed(dm)
    dm.merge(first)
    dm.merge(second)
    merged = copy.deepcopy(dm.backbone.state_dict())
    with pytest.raises(
        DeltaError,
        match=rf"cannot unmerge '{first}' yet: '{second}' were merged after it.*dm.unmerge\('{second}'\) first",
    ):
        dm.unmerge(first)
    assert dm.deltas[first].merged and dm.deltas[second].merged  # nothing changed by the refusal
    assert all(torch.equal(v, merged[k]) for k, v in dm.backbone.state_dict().items())
    dm.unmerge(second)
    dm.unmerge(first)
    assert all(torch.allclose(v, before[k], atol=1e-5) for k, v in dm.backbone.state_dict().items() if k in before)


def test_deltas_on_other_modules_unmerge_in_any_order() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.get_config("oft", targets=("attn.v",)), "a")
    dm.add("b", dt.get_config("ia3", targets=("attn.q",), feedforward=()))
    _perturbed(dm)
    dm.eval()
    ref = logits(dm, inputs)
    dm.merge("a")
    dm.merge("b")
    dm.unmerge("a")
    dm.unmerge("b")
    assert torch.allclose(logits(dm, inputs), ref, atol=1e-6)


def test_merging_a_disabled_delta_is_refused_and_changes_nothing() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = dt.attach(model, "lora")
    _perturbed(dm)
    dm.eval()
    dm.disable("default")
    off = logits(dm, inputs)
    with pytest.raises(
        DeltaError, match=r"delta 'default' is disabled; enable it before merging \(dm.enable\('default'\)\)"
    ):
        dm.merge("default")
    assert not dm.deltas["default"].merged
    assert torch.equal(logits(dm, inputs), off)  # still acts as off
    dm.enable("default")
    dm.merge("default")
