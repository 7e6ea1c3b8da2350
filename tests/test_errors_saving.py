"""Saves and exports that meet a file, a user's own files, or a kill midway: nothing is left half
written and the previous delta survives. docs/errors.md lists them (the hardening suite: files).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from errors_helpers import SRC, _files, _perturbed, _saved
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.core.io import META, WEIGHTS


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


@pytest.mark.plumbing
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


def test_two_processes_saving_one_folder_of_several_deltas_both_succeed(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Every rank of a DDP script saving at once (no rank check): another process put its `b1` folder in place
    between this save's two renames, and the save failed with `Directory not empty` (1 save in 10). The
    interleaving is forced here; the save moves the other folder aside too, and the folder loads whole."""
    from deltatune.core import atomic

    model = make_model("bert")
    dm = _perturbed(dt.attach(model, "lora"))
    dm.add("b1", "bitfit")
    dm.save_pretrained(tmp_path / "d")
    replace, raced = os.replace, []

    def another_writer_between(src, dst) -> None:  # noqa: ANN001
        replace(src, dst)
        if Path(dst).name.startswith(".b1.old") and not raced:  # b1 moved aside: the other process's b1 lands
            raced.append(1)
            (tmp_path / "d" / "b1").mkdir()
            (tmp_path / "d" / "b1" / "delta.json").write_text("{}")

    monkeypatch.setattr(atomic.os, "replace", another_writer_between)
    dm.save_pretrained(tmp_path / "d")
    assert raced
    again = dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path / "d")
    assert torch.equal(logits(again, make_inputs(model)), logits(dm, make_inputs(model)))
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.startswith(".")]  # nothing left aside
