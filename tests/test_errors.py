"""Bad inputs, as an attacker and a careless user would give them: each gets one clear error, and nothing changes.

Every case asserts the message (it names the setting or file and the fix) and that nothing was
changed: the backbone's tensors, the attached deltas, the files on disk. docs/errors.md lists them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import logits, make_inputs, make_model, same_state, state

import deltatune as dt
from deltatune.core import io, seal
from deltatune.core.io import META, WEIGHTS
from deltatune.core.routing import RoutingError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _no_trace(model: torch.nn.Module) -> bool:
    """No hook and no parametrization left on the backbone."""
    return not any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "parametrizations") for m in model.modules())


def _perturbed(dm: dt.DeltaModel, name: str = "default", seed: int = 0) -> dt.DeltaModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.delta(name).parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return dm


def _saved(tmp_path: Path, method: str = "lora", **kwargs: object) -> Path:
    dm = _perturbed(dt.attach(make_model("bert"), dt.METHODS[method](), train_head=False))
    dm.save_delta(tmp_path / "d", **kwargs)
    return tmp_path / "d"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_meta(folder: Path, edit, reseal: bool = True) -> None:  # noqa: ANN001 - a function of the parsed JSON
    """Edit delta.json; `reseal` also updates its recorded hash, as a deliberate attacker would, so the
    checks behind the seal are what must refuse the edit."""
    meta = json.loads((folder / META).read_text())
    edit(meta)
    (folder / META).write_bytes(io._sealed(meta) if reseal else json.dumps(meta).encode())


def _rewrite_tensors(folder: Path, edit, rehash: bool = True) -> None:  # noqa: ANN001
    """Edit the tensors and (as a deliberate attacker would) the recorded hash too."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))
    if rehash:
        digest = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
        _edit_meta(folder, lambda m: m.update(weights_sha256=digest))


def _refused_load(folder: Path, match: str, model: torch.nn.Module | None = None) -> None:
    """Loading `folder` raises DeltaIOError matching `match`; the model and the folder are untouched."""
    model = model if model is not None else make_model("bert")
    before, files = state(model), _files(folder)
    with pytest.raises(dt.DeltaIOError, match=match):
        dt.load_delta(model, folder)
    assert same_state(before, state(model)) and _no_trace(model)
    assert _files(folder) == files


# ============================================================================ settings (API)
CONFIG_CASES = [
    ("lora", {"r": 2.5}, r"LoRAConfig\.r must be a positive integer, got 2\.5 \(float\) \(at most 65536\)"),
    ("lora", {"r": "8"}, r"LoRAConfig\.r must be a positive integer, got '8' \(str\)"),
    ("lora", {"r": True}, r"LoRAConfig\.r must be a positive integer, got True \(bool\)"),
    ("lora", {"r": 0}, r"LoRAConfig\.r must be a positive integer, got 0"),
    ("lora", {"r": 10**9}, r"LoRAConfig\.r must be a positive integer, got 1000000000 \(at most 65536\)"),
    ("lora", {"alpha": float("nan")}, r"LoRAConfig\.alpha must be a finite number > 0, got nan"),
    ("lora", {"alpha": float("inf")}, r"LoRAConfig\.alpha must be a finite number > 0, got inf"),
    ("lora", {"alpha": 0}, r"LoRAConfig\.alpha must be a finite number > 0, got 0"),
    ("lora", {"dropout": 1}, r"LoRAConfig\.dropout must be in \[0, 1\), got 1"),
    ("lora", {"dropout": -0.1}, r"LoRAConfig\.dropout must be in \[0, 1\), got -0\.1"),
    ("lora", {"dropout": "0.1"}, r"LoRAConfig\.dropout must be a finite number in \[0, 1\), got '0\.1'"),
    ("lora", {"targets": 3}, r"LoRAConfig\.targets must be a string or a list of strings or None, got 3"),
    ("lora", {"layers": [0, "x"]}, r"LoRAConfig\.layers must be .*a list of integers or None, got \[0, 'x'\]"),
    ("adapter", {"bottleneck": 1.5}, r"AdapterConfig\.bottleneck must be a positive integer"),
    ("adapter", {"scaling": -1.0}, r"AdapterConfig\.scaling must be a finite number > 0, got -1\.0"),
    ("compacter", {"phm_dim": 0}, r"CompacterConfig\.phm_dim must be a positive integer"),
    ("prefix", {"num_tokens": True}, r"PrefixConfig\.num_tokens must be a positive integer, got True"),
    ("prompt", {"num_tokens": 0}, r"PromptConfig\.num_tokens must be a positive integer"),
    ("said", {"dim": -5}, r"SAIDConfig\.dim must be a positive integer"),
    ("diff_pruning", {"temperature": 0.0}, r"DiffPruningConfig\.temperature must be a finite number > 0"),
    ("selective", {"last_k": 0}, r"SelectiveConfig\.last_k must be a positive integer, got 0"),
    ("bitfit", {"exclude_head": "yes"}, r"BitFitConfig\.exclude_head must be True or False, got 'yes'"),
]


