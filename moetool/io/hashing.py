"""Every sha256 moetool takes of a file: whole files (:func:`sha256_file`), several files at once on
threads (:class:`FileHashes`), and a file still being written, from bytes read back as its complete
prefix grows (:class:`ReadBack`)."""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

#: Bytes per read of a whole-file hash (hashlib releases the GIL on large updates).
HASH_CHUNK = 8 << 20
#: Read back and hash in pieces that stay in the core's L2 cache between the read and the hash.
READBACK_CHUNK = 1 << 20
MAX_HASH_THREADS = 16


def sha256_file(
    path: str | os.PathLike[str], stop: threading.Event | None = None, *, follow: bool = True
) -> str:
    """sha256 of a file, read into one reused buffer (hashlib releases the GIL on large updates, so
    several files hash on several cores). Stops early, returning ``""``, once ``stop`` is set. With
    ``follow=False`` a link at ``path`` is an error (ELOOP)."""
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    with open(fd, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if stop is not None and stop.is_set():
                return ""
            h.update(view[:n])
    return h.hexdigest()


class FileHashes:
    """sha256 of several files at once, one thread per file (largest first), started on creation.

    ``result(path)`` waits for one digest; ``done_at`` is the ``time.perf_counter()`` at which the last
    digest finished. ``close()`` (or leaving the context) abandons hashes still running.
    """

    def __init__(self, paths: Iterable[Path], *, max_threads: int = MAX_HASH_THREADS) -> None:
        order = sorted(paths, key=lambda p: (-p.stat().st_size, str(p)))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.done_at = time.perf_counter()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(len(order), max_threads)), thread_name_prefix="moetool-sha256"
        )
        self._futures: dict[Path, Future[str]] = {p: self._pool.submit(self._hash, p) for p in order}

    def _hash(self, path: Path) -> str:
        digest = sha256_file(path, self._stop)
        with self._lock:
            self.done_at = max(self.done_at, time.perf_counter())
        return digest

    def result(self, path: Path) -> str:
        return self._futures[path].result()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> FileHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadBack:
    """sha256 of a file that is still being written, taken from bytes read back from the file.

    Writers report each byte range once it is written (``done``); a thread reads back and hashes the
    file's complete prefix as it grows, so that when the last range arrives only the tail is left. A
    range rewritten after the thread has read it makes the thread start again from byte 0, so the
    digest is always that of the file's final bytes.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self._cond = threading.Condition()
        self._starts: list[int] = []  # disjoint, merged written ranges [start, end), sorted
        self._ends: list[int] = []
        self._claimed = 0  # the thread has read, or is reading, bytes [0, _claimed)
        self._restart = False
        self._closed = False
        self._digest: str | None = None
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="moetool-readback", daemon=True)
        self._thread.start()

    def done(self, start: int, end: int) -> None:
        """Bytes ``[start, end)`` of the file hold their final contents."""
        if end <= start:
            return
        with self._cond:
            if start < self._claimed:
                self._restart, self._digest = True, None
            i = bisect.bisect_left(self._ends, start)  # first range that ends at or after start
            j = bisect.bisect_right(self._starts, end)  # ranges [i, j) touch [start, end)
            if i < j:
                start, end = min(start, self._starts[i]), max(end, self._ends[j - 1])
            self._starts[i:j] = [start]
            self._ends[i:j] = [end]
            self._cond.notify()

    def _ready(self) -> int:
        """End of the complete prefix (caller holds the lock)."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0

    def _run(self) -> None:
        buf = memoryview(bytearray(READBACK_CHUNK))
        h = hashlib.sha256()
        pos = 0
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()
            return
        with contextlib.suppress(OSError):
            # What is read back was just written and is in the page cache; read-ahead would only fill
            # the holes of the file not written yet with zero pages.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._restart and self._ready() <= pos:
                        self._cond.wait()
                    if self._closed:
                        return
                    if self._restart:
                        self._restart = False
                        h, pos = hashlib.sha256(), 0
                    end = min(self._ready(), pos + READBACK_CHUNK)
                    self._claimed = max(self._claimed, end)
                n = os.preadv(fd, [buf[: end - pos]], pos)
                if n <= 0:
                    raise OSError(errno.EIO, f"file ended at byte {pos} of {self.size} on re-reading")
                h.update(buf[:n])
                pos += n
                if pos == self.size:
                    with self._cond:
                        if not self._restart:
                            self._digest = h.hexdigest()
                            self._cond.notify_all()
        except OSError as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            os.close(fd)

    def digest(self) -> str:
        """The file's sha256, once every byte has been reported done (blocks until read back)."""
        with self._cond:
            while self._digest is None and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            return self._digest

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
