"""The process that takes the sha256 of whole files for ``moetool.io.process_hashes.ProcessHashes``.

A hash on a thread of the process that validates shares that interpreter's lock with the checks and
the import of torch: each 8 MiB read and update gives the lock up and must wait (up to the switch
interval, 5 ms) to take it back whenever the main thread runs Python, so a page-cached file hashed at
1.38 GB/s alone hashed at 0.51 GB/s beside a busy main thread, and every hand-off delayed the main
thread too. Here the hashes run in an interpreter of their own.

Run as a script, ``python -I -S hash_worker.py THREADS CHUNK FD...``: it imports nothing but the
standard library (not moetool, which a plain ``-m`` could find elsewhere on the path, nor torch). The
parent opens the files and passes their descriptors (the identity it checks is of the files it opened);
this process hashes each descriptor from byte 0 to its end with ``os.preadv`` (the shared file offset
is left alone), the largest files first, at most THREADS at once, each thread reading CHUNK bytes at a
time into one reused buffer. It writes JSON lines to stdout, each flushed as it is written:

- first ``{"pid": PID}``, before any hash (a parent that never sees it hashes by itself);
- per file ``{"fd": FD, "sha256": HEX, "bytes": N, "start": S, "end": E}``, or ``{"fd": FD, "error":
  TEXT, "errno": N}`` for a file that could not be read, or ``{"fd": FD, "bug": TEXT}`` for anything
  else; ``S`` and ``E`` are ``time.clock_gettime(CLOCK_MONOTONIC)``, one clock for every process.

It ends once every file is reported, or at once when its stdin (a pipe the parent never writes to)
reaches its end: the parent closed it, or died.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class _Out:
    """Whole lines to stdout, one writer at a time; a parent that went away ends this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def line(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        with self._lock:
            try:
                while data:
                    data = data[os.write(1, data) :]
            except OSError:
                os._exit(1)


def _hash(fd: int, buf: memoryview) -> tuple[str, int]:
    h = hashlib.sha256()
    pos = 0
    while n := os.preadv(fd, [buf], pos):
        h.update(buf[:n])
        pos += n
    return h.hexdigest(), pos


def _watch_parent() -> None:
    """Exit as soon as stdin ends: nothing is left to hash for."""
    try:
        while os.read(0, 4096):
            pass
    finally:
        os._exit(0)


def main(argv: list[str]) -> int:
    threads, chunk, *fds = (int(a) for a in argv)
    out = _Out()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends this
    out.line({"pid": os.getpid()})
    threading.Thread(target=_watch_parent, daemon=True).start()

    def size(fd: int) -> int:
        try:
            return os.fstat(fd).st_size
        except OSError:
            return 0

    todo = sorted(fds, key=lambda fd: (-size(fd), fd))[::-1]  # popped from the end: largest first
    lock = threading.Lock()

    def work() -> None:
        buf = memoryview(bytearray(chunk))
        while True:
            with lock:
                if not todo:
                    return
                fd = todo.pop()
            start = _now()
            try:
                digest, nbytes = _hash(fd, buf)
            except OSError as e:
                out.line({"fd": fd, "error": e.strerror or str(e), "errno": e.errno or 0})
            except Exception as e:  # reported: the parent raises it as a bug of moetool
                out.line({"fd": fd, "bug": f"{type(e).__name__}: {e}"})
            else:
                out.line({"fd": fd, "sha256": digest, "bytes": nbytes, "start": start, "end": _now()})

    pool = [threading.Thread(target=work) for _ in range(max(1, min(threads, len(fds))))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
