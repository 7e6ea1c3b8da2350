"""DoRA, LoHa, LoKr, OFT, VeRA, AdaLoRA and random-subset tuning: PEFT is the oracle for the math,
and the properties every method shares (merge, routing, save/load) are checked on every architecture.

PEFT oracle: the same weights are copied from a PEFT model (its adapter tensors made non-trivial)
into deltatune's delta, and the logits must agree to 1e-5 on tiny BERT and tiny Llama.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import CASES, logits, make_inputs, make_model

import deltatune as dt
from deltatune.interop import PeftFormatError, export_peft, import_peft

peft = pytest.importorskip("peft")

NEW = ("dora", "loha", "lokr", "oft", "vera", "random_subset", "adalora")
NEW = tuple(m for m in NEW if m in dt.METHODS)
MERGEABLE = tuple(m for m in NEW if dt.METHODS[m].mergeable)
PEFT_ARCHS = {"bert": ("cls", ["query", "value"], "SEQ_CLS"), "llama": ("lm", ["q_proj", "v_proj"], "CAUSAL_LM")}


def _perturb(params, seed: int = 3, scale: float = 0.1) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _peft_model(arch: str, config_cls, **kwargs):  # noqa: ANN001, ANN202
    head, targets, task = PEFT_ARCHS[arch]
    pm = peft.get_peft_model(make_model(arch, head), config_cls(target_modules=targets, task_type=task, **kwargs))
    _perturb([p for n, p in pm.named_parameters() if p.requires_grad and "modules_to_save" not in n], scale=0.3)
    return pm.eval()


def _copy(pm, dm: dt.DeltaModel, names: dict[str, str]) -> None:  # noqa: ANN001
    """Copy each PEFT layer tensor `<module>.<peft name>` into our `layers[<module>].<our name>`."""
    inner = pm.base_model.model
    delta = dm.delta()
    with torch.no_grad():
        for key, layer in delta.layers.items():
            module = inner.get_submodule(delta._names[key])
            for ours, theirs in names.items():
                target = layer.get_parameter(ours)
                source = module.get_parameter(theirs) if "." in theirs else getattr(module, theirs)
                target.copy_(source.reshape(target.shape))
    head = {n.replace(".modules_to_save.default", ""): p for n, p in inner.named_parameters() if "modules_to_save" in n}
    with torch.no_grad():
        for n, p in dm.backbone.named_parameters():
            if n in head:
                p.copy_(head[n])


def _assert_equal_to_peft(pm, dm: dt.DeltaModel, arch: str) -> None:  # noqa: ANN001
    inputs = make_inputs(dm.backbone)
    expected = logits(pm, inputs)
    assert not torch.allclose(expected, logits(make_model(arch, PEFT_ARCHS[arch][0]), inputs), atol=1e-4)
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=1e-5)


def _ours(arch: str, method: str, **kwargs: object) -> dt.DeltaModel:
    return dt.attach(make_model(arch, PEFT_ARCHS[arch][0]), dt.METHODS[method](targets=("attn.q", "attn.v"), **kwargs))


# -- PEFT as the oracle ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(PEFT_ARCHS))
def test_dora_equals_peft(arch: str) -> None:
    pm = _peft_model(arch, peft.LoraConfig, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    dm = _ours(arch, "dora", r=4, alpha=8)
    _copy(pm, dm, {"lora.A": "lora_A.default.weight", "lora.B": "lora_B.default.weight",
                   "magnitude": "lora_magnitude_vector.default.weight"})  # fmt: skip
    _assert_equal_to_peft(pm, dm, arch)


@pytest.mark.parametrize("arch", list(PEFT_ARCHS))
def test_loha_equals_peft(arch: str) -> None:
    pm = _peft_model(arch, peft.LoHaConfig, r=4, alpha=6)
    dm = _ours(arch, "loha", r=4, alpha=6)
    _copy(pm, dm, {f"w{i}{p}": f"hada_w{i}_{p}.default" for i in (1, 2) for p in "ab"})
    _assert_equal_to_peft(pm, dm, arch)


@pytest.mark.parametrize("r", [2, 8], ids=["low-rank-w2", "full-w2"])
@pytest.mark.parametrize("arch", list(PEFT_ARCHS))
def test_lokr_equals_peft(arch: str, r: int) -> None:
    pm = _peft_model(arch, peft.LoKrConfig, r=r, alpha=6)
    dm = _ours(arch, "lokr", r=r, alpha=6)
    names = {"w1": "lokr_w1.default"} | (
        {"w2": "lokr_w2.default"} if r == 8 else {"w2a": "lokr_w2_a.default", "w2b": "lokr_w2_b.default"}
    )
    _copy(pm, dm, names)
    _assert_equal_to_peft(pm, dm, arch)


@pytest.mark.parametrize("options", [{}, {"neumann_terms": 3}, {"cayley_neumann": False}], ids=["5", "3", "exact"])
@pytest.mark.parametrize("arch", list(PEFT_ARCHS))
def test_oft_equals_peft(arch: str, options: dict) -> None:
    theirs = {
        "use_cayley_neumann": options.get("cayley_neumann", True),
        "num_cayley_neumann_terms": options.get("neumann_terms", 5),
    }
    pm = _peft_model(arch, peft.OFTConfig, r=0, oft_block_size=8, **theirs)
    dm = _ours(arch, "oft", block_size=8, **options)
    _copy(pm, dm, {"weight": "oft_R.default.weight"})
    _assert_equal_to_peft(pm, dm, arch)


def test_oft_exact_cayley_is_orthogonal_and_keeps_weight_row_norms() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["oft"](block_size=8, cayley_neumann=False))
    _perturb(dm.delta().parameters(), scale=0.5)
    layer = next(iter(dm.delta().layers.values()))
    r = layer.rotations()
    torch.testing.assert_close(r @ r.transpose(-2, -1), torch.eye(8).expand_as(r), rtol=0, atol=1e-5)
    w = torch.randn(16, 32)
    torch.testing.assert_close(layer.merged_weight(w).norm(dim=1), w.norm(dim=1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(PEFT_ARCHS))
def test_vera_regenerates_peft_projections_from_the_seed_and_equals_peft(arch: str) -> None:
    pm = _peft_model(arch, peft.VeraConfig, r=16, projection_prng_key=5)
    dm = _ours(arch, "vera", r=16, seed=5)
    theirs = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
    assert torch.equal(dm.delta().vera_A, theirs[0]) and torch.equal(dm.delta().vera_B, theirs[1])
    _copy(pm, dm, {"lambda_b": "vera_lambda_b.default", "lambda_d": "vera_lambda_d.default"})
    _assert_equal_to_peft(pm, dm, arch)


def test_vera_saves_only_the_vectors(tmp_path: Path) -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["vera"](r=16))
    assert set(dm.delta_state_dict()) == {
        f"layers.{k}.{v}" for k in dm.delta().layers for v in ("lambda_b", "lambda_d")
    }


ADALORA = {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2}


@pytest.mark.parametrize("arch", list(PEFT_ARCHS))
def test_adalora_equals_peft(arch: str) -> None:
    pm = _peft_model(arch, peft.AdaLoraConfig, lora_alpha=8, total_step=8, **ADALORA)
    dm = _ours(arch, "adalora", alpha=8, **ADALORA)
    _copy(pm, dm, {"A": "lora_A.default", "B": "lora_B.default", "E": "lora_E.default"})
    _assert_equal_to_peft(pm, dm, arch)


def test_adalora_allocates_ranks_step_by_step_as_peft() -> None:
    """Same weights, same batch, same SGD steps: PEFT's RankAllocator and ours zero the same λ each step."""
    pm = _peft_model("bert", peft.AdaLoraConfig, lora_alpha=8, total_step=8, deltaT=1, **ADALORA)
    dm = _ours("bert", "adalora", alpha=8, **ADALORA)
    _copy(pm, dm, {"A": "lora_A.default", "B": "lora_B.default", "E": "lora_E.default"})
    for n, p in pm.named_parameters():
        p.requires_grad_(p.requires_grad and "modules_to_save" not in n)
    delta = dm.delta().train()  # its orthogonality term is on while training, as PEFT's always is
    inputs = make_inputs(dm.backbone)
    theirs_opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    ours_opt = torch.optim.SGD(list(delta.parameters()), lr=0.5)
    inner = pm.base_model.model
    for step in range(1, 9):
        pm(**inputs).loss.backward()
        dm(**inputs).loss.backward()  # carries the orthogonality term while training, as PEFT's forward does
        theirs_opt.step(), ours_opt.step()
        pm.base_model.update_and_allocate(step)
        delta.on_step(step, 8)
        theirs_opt.zero_grad(), ours_opt.zero_grad()
        for key, layer in delta.layers.items():
            e = inner.get_submodule(delta._names[key]).lora_E["default"]
            assert torch.equal(layer.E == 0, e == 0), f"step {step}: {key}"
            torch.testing.assert_close(layer.E, e, rtol=0, atol=1e-5)
    ranks = dm.delta().ranks()
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1, ranks


