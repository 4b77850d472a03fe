"""How fast whole files hash while the main thread runs Python: on threads of this process
(``PlannedHashes`` without plans, as ``validate --hash-source files`` hashed before) against a process
of its own (``ProcessHashes``), each with the main thread idle and busy (``x += i * i`` in a loop, as an
import or a check launching kernels keeps it busy). CPU only, no torch.

A thread's hash gives up the interpreter lock for each read and each update of a chunk and, with the
main thread running Python, waits up to the switch interval (5 ms) to take it back; the process has a
lock of its own. Also printed: the main thread's loop rate, alone and beside the hashes (the hand-offs
to hash threads slow it; a process takes a core, which slows it where the cores are few and busy).

The files (``--files``, or ``--count`` files of ``--mib`` MiB each, written to a temporary folder) are
read once before timing, so they are in the page cache: the figures are hashing and copying, not the
disk.

Usage: python scripts/bench_hash_gil.py [--count 3 --mib 512] [--files F...] [--threads N] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

from moetool.io.hashing import PlannedHashes, file_hash_threads
from moetool.io.process_hashes import ProcessHashes


def run(kind: str, files: list[str], threads: int, busy: bool) -> tuple[float, float]:
    """GB/s of the hashes, and the main thread's loop rate (million iterations per second)."""
    t0 = time.perf_counter()
    if kind == "threads":
        hashes = PlannedHashes(files, [], max_threads=threads)
    else:
        hashes = ProcessHashes(files, max_threads=threads)
    done = threading.Event()

    def wait() -> None:
        for f in files:
            hashes.result(f)
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    x = i = 0
    if busy:
        while not done.is_set():
            for _ in range(10_000):
                x += i * i
                i += 1
    done.wait()
    t1 = time.perf_counter()
    hashes.close()
    total = sum(os.path.getsize(f) for f in files)
    return total / (hashes.done_at - t0) / 1e9, i / (t1 - t0) / 1e6


def loop_alone(seconds: float = 1.0) -> float:
    """The main thread's loop rate with nothing else running (million iterations per second)."""
    x = i = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10_000):
            x += i * i
            i += 1
    return i / (time.perf_counter() - t0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="*", default=None)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--threads", type=int, default=file_hash_threads())
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = args.files or []
        for k in range(len(files), args.count if not files else 0):
            p = os.path.join(tmp, f"f{k}")
            with open(p, "wb") as out:
                for _ in range(args.mib):
                    out.write(os.urandom(1 << 20))
            files.append(p)
        files = [os.path.realpath(f) for f in files]
        for f in files:  # into the page cache
            with open(f, "rb") as src:
                while src.read(64 << 20):
                    pass
        total = sum(os.path.getsize(f) for f in files)
        print(
            f"{len(files)} files, {total / 1e9:.2f} GB, {args.threads} hash thread(s), {os.cpu_count()} cores"
        )
        for r in range(args.rounds):
            print(f"round {r + 1}: no hashes:         main thread {loop_alone():.1f} M iterations/s")
            for kind in ("threads", "process"):
                for busy in (False, True):
                    rate, loop = run(kind, files, args.threads, busy)
                    main_says = f", main thread {loop:.1f} M iterations/s" if busy else ""
                    print(
                        f"round {r + 1}: {kind:7s} main {'busy' if busy else 'idle'}: {rate:.2f} GB/s{main_says}"
                    )


if __name__ == "__main__":
    main()
