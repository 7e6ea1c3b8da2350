"""One `deltatune train` per output folder, and no earlier run replaced without being asked.

The default --out names the task, method, model and seed, not the learning rate or the budget, so
two terminals trying two rates wrote into one folder at once: both "succeeded", metrics.jsonl held
both curves interleaved (every step twice), and delta-lora/ and result.json were whichever run ended
last. Run again later, a folder's finished run was replaced without a word. Now the folder is
claimed with a lock file that names its process (a dead one's lock is taken over), and a finished or
unfinished run in it is kept unless --overwrite (or --resume) says otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

LOCK = ".deltatune-train.lock"
# what a run writes in its folder (train/run.py, train/trainer.py): --overwrite removes these only
RUN_FILES = ("result.json", "run.json", "metrics.jsonl", "checkpoint", "model")  # model: full fine-tuning's


def _launch() -> str:
    """The distributed launch this process belongs to ('' outside one): its processes share a folder."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or ":".join(
        os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT")
    ).strip(":")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The live run that holds the lock (None: no lock, or its process is gone on this host)."""
    try:
        held = json.loads(path.read_text())
        pid, host = int(held["pid"]), str(held["host"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):  # a torn or foreign file: whoever wrote it is not a run
        return None
    if host == socket.gethostname() and not _alive(pid):
        return None
    return held


def _refuse_held(out: Path, held: dict) -> None:
    ago = time.time() - float(held.get("started", time.time()))
    where = "" if held["host"] == socket.gethostname() else f" on {held['host']}"
    gone = f"; if that run is gone, delete {out / LOCK}" if where else ""
    raise ValueError(
        f"another deltatune train (pid {held['pid']}{where}, started {ago:.0f} s ago) is writing to {out}; "
        f"wait for it to end, or choose another --out{gone}"
    )


def _check_earlier(out: Path, resume: bool, overwrite: bool) -> None:
    if overwrite or (resume and (out / "checkpoint").exists()):
        return
    if resume and not (out / "result.json").exists():
        raise ValueError(f"{out} holds no run to resume; drop --resume to start the run afresh")
    if (out / "result.json").exists():
        try:
            info = json.loads((out / "run.json").read_text())
            what = f" ({info.get('label')} on {info.get('task')})"
        except (OSError, ValueError):
            what = ""
        done = "; it finished, so there is nothing to resume" if resume else ""
        raise ValueError(
            f"{out} holds a finished run{what}{done}; choose another --out, or pass --overwrite to replace it"
        )
    if (out / "checkpoint").exists():
        raise ValueError(f"{out} holds an unfinished run; --resume continues it, --overwrite starts afresh")


def claim(out: Path, resume: bool, overwrite: bool, main: bool) -> Callable[[], None]:
    """Check `out` and (on the main process) lock it; returns the release to call when the run ends."""
    held = _holder(out / LOCK)
    if held is not None and (main or held.get("launch") != _launch() or not _launch()):
        _refuse_held(out, held)
    _check_earlier(out, resume, overwrite)
    if not main:
        return lambda: None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "launch": _launch()}
    try:
        if held is None:
            (out / LOCK).unlink(missing_ok=True)  # a dead run's
        fd = os.open(out / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # another run claimed it between the check and here
        _refuse_held(out, _holder(out / LOCK) or {"pid": "?", "host": socket.gethostname()})
    with os.fdopen(fd, "w") as fh:
        json.dump(me, fh)
    if overwrite and not resume:  # the earlier run's files go, so none of them passes for the new run's
        for target in [out / name for name in RUN_FILES] + sorted(out.glob("delta-*")):
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    def release() -> None:
        try:
            if json.loads((out / LOCK).read_text()).get("pid") == me["pid"]:
                (out / LOCK).unlink()
            if created and not any(out.iterdir()):  # a run that failed before writing anything leaves nothing
                out.rmdir()
        except (OSError, ValueError):
            pass

    return release