def test_dora_magnitude_starts_at_the_weight_row_norms() -> None:
    pm = peft.get_peft_model(make_model("bert"), peft.LoraConfig(target_modules=["query"], use_dora=True))
    dm = dt.attach(make_model("bert"), dt.METHODS["dora"](targets=("attn.q",)))
    inner = pm.base_model.model
    for key, layer in dm.delta().layers.items():
        theirs = inner.get_submodule(dm.delta()._names[key]).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(layer.magnitude, theirs, rtol=0, atol=1e-6)


# -- PEFT folders in and out ----------------------------------------------------------------------
PEFT_FOLDERS = {
    "dora": (peft.LoraConfig, {"r": 4, "lora_alpha": 8, "use_dora": True, "init_lora_weights": False}),
    "loha": (peft.LoHaConfig, {"r": 4, "alpha": 6}),
    "lokr": (peft.LoKrConfig, {"r": 2, "alpha": 6}),
    "oft": (peft.OFTConfig, {"r": 0, "oft_block_size": 8}),
    "vera": (peft.VeraConfig, {"r": 16, "projection_prng_key": 3}),
    "adalora": (peft.AdaLoraConfig, {"init_r": 6, "target_r": 2, "total_step": 10}),
}


@pytest.mark.parametrize("arch", list(PEFT_ARCHS))
@pytest.mark.parametrize("method", list(PEFT_FOLDERS))
def test_peft_folders_import_and_export_with_equal_outputs(method: str, arch: str, tmp_path: Path) -> None:
    config_cls, kwargs = PEFT_FOLDERS[method]
    head = PEFT_ARCHS[arch][0]
    pm = _peft_model(arch, config_cls, **kwargs)
    pm.save_pretrained(tmp_path / "peft")
    dm = import_peft(make_model(arch, head), tmp_path / "peft")
    assert dm.delta().config.method == method
    _assert_equal_to_peft(pm, dm, arch)
    export_peft(dm, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(make_model(arch, head), tmp_path / "back").eval()
    inputs = make_inputs(dm.backbone)
    torch.testing.assert_close(logits(back, inputs), logits(dm, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["dora", "vera", "adalora"])
def test_gpt2_conv1d_folders_import_and_export_with_equal_outputs(method: str, tmp_path: Path) -> None:
    """GPT-2 stores its weights transposed (PEFT's fan_in_fan_out); PEFT has these three methods for it."""
    config_cls, kwargs = PEFT_FOLDERS[method]
    config = config_cls(target_modules=["c_attn"], task_type="CAUSAL_LM", fan_in_fan_out=True, **kwargs)
    pm = peft.get_peft_model(make_model("gpt2", "lm"), config)
    _perturb([p for p in pm.parameters() if p.requires_grad], scale=0.3)
    pm.eval().save_pretrained(tmp_path / "peft")
    dm = import_peft(make_model("gpt2", "lm"), tmp_path / "peft")
    inputs = make_inputs(dm.backbone)
    expected = logits(pm, inputs)
    assert not torch.allclose(expected, logits(make_model("gpt2", "lm"), inputs), atol=1e-4)
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=1e-5)
    export_peft(dm, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(make_model("gpt2", "lm"), tmp_path / "back").eval()
    torch.testing.assert_close(logits(back, inputs), expected, rtol=0, atol=1e-5)


def test_vera_folder_with_other_projections_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    pm = _peft_model("bert", peft.VeraConfig, r=16)
    pm.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 2
    save_file(tensors, str(weights))
    with pytest.raises(PeftFormatError, match="vera_A is not what its projection_prng_key regenerates"):
        import_peft(make_model("bert"), tmp_path / "peft")


def test_oft_folder_from_before_peft_0_18_is_refused(tmp_path: Path) -> None:
    import json

    _peft_model("bert", peft.OFTConfig, r=0, oft_block_size=8).save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | {"peft_version": "0.17.1"}))
    with pytest.raises(PeftFormatError, match="before PEFT 0.18"):
        import_peft(make_model("bert"), tmp_path / "peft")


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