@pytest.mark.parametrize("method,kwargs,match", CONFIG_CASES, ids=lambda v: str(v)[:30])
def test_a_bad_setting_is_refused_before_the_model_is_touched(method: str, kwargs: dict, match: str) -> None:
    model = make_model("bert")
    dm = dt.DeltaModel(model)
    before = state(model)
    with pytest.raises(ValueError, match=match):
        dm.add("x", dt.METHODS[method](**kwargs))
    assert list(dm.deltas) == [] and same_state(before, state(model)) and _no_trace(model)


@pytest.mark.parametrize(
    "method,kwargs,match",
    [
        (
            "lora",
            {"target_modules": ["query"]},
            r"LoRAConfig has no setting 'target_modules'; deltatune calls it 'targets'",
        ),
        ("lora", {"lora_alpha": 32}, r"LoRAConfig has no setting 'lora_alpha'; deltatune calls it 'alpha'$"),
        ("prompt", {"num_virtual_tokens": 8}, r"calls it 'num_tokens'$"),
        ("lora", {"task_type": "SEQ_CLS"}, r"'task_type' \(a PEFT setting\); in deltatune: not needed"),
        ("lora", {"num_virtual_tokens": 8}, r"no setting 'num_virtual_tokens'; its settings: targets, layers, r,"),
        ("lora", {"alpah": 8}, r"no setting 'alpah'; did you mean 'alpha'"),
    ],
)
def test_peft_s_setting_names_get_deltatune_s(method: str, kwargs: dict, match: str) -> None:
    """Users arrive from PEFT: its spelling of a setting names ours, one line, before anything is built."""
    with pytest.raises(TypeError, match=match):
        dt.METHODS[method](**kwargs)


def test_every_peft_name_points_at_a_real_setting() -> None:
    for cls in dt.METHODS.values():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(cls.peft_names.values()) <= fields, cls.__name__
        assert not set(cls.peft_names) & fields, cls.__name__


def test_the_core_names_no_method_field() -> None:
    """Validation is read from each config's declared types and ranges, not from a list of field names."""
    core = Path(SRC, "deltatune", "core")
    text = (core / "delta.py").read_text() + (core / "settings.py").read_text()
    for name in ('"r"', '"bottleneck"', '"num_tokens"', '"dropout"', '"rank"', '"dim"'):
        assert name not in text


# ============================================================================ files
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
    assert {p.dtype for p in dm.delta().parameters()} == {torch.bfloat16}


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


def test_saving_again_keeps_the_users_other_files(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    (folder / "notes.txt").write_text("mine")
    (folder / "eval").mkdir()
    (folder / "eval" / "scores.json").write_text("{}")
    dm = _perturbed(dt.attach(make_model("bert"), dt.METHODS["lora"]()), seed=3)
    dm.save_delta(folder)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "eval" / "scores.json").exists()
    inputs = make_inputs(dm.backbone)
    torch.testing.assert_close(logits(dt.load_delta(make_model("bert"), folder), inputs), logits(dm, inputs))
    assert sorted(p.name for p in folder.iterdir()) == ["delta.json", "delta.safetensors", "eval", "notes.txt"]


