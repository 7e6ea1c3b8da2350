"""Delta folders flipped, edited, smuggled into or swapped for a pipe: each load is refused in one line,
and the model and the folder are unchanged. docs/errors.md lists them (the hardening suite: files).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from errors_helpers import _edit_meta, _files, _no_trace, _refused_load, _rewrite_tensors, _saved
from tiny import make_model, same_state, state

import deltatune as dt
from deltatune.core import io, seal
from deltatune.core.io import META, WEIGHTS


def test_a_flipped_byte_in_the_tensors_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-3] ^= 0x01  # the last tensor's low mantissa bit: the logits would move by ~1e-3 without a word
    (folder / WEIGHTS).write_bytes(bytes(data))
    _refused_load(folder, "corrupted or edited: its content does not match the SHA-256")


def test_a_flipped_exponent_bit_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-1] ^= 0x40
    (folder / WEIGHTS).write_bytes(bytes(data))
    _refused_load(folder, "corrupted or edited")


def test_a_backbone_weight_smuggled_in_as_a_delta_key_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({"bert.embeddings.word_embeddings.weight": torch.zeros(99, 32)}))
    _refused_load(folder, r"unexpected keys \['bert\.embeddings\.word_embeddings\.weight'\]")


def test_a_backbone_weight_smuggled_in_as_a_head_key_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path, include_head=True)
    key = "__head__.bert.encoder.layer.0.attention.self.query.weight"
    _rewrite_tensors(folder, lambda t: t.update({key: torch.zeros(32, 32)}))
    _refused_load(folder, "names a backbone weight, not its task head; only the task head may be loaded")


def test_head_tensors_the_json_does_not_declare_are_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path, include_head=False)  # saved without a head
    _rewrite_tensors(folder, lambda t: t.update({"__head__.classifier.weight": torch.zeros(3, 32)}))
    _refused_load(folder, "holds task head tensors .* that delta.json does not declare")


def test_a_backbone_rerandomized_except_the_old_probes_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    model = make_model("bert")
    probes = json.loads((folder / META).read_text())["backbone"]["probes"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in probes and not name.startswith("classifier") and p.dim() == 2:
                p.copy_(torch.randn_like(p) * p.std())
    _refused_load(folder, "same shapes but other weights", model)


def test_one_rerandomized_tensor_is_enough_to_refuse(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    model = make_model("bert")
    with torch.no_grad():
        w = model.bert.encoder.layer[1].intermediate.dense.weight
        w.copy_(torch.randn_like(w) * w.std())
    _refused_load(
        folder, r"other weights \(e\.g\. 'bert\.encoder\.layer\.1\.intermediate\.dense\.weight' differs\)", model
    )


def test_a_bf16_copy_still_matches_every_signature(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    dm = dt.load_delta(make_model("bert").to(torch.bfloat16), folder)
    assert {p.dtype for p in dm.delta().parameters()} == {torch.float32}  # beside bf16 weights (test_dtypes.py)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.update(sites={"bert.encoder.layer.{0-99999999}.attention.self.query": 1}), "layer range"),
        (lambda m: m.update(sites={f"m.{{0-900000}}.x{i}": 1 for i in range(3)}), "more than 1,048,576 modules"),
        (lambda m: m.update(sites=["not", "a", "mapping"]), "'sites' is not a mapping"),
        (lambda m: m.update(config=["lora"]), "'config' is not a mapping"),
        (lambda m: m["config"].update(r=2.5), r"invalid lora config: LoRAConfig\.r must be a positive integer"),
        (lambda m: m["config"].update(alpha=float("nan")), r"LoRAConfig\.alpha must be a finite number > 0"),
        (lambda m: m["config"].update(dropout=1.0), r"LoRAConfig\.dropout must be in \[0, 1\)"),
        (lambda m: m["config"].update(targets={"a": 1}), r"LoRAConfig\.targets must be a string or a list"),
        (lambda m: m["config"].update(method=["lora"]), "names an unknown method"),
        (lambda m: m.update(name=7), "names the delta 7, not a string"),
        (lambda m: m.update(backbone="bert"), "backbone identity is not a mapping"),
        (lambda m: m["backbone"].update(signatures=[[1, 2, 3]]), "signatures do not fit the model's parameters"),
        (lambda m: m["backbone"]["signatures"].__setitem__(0, "x"), "signatures are malformed"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_an_edited_delta_json_is_refused_before_anything_is_allocated(tmp_path: Path, edit, match: str) -> None:  # noqa: ANN001
    folder = _saved(tmp_path)
    _edit_meta(folder, edit)
    _refused_load(folder, match)


def test_deeply_nested_json_is_refused_without_recursion_error(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    (folder / META).write_text('{"format": "deltatune.delta/1", "config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _refused_load(folder, "nested")


def test_a_huge_delta_json_is_refused_unread(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    (folder / META).write_bytes(b" " * (9 << 20))
    _refused_load(folder, "far more than a delta description")


def test_a_non_utf8_delta_json_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    (folder / META).write_bytes(b'{"format": "\xe9"}')
    _refused_load(folder, "is not valid JSON")


def test_a_delta_saved_before_hashes_loads_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder written before deltatune hashed tensors and sealed delta.json: it loads, with one warning each."""
    import warnings

    folder = _saved(tmp_path)
    _edit_meta(folder, lambda m: (m.pop("weights_sha256"), m.pop("meta_sha256")), reseal=False)
    monkeypatch.setattr(io, "_warned_unhashed", False)
    monkeypatch.setattr(seal, "_warned_unsealed", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.load_delta(make_model("bert"), folder)
    said = " | ".join(str(w.message) for w in caught)
    assert "records no hash of its tensors" in said and "records no hash of its own content" in said
    assert f"deltatune reseal {folder}" in said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.load_delta(make_model("bert"), folder)  # once per process, not once per load


def test_a_peft_adapter_cannot_write_backbone_weights_either(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    from deltatune.interop import import_peft_lora
    from deltatune.interop.peft_lora import PeftFormatError

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], task_type="SEQ_CLS")
    peft.get_peft_model(make_model("bert"), config).save_pretrained(tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(tensors, str(file))
    model = make_model("bert")
    before = state(model)
    with pytest.raises(
        PeftFormatError, match="'bert.pooler.dense.weight', a backbone weight that is not the task head"
    ):
        import_peft_lora(model, tmp_path / "peft")
    assert same_state(before, state(model)) and _no_trace(model)


def test_a_delta_from_before_signatures_is_checked_by_its_probes(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_meta(folder, lambda m: (m["backbone"].pop("signatures"), m.pop("weights_sha256")))
    dt.load_delta(make_model("bert"), folder)  # the same backbone: accepted (with the one-time warning)
    _refused_load(folder, "same shapes but other weights", make_model("bert", seed=5))


# -- found by the session-6 probe ----------------------------------------------------------------
# An independent probe (/work/probe14 in the session that wrote these) tried 200+ bad inputs; each case
# below is one it found accepted silently, crashing, or unclear, now refused in one line.


def test_an_edit_to_delta_json_that_still_parses_is_refused_and_reseal_accepts_it(tmp_path: Path) -> None:
    """alpha 16 -> 32 fits the same tensors and doubles the update: only delta.json's own hash can tell."""
    folder = _saved(tmp_path)
    _edit_meta(folder, lambda m: m["config"].update(alpha=32.0), reseal=False)
    _refused_load(folder, r"delta\.json is edited or corrupted: .*deltatune reseal")
    io.reseal(folder)  # a deliberate edit: sealed again, it loads with the new alpha
    assert dt.load_delta(make_model("bert"), folder).delta().config.alpha == 32.0


def test_reseal_refuses_a_changed_tensor_file_and_an_invalid_config(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-2] ^= 0x40
    (folder / WEIGHTS).write_bytes(bytes(data))
    before = _files(folder)
    with pytest.raises(dt.DeltaIOError, match="resealing covers delta.json only"):
        io.reseal(folder)
    assert _files(folder) == before
    folder = _saved(tmp_path / "b")
    _edit_meta(folder, lambda m: m["config"].update(r=0), reseal=False)
    with pytest.raises(dt.DeltaIOError, match=r"LoRAConfig\.r must be a positive integer"):
        io.reseal(folder)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_delta_file_that_is_a_pipe_or_a_device_is_refused_unread(tmp_path: Path, kind: str) -> None:
    """A FIFO delta.json hung the loader; delta.safetensors -> /dev/zero read until the OOM killer came."""
    folder = _saved(tmp_path)
    if kind == "fifo":
        (folder / META).unlink()
        os.mkfifo(folder / META)
    else:
        (folder / WEIGHTS).unlink()
        (folder / WEIGHTS).symlink_to("/dev/zero")
    start = time.perf_counter()
    _refused_load(folder, "is not a regular file")
    assert time.perf_counter() - start < 5


def test_non_finite_tensors_are_refused_on_load_and_merge(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _rewrite_tensors(folder, lambda t: t[sorted(t)[0]].fill_(float("nan")))
    _edit_meta(folder, lambda m: None)  # rehashed and resealed: a complete, deliberate edit
    _refused_load(folder, "holds NaN or infinite values")
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"]())
    before = state(dm.backbone)
    nan = {k: torch.full_like(v, float("nan")) for k, v in dm.delta_state_dict().items()}
    with pytest.raises(dt.DeltaError, match="holds NaN or infinite values"):
        dm.load_delta_state_dict("default", nan)
    with torch.no_grad():
        next(iter(dm.delta().parameters())).fill_(float("inf"))
    with pytest.raises(dt.DeltaError, match="merging would write them into the weights"):
        dm.merge()
    assert not dm.delta().merged and same_state(before, state(dm.backbone))


def test_saved_folders_take_the_umask_modes_not_mkdtemp(tmp_path: Path) -> None:
    """Folders renamed into place from `tempfile.mkdtemp` were 0700 (merged shards 0600): a serving process or
    another user could not read a delta, checkpoint or merged model."""
    import os
    import stat

    from tiny import make_model

    import deltatune as dt

    old = os.umask(0o022)
    try:
        dm = dt.attach(make_model("bert"), "lora")
        dm.save_delta(str(tmp_path / "delta"))
        dm.export_merged(str(tmp_path / "merged"))
    finally:
        os.umask(old)
    for folder in (tmp_path / "delta", tmp_path / "merged"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in folder.iterdir()), folder
