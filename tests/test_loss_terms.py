"""Loss terms and training schedules of deltas that do not act: a disabled delta computes as if absent.

`DeltaModel.forward` adds the acting deltas' loss terms (diff pruning's L0 penalty, AdaLoRA's orthogonality) to a
returned loss, and `fit` / `DeltaScheduleCallback` run their schedules (AdaLoRA's rank budget) after each step. Both
reached disabled deltas: a disabled diff-pruning delta's gates moved 1e-2 in 5 steps and a disabled AdaLoRA delta
was pruned to one rank a layer, without an error. A loss computed outside the model (Trainer's label smoothing)
leaves the terms out: that is said.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from tiny import make_inputs, make_model

import deltatune as dt
from deltatune.train.hf import DeltaScheduleCallback


def _dm() -> dt.DeltaModel:
    dm = dt.attach(make_model("bert").train(), "lora", name="a")
    dm.add("pruned", dt.get_config("diff_pruning"), enabled=False)
    return dm


def test_a_disabled_delta_gets_no_loss_term_and_no_gradient() -> None:
    dm = _dm()
    dm(**make_inputs(dm.backbone)).loss.backward()
    assert all(p.grad is None for p in dm.delta("pruned").parameters())
    assert any(p.grad is not None for p in dm.delta("a").parameters())


def test_rows_of_a_mixed_batch_give_their_delta_its_loss_term() -> None:
    dm = _dm()
    assert dm.regularization() is None  # LoRA has none, the diff-pruning delta is disabled
    with dm.route(["pruned", None]):
        assert dm.regularization() is not None  # it acts on a row: its term trains it
    dm(**make_inputs(dm.backbone), delta_ids=["pruned", None]).loss.backward()
    assert all(p.grad is not None for p in dm.delta("pruned").parameters() if p.requires_grad)


def test_a_disabled_adalora_delta_keeps_its_ranks_through_the_schedule() -> None:
    dm = dt.attach(make_model("bert").train(), "lora", name="a")
    dm.add("ada", dt.get_config("adalora", init_r=4, target_r=1, tinit=0, tfinal=0, delta_t=1), enabled=False)
    with torch.no_grad():
        for p in dm.delta("ada").parameters():
            p.add_(0.1)
    before = {k: v.clone() for k, v in dm.delta_state_dict("ada").items()}
    dm(**make_inputs(dm.backbone)).loss.backward()
    callback = DeltaScheduleCallback()
    for step in range(3):
        callback.on_optimizer_step(None, types.SimpleNamespace(global_step=step, max_steps=4), None, model=dm)
    assert all(torch.equal(v, before[k]) for k, v in dm.delta_state_dict("ada").items())


def test_a_loss_computed_outside_the_model_is_said_to_leave_the_term_out() -> None:
    dm = _dm()
    dm.enable("pruned")
    inputs = {k: v for k, v in make_inputs(dm.backbone).items() if k != "labels"}
    with pytest.warns(UserWarning, match=r"returned no loss .* 'pruned' \(diff_pruning\) .* dm.regularization\(\)"):
        dm(**inputs)
    dm.disable("pruned")
    other = _dm()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the model returned no loss")
        with torch.no_grad():
            other(**inputs)  # no gradient: nothing trains, nothing to say
        other(**inputs)  # the delta with the term is disabled
