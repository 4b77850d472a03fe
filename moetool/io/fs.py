"""Filesystem guards every reader and writer goes through.

- ``real_path``: a path with every link resolved, never an exception on a loop of links.
- ``input_roots`` and ``refuse_into_input``: the real folders that hold an input's files, and the rule
  that moetool writes, renames or deletes nothing that resolves into them.
- ``open_regular`` and ``read_small``: only regular files are opened (a FIFO would block forever, a link
  to ``/dev/zero`` would never end), checked before the open and again on the open descriptor, and small
  files (JSON, headers) are read with a byte limit.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from moetool.errors import InputError, UsageError

#: What moetool writes beside a checkpoint's files: their sizes and sha256, and how each tensor came to be.
MANIFEST_NAME = "moetool.json"

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def real_path(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, with every link resolved as far as it resolves. Unlike ``Path.resolve`` on
    Python < 3.13 this never raises on a loop of links: the looping part is left as it is, and opening
    it later fails with ELOOP like any unreadable file."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words (``a FIFO``, ``a directory`` ...)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def input_roots(root: str | os.PathLike[str]) -> list[Path]:
    """Real folders holding an input checkpoint's files: the folder itself, and for a Hub cache
    snapshot (``.../snapshots/<rev>``, whose files are links into ``../../blobs``) that repo's blobs."""
    root = Path(root)
    roots = [real_path(root)]
    for r in (root.absolute(), roots[0]):  # a snapshot given as it is, or through a link to it
        if r.parent.name == "snapshots" and real_path(r.parent.parent / "blobs") not in roots:
            roots.append(real_path(r.parent.parent / "blobs"))
    return roots


def is_within(path: Path, roots: Iterable[Path]) -> bool:
    """Whether real path ``path`` equals or lies inside one of the real paths ``roots``."""
    return any(path == r or path.is_relative_to(r) for r in roots)


def refuse_into_input(
    path: str | os.PathLike[str],
    roots: list[Path],
    *,
    what: str,
    shown: str | None = None,
    follow_last: bool = True,
) -> None:
    """``UsageError`` when ``path`` (a file or folder moetool is about to create, write, rename or
    delete) resolves, links followed, to a path inside an input, or when an input lies inside it.
    With ``follow_last=False`` a link at ``path`` itself is not followed: the entry is what counts
    (what a rename over it would replace)."""
    p = Path(os.path.abspath(os.fspath(path)))
    real = real_path(path) if follow_last else real_path(p.parent) / p.name
    if is_within(real, roots):
        raise UsageError(
            f"{what} resolves into the input ({real})",
            file=shown or str(path),
            fix="choose a path outside the input; moetool never writes into its input",
        )
    inside = [r for r in roots if r.is_relative_to(real)]
    if inside:
        raise UsageError(
            f"the input ({inside[0]}) lies inside {what}",
            file=shown or str(path),
            fix="choose another path; moetool would replace or delete it",
        )


def input_inodes(roots: Iterable[Path]) -> dict[tuple[int, int], Path]:
    """Every regular file under the real folders ``roots`` (or a root that is itself a file) by
    (device, inode): what another name of an input file, anywhere, would share."""
    found: dict[tuple[int, int], Path] = {}
    for root in roots:
        files = [root] if not stat.S_ISDIR(_lstat_mode(root)) else []
        files += [Path(f) / n for f, _, names in os.walk(root) for n in names]
        for p in files:
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.setdefault((st.st_dev, st.st_ino), p)
    return found


def refuse_other_names(
    path: str | os.PathLike[str], inodes: dict[tuple[int, int], Path], *, what: str, tree: bool = False
) -> None:
    """``UsageError`` when the entry ``path`` (with ``tree``, any entry under it, links not followed) is
    another name — a hard link — of an input file: replacing or removing a name of a file changes that
    file's link count and change time, and moetool changes nothing of its input."""
    p = Path(path)
    entries = [p]
    if tree and stat.S_ISDIR(_lstat_mode(p)):
        entries += [Path(f) / n for f, dirs, names in os.walk(p) for n in (*names, *dirs)]
    for e in entries:
        try:
            st = os.lstat(e)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in inodes:
            raise UsageError(
                f"{what} holds another name (a hard link) of the input file {inodes[(st.st_dev, st.st_ino)]}",
                file=str(e),
                fix="remove that name yourself, or choose another path; moetool changes nothing of its "
                "input, not even its link count",
            )


def _lstat_mode(p: Path) -> int:
    try:
        return os.lstat(p).st_mode
    except OSError:
        return 0


def open_regular(path: str | os.PathLike[str], *, what: str = "file") -> int:
    """A read-only descriptor of ``path`` (links followed), refused with an ``InputError`` naming it
    unless it is a regular file. The type is checked before opening (opening a FIFO blocks, opening
    some devices has side effects) and again on the descriptor, in case the file was swapped between."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror}", file=p) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{what} is {kind_of(st.st_mode)}, not a regular file",
            file=p,
            fix="moetool reads only regular files",
        )
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror}", file=p) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{what} is {kind_of(st.st_mode)}, not a regular file", file=p)
    return fd


IDENTITY_KEYS = ("size", "inode", "device", "mtime_ns", "ctime_ns")


def file_identity(st: os.stat_result) -> dict[str, int]:
    """What tells one file's bytes from another's under the same name, cheaply: size, inode, device,
    modification and change times. Another file put in its place has another inode; the same file
    written in place has a new change time, which the kernel sets on every write and no unprivileged
    call can set back (``touch`` restores the modification time only)."""
    return {
        "size": st.st_size,
        "inode": st.st_ino,
        "device": st.st_dev,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def changed_keys(was: dict[str, int], now: dict[str, int]) -> list[str]:
    """Which of ``file_identity``'s values differ."""
    return [k for k in IDENTITY_KEYS if was.get(k) != now.get(k)]


def opened_path(fd: int, path: str | os.PathLike[str]) -> Path:
    """The real path of the file open on ``fd`` (opened as ``path``): what the kernel opened, whatever
    ``path`` pointed to a moment before or after (``/proc/self/fd``; ``real_path(path)`` without it)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return real_path(path)
    return Path(target) if os.path.isabs(target) else real_path(path)


def read_small(
    path: str | os.PathLike[str], limit: int, *, what: str = "file", within: list[Path] | None = None
) -> bytes:
    """All bytes of the regular file ``path``, refused (``InputError`` naming it) past ``limit`` bytes,
    whatever its size claims: never more than ``limit + 1`` bytes are read. With ``within`` (real
    folders) the file actually opened must lie in one of them (a link out of the checkpoint is refused)."""
    fd = open_regular(path, what=what)
    try:
        if within is not None and not is_within(opened_path(fd, path), within):
            raise InputError(
                f"{what} is a symbolic link that points outside the checkpoint",
                file=os.fspath(path),
                fix="replace it with the file it points to",
            )
        if os.fstat(fd).st_size > limit:
            raise InputError(f"{what} is larger than {_size(limit)}", file=os.fspath(path))
        chunks, total = [], 0
        while True:
            b = os.read(fd, min(1 << 20, limit + 1 - total))
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > limit:
                raise InputError(f"{what} is larger than {_size(limit)}", file=os.fspath(path))
        return b"".join(chunks)
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror}", file=os.fspath(path)) from None
    finally:
        os.close(fd)


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n} bytes"
