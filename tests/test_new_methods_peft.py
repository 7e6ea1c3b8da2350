"""DoRA, LoHa, LoKr, OFT, VeRA and AdaLoRA against PEFT: PEFT is the oracle for the math, and PEFT
folders of them import and export with equal outputs (or are refused where they cannot).

PEFT oracle: the same weights are copied from a PEFT model (its adapter tensors made non-trivial)
into deltatune's delta, and the logits must agree to 1e-5 on tiny BERT and tiny Llama.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from new_methods_helpers import _perturb
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.interop import PeftFormatError, export_peft, import_peft

peft = pytest.importorskip("peft")

PEFT_ARCHS = {"bert": ("cls", ["query", "value"], "SEQ_CLS"), "llama": ("lm", ["q_proj", "v_proj"], "CAUSAL_LM")}


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
