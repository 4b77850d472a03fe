"""Writing a checkpoint without ever leaving half of one behind.

``OutputDir`` owns ``OUT.partial/``: it refuses an OUT that exists (without ``--overwrite``), equals or
lies inside the input, holds a lock so two runs cannot race for one OUT, and renames to OUT only in
``commit``. ``ShardWriter`` lays out one safetensors file from a precomputed header and fills tensor
byte ranges in any order (a stacked ``[E, N, K]`` tensor is written expert by expert, never assembled
in memory), then syncs, re-reads and checks it before giving it its final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from moetool.errors import EnvironmentError_, InputError, UsageError
from moetool.io.safetensors_format import DTYPE_NAMES, build_header, read_header

LOCK_NAME = ".moetool.lock"
FLUSH_EVERY = 256 << 20
_FLUSHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moetool-flush")
HASH_CHUNK = 16 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """The life of one output checkpoint: ``OUT.partial/`` → checks → ``commit()`` renames it to OUT."""

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        source: str | os.PathLike[str] | None,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        self.out = Path(out).absolute()
        self.partial = self.out.with_name(self.out.name + ".partial")
        src = Path(source).resolve() if source is not None else None
        real_out = self.out.resolve()
        if src is not None:
            if real_out == src or real_out.is_relative_to(src):
                raise UsageError(
                    "OUT equals or lies inside the input checkpoint",
                    file=str(self.out),
                    fix="choose an OUT outside the input folder",
                )
            if src.is_relative_to(real_out):
                raise UsageError("the input lies inside OUT", file=str(self.out), fix="choose another OUT")
        if self.out.exists() and not overwrite:
            raise UsageError(
                "OUT already exists", file=str(self.out), fix="pass --overwrite or choose another OUT"
            )
        if self.out.exists() and not self.out.is_dir():
            raise UsageError("OUT exists and is not a directory", file=str(self.out))
        self.resumed = False
        existed = self.partial.exists()
        # Lock before deciding anything about an existing OUT.partial: a run still writing it must be
        # neither resumed nor wiped by a second run.
        self._lock_fd: int | None = self._lock()
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
            self.partial.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.partial / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise os_error(e, self.partial) from None
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
            for p in self.partial.iterdir():
                if p.name == LOCK_NAME:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        except OSError as e:
            self._unlock()
            raise os_error(e, self.partial) from None

    @classmethod
    def join(cls, out: str | os.PathLike[str], *, resumed: bool) -> OutputDir:
        """Another rank's handle on the ``OUT.partial`` rank 0 created (no checks, no lock: rank 0
        owns the directory's life)."""
        self = cls.__new__(cls)
        self.out = Path(out).absolute()
        self.partial = self.out.with_name(self.out.name + ".partial")
        if not self.partial.is_dir():
            raise UsageError(
                "OUT.partial is not visible to this rank",
                file=str(self.partial),
                fix="under torchrun OUT must be on a filesystem every rank shares",
            )
        self.resumed = resumed
        self._lock_fd = None
        return self

    def path(self, rel: str) -> Path:
        return self.partial / rel

    def write_json(self, rel: str, data: Any) -> None:
        """Deterministic JSON (sorted keys, 2-space indent, trailing newline), written atomically."""
        self.write_bytes(rel, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        dst = self.path(rel)
        tmp = dst.with_name(dst.name + ".tmp")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        except OSError as e:
            raise os_error(e, dst) from None

    def copy_file(self, src: Path, rel: str) -> None:
        dst = self.path(rel)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except OSError as e:
            raise os_error(e, dst) from None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def commit(self) -> Path:
        """Sync and rename ``OUT.partial`` to OUT (replacing an old OUT only now, under --overwrite)."""
        with contextlib.suppress(FileNotFoundError):
            (self.partial / LOCK_NAME).unlink()
        for p in self.partial.iterdir():
            if p.name.endswith(".tmp"):
                p.unlink()
        _fsync_dir(self.partial)
        self._unlock()
        old = None
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.partial, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        """Remove everything this run wrote (the input and any old OUT are untouched)."""
        self._unlock()
        shutil.rmtree(self.partial, ignore_errors=True)

    def release(self) -> None:
        """Leave ``OUT.partial`` for ``--resume`` (an interrupted run)."""
        self._unlock()


class ShardWriter:
    """One safetensors file laid out from ``entries`` up front; tensors filled by byte range in any order.

    ``write(name, tensor, start=0)`` copies ``tensor``'s bytes to the tensor's data at byte ``start``
    (for a C-contiguous stacked tensor, expert e's rows [r0, r1) start at ``(e * N + r0) * K * itemsize``).
    ``finish()`` syncs, re-reads the header, checks every byte range was written, and renames
    ``<name>.tmp`` to ``<name>``; it returns the file's sha256 and size.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.prefix, self.spans = build_header(entries, metadata)
        self.entries = {n: (d, tuple(s)) for n, d, s in entries}
        self.size = len(self.prefix) + sum(n for _, n in self.spans.values())
        self.written: dict[str, list[tuple[int, int]]] = {n: [] for n in self.spans}
        self._unsynced = 0
        self._flush: Future | None = None
        try:
            self.fd = os.open(self.tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
            self._pwrite(self.prefix, 0)
            os.ftruncate(self.fd, self.size)
        except OSError as e:
            raise os_error(e, self.path) from None

    def _pwrite(self, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
            self._unsynced += n
        if self._unsynced >= FLUSH_EVERY and (self._flush is None or self._flush.done()):
            # start putting written bytes on disk now, so finish() only waits for the tail
            self._unsynced = 0
            self._flush = _FLUSHER.submit(os.fdatasync, self.fd)

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        dtype, _ = self.entries[name]
        if DTYPE_NAMES.get(tensor.dtype) != dtype:
            raise InputError(f"internal: writing {tensor.dtype} into a {dtype} tensor", tensor=name)
        offset, nbytes = self.spans[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if start < 0 or start + data.numel() > nbytes:
            raise InputError(
                f"internal: write of {data.numel()} bytes at {start} overruns {nbytes}", tensor=name
            )
        try:
            self._pwrite(data.numpy().data, offset + start)
        except OSError as e:
            raise os_error(e, self.path) from None
        self.written[name].append((start, start + data.numel()))

    def finish(self) -> tuple[str, int]:
        for name, (_, nbytes) in self.spans.items():
            hole = _first_hole(self.written[name], nbytes)
            if hole is not None:
                raise InputError(
                    f"internal: bytes from {hole} of {nbytes} were never written",
                    file=str(self.path),
                    tensor=name,
                )
        try:
            if self._flush is not None:
                self._flush.result()
            os.fsync(self.fd)
            os.close(self.fd)
            header = read_header(self.tmp)
            if {k: (v.dtype, v.shape) for k, v in header.tensors.items()} != self.entries:
                raise InputError("re-read header differs from what was written", file=str(self.path))
            digest = sha256_file(self.tmp)
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise os_error(e, self.path) from None
        return digest, self.size

    def close(self) -> None:
        if self._flush is not None:  # never let a flush run on a closed (and reused) descriptor
            with contextlib.suppress(OSError):
                self._flush.result()
        with contextlib.suppress(OSError):
            os.close(self.fd)


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
