"""Files made by something other than this deltatune (another release, a hand edit, a spreadsheet): each is
refused in one line that says what the file is and what to do, not with a message about something else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from errors_helpers import _edit_meta, _refused_load, _saved
from tiny import make_model

import deltatune as dt
from deltatune.cli import predict_io
from deltatune.core import io
from deltatune.data import DataError, load_task

# ----------------------------------------------------------------------------- delta.json of another format


def test_a_delta_of_a_newer_format_says_to_upgrade(tmp_path: Path) -> None:
    """A newer release's delta was "not a deltatune delta description": it read as a corrupted file."""
    folder = _saved(tmp_path)
    _edit_meta(folder, lambda m: m.update(format="deltatune.delta/2"))
    _refused_load(folder, r"written by a newer deltatune in format 'deltatune\.delta/2'.*pip install -U deltatune")
    # only "deltatune.delta/<N>" is another release's; a 5000-digit N must not reach int() (4300 digits at most)
    for fmt in ("peft.adapter/1", "deltatune.delta/x", "deltatune.delta/" + "9" * 5000, 2):
        _edit_meta(folder, lambda m, fmt=fmt: m.update(format=fmt))
        with pytest.raises(dt.DeltaIOError, match="is not a deltatune delta description"):
            io.read_meta(folder)


def test_a_newer_format_is_named_even_where_its_layout_changed(tmp_path: Path) -> None:
    """A later format may drop keys this one needs ('config'): its version is what to report, not the layout."""
    folder = _saved(tmp_path)
    _edit_meta(folder, lambda m: (m.update(format="deltatune.delta/3"), m.pop("config")))
    with pytest.raises(dt.DeltaIOError, match="written by a newer deltatune") as info:
        io.read_meta(folder)
    assert "\n" not in str(info.value)


def test_a_delta_of_an_older_format_names_the_format_this_release_reads(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_meta(folder, lambda m: m.update(format="deltatune.delta/0"))
    _refused_load(folder, r"older format 'deltatune\.delta/0'; this deltatune \S+ reads only 'deltatune\.delta/1'")


# ----------------------------------------------------------------------------- delta.json without its backbone


def test_a_delta_json_without_its_backbone_record_says_so(tmp_path: Path) -> None:
    """It compared the model with an empty record: "trained on None (None, unnamed, 0 parameters)". The refusal
    belongs to the identity check, so strict_backbone=False (no check asked for) still loads the delta."""
    folder = _saved(tmp_path)
    _edit_meta(folder, lambda m: m.pop("backbone"))
    _refused_load(folder, r"delta\.json has no 'backbone' record \(was delta\.json edited\?\).*save the delta again")
    assert "default" in dt.load_delta(make_model("bert"), folder, strict_backbone=False).deltas


# ----------------------------------------------------------------------------- a header naming a column twice

DUPLICATE = "text,text,label\ntitle one,body one is long,1\ntitle two,body two,0\n"


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t"), (".csv", ";")])
def test_a_header_naming_a_column_twice_is_refused(tmp_path: Path, suffix: str, sep: str) -> None:
    """csv.DictReader keeps the last of two same-named cells: the titles were dropped without a word."""
    path = tmp_path / f"mine{suffix}"
    path.write_text(DUPLICATE.replace(",", sep))
    with pytest.raises(DataError) as info:
        load_task(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}, line 1: the header names column 'text' twice (columns 1 and 2)")
    assert "rename one" in msg and "\n" not in msg


def test_predict_input_with_a_duplicated_column_is_refused_too(tmp_path: Path) -> None:
    """`deltatune predict --input` reads CSV through the same reader: it predicted from the second text alone.
    Blank header cells (trailing delimiters: unnamed, unread columns) are not duplicates."""
    path = tmp_path / "input.csv"
    path.write_text("text,,\nfine,,\n")
    assert [mapped for _, mapped in predict_io.read_rows(str(path), None)] == [{"text": "fine"}]
    path.write_text("text,text\nfirst,second\n")
    with pytest.raises(DataError, match="names column 'text' twice"):
        predict_io.read_rows(str(path), None)


def test_a_truncated_gguf_is_named_cut_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download cut short failed as `cannot reshape array of size 3214336 into shape (49152,612)`."""
    gguf = pytest.importorskip("gguf")
    from deltatune.backbones import model_path

    whole = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(whole), "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size - 4000])
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        ValueError, match=r"cut\.gguf is cut short or damaged \(.* bytes; .*download or convert it again"
    ):
        model_path(str(cut))
