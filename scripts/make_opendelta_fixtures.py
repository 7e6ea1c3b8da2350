"""Write tests/fixtures/opendelta/: tiny base models, OpenDelta delta folders and OpenDelta's outputs.

OpenDelta 0.3.2 declares web services and a broken `sklearn` dummy among its dependencies, so it is
installed without them, in a venv of its own:

    python3 -m venv /work/venv-od
    /work/venv-od/bin/pip install torch==2.13.0 transformers==4.57.6 safetensors rich decorator pyyaml
    /work/venv-od/bin/pip install --no-deps opendelta==0.3.2
    /work/venv-od/bin/python scripts/make_opendelta_fixtures.py [out_folder]

Its import needs three stand-ins, set here only: `DeltaCenter` and `web` (the hub client and the web
page of `interactive_modify`, both unused) and `transformers.deepspeed` (moved to
`transformers.integrations.deepspeed`). For each case the base model (tiny random BERT, GPT-2 or T5,
hidden 32, 2 layers, saved once per architecture as safetensors) gets the delta, whose tensors are
perturbed (LoRA's B, BitFit's biases and OpenDelta's near-zero adapter inits would make any import pass),
then `freeze_module` (delta and task head trainable) and `save_finetuned` write the folder, and the
model's outputs in eval mode on fixed inputs go to expected.safetensors. tests/test_opendelta.py checks
deltatune's import against them without OpenDelta.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import torch

VOCAB, LABELS = 100, 2


def _stand_ins() -> None:
    """What `import opendelta` needs and its forward never uses."""
    hub = types.ModuleType("DeltaCenter")
    hub.OssClient = object
    sys.modules.setdefault("DeltaCenter", hub)

    class _App:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

    web = types.ModuleType("web")
    web.application = _App
    web.template = types.SimpleNamespace(render=lambda *a, **k: None)
    web.httpserver = types.SimpleNamespace()
    sys.modules.setdefault("web", web)
    import transformers.integrations.deepspeed as deepspeed

    sys.modules.setdefault("transformers.deepspeed", deepspeed)


CONFIGS = {
    "bert": ("BertForSequenceClassification", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
             num_labels=LABELS)),
    "gpt2": ("GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "t5": ("T5ForConditionalGeneration", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
           num_decoder_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
}  # fmt: skip

# case -> (architecture, OpenDelta class name, its keyword arguments, call freeze_module before saving)
CASES = {
    "lora": ("bert", "LoraModel", dict(lora_r=4, lora_alpha=16), True),
    "lora_names": ("bert", "LoraModel", dict(lora_r=2, lora_alpha=6, lora_dropout=0.1,
                   modified_modules=["query", "key", "intermediate.dense"]), True),
    "lora_unfrozen": ("bert", "LoraModel", dict(lora_r=4, lora_alpha=8), False),
    "adapter": ("bert", "AdapterModel", dict(bottleneck_dim=8), True),
    "adapter_relu": ("bert", "AdapterModel", dict(bottleneck_dim=6, non_linearity="relu",
                     modified_modules=["intermediate.dense"]), True),
    "bitfit": ("bert", "BitFitModel", dict(), True),
    "low_rank_adapter": ("bert", "LowRankAdapterModel", dict(reduction_factor=4), True),
    "parallel_adapter": ("bert", "ParallelAdapterModel", dict(bottleneck_dim=8, non_linearity="tanh",
                         modified_modules=["ff@.w1@", "ff@.w2@"], common_structure=True), True),
    "parallel_adapter_attn": ("bert", "ParallelAdapterModel", dict(bottleneck_dim=8), True),
    "soft_prompt": ("bert", "SoftPromptModel", dict(soft_token_num=3), True),
    "gpt2_adapter": ("gpt2", "AdapterModel", dict(bottleneck_dim=8, non_linearity="gelu_orig"), True),
    "gpt2_bitfit": ("gpt2", "BitFitModel", dict(), True),
    "t5_lora": ("t5", "LoraModel", dict(lora_r=4, lora_alpha=8), True),
    "t5_adapter": ("t5", "AdapterModel", dict(bottleneck_dim=8, non_linearity="swish"), True),
    "gpt2_soft_prompt": ("gpt2", "SoftPromptModel", dict(soft_token_num=2), True),
    "t5_soft_prompt": ("t5", "SoftPromptModel", dict(soft_token_num=2, token_init=False), True),
}  # fmt: skip


def base_model(arch: str) -> torch.nn.Module:
    import transformers as tf

    cls, kwargs = CONFIGS[arch]
    config_cls = getattr(tf, cls).config_class
    return getattr(tf, cls)(config_cls(**kwargs)).eval()


def inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 4), generator=g)
    return batch


def output(model: torch.nn.Module, arch: str, mask: bool = True) -> torch.Tensor:
    batch = {k: v.clone() for k, v in inputs(arch).items() if mask or k != "attention_mask"}
    with torch.no_grad():  # clones: OpenDelta's soft prompt rewrites the caller's attention_mask in place
        return model(**batch).logits.float().contiguous()


@torch.no_grad()
def _perturb(delta_model: torch.nn.Module, backbone: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in backbone.named_parameters():
        if getattr(p, "_is_delta", False) or name.startswith(("classifier.", "soft_prompt_layer.")):
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.2))


def main(out: Path) -> None:
    _stand_ins()
    import opendelta
    from safetensors.torch import save_file

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    expected: dict[str, torch.Tensor] = {}
    backbones = {}
    for arch in CONFIGS:
        torch.manual_seed(0)
        model = base_model(arch)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if arch != "bert":  # the tied output embeddings: the same tensor as the input ones
            state.pop("lm_head.weight", None)
        backbones[arch] = state
        save_file(state, str(out / f"base_{arch}.safetensors"))
        for key, value in inputs(arch).items():
            expected[f"{arch}.input.{key}"] = value
        expected[f"{arch}.base"] = output(model, arch)
    for i, (case, (arch, cls, kwargs, freeze)) in enumerate(CASES.items()):
        model = base_model(arch)
        model.load_state_dict(backbones[arch], strict=False)
        delta = getattr(opendelta, cls)(model, **kwargs)
        _perturb(delta, model, 100 + i)
        if freeze:
            delta.freeze_module(exclude=["deltas", "classifier"])
        delta.save_finetuned(str(out / case))
        model.eval()
        expected[case] = output(model, arch)
        if cls == "SoftPromptModel":  # OpenDelta infers a mask from input_ids != 0 when the call passes none
            expected[f"{case}.no_mask"] = output(model, arch, mask=False)
        print(
            case,
            sorted(p.name for p in (out / case).iterdir()),
            f"{(out / case / 'pytorch_model.bin').stat().st_size} B",
        )
    save_file(expected, str(out / "expected.safetensors"))
    (out / "versions.json").write_text(json.dumps({"opendelta": "0.3.2", "torch": torch.__version__,
                                                   "transformers": __import__("transformers").__version__}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "tests/fixtures/opendelta")
