"""Writing a checkpoint without ever leaving half of one behind.

``OutputDir`` owns ``OUT.partial/``: it refuses an OUT that exists (without ``--overwrite``), equals or
lies inside the input, holds a lock so two runs cannot race for one OUT, and renames to OUT only in
``commit``. ``ShardWriter`` lays out one safetensors file from a precomputed header and fills tensor
byte ranges in any order (a stacked ``[E, N, K]`` tensor is written expert by expert, never assembled
in memory), re-reads it (the sha256 is taken from bytes read back from the file, fed while the rest is
still being written) and checks it before giving it its final name.

Durability is opt-in (``fsync=True``, the CLI's ``--fsync``): without it nothing is flushed to disk
before the renames, as with ``cp`` and rsync; with it every shard is ``fdatasync``'ed in the background
as it grows and fsynced before its rename, and the folders are fsynced around the final rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from moetool.errors import EnvironmentError_, InputError, UsageError
from moetool.io import atomic
from moetool.io.checkpoint import truncated_shard
from moetool.io.fs import (
    input_inodes,
    input_roots,
    is_within,
    open_regular,
    opened_path,
    real_path,
    refuse_into_input,
    refuse_other_names,
)
from moetool.io.hashing import ReadBack
from moetool.io.safetensors_format import DTYPE_NAMES, build_header, read_header

LOCK_NAME = ".moetool.lock"
FLUSH_EVERY = 256 << 20
_FLUSHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moetool-flush")
COPY_CHUNK = 8 << 20
# copy_file_range errors that mean "not between these two files": copy through memory instead.
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ETXTBSY, errno.EBADF}


def os_error(e: OSError, path: Path) -> EnvironmentError_:
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return EnvironmentError_(
            "no space left while writing",
            file=str(path),
            fix="free disk space or choose another OUT; nothing was kept",
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EnvironmentError_("cannot write here", file=str(path), fix="choose a writable OUT")
    return EnvironmentError_(f"write failed: {e.strerror}", file=str(path))


class OutputDir:
    """The life of one output checkpoint: ``OUT.partial/`` → checks → ``commit()`` renames it to OUT.

    The input is never written, renamed or deleted: OUT and OUT.partial are compared with the input by
    real path (links followed) before anything is created, both ways (OUT or its work folder inside the
    input, or the input inside either of them). In the work folder nothing moetool did not create is
    followed: OUT.partial, its subfolders and the lock must not be links, every file is created anew
    (``O_EXCL | O_NOFOLLOW``) after removing whatever entry had its name, and removal unlinks a link
    rather than what it points to.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        source: str | os.PathLike[str] | None,
        overwrite: bool = False,
        resume: bool = False,
        fsync: bool = False,
    ) -> None:
        self.out = out_path(out)
        self.fsync = fsync
        self.partial = self.out.with_name(self.out.name + ".partial")
        if source is not None:
            roots = input_roots(source)
            # what a link there points to (written through), and the entry itself (renamed, removed)
            for follow in (True, False):
                refuse_into_input(self.out, roots, what="OUT", follow_last=follow, shown=os.fspath(out))
                refuse_into_input(
                    self.partial, roots, what="OUT.partial (the folder OUT is written in)", follow_last=follow
                )
        if os.path.lexists(self.out) and not overwrite:
            raise UsageError(
                "OUT already exists", file=str(self.out), fix="pass --overwrite or choose another OUT"
            )
        if source is not None and (resume or overwrite):
            # what this run may replace or remove: no name in it may be a second name of an input file
            inodes = input_inodes(roots)
            refuse_other_names(self.partial, inodes, what="OUT.partial", tree=True)
            if overwrite:
                refuse_other_names(self.out, inodes, what="OUT", tree=True)
        if os.path.lexists(self.out) and not self.out.is_dir():
            raise UsageError("OUT exists and is not a directory", file=str(self.out))
        self.resumed = False
        existed = os.path.lexists(self.partial)
        # Lock before deciding anything about an existing OUT.partial: a run still writing it must be
        # neither resumed nor wiped by a second run.
        self._lock_fd: int | None = self._lock()
        self._ident = _folder_ident(self.partial)
        if existed:
            if resume:
                self.resumed = True
            elif overwrite:
                self._clear_partial()
            else:
                self._unlock()
                raise UsageError(
                    "an earlier run left OUT.partial",
                    file=str(self.partial),
                    fix="pass --resume to continue it or --overwrite to start again",
                )

    def _lock(self) -> int:
        """Create ``OUT.partial`` if needed and take its lock; refuse while another run holds it."""
        try:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.partial)
            _require_folder(self.partial, "OUT.partial")
            fd = os.open(
                self.partial / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _link_error(self.partial / LOCK_NAME) from None
            raise os_error(e, self.partial) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UsageError(
                "the lock file is not a regular file", file=str(self.partial / LOCK_NAME), fix="remove it"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                "another moetool run is writing this OUT",
                file=str(self.out),
                fix="wait for it to finish or choose another OUT",
            ) from None
        return fd

    def _clear_partial(self) -> None:
        """Empty ``OUT.partial`` (``--overwrite``) but keep its lock file, so the lock stays held."""
        try:
            self._remove_where(lambda rel, is_dir: str(rel) != LOCK_NAME, descend=lambda rel: False)
        except BaseException:
            self._unlock()
            raise

    def _mine(self) -> int:
        """A descriptor of OUT.partial, refused (``UsageError`` naming it) unless it is still the real
        folder this run locked: a link or another folder put in its place while the run works (the
        input itself, renamed there) must neither receive this run's files nor lose any of its own."""
        try:
            fd = os.open(self.partial, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd < 0 or _ident_of(os.fstat(fd)) != self._ident:
            if fd >= 0:
                os.close(fd)
            raise UsageError(
                "OUT.partial was replaced while this run wrote it",
                file=str(self.partial),
                fix="another process moved or replaced it; nothing in it was removed; run again",
            )
        return fd

    def check(self) -> None:
        """Refuse to go on unless OUT.partial is still the folder this run locked (before each file
        is created)."""
        os.close(self._mine())

    def _remove_where(self, remove: Callable[[Path, bool], bool], descend: Callable[[Path], bool]) -> None:
        """Remove the entries of OUT.partial that ``remove(rel, is_dir)`` picks, going into the real
        subfolders ``descend(rel)`` picks: through a descriptor of the folder this run locked, so a
        link or folder put in its place is never walked, and entries as entries (a link is unlinked,
        never followed)."""

        def walk(dfd: int, here: Path) -> None:
            with os.scandir(dfd) as entries:
                listed = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            for name, is_dir in listed:
                rel = here / name
                if is_dir and descend(rel):
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                    try:
                        walk(sub, rel)
                    finally:
                        os.close(sub)
                elif remove(rel, is_dir):
                    _remove_at(dfd, name)

        fd = self._mine()
        try:
            walk(fd, Path())
        except OSError as e:
            raise os_error(e, self.partial) from None
        finally:
            os.close(fd)

    @classmethod
    def join(cls, out: str | os.PathLike[str], *, resumed: bool, fsync: bool = False) -> OutputDir:
        """Another rank's handle on the ``OUT.partial`` rank 0 created (no checks, no lock: rank 0
        owns the directory's life)."""
        self = cls.__new__(cls)
        self.out = out_path(out)
        self.fsync = fsync
        self.partial = self.out.with_name(self.out.name + ".partial")
        if not os.path.isdir(self.partial):
            raise UsageError(
                "OUT.partial is not visible to this rank",
                file=str(self.partial),
                fix="under torchrun OUT must be on a filesystem every rank shares",
            )
        _require_folder(self.partial, "OUT.partial")
        self._ident = _folder_ident(self.partial)
        self.resumed = resumed
        self._lock_fd = None
        return self

    def path(self, rel: str) -> Path:
        return self.partial / rel

    def _folders(self, folder: Path) -> None:
        """Create ``folder`` (inside OUT.partial) and its parents, refusing any that is a link."""
        rel = folder.relative_to(self.partial)
        here = self.partial
        for part in rel.parts:
            here = here / part
            with contextlib.suppress(FileExistsError):
                os.mkdir(here)
            _require_folder(here, "a folder in OUT.partial")

    def write_json(self, rel: str, data: Any) -> None:
        """Deterministic JSON (sorted keys, 2-space indent, trailing newline), written atomically."""
        self.write_bytes(rel, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def _atomic(self, rel: str) -> contextlib.AbstractContextManager[atomic.Temp]:
        """Write ``rel`` atomically through ``<rel>.tmp`` (its folders made first, links refused)."""
        dst = self.path(rel)
        self.check()
        self._folders(dst.parent)
        return atomic.atomic_write(dst, fsync=self.fsync, tmp=dst.with_name(dst.name + ".tmp"))

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            with self._atomic(rel) as t:
                t.file.write(data)
        except OSError as e:
            raise os_error(e, self.path(rel)) from None

    def copy_file(self, src: Path, rel: str, *, within: list[Path] | None = None) -> None:
        """Copy the input's regular file ``src`` to ``rel`` (a FIFO or device is refused, not read).
        With ``within`` (real folders), the file actually opened must lie in one of them: a link put in
        its place after the plan checked it, pointing out of the checkpoint, is refused, not copied."""
        sfd = open_regular(src, what="file")
        if within is not None and not is_within(opened_path(sfd, src), within):
            os.close(sfd)
            raise InputError(
                "symbolic link points outside the checkpoint",
                file=str(src),
                fix="replace it with the file it points to",
            )
        try:
            with open(sfd, "rb", closefd=False) as fi, self._atomic(rel) as t:
                shutil.copyfileobj(fi, t.file, COPY_CHUNK)
        except OSError as e:
            raise os_error(e, self.path(rel)) from None
        finally:
            os.close(sfd)

    def prune(self, keep: set[str]) -> None:
        """Remove every entry of OUT.partial but the files ``keep`` (relative paths), their folders and
        the lock: OUT then holds exactly what the run wrote, whatever else an earlier run or someone
        else left in the work folder. Links are removed as links."""
        folders = {p for rel in keep for p in Path(rel).parents if str(p) != "."}
        self._remove_where(
            lambda rel, is_dir: str(rel) not in keep and str(rel) != LOCK_NAME,
            descend=lambda rel: rel in folders,
        )

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_tmp(self) -> None:
        """Remove this run's unfinished ``*.tmp`` files (entries only, never what a link points to)."""
        self._remove_where(
            lambda rel, is_dir: rel.name.endswith(".tmp"), descend=lambda rel: not rel.name.endswith(".tmp")
        )

    def commit(self) -> Path:
        """Rename ``OUT.partial`` to OUT (replacing an old OUT only now, under --overwrite); with
        ``fsync`` the folder is synced before and its parent after the rename. An old OUT that is a
        link is replaced as a link: what it points to is left alone."""
        self._remove_tmp()  # refused unless OUT.partial is still this run's folder
        with contextlib.suppress(FileNotFoundError):
            (self.partial / LOCK_NAME).unlink()
        if self.fsync:
            atomic.fsync_dir(self.partial)
        self.check()
        self._unlock()
        old = None
        if os.path.lexists(self.out):
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            n = 0
            while os.path.lexists(old):  # never rename onto something that exists
                n += 1
                old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}-{n}")
            os.rename(self.out, old)
        os.rename(self.partial, self.out)
        if self.fsync:
            atomic.fsync_dir(self.out.parent)
        if old is not None:
            with contextlib.suppress(OSError):
                atomic.remove_entry(old)
        return self.out

    def abort(self) -> None:
        """Remove everything this run wrote (the input and any old OUT are untouched)."""
        self._unlock()
        try:
            os.close(self._mine())  # only the folder this run locked, never one put in its place
        except UsageError:
            return
        shutil.rmtree(self.partial, ignore_errors=True)

    def release(self) -> None:
        """Leave ``OUT.partial`` for ``--resume`` (an interrupted run)."""
        self._unlock()

    def keep(self) -> None:
        """Leave ``OUT.partial`` for ``--resume`` after a failure: its recorded shards stay, this run's
        unfinished files go."""
        self._unlock()
        with contextlib.suppress(OSError, EnvironmentError_, UsageError):
            self._remove_tmp()


def out_path(out: str | os.PathLike[str]) -> Path:
    """OUT as an absolute path whose last part names the folder to create (``x/..`` resolved);
    the filesystem root is refused."""
    p = Path(out).absolute()
    if p.name in ("", ".", ".."):
        p = real_path(p)
    if not p.name:
        raise UsageError(
            "OUT is the filesystem root", file=str(out), fix="name a new folder for the output checkpoint"
        )
    return p


def _link_error(path: Path) -> UsageError:
    return UsageError(
        "is a symbolic link in the output's work folder",
        file=str(path),
        fix="remove it; moetool never follows a link it did not create",
    )


def _ident_of(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _folder_ident(path: Path) -> tuple[int, int]:
    return _ident_of(os.lstat(path))


def _remove_at(dfd: int, name: str) -> None:
    """Remove the entry ``name`` of the open folder ``dfd``: a real folder with its contents
    (``shutil.rmtree``, which never follows links), anything else unlinked."""
    try:
        st = os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)


def _require_folder(path: Path, what: str) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise _link_error(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(
            f"{what} exists and is not a folder", file=str(path), fix="remove it or choose another OUT"
        )


def write_file_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a new temporary file beside it, renamed over ``path`` only once
    complete: a reader sees the old file or the new one, never a part, and a link at ``path`` is
    replaced, not followed. Returns the absolute path written. ``OSError`` as an ``EnvironmentError_``."""
    dst = Path(path).absolute()
    try:
        with atomic.atomic_write(dst, fsync=fsync) as t:
            t.file.write(data)
    except OSError as e:
        raise os_error(e, dst) from None
    return dst


class ShardWriter:
    """One safetensors file laid out from ``entries`` up front; tensors filled by byte range in any order.

    ``write(name, tensor, start=0)`` copies ``tensor``'s bytes to the tensor's data at byte ``start``
    (for a C-contiguous stacked tensor, expert e's rows [r0, r1) start at ``(e * N + r0) * K * itemsize``);
    ``copy_from`` does the same for bytes of another file, without passing them through memory. Both
    may be called from several threads. ``finish()`` checks every byte range was written, re-reads the
    header, takes the sha256 of the bytes read back (mostly done while the file was still being
    written) and renames ``<name>.tmp`` to ``<name>``; it returns the file's sha256 and size. With
    ``fsync`` the file is also on disk before the rename.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        *,
        fsync: bool = False,
    ) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.prefix, self.spans = build_header(entries, metadata)
        self.entries = {n: (d, tuple(s)) for n, d, s in entries}
        self.size = len(self.prefix) + sum(n for _, n in self.spans.values())
        self.written: dict[str, list[tuple[int, int]]] = {n: [] for n in self.spans}
        self.fsync = fsync
        self._lock = threading.Lock()
        self._unsynced = 0
        self._flush: Future | None = None
        self._readback: ReadBack | None = None
        self.fd = -1
        try:
            self.fd = atomic.create_file(self.tmp)  # never through a link or into a file someone else made
            os.ftruncate(self.fd, self.size)
            self._pwrite(self.prefix, 0)
        except OSError as e:
            self._close_fd()
            raise os_error(e, self.path) from None
        self._readback = ReadBack(self.tmp, self.size)
        self._readback.done(0, len(self.prefix))

    def _pwrite(self, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
            self._wrote(n)

    def _wrote(self, n: int) -> None:
        if not self.fsync:
            return
        with self._lock:
            self._unsynced += n
            if self._unsynced >= FLUSH_EVERY and (self._flush is None or self._flush.done()):
                # start putting written bytes on disk now, so finish() only waits for the tail
                self._unsynced = 0
                self._flush = _FLUSHER.submit(os.fdatasync, self.fd)

    def _check(self, name: str, dtype: str, start: int, nbytes: int) -> int:
        """The file offset of ``nbytes`` of tensor ``name`` at ``start``, after checking dtype and bounds."""
        want, _ = self.entries[name]
        if dtype != want:
            raise InputError(f"internal: writing {dtype} into a {want} tensor", tensor=name)
        offset, total = self.spans[name]
        if start < 0 or start + nbytes > total:
            raise InputError(f"internal: write of {nbytes} bytes at {start} overruns {total}", tensor=name)
        return offset + start

    def _record(self, name: str, start: int, nbytes: int) -> None:
        with self._lock:
            self.written[name].append((start, start + nbytes))
        if self._readback is not None:
            offset = self.spans[name][0] + start
            self._readback.done(offset, offset + nbytes)

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        offset = self._check(name, DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), start, data.numel())
        try:
            self._pwrite(data.numpy().data, offset)
        except OSError as e:
            raise os_error(e, self.path) from None
        self._record(name, start, data.numel())

    def copy_from(
        self, name: str, dtype: str, src_fd: int, src_offset: int, nbytes: int, start: int = 0, *, src: str
    ) -> None:
        """Copy ``nbytes`` at ``src_offset`` of the open file ``src_fd`` (named ``src`` in errors) into
        tensor ``name`` (safetensors ``dtype``) at byte ``start``. In the kernel (copy_file_range) where
        the filesystems allow it, else through a bounded buffer."""
        offset = self._check(name, dtype, start, nbytes)
        done = 0
        try:
            while done < nbytes:
                try:
                    n = os.copy_file_range(src_fd, self.fd, nbytes - done, src_offset + done, offset + done)
                except OSError as e:
                    if e.errno not in _NO_COPY_RANGE:
                        raise
                    n = self._copy_through_memory(src_fd, src_offset + done, offset + done, nbytes - done)
                if n <= 0:
                    raise truncated_shard(src, name, done, nbytes)
                self._wrote(n)
                done += n
        except OSError as e:
            raise os_error(e, self.path) from None
        self._record(name, start, nbytes)

    def _copy_through_memory(self, src_fd: int, src_offset: int, offset: int, nbytes: int) -> int:
        """Copy up to ``nbytes`` with pread/pwrite; returns how many were copied (0 at the source's end)."""
        buf = memoryview(bytearray(min(nbytes, COPY_CHUNK)))
        done = 0
        while done < nbytes:
            n = os.preadv(src_fd, [buf[: min(len(buf), nbytes - done)]], src_offset + done)
            if n <= 0:
                break
            view = buf[:n]
            while view.nbytes:
                w = os.pwrite(self.fd, view, offset + done)
                view, done = view[w:], done + w
        return done

    def finish(self) -> tuple[str, int]:
        for name, (_, nbytes) in self.spans.items():
            hole = _first_hole(self.written[name], nbytes)
            if hole is not None:
                raise InputError(
                    f"internal: bytes from {hole} of {nbytes} were never written",
                    file=str(self.path),
                    tensor=name,
                )
        assert self._readback is not None
        try:
            if self.fsync:
                if self._flush is not None:
                    self._flush.result()
                os.fsync(self.fd)
            digest = self._readback.digest()
            self._readback.close()
            self._close_fd()
            header = read_header(self.tmp)
            if {k: (v.dtype, v.shape) for k, v in header.tensors.items()} != self.entries:
                raise InputError("re-read header differs from what was written", file=str(self.path))
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise os_error(e, self.path) from None
        return digest, self.size

    def close(self) -> None:
        if self._readback is not None:
            self._readback.close()
        if self._flush is not None:  # never let a flush run on a closed (and reused) descriptor
            with contextlib.suppress(OSError):
                self._flush.result()
        self._close_fd()

    def _close_fd(self) -> None:
        # once only: a descriptor number closed twice may by then belong to another thread's file
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _first_hole(ranges: list[tuple[int, int]], nbytes: int) -> int | None:
    """The first byte of ``[0, nbytes)`` no range covers, or None (ranges may overlap or repeat)."""
    pos = 0
    for start, end in sorted(ranges):
        if start > pos:
            return pos
        pos = max(pos, end)
    return pos if pos < nbytes else None


def write_index(out: OutputDir, weight_map: dict[str, str], total_size: int) -> None:
    out.write_json(
        "model.safetensors.index.json",
        {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
    )
