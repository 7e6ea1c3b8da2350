"""PEFT LoRA folders made by PEFT itself load into deltatune, and ours load into PEFT, outputs equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.interop import export_peft_lora, import_peft_lora
from deltatune.interop.peft_lora import PeftFormatError

peft = pytest.importorskip("peft")

CASES = [
    ("bert", "cls", ["query", "value"], "SEQ_CLS"),
    ("gpt2", "lm", ["c_attn"], "CAUSAL_LM"),
    ("llama", "lm", ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM"),
]


def _peft_model(arch: str, head: str, targets: list[str], task: str, **kwargs: object):  # noqa: ANN202
    model = make_model(arch, head)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, task_type=task, init_lora_weights=False, **kwargs
    )
    pm = peft.get_peft_model(model, config).eval()
    with torch.no_grad():  # a trained-looking head as well
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return pm


@pytest.mark.parametrize("arch,head,targets,task", CASES, ids=[c[0] for c in CASES])
def test_peft_adapter_imports_with_equal_outputs(
    arch: str, head: str, targets: list, task: str, tmp_path: Path
) -> None:
    pm = _peft_model(arch, head, targets, task)
    inputs = make_inputs(make_model(arch, head))
    expected = logits(pm, inputs)
    pm.save_pretrained(tmp_path / "peft")
    dm = import_peft_lora(make_model(arch, head), tmp_path / "peft")
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=1e-5)
    assert dm.delta().config.r == 4


def test_rslora_scaling_is_kept(tmp_path: Path) -> None:
    pm = _peft_model("bert", "cls", ["query", "value"], "SEQ_CLS", use_rslora=True)
    inputs = make_inputs(make_model("bert"))
    expected = logits(pm, inputs)
    pm.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(
        logits(import_peft_lora(make_model("bert"), tmp_path / "peft"), inputs), expected, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("arch,head,targets,task", CASES, ids=[c[0] for c in CASES])
def test_our_lora_loads_in_peft_with_equal_outputs(
    arch: str, head: str, targets: list, task: str, tmp_path: Path
) -> None:
    model = make_model(arch, head)
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS["lora"](r=4, targets=("attn.q", "attn.v")), train_head=True)
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    expected = logits(dm, inputs)
    export_peft_lora(dm, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(make_model(arch, head), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=1e-5)


def test_what_cannot_be_represented_is_refused(tmp_path: Path) -> None:
    pm = _peft_model("bert", "cls", ["query", "value"], "SEQ_CLS", lora_bias=True)
    pm.save_pretrained(tmp_path / "bias")
    with pytest.raises(PeftFormatError, match="trained LoRA biases"):
        import_peft_lora(make_model("bert"), tmp_path / "bias")
    with pytest.raises(PeftFormatError, match=r"holds PEFT adapters in subfolders \(bias\): import each by its"):
        import_peft_lora(make_model("bert"), tmp_path)  # PEFT saves all adapters but "default" so
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftFormatError, match="no adapter_config.json"):
        import_peft_lora(make_model("bert"), tmp_path / "empty")
    weights = tmp_path / "bias" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:60])  # a copy cut short: safetensors' own error came through
    with pytest.raises(PeftFormatError, match=r"adapter_model.safetensors cannot be read .* truncated or corrupted"):
        import_peft_lora(make_model("bert"), tmp_path / "bias")
    dm = dt.attach(make_model("bert"), dt.METHODS["ia3"]())
    with pytest.raises(PeftFormatError, match="only LoRA and DoRA deltas export"):
        export_peft_lora(dm, tmp_path / "x")


def test_an_adapter_for_another_model_is_refused_cleanly(tmp_path: Path) -> None:
    pm = _peft_model("bert", "cls", ["query", "value"], "SEQ_CLS")
    pm.save_pretrained(tmp_path / "peft")
    model = make_model("roberta")
    with pytest.raises(dt.TargetError, match="closest names: roberta.encoder.layer.0.attention.self.query"):
        import_peft_lora(model, tmp_path / "peft")
    llama = make_model("llama")
    with pytest.raises(dt.TargetError, match="matches no module"):
        import_peft_lora(llama.model, tmp_path / "peft")  # a bare body: no head to fill, wrong modules
    assert not any(m._forward_hooks for m in list(model.modules()) + list(llama.modules()))


def test_a_delta_on_the_task_head_is_refused_on_export(tmp_path: Path) -> None:
    # PEFT wraps the classifier as modules_to_save and loaded this adapter without its classifier LoRA:
    # the export gave logits 0.85 away from the model's, without an error
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"](r=4, targets=("query", "classifier")), train_head=False)
    with pytest.raises(PeftFormatError, match="the delta sits on 'classifier', part of the task head"):
        export_peft_lora(dm, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_an_unknown_config_field_that_is_set_is_refused_not_ignored(tmp_path: Path) -> None:
    # a later PEFT's field (made up here) was ignored without a word, whatever it did to the outputs
    import json

    pm = _peft_model("bert", "cls", ["query", "value"], "SEQ_CLS")
    inputs = make_inputs(make_model("bert"))
    expected = logits(pm, inputs)
    pm.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"lora_foo": 1, "lora_off": False}))
    with pytest.raises(PeftFormatError, match=r"sets lora_foo=1, unknown .* pass ignore_fields=\['lora_foo'\]"):
        import_peft_lora(make_model("bert"), tmp_path / "peft")
    dm = import_peft_lora(make_model("bert"), tmp_path / "peft", ignore_fields=("lora_foo",))
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=1e-5)
    for field, value in (("kasa_config", {"r": 2}), ("use_bdlora", {"blocks": 2})):
        path.write_text(json.dumps(config | {field: value}))
        with pytest.raises(PeftFormatError, match="cannot represent it exactly"):
            import_peft_lora(make_model("bert"), tmp_path / "peft")


def test_a_saved_copy_of_gpt2_s_tied_lm_head_is_refused_on_a_tied_model_and_exact_untied(tmp_path: Path) -> None:
    # PEFT's modules_to_save copy of lm_head is untied from the input embeddings; the import called it a
    # head tensor "this model lacks" (named_parameters lists the tied weight once, as transformer.wte.weight)
    base = make_model("gpt2", "lm")
    base.save_pretrained(tmp_path / "base")
    pm = _peft_model("gpt2", "lm", ["c_attn"], "CAUSAL_LM", modules_to_save=["lm_head"])
    inputs = make_inputs(base)
    expected = logits(pm, inputs)
    pm.save_pretrained(tmp_path / "peft")
    with pytest.raises(PeftFormatError, match="ties to 'transformer.wte.weight'.*tie_word_embeddings=False"):
        import_peft_lora(make_model("gpt2", "lm"), tmp_path / "peft")
    untied = type(base).from_pretrained(tmp_path / "base", tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    dm = import_peft_lora(untied, tmp_path / "peft")
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "arch,head,targets,task,init,options",
    [
        ("bert", "cls", ["query", "value"], "SEQ_CLS", "pissa", {}),
        ("bert", "cls", ["query", "value"], "SEQ_CLS", "olora", {}),
        ("bert", "cls", ["query", "value"], "SEQ_CLS", "pissa", {"use_rslora": True, "rank_pattern": {"query": 2}}),
        ("gpt2", "lm", ["c_attn"], "CAUSAL_LM", "pissa", {}),
        ("llama", "lm", ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM", "olora", {"alpha_pattern": {"v_proj": 3}}),
    ],
    ids=["bert-pissa", "bert-olora", "bert-pissa-rslora-pattern", "gpt2-pissa", "llama-olora-pattern"],
)
def test_pissa_and_olora_adapters_saved_unconverted_import_on_the_original_base_equal_to_peft(
    arch: str, head: str, targets: list, task: str, init: str, options: dict, tmp_path: Path
) -> None:
    # PiSSA/OLoRA subtract their initial B0 A0 from the base weights; read as a plain LoRA on the original
    # base, a folder saved without PEFT's conversion was off by s B0 A0 (0.011 on tiny BERT) with no error
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, task_type=task, init_lora_weights=init, **options
    )
    pm = peft.get_peft_model(make_model(arch, head), config).eval()
    with torch.no_grad():  # trained: B moved away from B0 (at B0 the model equals the base)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.1)
    inputs = make_inputs(make_model(arch, head))
    expected = logits(pm, inputs)
    pm.save_pretrained(tmp_path / "peft")
    plain = logits(
        import_peft_lora(make_model(arch, head), tmp_path / "peft", ignore_fields=("init_lora_weights",)), inputs
    )
    assert (plain - expected).abs().max() > 1e-4  # the offset matters: read plainly, it is wrong
    dm = import_peft_lora(make_model(arch, head), tmp_path / "peft")
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=1e-5)
    reloaded = peft.PeftModel.from_pretrained(make_model(arch, head), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(dm, inputs), logits(reloaded, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "init,match",
    [
        ("corda", "activation statistics"),
        ("astra", "activation statistics"),
        ("loftq", "LoftQ base"),
        ("eigen_init", "unknown to deltatune"),
    ],  # fmt: skip
)
def test_inits_whose_base_change_cannot_be_recomputed_are_refused(init: str, match: str, tmp_path: Path) -> None:
    pm = _peft_model("bert", "cls", ["query"], "SEQ_CLS")
    pm.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"init_lora_weights": init}))
    with pytest.raises(PeftFormatError, match=match):
        import_peft_lora(make_model("bert"), tmp_path / "peft")
    for plain in ("gaussian", "orthogonal", "mica", "eva", "nora"):  # these leave the base as it is
        path.write_text(json.dumps(config | {"init_lora_weights": plain}))
        import_peft_lora(make_model("bert"), tmp_path / "peft")
    path.write_text(json.dumps(config | {"init_lora_weights": "pissa_niter_4"}))
    with pytest.warns(UserWarning, match="randomized SVD"):
        import_peft_lora(make_model("bert"), tmp_path / "peft")


def test_an_adapterhub_folder_is_named_as_such_not_as_a_broken_peft_one(tmp_path: Path) -> None:
    """AdapterHub's `adapters` also writes adapter_config.json: its folder was read as a PEFT folder missing
    adapter_model.safetensors, and DeltaModel.from_pretrained called it a PEFT adapter to import."""
    folder = tmp_path / "sst-2"
    folder.mkdir()
    config = {"config": {"output_adapter": True, "reduction_factor": 16}, "hidden_size": 32, "model_class": "BertModel"}
    (folder / "adapter_config.json").write_text(json.dumps(config | {"name": "sst-2", "version": "adapters.1.0.0"}))
    with pytest.raises(
        PeftFormatError, match="is AdapterHub's .*adapters.1.0.0.*'sst-2'.*not PEFT's: .*import_adapterhub"
    ):
        dt.interop.import_peft(make_model("bert"), folder)
    with pytest.raises(
        dt.DeltaIOError, match="not PEFT's \\(AdapterHub's `adapters` library\\?\\): .*import_adapterhub"
    ):
        dt.DeltaModel.from_pretrained(make_model("bert"), folder)


@pytest.mark.parametrize(
    ("arch", "head", "table", "task"),
    [("llama", "lm", "embed_tokens", "CAUSAL_LM"), ("bert", "cls", "word_embeddings", "SEQ_CLS")],
)
def test_lora_on_the_embedding_table_matches_peft_both_ways_and_merges_exactly(
    arch: str, head: str, table: str, task: str, tmp_path: Path
) -> None:
    """PEFT's `target_modules=["embed_tokens"]` (training embeddings for new tokens) had no place here: 'LoRA
    target is a Embedding, not a linear layer'. Now an embedding takes LoRA as PEFT's lora_embedding_A/B."""
    model = make_model(arch, head)
    inputs = make_inputs(model)
    pm = _peft_model(arch, head, [table, "query" if arch == "bert" else "q_proj"], task)
    expected = logits(pm, inputs)
    pm.save_pretrained(tmp_path / "peft")  # with the base table beside it (save_embedding_layers)
    dm = import_peft_lora(make_model(arch, head), tmp_path / "peft")
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=1e-5)
    export_peft_lora(dm, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(make_model(arch, head), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=1e-5)
    ours = dt.attach(make_model(arch, head), "lora", targets=("embeddings.word",))
    torch.testing.assert_close(logits(ours, inputs), logits(model, inputs), rtol=0, atol=0)  # A starts at 0
    dm.merge()
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=1e-5)
    dm.unmerge()
    base, own_head = dict(make_model(arch, head).named_parameters()), set(dm.head_parameter_names())
    assert all(torch.allclose(p, base[n], atol=1e-6) for n, p in dm.backbone.named_parameters() if n not in own_head)


@pytest.mark.parametrize("method", ["loha", "lokr", "oft"])
def test_an_export_peft_could_not_load_is_refused(method: str, tmp_path: Path) -> None:
    """PEFT's LoHa, LoKr and OFT layers take nn.Linear only: a delta on GPT-2's Conv1D exported without a word,
    then `PeftModel.from_pretrained` failed inside PEFT ("Target module Conv1D ... not supported")."""
    from deltatune.interop import export_peft

    dm = dt.attach(make_model("gpt2", "lm"), method)
    with pytest.raises(PeftFormatError, match=r"do not take GPT-2-style Conv1D modules \(transformer\.h\.0\.attn"):
        export_peft(dm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
