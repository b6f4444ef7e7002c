"""Writing outputs so that nothing is ever half-written: every file and folder lowbit produces is
written under a temporary name beside its destination and renamed into place in one step.

A crash leaves the old output or the new one, never a mix; a folder that another writer finished
in the meantime is not replaced unless the caller asked to overwrite it. Temporary names carry
the writer's host and process id (`.NAME.lowbit-HOST-PID-XXXX`), so that what a killed run left
behind is recognised and removed by the next run that writes beside it (`sweep_stale`), while
the temporaries of a run still alive are left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UserError


class OutputExistsError(UserError):
    """The destination exists and may not be replaced."""


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.lowbit-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _prefix(path: Path) -> str:
    return f".{path.name}.lowbit-{_host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale(path: str | Path) -> list[Path]:
    """Remove the temporaries that runs on this host, now dead, left beside `path` (a kill -9
    during a save leaves its staging folder; a 7B model's is gigabytes). Returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        m = _TEMPORARY.match(entry.name)
        if m is None or m.group("name") != path.name or m.group("host") != _host() or _alive(int(m.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_out_dir(out: str | Path, overwrite: bool, inputs: tuple = (), *, is_file: bool = False) -> Path:
    """Refuse an existing output folder (or file, `is_file`) unless `overwrite`, one that is or holds
    an input (writing it would replace what the run reads), and a place lowbit cannot write to;
    called before any work starts. Removes what dead runs left beside it."""
    out = Path(out)
    resolved = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue  # a short name or a hub id: nothing on disk to protect
        source = Path(given).resolve()
        if source == resolved or resolved in source.parents:
            raise UserError(f"--out {out} would replace the input {given}; choose another --out")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {'file' if is_file else 'folder'} {out} exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and out.is_dir() == is_file:
        raise UserError(f"{out} exists and is not a {'file' if is_file else 'folder'}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: {parent} is not a writable folder; choose another --out")
    sweep_stale(out)
    return out


def ensure_writable_dir(folder: str | Path) -> Path:
    """`folder`, created if needed, or a UserError if lowbit cannot write there (checked before any work)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {folder}: {exc.strerror}; choose a writable place") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {folder}: not writable; choose a writable place")
    return folder


def temporary_dir(out: Path, tag: str = "") -> Path:
    """A fresh folder beside `out`, named so that once this process is dead the next run writing
    beside `out` removes it (`sweep_stale`); stale ones are swept now."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)
        return Path(tempfile.mkdtemp(prefix=_prefix(out) + tag, dir=out.parent))
    except OSError as exc:  # not writable, a file where a folder should be, a full disk
        raise UserError(f"cannot write {out}: {exc.strerror} ({exc.filename}); choose a writable place") from None


def write_dir_atomically(out: str | Path, fill: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Let `fill` write into a fresh temporary folder beside `out`, then move it to `out` in one rename.

    An existing `out` is replaced (with `overwrite`) only after the new one is complete; without
    `overwrite`, an `out` that appeared meanwhile is kept and `OutputExistsError` raised."""
    out = Path(out)
    tmp = temporary_dir(out)
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs get the usual mode
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"{out} was created by another run while this one worked; its output is kept, this one is not written")
            old = temporary_dir(out, "old-")
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let `write` write a temporary file beside `path` (it gets the file's path), then rename it to `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror} ({exc.filename}); choose a writable place") from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@contextlib.contextmanager
def staging_dir(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside `out` (same filesystem, so its contents move into `out` by
    rename), removed when the block ends, whatever happened."""
    tmp = temporary_dir(Path(out), "staging-")
    os.chmod(tmp, 0o777 & ~_umask())  # what moves out of it keeps the usual modes
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
