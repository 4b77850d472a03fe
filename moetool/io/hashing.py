"""Every sha256 moetool takes of a file: whole files (:func:`sha256_file`), files whose bytes are being
read anyway, from the readers' own buffers (:class:`PlannedHashes`), and a file still being written,
from bytes read back as its complete prefix grows (:class:`ReadBack`). Several whole files at once, in
a process of their own: ``moetool.io.process_hashes``."""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from moetool.errors import InputError

if TYPE_CHECKING:
    from moetool.io.prefetch import ReadPlan

#: Bytes per read of a whole-file hash (hashlib releases the GIL on large updates).
HASH_CHUNK = 8 << 20
#: Read back and hash in pieces that stay in the core's L2 cache between the read and the hash.
READBACK_CHUNK = 1 << 20
MAX_HASH_THREADS = 16


def file_hash_threads() -> int:
    """Threads for hashing files each read whole by its own thread beside a pass that reads with the
    rest of the cores: at most half of them."""
    return max(1, (os.cpu_count() or 2) // 2)


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


class _Stopped(Exception):
    """A hash abandoned by ``close``."""


@dataclass
class Run:
    """Bytes ``[start, end)`` of one file that plan ``plan`` reads, as its pieces ``(file_offset,
    nbytes, dest)`` (``dest``: where in the plan's buffer), in file order, with no gap between them."""

    plan: int
    start: int
    end: int
    pieces: list[tuple[int, int, int]] = field(default_factory=list)


def plan_runs(plans: Sequence[ReadPlan], files: Iterable[str]) -> dict[str, list[Run]]:
    """Each of ``files``' bytes that ``plans`` read, as runs in reading order: per plan, its pieces of
    the file sorted by offset and joined where they touch or overlap."""
    want = set(files)
    out: dict[str, list[Run]] = {f: [] for f in want}
    for i, plan in enumerate(plans):
        mine: dict[str, list[tuple[int, int, int]]] = {}
        for p in plan.pieces:
            if p.file in want and p.nbytes:
                mine.setdefault(p.file, []).append((p.file_offset, p.nbytes, p.dest))
        for file, pieces in mine.items():
            pieces.sort()
            runs = out[file]
            first = len(runs)
            for off, n, dest in pieces:
                if len(runs) > first and off <= runs[-1].end:
                    runs[-1].end = max(runs[-1].end, off + n)
                    runs[-1].pieces.append((off, n, dest))
                else:
                    runs.append(Run(i, off, off + n, [(off, n, dest)]))
    return out


def hashed_runs(runs: list[Run]) -> list[Run]:
    """The runs of one file to hash from the read buffers: the chain of runs, in reading order, each
    starting at or after the end of the one before, that covers the most bytes (a heaviest increasing
    subsequence). A hash takes a file's bytes in order while each buffer lives only until its plan is
    done, so bytes read out of order (a layer's router before its experts, say) cannot all be taken
    from the buffers; the hasher reads whatever the chain leaves out itself."""
    if not runs:
        return []
    ends = sorted({r.end for r in runs})
    size = len(ends)
    best = [(0, -1)] * (size + 1)  # Fenwick tree over the end offsets: (heaviest chain, its last run)
    total = [0] * len(runs)
    prev = [-1] * len(runs)
    for i, r in enumerate(runs):  # runs come in reading order, by offset within a plan
        k = bisect.bisect_right(ends, r.start)  # chains whose last run ends at or before r.start
        top = (0, -1)
        while k > 0:
            top = max(top, best[k])
            k -= k & -k
        total[i], prev[i] = top[0] + (r.end - r.start), top[1]
        k = bisect.bisect_left(ends, r.end) + 1
        while k <= size:
            best[k] = max(best[k], (total[i], i))
            k += k & -k
    i = max(range(len(runs)), key=lambda j: (total[j], -j))
    chain: list[Run] = []
    while i >= 0:
        chain.append(runs[i])
        i = prev[i]
    return chain[::-1]


class PlannedHashes:
    """sha256 of whole files whose bytes read plans are reading anyway, taken from the read buffers,
    so each byte is read once: one thread per file takes the file's bytes in file order, the runs of
    :func:`hashed_runs` from the buffers (``feed``, the hook of ``moetool.io.prefetch.Prefetcher``) and
    every other span (headers, what no plan reads, what plans read out of order) by reading the file
    itself, ahead of the buffers it waits for. A file no plan reads is hashed whole at once.

    It is the prefetcher's ``BufferHold``: ``feed(plan, view)``, before the plan is read, returns the
    futures that keep the plan's buffer from reuse until its runs are hashed; ``filled`` hears which
    bytes have landed, so each file's hash takes a step's bytes while the rest of the step is still
    being read (``wants``: the files' pieces are read first), and lets go of the buffer as soon as its
    own runs in it are hashed. ``result(file)`` waits for one digest (an ``InputError`` naming the file if it could not be
    read); ``done_at`` is the ``time.perf_counter()`` of the last digest; ``from_buffers`` and
    ``read_itself`` count the bytes hashed from the buffers and read by the hasher. ``open_file(file)``
    opens a file read-only (default ``os.open``). ``close()`` abandons hashes still running.

    ``timeline()``: per file, when its hash started and ended (seconds after creation), and how long it
    waited for a buffer to be read, hashed from the buffers, and read and hashed the rest itself.
    """

    def __init__(
        self,
        files: Iterable[str],
        plans: Sequence[ReadPlan],
        *,
        open_file: Callable[[str], int] | None = None,
        max_threads: int = MAX_HASH_THREADS,
    ) -> None:
        files = sorted(set(files))
        self._open = open_file or (lambda f: os.open(f, os.O_RDONLY | os.O_CLOEXEC))
        self._index = {id(plan): i for i, plan in enumerate(plans)}
        self._runs = {f: hashed_runs(r) for f, r in plan_runs(plans, files).items()}
        self._views: dict[int, memoryview] = {}
        self._files = set(files)
        self._hurried: set[int] = set()  # plans whose buffers the reader wants back
        self._at: dict[str, int] = {}  # the plan each file's hash is taking bytes from
        # per plan being read: the byte ranges of its buffer read so far, merged, sorted
        self._filled: dict[int, tuple[list[int], list[int]]] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._lock = threading.Lock()
        self.done_at = time.perf_counter()
        self.from_buffers = 0
        self.read_itself = 0
        self._t0 = time.perf_counter()
        self._timeline: dict[str, dict[str, float]] = {}
        # the futures that hold plan i's buffer: one per file with runs in it
        self._holds: dict[int, dict[str, Future[None]]] = {}
        for f, chain in self._runs.items():
            for r in chain:
                self._holds.setdefault(r.plan, {}).setdefault(f, Future())
        # buffers for reading: at most this many files are read at once, whatever their number
        self._buffers: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(max(1, min(len(files), max_threads))):
            self._buffers.put(memoryview(bytearray(HASH_CHUNK)))
        self._threads: dict[str, threading.Thread] = {}
        self._digests: dict[str, Future[str]] = {}
        for f in files:
            self._digests[f] = Future()
            t = threading.Thread(target=self._work, args=(f,), name="moetool-sha256", daemon=True)
            self._threads[f] = t
            t.start()

    def feed(self, plan: ReadPlan, view: memoryview) -> list[Future[None]]:
        """Plan ``plan`` is about to be read into ``view`` (its buffer, as ``filled`` reports), and its
        bytes stay there until the returned futures are done."""
        i = self._index.get(id(plan))
        holds = self._holds.get(i, {}) if i is not None else {}
        if holds:
            with self._cond:
                self._filled[i] = ([], [])
                self._views[i] = view
                self._cond.notify_all()
        return list(holds.values())

    def filled(self, plan: ReadPlan, start: int, nbytes: int) -> None:
        """Bytes ``[start, start + nbytes)`` of plan ``plan``'s buffer are read."""
        i = self._index.get(id(plan))
        if i is None or i not in self._holds or nbytes <= 0:
            return
        end = start + nbytes
        with self._cond:
            ranges = self._filled.get(i)
            if ranges is None:
                return
            starts, ends = ranges
            a = bisect.bisect_left(ends, start)  # ranges [a, b) touch [start, end)
            b = bisect.bisect_right(starts, end)
            if a < b:
                start, end = min(start, starts[a]), max(end, ends[b - 1])
            starts[a:b] = [start]
            ends[a:b] = [end]
            self._cond.notify_all()

    def wants(self, file: str) -> bool:
        return file in self._files

    def _view(self, i: int) -> memoryview | None:
        with self._cond:
            while i not in self._views and not self._stop:
                self._cond.wait()
            return None if self._stop else self._views[i]

    def hurry(self, plan: ReadPlan) -> None:
        """The reader waits for ``plan``'s buffer: the hashes still taking bytes from it let it go at
        once and read the rest of those bytes from their files themselves."""
        i = self._index.get(id(plan))
        if i is not None and i in self._holds:
            with self._cond:
                self._hurried.add(i)
                for f in self._holds[i]:
                    if self._at.get(f) != i:  # not at it yet (reading a gap itself, or hashing before)
                        self._let_go(i, f)
                self._cond.notify_all()  # those at it notice in _ready

    def _ready(self, i: int, start: int, end: int) -> int:
        """Wait until byte ``start`` of plan ``i``'s buffer is read; how far from there, up to ``end``,
        its bytes are read (``start`` itself once stopped, or once the buffer is wanted back)."""
        with self._cond:
            while not self._stop and i not in self._hurried:
                starts, ends = self._filled[i]
                k = bisect.bisect_right(starts, start) - 1
                if k >= 0 and ends[k] > start:
                    return min(ends[k], end)
                self._cond.wait()
            return start

    def _let_go(self, i: int, f: str) -> None:
        """File ``f`` is done with plan ``i``'s buffer (the buffer is free once every file is)."""
        with self._cond:  # once: by the hash itself or by hurry
            fut = self._holds[i][f]
            if not fut.done():
                fut.set_result(None)
            if all(h.done() for h in self._holds[i].values()):
                self._views.pop(i, None)
                self._filled.pop(i, None)

    def timeline(self) -> list[dict[str, float | str]]:
        """Each finished file's hash: ``file``, ``start``/``end`` (seconds after creation), ``wait`` (for
        buffers to be read), ``hash`` (from the buffers), ``read`` (reading and hashing the rest itself),
        ``from_buffers``/``read_itself`` (bytes), by start."""
        with self._lock:
            rows = [{"file": f, **{k: round(v, 3) for k, v in t.items()}} for f, t in self._timeline.items()]
        return sorted(rows, key=lambda r: (r["start"], r["file"]))

    def _work(self, f: str) -> None:
        chain = self._runs.get(f, [])
        h = hashlib.sha256()
        fd = -1
        from_buffers = read_itself = 0
        t_start = time.perf_counter()
        t_wait = t_hash = t_read = 0.0

        def read_to(pos: int, end: int | None) -> int:
            """Hash the file's bytes [pos, end) (to its end with None), read here; the new position."""
            nonlocal read_itself, t_read
            if end is not None and pos >= end:
                return pos
            t = time.perf_counter()
            buf = self._buffers.get()
            try:
                while end is None or pos < end:
                    if self._stop:
                        raise _Stopped
                    want = HASH_CHUNK if end is None else min(HASH_CHUNK, end - pos)
                    n = os.preadv(fd, [buf[:want]], pos)
                    if n <= 0:
                        if end is None:
                            break
                        raise OSError(errno.EIO, f"file ended at byte {pos}, before byte {end}")
                    h.update(buf[:n])
                    pos += n
                    read_itself += n
            finally:
                self._buffers.put(buf)
                t_read += time.perf_counter() - t
            return pos

        try:
            fd = self._open(f)
            pos = 0
            for k, run in enumerate(chain):
                if run.plan not in self._hurried:
                    pos = read_to(pos, run.start)  # ahead of the buffer, while it is being read
                with self._cond:
                    skip = run.plan in self._hurried
                    if not skip:
                        self._at[f] = run.plan  # hurry leaves the buffer to this hash from here on
                if skip:  # its buffer went back: these bytes are read below
                    self._let_go(run.plan, f)
                    continue
                t = time.perf_counter()
                view = self._view(run.plan)
                if view is None:
                    return
                t_wait += time.perf_counter() - t
                hurried = False
                for off, n, dest in run.pieces:
                    if off + n <= pos:
                        continue
                    at, end = dest + max(pos - off, 0), dest + n
                    while at < end:
                        t = time.perf_counter()
                        ready = self._ready(run.plan, at, min(end, at + HASH_CHUNK))
                        if ready == at:
                            if self._stop:
                                return
                            hurried = True  # the reader needs the buffer: read the rest here
                            break
                        t2 = time.perf_counter()
                        t_wait += t2 - t
                        h.update(view[at:ready])
                        t_hash += time.perf_counter() - t2
                        from_buffers += ready - at
                        at = ready
                        pos = off + at - dest
                    if hurried:
                        break
                if hurried or k + 1 == len(chain) or chain[k + 1].plan != run.plan:
                    self._let_go(run.plan, f)
            read_to(pos, None)
            t_end = time.perf_counter()
            with self._lock:
                self.done_at = max(self.done_at, t_end)
                self.from_buffers += from_buffers
                self.read_itself += read_itself
                self._timeline[f] = {
                    "start": t_start - self._t0,
                    "end": t_end - self._t0,
                    "wait": t_wait,
                    "hash": t_hash,
                    "read": t_read,
                    "from_buffers": from_buffers,
                    "read_itself": read_itself,
                }
            self._digests[f].set_result(h.hexdigest())
        except _Stopped:
            pass
        except Exception as e:  # raised by result(), where the file is checked
            if isinstance(e, OSError):
                e = InputError(f"cannot read: {e.strerror or e}", file=f)
            self._digests[f].set_exception(e)
        finally:
            if fd >= 0:
                os.close(fd)
            for r in chain:  # a buffer is never held by a hash that ended early
                self._let_go(r.plan, f)
            if not self._digests[f].done():
                self._digests[f].set_exception(InputError("hashing was stopped", file=f))

    def result(self, file: str) -> str:
        return self._digests[file].result()

    def future(self, file: str) -> Future[str]:
        """The future that ``result(file)`` waits on."""
        return self._digests[file]

    @property
    def started(self) -> float:
        """``time.perf_counter()`` at creation: what ``timeline()``'s seconds count from."""
        return self._t0

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads.values():
            t.join()

    def __enter__(self) -> PlannedHashes:
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
