"""Writing outputs so that nothing is ever half-written: every file and folder lowbit produces is
written under a temporary name beside its destination and renamed into place in one step.

A crash leaves the old output or the new one, never a mix; a folder that another writer finished
in the meantime is not replaced unless the caller asked to overwrite it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UserError


class OutputExistsError(UserError):
    """The destination exists and may not be replaced."""


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless `overwrite`; called before any work starts."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    return out


def _temporary_dir(out: Path, tag: str = "") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}-{tag}", dir=out.parent))


def write_dir_atomically(out: str | Path, fill: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Let `fill` write into a fresh temporary folder beside `out`, then move it to `out` in one rename.

    An existing `out` is replaced (with `overwrite`) only after the new one is complete; without
    `overwrite`, an `out` that appeared meanwhile is kept and `OutputExistsError` raised."""
    out = Path(out)
    tmp = _temporary_dir(out)
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs get the usual mode
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"{out} was created by another run while this one worked; its output is kept, this one is not written")
            old = _temporary_dir(out, "old-")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
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
    tmp = _temporary_dir(Path(out), "staging-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
