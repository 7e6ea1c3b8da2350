"""Backbones whose weights are not in memory: accelerate's offloading and models built empty.

accelerate keeps an offloaded module's weights on the meta device and loads them inside each forward.
Attaching there failed with torch's "Cannot copy out of meta tensor"; a delta attached before
offloading (`cpu_offload`, `dispatch_model`) computes its outputs (DoRA failed: "Tensor on device cpu is
not on the expected device meta!"; it now reads the stored weight, `core.layers.loaded`), but merging it
wrote into the meta weights: the merged model's logits were 0.46 off the unmerged ones on tiny Llama,
without an error. Each refusal is one line naming the fix (`core.layers.check_in_memory`).
"""

from __future__ import annotations

import pytest
from tiny import logits, make_inputs, make_model, perturbed

import deltatune as dt

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")


def test_attaching_to_a_disk_offloaded_model_is_refused_in_one_line(tmp_path) -> None:
    make_model("llama", head="lm").save_pretrained(tmp_path / "m")
    where = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    where |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", device_map=where, offload_folder=tmp_path / "offload"
    )
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    with pytest.raises(
        ValueError, match=r"9 of the model's weights are offloaded by accelerate .*device_map=None.*attach first"
    ):
        dt.attach(model, "lora")
    assert not any(n.startswith("deltas") for n, _ in model.named_parameters())  # nothing was attached


def test_attaching_to_a_model_built_without_weights_is_refused_in_one_line() -> None:
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(make_model("llama", head="lm").config)
    with pytest.raises(
        ValueError, match=r"weights are not loaded \(model.embed_tokens.weight and 20 more .*assign=True"
    ):
        dt.attach(model, dt.LoRAConfig(r=4))


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit", "dora", "adapter", "prefix", "prompt"])
def test_a_delta_offloaded_after_attaching_computes_but_refuses_to_merge(method: str, tmp_path) -> None:
    inputs = make_inputs(make_model("llama", head="lm"))
    dm = perturbed(dt.attach(make_model("llama", head="lm"), method), scale=0.1)
    before = logits(dm, inputs)
    accelerate.cpu_offload(dm.backbone, execution_device="cpu")
    assert (logits(dm, inputs) - before).abs().max() < 1e-6  # the hooks act on the loaded weights
    with pytest.raises(ValueError, match="offloaded by accelerate"):
        dm.merge()
    assert not dm.delta().merged and (logits(dm, inputs) - before).abs().max() < 1e-6
    with pytest.raises(ValueError, match="offloaded by accelerate"):
        dm.export_merged(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_attaching_first_then_dispatching_with_disk_offload_computes_exactly(tmp_path) -> None:
    """The recipe the refusal names: load, attach, then let accelerate offload (DoRA reads its weight's norm in
    its hook, after accelerate put the weight back on the meta device: `core.layers.loaded`)."""
    where = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    where |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for method in ("lora", "dora", "prefix"):
        inputs = make_inputs(make_model("llama", head="lm"))
        dm = perturbed(dt.attach(make_model("llama", head="lm"), method), scale=0.1)
        before = logits(dm, inputs)
        accelerate.dispatch_model(dm.backbone, device_map=where, offload_dir=tmp_path / method, main_device="cpu")
        assert dm.backbone.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
        assert (logits(dm, inputs) - before).abs().max() < 1e-6, method
