"""DoRA, LoHa, LoKr, OFT, VeRA, AdaLoRA and random-subset tuning on their own: the properties every method
shares (merge, routing, save/load) on every architecture, random-subset's seeded entries, AdaLoRA's rank
allocation in training, budget matching and settings checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from new_methods_helpers import _perturb
from tiny import CASES, logits, make_inputs, make_model

import deltatune as dt

pytest.importorskip("peft")  # skipped without PEFT as when they shared test_new_methods.py (none uses it)

NEW = ("dora", "loha", "lokr", "oft", "vera", "random_subset", "adalora")
NEW = tuple(m for m in NEW if m in dt.METHODS)
MERGEABLE = tuple(m for m in NEW if dt.METHODS[m].mergeable)


# -- what every new method shares, on every architecture -----------------------------------------
@pytest.mark.parametrize("arch,head", CASES, ids=lambda v: v)
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_matches_unmerged_and_unmerge_restores_the_weights(method: str, arch: str, head: str) -> None:
    model = make_model(arch, head)
    inputs = make_inputs(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    dm = dt.attach(model, dt.METHODS[method]())
    _perturb(dm.delta().parameters(), scale=0.05)
    unmerged = logits(dm, inputs)
    dm.merge()
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)
    dm.unmerge()
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)
    dm.detach()
    drift = max((p.detach() - weights[n]).abs().max().item() for n, p in model.named_parameters())
    assert drift <= 1e-6


@pytest.mark.parametrize("arch,head", [("bert", "cls"), ("llama", "lm"), ("bart", "lm")], ids=lambda v: v)
@pytest.mark.parametrize("method", NEW)
def test_each_row_of_a_mixed_batch_equals_its_delta_alone(method: str, arch: str, head: str) -> None:
    dm = dt.DeltaModel(make_model(arch, head))
    for name in ("a", "b"):
        dm.add(name, dt.METHODS[method](), enabled=False)
        _perturb(dm.delta(name).parameters(), seed=len(name) + ord(name), scale=0.05)
    inputs = make_inputs(dm.backbone, batch=4)
    labels = inputs.pop("labels")
    if dm.backbone.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = labels
    ids = ["a", None, "b", "a"]
    with torch.no_grad():
        mixed = dm(**inputs, delta_ids=ids).logits
        for i, name in enumerate(ids):
            dm.set_active([] if name is None else name)
            torch.testing.assert_close(mixed[i], dm(**inputs).logits[i], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", NEW)
def test_save_load_round_trip_and_tree(method: str, tmp_path: Path) -> None:
    dm = dt.attach(make_model("llama", "lm"), dt.METHODS[method]())
    _perturb(dm.delta().parameters(), scale=0.05)
    inputs = make_inputs(dm.backbone)
    dm.save_delta(tmp_path / "d")
    loaded = dt.load_delta(make_model("llama", "lm"), tmp_path / "d")
    torch.testing.assert_close(logits(loaded, inputs), logits(dm, inputs), rtol=0, atol=0)
    assert f"{method}:default +" in dm.tree()


# -- random-subset tuning ---------------------------------------------------------------------------
def _changed_entries(seed: int, count: int = 500) -> set[tuple[str, int]]:
    model = make_model("bert")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    dm = dt.attach(model, dt.METHODS["random_subset"](count=count, seed=seed))
    with torch.no_grad():
        dm.delta().values.fill_(1.0)
    dm.merge()
    now = {n.replace(".parametrizations.", ".").replace(".original", ""): p for n, p in model.named_parameters()}
    changed = {(n, int(i)) for n, p in now.items() for i in torch.nonzero(p.flatten() != base[n].flatten())}
    dm.unmerge()
    return changed


def test_random_subset_trains_exactly_count_entries_chosen_by_the_seed() -> None:
    first, again, other = _changed_entries(0), _changed_entries(0), _changed_entries(1)
    assert len(first) == 500 and first == again and first != other
    assert {n.rsplit(".", 2)[-2] for n, _ in first} >= {"query", "key", "value", "dense"}


def test_random_subset_saves_only_the_values_and_refuses_too_many() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["random_subset"](count=123))
    assert {k: v.shape for k, v in dm.delta_state_dict().items()} == {"values": (123,)}
    with pytest.raises(ValueError, match="hold only .* entries; lower count"):
        dt.attach(make_model("bert"), dt.METHODS["random_subset"](count=10**8, targets=("attn.q",)))


def test_fit_runs_adalora_rank_allocation_down_to_the_target_budget(tmp_path: Path) -> None:
    from tiny import TOY_WORDS as WORDS
    from tiny import make_tokenizer
    from tiny import tiny_bert as _bert
    from tiny import write_toy_task as _write_task

    from deltatune.data import load_task
    from deltatune.train import TrainConfig, fit

    tokenizer = make_tokenizer(WORDS)
    task = load_task(_write_task(tmp_path / "toy"))
    config = dt.METHODS["adalora"](init_r=6, target_r=2, tfinal=3)
    cfg = TrainConfig(max_steps=12, batch_size=16, eval_every=1000, max_length=16, progress=False, lr=1e-2)
    model, _ = fit(_bert(tokenizer), tokenizer, task, [config], cfg)
    ranks = model.delta("adalora").ranks()
    assert sum(ranks.values()) == 2 * len(ranks), ranks
    with pytest.raises(ValueError, match="tinit \\+ tfinal .* below the 12 training steps"):
        fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["adalora"](tfinal=12)], cfg)


BUDGETS = {"lokr": (150, 300), "oft": (500, 1500)}  # their counts saturate on a 32-wide model


@pytest.mark.parametrize("method", NEW)
def test_study_budget_matching_tunes_the_declared_size(method: str) -> None:
    from deltatune.core.settings import size_field
    from deltatune.study.executors import _budget_config

    model = make_model("bert")
    small, large = (
        _budget_config(model, method, {}, b)[size_field(dt.METHODS[method])] for b in BUDGETS.get(method, (3000, 12000))
    )
    assert small < large
    counts = [dt.attach(make_model("bert"), dt.METHODS[method](**{size_field(dt.METHODS[method]): v})).delta_parameters()
              for v in (small, large)]  # fmt: skip
    assert counts[0] < counts[1]


def test_bad_settings_of_the_new_methods_get_one_clear_line() -> None:
    with pytest.raises(ValueError, match="LoKrConfig.factor must be -1 .* got 0"):
        dt.METHODS["lokr"](factor=0).validate()
    with pytest.raises(ValueError, match="target_r \\(9\\) must not exceed init_r \\(4\\)"):
        dt.METHODS["adalora"](init_r=4, target_r=9).validate()
    with pytest.raises(ValueError, match="OFTConfig.block_size must be a positive integer"):
        dt.METHODS["oft"](block_size=0).validate()


def test_adalora_resumed_in_its_final_phase_keeps_the_saved_zeros() -> None:
    """A fresh process past the last allocation has no masks in memory: the saved zeros are the ranks."""
    dm = dt.attach(make_model("bert"), dt.METHODS["adalora"](init_r=4, target_r=2, tfinal=5))
    delta = dm.delta()
    with torch.no_grad():
        for layer in delta.layers.values():
            layer.E.copy_(torch.tensor([[1.0], [0.0], [2.0], [0.0]]))  # as loaded
    delta.on_step(8, 10)
    with torch.no_grad():
        for layer in delta.layers.values():
            layer.E[1] = 0.5  # an optimizer step revives a pruned λ
    delta.on_step(9, 10)
    assert all(torch.equal(layer.E.view(-1), torch.tensor([1.0, 0.0, 2.0, 0.0])) for layer in delta.layers.values())


def test_adalora_finalize_prunes_an_early_best_state_down_to_the_target_budget() -> None:
    """A best state restored from before the last allocation holds more rank than target_r: finalize cuts it."""
    dm = dt.attach(make_model("bert"), dt.METHODS["adalora"](init_r=4, target_r=2))
    delta = dm.delta()
    with torch.no_grad():
        for i, layer in enumerate(delta.layers.values()):
            layer.E.copy_(torch.tensor([[0.1], [0.0], [3.0 + i], [0.2 + i]]))  # rank 3 each, 0 already pruned
    delta.finalize()
    ranks = list(delta.ranks().values())
    assert sum(ranks) == 2 * len(ranks)
    for layer in delta.layers.values():  # no importance averages: the largest |λ| stay
        kept = (layer.E.view(-1) != 0).tolist()
        assert kept[1] is False and kept[2] is True
    assert sum((layer.E.view(-1)[0] != 0).item() for layer in delta.layers.values()) == 0  # 0.1 is the smallest


def test_adalora_schedule_state_round_trips_its_importance_averages() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["adalora"](init_r=4, target_r=2, tfinal=2))
    delta = dm.delta()
    for p in delta.parameters():
        p.grad = torch.randn_like(p)
    delta.on_step(1, 10)
    state = delta.schedule_state()
    assert state and all(k.startswith("ema.") for k in state)
    other = dt.attach(make_model("bert"), dt.METHODS["adalora"](init_r=4, target_r=2, tfinal=2)).delta()
    other.load_schedule_state(state)
    assert {k: v.shape for k, v in other.schedule_state().items()} == {k: v.shape for k, v in state.items()}
    assert all(torch.equal(other.schedule_state()[k], v) for k, v in state.items())