def test_a_stale_temp_folder_of_a_dead_save_is_cleaned(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".d.tmp-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / WEIGHTS).write_bytes(b"half")
    live = tmp_path / f".d.tmp-{os.getpid()}-xyz"  # a save in progress in a live process: left alone
    live.mkdir()
    _saved(tmp_path)
    assert not stale.exists() and live.exists()


def test_a_kill_between_the_two_renames_is_recovered_on_the_next_load(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    dm = _perturbed(dt.attach(make_model("bert"), dt.METHODS["lora"]()), seed=7)
    dm.save_delta(tmp_path / "new")
    # the state a kill leaves after the weights were renamed into place but before delta.json was
    os.replace(tmp_path / "new" / WEIGHTS, folder / WEIGHTS)
    os.replace(tmp_path / "new" / META, folder / f".{META}.pending")
    inputs = make_inputs(dm.backbone)
    torch.testing.assert_close(logits(dt.load_delta(make_model("bert"), folder), inputs), logits(dm, inputs))
    assert sorted(p.name for p in folder.iterdir()) == [META, WEIGHTS]


@pytest.mark.parametrize("commit_mark_half_written", [False, True])
def test_a_kill_before_the_commit_mark_keeps_the_old_delta(tmp_path: Path, commit_mark_half_written: bool) -> None:
    folder = _saved(tmp_path)
    files = _files(folder)
    (folder / f".{WEIGHTS}.pending").write_bytes(b"half written")
    if commit_mark_half_written:  # killed while writing delta.json: it is written aside, never as the mark
        (folder / f".{META}.pending.partial").write_bytes(b"")
    dt.load_delta(make_model("bert"), folder)
    assert _files(folder) == files


def test_a_replace_cut_short_by_an_older_version_is_recovered(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    os.replace(folder, tmp_path / ".d.old-12345")  # old versions renamed the folder away first
    dt.load_delta(make_model("bert"), folder)
    assert (folder / META).exists() and not (tmp_path / ".d.old-12345").exists()


def test_saving_over_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").write_text("not a folder")
    with pytest.raises(dt.DeltaIOError, match="exists and is not a delta folder; choose another path"):
        dt.attach(make_model("bert"), dt.METHODS["lora"]()).save_delta(tmp_path / "d")
    assert (tmp_path / "d").read_text() == "not a folder"


# ============================================================================ state misuse
def _two(method: str = "lora") -> dt.DeltaModel:
    dm = dt.DeltaModel(make_model("bert"))
    dm.add("a", dt.METHODS[method]())
    dm.add("b", dt.METHODS[method](targets=("attn.k",)))
    _perturbed(dm, "a")
    _perturbed(dm, "b", seed=1)
    return dm


def test_training_while_merged_is_refused() -> None:
    dm = _two()
    dm.merge("a")
    dm.train()
    inputs = make_inputs(dm.backbone)
    with pytest.raises(dt.DeltaError, match=r"merged into the weights, so training would not reach them; unmerge"):
        dm(**inputs).loss.backward()
    dm.eval()
    with torch.no_grad():
        dm(**inputs)  # inference on the merged model is fine


def test_loading_tensors_into_a_merged_delta_is_refused() -> None:
    dm = _two()
    dm.merge("a")
    before = state(dm)
    new = {k: torch.zeros_like(v) for k, v in dm.delta_state_dict("a").items()}
    with pytest.raises(dt.DeltaError, match=r"cannot load tensors into 'a'.*unmerge them first \(dm\.unmerge\('a'\)\)"):
        dm.load_delta_state_dict("a", new)
    with pytest.raises(dt.DeltaError, match="unmerge it before loading other tensors"):
        dm.delta("a").load_state_dict(new)
    assert same_state(before, state(dm))


def test_disabling_or_switching_off_a_merged_delta_is_refused() -> None:
    dm = _two()
    dm.merge("a")
    with pytest.raises(dt.DeltaError, match=r"cannot disable 'a'.*unmerge them first"):
        dm.disable("a")
    with pytest.raises(dt.DeltaError, match="cannot switch deltas"):
        dm.set_active(["b"])
    assert dm.delta("a").enabled and dm.delta("b").enabled


@pytest.mark.parametrize("name", ["a", "b", None])
def test_detach_with_a_merged_delta_is_all_or_nothing(name: str | None) -> None:
    dm = _two()
    dm.merge("a")
    before = state(dm.backbone)
    fix = "unmerge this delta before removing it" if name != "b" else "unmerge a before removing any delta"
    with pytest.raises(dt.DeltaError, match=rf"delta\(s\) a are merged into the weights; {fix}"):
        dm.detach(name)
    assert list(dm.deltas) == ["a", "b"] and same_state(before, state(dm.backbone))
    dm.unmerge("a")
    assert _no_trace(dm.detach())


def test_a_head_key_naming_a_backbone_weight_cannot_be_loaded_through_the_api() -> None:
    dm = _two()
    before = state(dm.backbone)
    bad = {**dm.delta_state_dict("a"), "__head__.bert.pooler.dense.weight": torch.zeros(32, 32)}
    with pytest.raises(dt.DeltaError, match="is not a task head parameter of this model"):
        dm.load_delta_state_dict("a", bad)
    assert same_state(before, state(dm.backbone))


@pytest.mark.parametrize(
    "ids,error,match",
    [
        ("ab", RoutingError, r"delta_ids must be a list with one entry per row .* got str 'ab'"),
        (["a", "b"], RoutingError, "delta_ids has 2 entries for a batch of 4 rows; pass one delta id per row"),
        (["a", "b", "a", None, "b"], RoutingError, "5 entries for a batch of 4 rows"),
        (["a", ["b", "b"], None, None], RoutingError, r"delta_ids\[1\] names a delta twice"),
        (["a", 3, None, None], RoutingError, r"delta_ids\[1\] must be a delta name"),
        ({"a": 0}, RoutingError, "must be a list with one entry per row"),
        (torch.zeros(4), RoutingError, "must be a list with one entry per row"),
        (["a", "zz", None, None], KeyError, "no delta named 'zz'; attached deltas: a, b"),
        ([], RoutingError, "delta_ids is empty"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_bad_delta_ids_are_refused(ids, error: type, match: str) -> None:  # noqa: ANN001
    dm = _two()
    dm.set_active([])
    inputs = {k: v for k, v in make_inputs(dm.backbone, batch=4).items() if k != "labels"}
    with pytest.raises(error, match=match), torch.no_grad():
        dm(**inputs, delta_ids=ids)
    assert all(d.route is None for d in dm.deltas.values())


# ============================================================================ the CLI
def _cli(capsys, *argv: str) -> tuple[int, str]:  # noqa: ANN001
    from deltatune.cli import main

    capsys.readouterr()  # only what the command prints
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _one_line_error(code: int, err: str, match: str) -> None:
    import re

    assert code != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err


@pytest.fixture()
def junk(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "text.txt").write_text("hello, not a database\n")
    (tmp_path / "bad.yaml").write_text("methods: [lora\nmodels: x: y\n")
    (tmp_path / "nomodel").mkdir()
    return {
        "text": tmp_path / "text.txt",
        "yaml": tmp_path / "bad.yaml",
        "dir": tmp_path,
        "nomodel": tmp_path / "nomodel",
    }


CLI_CASES = [
    (("train", "--model", "no-such-model", "--task", "sst2"), r"unknown model 'no-such-model': not a short name"),
    (("inspect", "--model", "{nomodel}"), r"is not a model folder \(no config\.json\)"),
    (("study", "run", "{yaml}"), r"does not parse at line 2, column 7: .*fix the file's syntax"),
    (("study", "run", "smoke", "--db", "{text}"), r"--db .*text\.txt is not an SQLite database"),
    (("study", "status", "{text}"), r"is not an SQLite database .*pass the \.sqlite file"),
    (("study", "report", "{dir}", "--out", "{text}"), r"no \*\.sqlite study files|--out .* is an existing file"),
    (("study", "run", "smoke", "--workers", "0"), r"--workers must be at least 1, got 0"),
    (("study", "run", "{dir}/nope.yaml"), r"no study spec .*give a \.yaml/\.toml file or a preset"),
    (("subspace", "report", "--workdir", "{text}"), r"--workdir .* is an existing file; pass a folder"),
    (("subspace", "find", "--workdir", "{dir}", "--db", "{text}"), r"--db .* is not an SQLite database"),
    (("subspace", "landscape", "--workdir", "{dir}", "--grid", "1"), r"--grid must be at least 2, got 1"),
    (("subspace", "collect", "--workdir", "{dir}/w", "--steps", "0"), r"--steps must be at least 1, got 0"),
    (("subspace", "collect", "--workdir", "{dir}/w", "--head-lr", "nan"), r"--head-lr must be a finite number > 0"),
    (("subspace", "report", "--workdir", "{dir}", "--out", "{text}"), r"--out .* is an existing file"),
]


@pytest.mark.parametrize("argv,match", CLI_CASES, ids=lambda v: " ".join(v)[:40] if isinstance(v, tuple) else "")
def test_cli_errors_are_one_line_without_traceback(argv: tuple, match: str, junk: dict[str, Path], capsys) -> None:  # noqa: ANN001
    before = _files(junk["dir"])
    start = time.perf_counter()
    code, err = _cli(capsys, *(a.format(**junk) for a in argv))
    _one_line_error(code, err, match)
    assert time.perf_counter() - start < 10  # refused before any model is loaded
    assert _files(junk["dir"]) == before


def test_cli_study_status_of_a_text_file_in_a_folder_of_dbs(junk: dict[str, Path], capsys) -> None:  # noqa: ANN001
    (junk["dir"] / "x.sqlite").write_text("not sqlite")
    code, err = _cli(capsys, "study", "status", str(junk["dir"]))
    _one_line_error(code, err, r"x\.sqlite is not an SQLite database")


def test_cli_merge_of_a_corrupted_delta_is_one_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from tiny import make_tokenizer

    folder = _saved(tmp_path, task="toy", task_type="classification", labels=["a", "b", "c"])
    make_model("bert").save_pretrained(tmp_path / "backbone")
    make_tokenizer(["x"]).save_pretrained(tmp_path / "backbone")
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-2] ^= 0x10
    (folder / WEIGHTS).write_bytes(bytes(data))
    code, err = _cli(capsys, "merge", str(tmp_path / "backbone"), str(folder), str(tmp_path / "merged"))
    _one_line_error(code, err, "corrupted or edited")
    assert not (tmp_path / "merged").exists()


def test_cli_bug_says_internal_error_and_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    import deltatune.cli as cli

    def broken(args: object) -> int:
        raise AttributeError("'NoneType' object has no attribute 'x'")

    monkeypatch.setitem(cli.COMMANDS, "tasks", (*cli.COMMANDS["tasks"][:2], broken))
    code, err = _cli(capsys, "tasks")
    _one_line_error(code, err, r"internal error: AttributeError: .*rerun with --debug")
    assert code == 3
    with pytest.raises(AttributeError):
        cli.main(["tasks", "--debug"])


# ============================================================================ the study
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("errors-study")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")  # the spec checks the folder; nothing loads it here
    task = root / "toy"
    task.mkdir()
    for split in ("train", "dev", "test"):
        rows = [{"text": f"a {i}", "label": i % 2} for i in range(8)]
        (task / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (task / "meta.json").write_text(json.dumps({"name": "toy", "type": "classification", "labels": ["n", "p"]}))
    return {"model": str(root / "model"), "task": str(task)}


@pytest.mark.parametrize(
    "over,match",
    [
        (
            {"methods": {"lora@x/../../../escaped": {}}},
            r"methods\.lora@x/\.\./\.\./\.\./escaped: .* cannot name a folder",
        ),
        ({"methods": {"lora/x": {}}}, "cannot name a folder; use letters, digits"),
        ({"methods": {"..": {}}}, "cannot name a folder"),
        ({"name": "../../outside"}, r"name: '\.\./\.\./outside' cannot name a folder"),
        ({"models": [".."]}, r"models: '\.\.' does not end in a folder name; give the model folder by its path"),
        ({"seeds": []}, r"seeds: \[\] are not all integers"),
        ({"seeds": [True]}, "are not all integers"),
        ({"methods": {"lora": 3}}, r"methods\.lora: settings must be a mapping, got 3"),
        ({"methods": {"lora": {"r": 2.5}}}, r"methods\.lora\.lora: LoRAConfig\.r must be a positive integer"),
        ({"methods": {"lora": {"dropout": 1}}}, r"LoRAConfig\.dropout must be in \[0, 1\)"),
        # found by the session-6 probe: these ran and "succeeded", or failed in every run without a word
        ({"train": {"lr": -1}}, r"train\.lr: must be a number above 0, got -1"),
        ({"train": {"max_length": 0}}, r"train\.max_length: must be at least 1, got 0"),
        ({"train": {"epochs": float("nan")}}, r"train\.epochs: must be a finite number"),
        ({"train": {"batch_size": 2.5}}, r"train\.batch_size: must be a whole number"),
        ({"train": {"mixed_precision": "fp8"}}, r"train\.mixed_precision: must be one of no, bf16, fp16"),
        ({"k_shot": True}, r"k_shot: True is not a positive integer"),
        ({"threads": 100_000}, r"threads: 100000 is more than \d+ \(4 per core here\)"),
        ({"seeds": [-5]}, r"seeds: \[-5\] holds a repeat or a seed outside 0\.\.4294967295"),
        ({"seeds": [1, 1]}, "holds a repeat"),
        ({"seeds": list(range(100_000))}, r"the grid is 100,000 runs, more than 20,000; split it"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_study_spec_errors(world: dict[str, str], over: dict, match: str, tmp_path: Path) -> None:
    from deltatune.study.spec import SpecError, parse_spec

    raw = {"models": [world["model"]], "tasks": [world["task"]], "methods": {"lora": {}}} | over
    with pytest.raises(SpecError, match=match):
        parse_spec(raw)
    assert list(tmp_path.iterdir()) == []


def _alive(pid: int) -> bool:
    """Running (a zombie holds no memory: it counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_process_workers_die_with_their_runner(tmp_path: Path) -> None:
    script = (
        "import os, sys, time\n"
        "from deltatune.study.executors import ProcessExecutor\n"
        "ex = ProcessExecutor(2)\n"
        "pids = {ex.pool.submit(os.getpid).result() for _ in range(8)}\n"
        "ex.pool.submit(time.sleep, 300)\n"
        "print(' '.join(map(str, pids)), flush=True)\n"
        "time.sleep(300)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        workers = [int(p) for p in runner.stdout.readline().split()]
        assert workers and all(_alive(p) for p in workers)
        runner.send_signal(signal.SIGKILL)  # no shutdown, no atexit: what kill -9 does
        runner.wait(timeout=10)
        deadline = time.time() + 15
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "workers outlived their runner"
    finally:
        runner.kill()


# ============================================================================ names and exports
@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "", "x" * 101, "a\nb", 3])
def test_delta_names_that_could_leave_their_folder_are_refused(name: object) -> None:
    model = make_model("bert")
    dm = dt.DeltaModel(model)
    with pytest.raises(ValueError, match="delta name must be a non-empty string .* without dots or slashes"):
        dm.add(name, dt.METHODS["lora"]())  # type: ignore[arg-type]
    assert list(dm.deltas) == [] and _no_trace(model)


def test_exporting_over_a_file_is_refused_and_stale_exports_are_cleaned(tmp_path: Path) -> None:
    dm = _perturbed(dt.attach(make_model("bert"), dt.METHODS["lora"]()))
    (tmp_path / "file").write_text("keep")
    with pytest.raises(FileExistsError, match="is a file; choose a new folder"):
        dm.export_merged(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.tmp-{int(dead.stdout)}-q"
    stale.mkdir()
    dm.export_merged(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists() and not stale.exists()


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


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_non_utf8_data_file_names_the_file_and_line(tmp_path: Path, suffix: str) -> None:
    from deltatune.data.files import DataError, _read_file

    file = tmp_path / f"train{suffix}"
    head, good = ("", '{"text": "ok", "label": 0}\n') if suffix == ".jsonl" else ("text,label\n", "ok,0\n")
    bad = b'{"text": "caf\xe9", "label": 1}\n' if suffix == ".jsonl" else b"caf\xe9,1\n"
    file.write_bytes((head + good * 3).encode() + bad)
    line = 4 if suffix == ".jsonl" else 5
    with pytest.raises(
        DataError, match=rf"train{suffix}, line {line}: byte 0xe9 is not UTF-8; re-save the file as UTF-8"
    ):
        _read_file(file)


@pytest.mark.parametrize(
    "argv,match",
    [
        (
            ("train", "--lr", "abc"),
            r"deltatune train: error: argument --lr: 'abc' is not a number above 0; see `deltatune train --help`",
        ),
        (("study", "run"), r"the following arguments are required: spec; see `deltatune study run --help`"),
        (("nosuch",), r"invalid choice: 'nosuch' .*; see `deltatune --help`"),
    ],
)
def test_cli_usage_errors_are_one_line_and_return(argv: tuple, match: str, capsys) -> None:  # noqa: ANN001
    code, err = _cli(capsys, *argv)
    _one_line_error(code, err, match)
    assert code == 2


def test_kill_9_during_repeated_saves_always_leaves_a_whole_delta(tmp_path: Path) -> None:
    """A writer saving two deltas in turn into one folder is killed at random moments: every load gets one of them."""
    folder = tmp_path / "d"
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import deltatune as dt\n"
        "from tiny import make_model\n"
        "dms = []\n"
        "for seed in (0, 1):\n"
        "    dm = dt.attach(make_model('bert'), dt.METHODS['lora']())\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    with torch.no_grad():\n"
        "        for p in dm.delta().parameters():\n"
        "            p.add_(torch.randn(p.shape, generator=g))\n"
        "    dms.append(dm)\n"
        "print('ready', flush=True)\n"
        "i = 0\n"
        "while True:\n"
        f"    dms[i % 2].save_delta({str(folder)!r}, padding='x' * 200000)\n"
        "    i += 1\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    expected = []
    for seed in (0, 1):
        dm = dt.attach(make_model("bert"), dt.METHODS["lora"]())
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in dm.delta().parameters():
                p.add_(torch.randn(p.shape, generator=g))
        expected.append(logits(dm, make_inputs(dm.backbone)))
        if seed == 0:
            dm.save_delta(folder)
    (folder / "mine.txt").write_text("keep")
    for delay in (0.05, 0.2):
        writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        model = make_model("bert")
        got = logits(dt.load_delta(model, folder), make_inputs(model))
        assert any(torch.equal(got, e) for e in expected)
        assert (folder / "mine.txt").read_text() == "keep"
        assert sorted(p.name for p in folder.iterdir()) == [META, WEIGHTS, "mine.txt"]


def test_api_type_mistakes_get_a_sentence_not_a_stack_of_internals() -> None:
    with pytest.raises(
        ValueError,
        match="lora has no setting 'rank'; its settings: alpha, alpha_pattern, dropout, layers, r, rank_pattern, targets",
    ):
        dt.get_config("lora", rank=4)
    with pytest.raises(TypeError, match="expected a transformers model .*got str"):
        dt.DeltaModel("bert-base")  # type: ignore[arg-type]
    model = make_model("bert")
    dm = dt.DeltaModel(model)
    with pytest.raises(TypeError, match="enabled must be True or False, got 'no'"):
        dm.add("a", dt.METHODS["lora"](), enabled="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got the class LoRAConfig; pass an instance"):
        dm.add("a", dt.METHODS["lora"])  # the class, not a config  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="unknown method 'lroa'; did you mean lora"):
        dm.add("a", "lroa")
    assert list(dm.deltas) == [] and _no_trace(model)
    # a method name attaches it with its defaults, as get_config(name) does
    assert dt.attach(make_model("bert"), "lora").delta().config == dt.get_config("lora")


def test_cli_refuses_to_add_study_tables_to_someone_elses_database(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    import sqlite3

    db = tmp_path / "app.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    for argv in (("study", "status", str(db)), ("study", "run", "smoke", "--db", str(db))):
        code, err = _cli(capsys, *argv)
        _one_line_error(code, err, r"app\.sqlite is an SQLite database of something else \(tables users\)")
    assert db.read_bytes() == before


def test_a_delta_from_before_signatures_is_checked_by_its_probes(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_meta(folder, lambda m: (m["backbone"].pop("signatures"), m.pop("weights_sha256")))
    dt.load_delta(make_model("bert"), folder)  # the same backbone: accepted (with the one-time warning)
    _refused_load(folder, "same shapes but other weights", make_model("bert", seed=5))


# ============================================================================ found by the session-6 probe
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


def test_load_delta_state_dict_names_stray_keys_and_shapes_in_one_line() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"]())
    own = dict(dm.delta_state_dict())
    before = {k: v.clone() for k, v in own.items()}
    with pytest.raises(dt.DeltaError, match=r"unexpected keys \['bert\.embeddings\.word_embeddings\.weight'\]"):
        dm.load_delta_state_dict("default", {**own, "bert.embeddings.word_embeddings.weight": torch.zeros(100, 32)})
    with pytest.raises(dt.DeltaError, match=r"shape \(3, 3\) for .*, here \(8, 32\)"):
        dm.load_delta_state_dict("default", {k: torch.zeros(3, 3) for k in own})
    assert all(torch.equal(before[k], v) for k, v in dm.delta_state_dict().items())


@pytest.mark.parametrize(
    "method,kwargs,match",
    [
        ("lora", {"r": 64}, r"LoRAConfig\.r is 64, but BertForSequenceClassification has a hidden size of 32"),
        ("adapter", {"bottleneck": 1000}, r"AdapterConfig\.bottleneck is 1000, .* hidden size of 32 .*use at most 32"),
        ("loha", {"r": 100}, r"LoHaConfig\.r is 100"),
        ("adalora", {"init_r": 33}, r"AdaLoRAConfig\.init_r is 33"),
    ],
)
def test_size_settings_are_bounded_by_the_model(method: str, kwargs: dict, match: str) -> None:
    model = make_model("bert")
    before = state(model)
    with pytest.raises(ValueError, match=match):
        dt.attach(model, dt.METHODS[method](**kwargs))
    assert same_state(before, state(model)) and _no_trace(model)
    dt.attach(make_model("bert"), dt.METHODS[method](**{k: 32 for k in kwargs}))  # the limit itself is allowed
    with pytest.raises(ValueError, match=r"LoRAConfig\.rank_pattern is 1000, .*use at most 32"):
        dt.attach(model, dt.METHODS["lora"](rank_pattern={"query": 1000}))  # per-module ranks too


def test_long_values_and_layer_ranges_give_short_messages() -> None:
    with pytest.raises(ValueError, match=r"got \[\['attn\.q'\], .*\.\.\. \(100000 items\)") as err:
        dt.attach(make_model("bert"), dt.METHODS["lora"](targets=[["attn.q"]] * 100_000))
    assert len(str(err.value)) < 300
    start = time.perf_counter()
    with pytest.raises(dt.TargetError, match=r"layers 0-99999999 do not exist: the model has layers 0-1"):
        dt.attach(make_model("bert"), dt.METHODS["lora"](layers="0-99999999"))
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize(
    "text,match",
    [
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),
        ("description: '" + "x" * (1 << 20) + "'\n", r"bytes, more than 1,048,576; a spec is a few kilobytes"),
        (
            "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
            + "".join(
                f"{c}: &{c} [" + ",".join([f"*{p}"] * 10) + "]\n" for p, c in zip("abcdef", "bcdefg", strict=True)
            ),
            r"more than 100,000 values \(YAML aliases expanded\)",
        ),
        ("", "the file is empty"),
    ],
    ids=["deep", "huge", "aliases", "empty"],
)
def test_study_spec_files_are_bounded_before_anything_is_built(tmp_path: Path, text: str, match: str) -> None:
    """5,000 nested brackets crashed the interpreter (SystemError, then a segfault); a 30 MB spec ran."""
    from deltatune.study.spec import SpecError, load_spec

    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(SpecError, match=match):
        load_spec(tmp_path / "s.yaml")


def test_cli_found_by_the_probe(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """--threads 100000 segfaulted torch; --seed -5 named no flag; --out/merge onto a file gave an errno."""
    (tmp_path / "file").write_text("precious")
    cases = [
        (("train", "--threads", "100000"), r"argument --threads: must be a whole number of at least 1 and at most"),
        (("train", "--seed", "-5"), r"argument --seed: must be a whole number from 0 to 4294967295"),
        (("train", "--out", str(tmp_path / "file")), r"--out .*file is an existing file; pass a folder"),
        (("merge", "minilm-l6", str(tmp_path), str(tmp_path / "file")), r"not a delta folder|is an existing file"),
    ]
    for argv, match in cases:
        code, err = _cli(capsys, *argv)
        _one_line_error(code, err, match)
    assert (tmp_path / "file").read_text() == "precious"


def test_cli_inspect_of_a_corrupted_delta_says_so_and_reseal_is_a_command(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = _saved(tmp_path)
    _edit_meta(folder, lambda m: m["config"].update(alpha=8.0), reseal=False)
    code, err = _cli(capsys, "inspect", str(folder))
    _one_line_error(code, err, r"delta\.json is edited or corrupted")
    assert _cli(capsys, "reseal", str(folder))[0] == 0
    from deltatune.cli import main

    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "config: targets=" in out and "alpha=8.0" in out and "integrity: ok" in out


def test_a_one_class_task_is_refused(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"text": f"t {i}", "label": "a"}) + "\n" for i in range(10)))
    code, err = _cli(capsys, "train", "--task", str(data), "--dev-split", "0.2", "--out", str(tmp_path / "run"))
    _one_line_error(code, err, r"has one class only \(\['a'\]\): there is nothing to tell apart")
    assert not (tmp_path / "run").exists()


def test_a_max_length_beyond_the_model_is_refused_by_the_cli_and_the_spec(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """--max-length 100000 on long texts ended in torch's 'size of tensor a (2002) must match ... (512)'."""
    from deltatune.study.spec import SpecError, parse_spec

    make_model("bert").save_pretrained(tmp_path / "tiny")  # 64 positions
    raw = {"models": [str(tmp_path / "tiny")], "tasks": ["sst2"], "methods": {"lora": {}}, "train": {"max_length": 65}}
    with pytest.raises(SpecError, match=r"train\.max_length 65 is more than .*tiny can read \(64 positions\)"):
        parse_spec(raw)
    parse_spec({**raw, "train": {"max_length": 64}})
    code, err = _cli(
        capsys, "eval", "--delta", str(_saved(tmp_path)), "--model", str(tmp_path / "tiny"), "--max-length", "100"
    )
    _one_line_error(code, err, r"--max-length 100 is more than .*tiny can read \(64 positions\); use at most 64")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"rank_pattern": {"query": 0}},
            r"LoRAConfig\.rank_pattern values must be a positive integer, got 0 for 'query'",
        ),
        ({"rank_pattern": {"query": 2.5}}, r"rank_pattern must be a mapping of strings to integers or None"),
        ({"rank_pattern": {1: 2}}, r"rank_pattern must be a mapping of strings to integers or None"),
        ({"alpha_pattern": {"query": -1}}, r"alpha_pattern values must be a finite number > 0, got -1 for 'query'"),
        ({"alpha_pattern": {"query": float("nan")}}, r"alpha_pattern must be a mapping of strings to finite numbers"),
    ],
)
def test_per_module_mappings_are_checked_from_their_declared_types(settings: dict, message: str) -> None:
    """dict[str, X] settings get their types and ranges from the declaration, as scalar settings do."""
    with pytest.raises(ValueError, match=message):
        dt.METHODS["lora"](**settings).validate()
