"""Writing a folder of files so that no crash leaves it half written and nothing else in it is lost.

A new folder is written under a temporary name beside it and renamed into place. An existing folder
(a delta saved again) is updated in place, file by file, because it may hold a user's other files
that must survive: each file is first written completely as `.<name>.pending`, and the *last* file
of the set (the one that describes the others, delta.json) is written last, as `.partial` renamed to
`.pending`, so it appears whole or not at all. Its pending copy is the commit mark: a kill before it
exists leaves the old set intact (the pending files are dropped on the next access); a kill after
it, even between two renames, is rolled forward on the next access.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PENDING = ".pending"


def _fsync_write(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def as_created(folder: Path) -> None:
    """The modes a plain `mkdir` and `open` would give under the process's umask (0755 and 0644 with umask 022).
    `tempfile.mkdtemp` makes its folder 0700 (and transformers' shard writer 0600 files), so every delta, checkpoint
    and merged model folder renamed into place from one was unreadable to another user or a serving process."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_file(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace one file in one rename: readers see the old file or the new one, never half of either.

    The temporary file (`.<name>.tmp-<pid>` beside it, so two writers never share one) is flushed to disk
    before the rename; a crash leaves at most that temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _fsync_write(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def replacing_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; when the block ends without error it takes
    `path`'s place in one rename (a folder already there is moved aside first, then removed), and on an
    error it is removed: readers see the old folder or the new one, never half of it.

    For folders deltatune owns whole (a merged export, a training checkpoint, a PEFT adapter); a delta
    folder, which may hold a user's other files, is updated file by file instead (`write_folder`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        as_created(tmp)
        swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(src: Path, dest: Path) -> None:
    """Rename folder `src` to `dest`, a folder already there moved aside first and removed after.

    Between the two renames another process may put its own folder at `dest` (every rank of a DDP script
    saving at once: `Directory not empty`, 1 save in 10): that one is moved aside in turn, so the folder
    at `dest` is always one writer's, whole.
    """
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    for _ in range(100):
        shutil.rmtree(old, ignore_errors=True)
        if dest.is_dir() and not dest.is_symlink():
            with contextlib.suppress(FileNotFoundError):  # another writer moved it aside first
                os.replace(dest, old)
        try:
            os.replace(src, dest)
            break
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    else:
        raise OSError(errno.EBUSY, f"{dest} kept being replaced by other processes; save again")
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pending(folder: Path, name: str) -> Path:
    return folder / f".{name}{PENDING}"


def clean_stale(path: Path) -> None:
    """Remove temporary folders that interrupted writes of `path` left beside it (their writer is dead)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.removeprefix(f".{path.name}.tmp-").split("-")[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files `write_file`s killed midway left anywhere under `folder` (their writer is dead).

    A kill between writing `.<name>.tmp-<pid>` and renaming it leaves that file: the real one is intact (old or
    absent), but a work folder that is resumed again and again would collect them. Returns what was removed.
    """
    removed = []
    for tmp in Path(folder).rglob(".*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[-1]
        if tmp.is_file() and pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def recover(path: Path, names: list[str]) -> None:
    """Finish or drop an interrupted in-place update of `names` in `path`; a no-op when none was interrupted.

    Roll forward when the commit mark (the pending copy of the last name) exists: every other pending
    file was complete before it was written. Otherwise drop the pending files: the old set is intact.
    """
    path = Path(path)
    if not path.is_dir():
        for old in path.parent.glob(f".{path.name}.old-*"):  # a replace by an older deltatune, cut short
            if old.is_dir() and not path.exists():
                os.replace(old, path)
        return
    _pending(path, names[-1]).with_name(f".{names[-1]}{PENDING}.partial").unlink(missing_ok=True)
    pending = [n for n in names if _pending(path, n).exists()]
    if not pending:
        return
    if names[-1] in pending:
        for n in names:
            try:
                os.replace(_pending(path, n), path / n)
            except FileNotFoundError:  # not part of this update, or another process finished it first
                pass
    else:
        for n in pending:
            _pending(path, n).unlink(missing_ok=True)


def write_folder(path: Path, files: dict[str, bytes]) -> None:
    """Write `files` (in order; the last one commits) into `path`, leaving every other file there untouched."""
    path = Path(path)
    names = list(files)
    if path.is_dir():
        recover(path, names)
        mark = _pending(path, names[-1])
        partial = mark.with_name(mark.name + ".partial")
        try:
            for name, data in list(files.items())[:-1]:
                _fsync_write(_pending(path, name), data)
            # the commit mark appears whole or not at all: written under another name, then renamed
            _fsync_write(partial, files[names[-1]])
            os.replace(partial, mark)
        except BaseException:
            for name in names:
                _pending(path, name).unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
            raise
        recover(path, names)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        for name, data in files.items():
            _fsync_write(tmp / name, data)
        as_created(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
