"""sha256 of several whole files at once in a process of its own (:class:`ProcessHashes`), and the
converted files' hashes a ``validate`` run starts before it imports torch (:class:`HashesAhead`). Like
``moetool.io.hashing``, this module imports no torch."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

from moetool.errors import EnvironmentError_, InputError, InternalError, MoetoolError
from moetool.io.fs import (
    MANIFEST_NAME,
    changed_keys,
    file_identity,
    input_roots,
    is_within,
    open_regular,
    read_small,
    real_path,
)
from moetool.io.hashing import HASH_CHUNK, MAX_HASH_THREADS, PlannedHashes, file_hash_threads

#: The script :class:`ProcessHashes` runs in a process of its own (standard library only).
WORKER = Path(__file__).with_name("hash_worker.py")
#: Seconds a hashing process is given to end after SIGTERM before it is killed.
STOP_WAIT = 1.0


class ProcessHashes:
    """sha256 of whole files, each read by its own thread of a process of its own (:data:`WORKER`, run
    by ``sys.executable``), at most ``max_threads`` at once, the largest first.

    Why a process: a hash on a thread here shares the interpreter's lock with whatever the main thread
    runs (torch's import, the checks launching kernels). Each read and each update of a chunk gives the
    lock up and waits up to the switch interval (5 ms) to take it back, so a page-cached file hashed at
    1.38 GB/s with the main thread idle hashed at 0.51 GB/s with it busy in Python (0.33-0.40 GB/s
    during torch's import on the GPU machine, 0.56-0.62 later), and each hand-off delays the main thread
    too. The other process has a lock of its own; this one only reads a line per file.

    The files are opened here, by ``open_file`` (default ``os.open``; an ``InputError`` of it, or one
    naming the file for an ``OSError``, is that file's result), so whatever the caller checks of a
    descriptor holds for the bytes hashed: the process gets the open descriptors themselves. Where no
    process can be started (no ``sys.executable``, the spawn fails, or the process ends before it says
    it runs), the same descriptors are hashed on threads here, as :class:`PlannedHashes` without plans
    does, with the same results.

    What :class:`PlannedHashes` offers for files hashed whole: ``result(file)`` waits for one digest (an
    ``InputError`` naming the file if it could not be read; an ``InternalError`` if the process wrote
    what it should not or ended before it hashed the file, an ``EnvironmentError_`` if it was killed:
    never a hang, never a wrong digest), ``done_at`` (``time.perf_counter()`` of the last digest),
    ``timeline()`` (each file read by the hash itself: ``read_itself`` its bytes, ``read`` its time),
    ``from_buffers`` (0) and ``read_itself``. ``pid``: the hashing process's, once it has said it runs
    (None before, and for hashes on threads here). ``close()`` abandons hashes still running: the
    process is ended and reaped and the descriptors closed (also at the interpreter's exit, for a
    ``ProcessHashes`` never closed; a parent killed outright leaves the process its stdin's end, on
    which it exits).
    """

    def __init__(
        self,
        files: Iterable[str],
        *,
        open_file: Callable[[str], int] | None = None,
        max_threads: int = MAX_HASH_THREADS,
    ) -> None:
        self._t0 = time.perf_counter()
        self._done_at = self._t0
        self._read_itself = 0
        self._max_threads = max_threads
        self.pid: int | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._rows: dict[str, dict[str, float]] = {}
        self._digests: dict[str, Future[str]] = {}
        self._local: PlannedHashes | None = None  # hashes on threads here, where no process runs
        self._fds: dict[int, str] = {}  # the descriptors this object still owns
        opener = open_file or (lambda f: os.open(f, os.O_RDONLY | os.O_CLOEXEC))
        try:
            for f in sorted(set(files)):
                self._digests[f] = Future()
                try:
                    self._fds[opener(f)] = f
                except OSError as e:
                    self._digests[f].set_exception(InputError(f"cannot read: {e.strerror or e}", file=f))
                except Exception as e:  # raised by result(), where the file is checked
                    self._digests[f].set_exception(e)
        except BaseException:
            _close_fds(self._fds, self._lock)
            raise
        self._by_fd = dict(self._fds)
        self._proc = self._spawn() if self._fds else None
        # ends the process and closes the descriptors on close(), on collection, or at exit
        self._finalizer = weakref.finalize(self, _end_hashing, self._proc, self._fds, self._lock)
        self._reader: threading.Thread | None = None
        if self._proc is not None:
            self._reader = threading.Thread(target=self._read, name="moetool-sha256-reader", daemon=True)
            self._reader.start()
        elif self._fds:
            self._fall_back()

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        """The hashing process, given every open descriptor; None where it cannot be started."""
        if not sys.executable or getattr(sys, "frozen", False) or not WORKER.is_file():
            return None
        if not hasattr(os, "preadv") or not hasattr(time, "clock_gettime"):
            return None
        fds = sorted(self._fds)
        # the process reports CLOCK_MONOTONIC, the one clock every process shares; its offset from
        # perf_counter here converts the process's times to this process's
        self._clock = time.perf_counter() - time.clock_gettime(time.CLOCK_MONOTONIC)
        threads = max(1, min(len(fds), self._max_threads))
        cmd = [sys.executable, "-I", "-S", os.fspath(WORKER), str(threads), str(HASH_CHUNK), *map(str, fds)]
        try:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,  # never written: its end tells the process to stop
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                pass_fds=fds,
            )
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def _read(self) -> None:
        """The process's lines, until it ends: each file's result as it comes."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        problem = None
        try:
            for raw in proc.stdout:
                problem = self._take(raw)
                if problem is not None:
                    break
        except Exception as e:  # its output unreadable, or a line this cannot take: fail, never hang
            problem = f"what could not be taken ({type(e).__name__}: {e})"
        finally:
            if problem is not None:
                _end_process(proc)  # nothing it says can be trusted now
            proc.stdout.close()
        try:
            code = proc.wait(STOP_WAIT)  # its stdout is closed: it is ending
        except subprocess.TimeoutExpired:
            _end_process(proc)
            code = proc.returncode
        if problem is None and self.pid is None:
            try:
                self._fall_back()  # it never ran: hash here, with the descriptors opened
                return
            except Exception as e:
                problem = f"nothing, and no thread could hash instead ({type(e).__name__}: {e})"
        kind: type[MoetoolError] = InternalError
        if problem is not None:
            said = f"the sha256 process wrote {problem}"
        elif code < 0:  # killed from outside: by the machine, not by moetool or the file
            kind, said = (
                EnvironmentError_,
                f"the sha256 process was killed (signal {-code}) before it hashed the file",
            )
        else:
            said = f"the sha256 process ended (exit status {code}) before it hashed the file"
        self._fail(lambda f: kind(said, file=f))

    def _take(self, raw: bytes) -> str | None:
        """Take one line of the process; what is wrong with it, in words, or None."""
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            return f"a line that is no JSON object: {raw[:80]!r}"
        if self.pid is None:
            if type(rec.get("pid")) is not int:
                return f"a first line without its pid: {raw[:80]!r}"
            self.pid = rec["pid"]
            return None
        f = self._by_fd.get(rec.get("fd")) if type(rec.get("fd")) is int else None
        if f is None:
            return f"a line for no descriptor it was given: {raw[:80]!r}"
        digest, error, bug = rec.get("sha256"), rec.get("error"), rec.get("bug")
        nbytes, start, end = rec.get("bytes"), rec.get("start"), rec.get("end")
        with self._lock:
            if self._digests[f].done():
                return None if self._closed else f"a second line for {f}"
            if isinstance(error, str) and type(rec.get("errno")) is int:
                self._digests[f].set_exception(InputError(f"cannot read: {error}", file=f))
                return None
            if isinstance(bug, str):
                self._digests[f].set_exception(InternalError(f"hashing failed: {bug}", file=f))
                return None
            if not (
                isinstance(digest, str)
                and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)
                and type(nbytes) is int
                and nbytes >= 0
                and all(type(t) in (int, float) and math.isfinite(t) for t in (start, end))
                and start <= end
            ):
                return f"a line that is no result: {raw[:120]!r}"
            start, end = start + self._clock, end + self._clock  # this process's perf_counter
            self._done_at = max(self._done_at, end)
            self._read_itself += nbytes
            self._rows[f] = {
                "start": max(start - self._t0, 0.0),
                "end": max(end - self._t0, 0.0),
                "wait": 0.0,
                "hash": 0.0,
                "read": end - start,
                "from_buffers": 0,
                "read_itself": nbytes,
            }
            self._digests[f].set_result(digest)
        return None

    def _fail(self, error: Callable[[str], Exception]) -> None:
        """Every file still without a result gets ``error(file)`` (stopped ones: stopped)."""
        with self._lock:
            for f, fut in self._digests.items():
                if not fut.done():
                    fut.set_exception(InputError("hashing was stopped", file=f) if self._closed else error(f))

    def _fall_back(self) -> None:
        """Hash the files still without a result on threads here (:class:`PlannedHashes` without
        plans), from the descriptors already open, which it takes over and closes."""
        with self._lock:
            if self._closed:
                return
            handed = {f: fd for fd, f in self._fds.items()}
            self._fds.clear()
            pending = sorted(f for f in handed if not self._digests[f].done())
            for f in set(handed) - set(pending):
                os.close(handed.pop(f))
            try:
                self._local = PlannedHashes(
                    pending,
                    [],
                    open_file=handed.pop,
                    max_threads=max(1, min(len(pending), self._max_threads)),
                )
            except BaseException:
                for fd in handed.values():  # those no thread took
                    os.close(fd)
                raise
            for f in pending:
                self._local.future(f).add_done_callback(lambda fut, f=f: _copy(fut, self._digests[f]))

    @property
    def done_at(self) -> float:
        local = self._local
        return max(self._done_at, local.done_at) if local is not None else self._done_at

    @property
    def from_buffers(self) -> int:
        return 0

    @property
    def read_itself(self) -> int:
        local = self._local
        return self._read_itself + (local.read_itself if local is not None else 0)

    def timeline(self) -> list[dict[str, float | str]]:
        """Each finished file's hash, as :meth:`PlannedHashes.timeline` gives it (seconds after
        creation), by start."""
        with self._lock:
            rows = [{"file": f, **{k: round(v, 3) for k, v in t.items()}} for f, t in self._rows.items()]
        local = self._local
        if local is not None:
            shift = local.started - self._t0
            for row in local.timeline():
                rows.append(
                    {**row, "start": round(row["start"] + shift, 3), "end": round(row["end"] + shift, 3)}
                )
        return sorted(rows, key=lambda r: (r["start"], r["file"]))

    def result(self, file: str) -> str:
        return self._digests[file].result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._finalizer()  # the process ended and reaped, the descriptors closed
        if self._reader is not None:
            self._reader.join()
        if self._local is not None:
            self._local.close()
        self._fail(lambda f: InputError("hashing was stopped", file=f))

    def __enter__(self) -> ProcessHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _copy(src: Future[str], dest: Future[str]) -> None:
    """``src``'s outcome to ``dest``, unless ``dest`` has one already."""
    with contextlib.suppress(Exception):  # InvalidStateError: dest was stopped first
        if src.exception() is not None:
            dest.set_exception(src.exception())
        else:
            dest.set_result(src.result())


def _end_process(proc: subprocess.Popen[bytes]) -> None:
    """End ``proc`` (SIGTERM, then SIGKILL after ``STOP_WAIT``) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.terminate()
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()


def _close_fds(fds: dict[int, str], lock: threading.Lock) -> None:
    with lock:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        fds.clear()


def _end_hashing(proc: subprocess.Popen[bytes] | None, fds: dict[int, str], lock: threading.Lock) -> None:
    """What :meth:`ProcessHashes.close` leaves behind it (refers to no ``ProcessHashes``, so that it can
    run when one is collected or at exit): the process ended and reaped, its stdin closed, the
    descriptors closed."""
    if proc is not None:
        _end_process(proc)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
    _close_fds(fds, lock)


class HashesAhead:
    """sha256 of the files a moetool output's ``moetool.json`` records, started as early as a process
    can (this module imports no torch): each listed regular file of the recorded size inside ``root``,
    opened here and hashed whole by its own thread of a process of its own (:class:`ProcessHashes`, at
    most ``max_threads`` read at once), so the hashes neither slow the import of torch that runs
    meanwhile nor are slowed by it. Nothing here trusts the manifest beyond picking the files:
    ``validate``'s structure check decides on its own which files to hash, and :meth:`take` hands these
    hashes over only if they are exactly those files, each opened as the very file whose header the
    checks read.

    ``started``: the ``time.perf_counter()`` of the start. ``close()`` abandons what still runs (also
    after ``take``: closing twice is harmless)."""

    def __init__(self, root: str | os.PathLike[str], *, max_threads: int | None = None) -> None:
        self.started = time.perf_counter()
        files = _recorded_files(Path(root))
        self._identity: dict[str, Future[dict[str, int]]] = {f: Future() for f in files}
        self.hashes = ProcessHashes(
            files, open_file=self._open, max_threads=max_threads or file_hash_threads()
        )

    @property
    def files(self) -> frozenset[str]:
        return frozenset(self._identity)

    def _open(self, file: str) -> int:
        try:
            fd = open_regular(file, what="file")
            self._identity[file].set_result(file_identity(os.fstat(fd)))
        except BaseException as e:
            self._identity[file].set_exception(e)
            raise
        return fd

    def take(self, files: Iterable[str], identity: Callable[[str], dict[str, int] | None]) -> bool:
        """Whether these hashes are those of ``files`` (real paths), each opened as the file
        ``identity(file)`` describes (``moetool.io.fs.file_identity``; None: a file no header was read
        of, taken as opened): the identity of the descriptor whose bytes are hashed, taken here when
        the file was opened."""
        if set(files) != set(self._identity):
            return False
        for file, opened in self._identity.items():
            try:
                now = opened.result()
            except BaseException:
                return False
            want = identity(file)
            if want is not None and changed_keys(want, now):
                return False
        return True

    def close(self) -> None:
        self.hashes.close()


def _recorded_files(root: Path) -> list[str]:
    """Real paths of the regular files of checkpoint ``root`` (inside it, or in its Hub cache's blobs)
    that its ``moetool.json`` lists, where the size on disk is the recorded one; none where the
    manifest cannot be read."""
    roots = input_roots(root)
    try:
        files = json.loads(read_small(root / MANIFEST_NAME, 64 << 20, within=roots)).get("files")
        out = []
        for rel, rec in files.items() if isinstance(files, dict) else ():
            if not isinstance(rel, str) or not isinstance(rec, dict):
                continue
            p = real_path(root / rel)
            if p not in roots and is_within(p, roots) and p.is_file() and p.stat().st_size == rec.get("size"):
                out.append(os.fspath(p))
        return sorted(set(out))
    except (InputError, OSError, ValueError, AttributeError):
        return []
