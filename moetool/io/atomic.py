"""Every file moetool writes appears whole or not at all, and never through a link.

A file is written as a new temporary file beside its destination — created with ``O_EXCL |
O_NOFOLLOW``, so nothing already there is followed or truncated through — optionally put on disk
(``fsync``), and renamed over the destination in one step (:func:`atomic_write`); an error removes the
temporary file and leaves the destination as it was. :func:`create_file` and :func:`remove_entry` are the
two primitives (a writer that fills its file at offsets, ``ShardWriter``, uses them directly);
:func:`fsync_dir` puts a rename on disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# fsync of a folder that the filesystem does not support (it has nothing to put on disk)
_NO_DIR_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def is_folder(path: Path) -> bool:
    """A real folder, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def remove_entry(path: Path) -> None:
    """Remove ``path`` itself: a link or a file is unlinked (what a link points to is untouched), a
    real folder is removed with its contents (``shutil.rmtree`` never follows links inside it)."""
    if is_folder(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def create_file(path: Path) -> int:
    """A new, empty regular file at ``path`` opened read-write. An entry already there (a file, a link,
    an unfinished file of an earlier run) is removed first, never followed or truncated through."""
    remove_entry(path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Put a folder's entries (a rename into it) on disk; a filesystem without folder syncs is skipped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_SYNC:
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Put a file's bytes on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Temp:
    """The temporary file of an :func:`atomic_write`: its ``path`` and a binary ``file`` open on it (a
    writer that writes by name may close ``file`` first)."""

    path: Path
    file: BinaryIO


@contextlib.contextmanager
def atomic_write(
    dst: str | os.PathLike[str], *, fsync: bool, tmp: str | os.PathLike[str] | None = None
) -> Iterator[Temp]:
    """Write ``dst`` through a new temporary file: ``tmp`` (whatever entry has that name is removed
    first), else a fresh name beside ``dst`` that nothing else has. On success the file is flushed, put
    on disk when ``fsync``, and renamed over ``dst`` (a link at ``dst`` is replaced, not followed); on
    any error it is removed and ``dst`` is left as it was."""
    dst = Path(dst)
    if tmp is not None:
        path = Path(tmp)
        fd = create_file(path)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)  # O_EXCL
        path = Path(name)
        os.fchmod(fd, 0o644)
    try:
        with open(fd, "wb") as f:  # closing it flushes it (a body may have closed it already)
            yield Temp(path, f)
        if fsync:
            fsync_file(path)
        os.replace(path, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
