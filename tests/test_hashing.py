"""File hashes: ``sha256_file`` agrees with hashlib on sizes around the read size.

``ProcessHashes`` hashes in a process of its own (``moetool/io/hash_worker.py``) the descriptors it
opened here: hashlib's digests, an unreadable file an ``InputError`` naming it, the process another
one (it hashes while this one holds the interpreter lock), ended and reaped with every descriptor
closed on ``close`` and at the interpreter's exit, and exiting by itself when its parent is killed. A
process that is killed or writes what it should not fails every pending file (never a hang, never a
digest), and where none can be started the files hash on threads here with the same results."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_validate_io import _our_threads

from moetool.errors import EnvironmentError_, InputError, InternalError
from moetool.io import hashing, process_hashes
from moetool.io.hashing import sha256_file as sha256_of
from moetool.io.process_hashes import ProcessHashes


@pytest.mark.parametrize(
    "size", [0, 1, hashing.HASH_CHUNK - 1, hashing.HASH_CHUNK, 2 * hashing.HASH_CHUNK + 5]
)
def test_sha256_of_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


# -- whole files hashed in a process of their own ---------------------------------------------------------
def _files(root: Path, sizes: list[int]) -> dict[str, str]:
    """Files of these sizes (seeded random bytes) under ``root``: real path -> hashlib's sha256."""
    root.mkdir(exist_ok=True)
    out = {}
    for i, size in enumerate(sizes):
        p = root / f"f{i}"
        p.write_bytes(random.Random(i).randbytes(size))
        out[os.path.realpath(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _sparse(path: Path, size: int = 64 << 30) -> str:
    """A file of ``size`` bytes of zeros that takes no disk: minutes to hash."""
    with open(path, "wb") as f:
        f.truncate(size)
    return os.path.realpath(path)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _wait_for_pid(hashes: ProcessHashes) -> int:
    deadline = time.monotonic() + 30
    while hashes.pid is None:
        assert time.monotonic() < deadline, "the hashing process never said it runs"
        time.sleep(0.005)
    return hashes.pid


def _reaped(pid: int) -> bool:
    """``pid`` is no child of this process any more (ended and waited for) and no process at all."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")
    return False


def _gone(pid: int, within: float) -> bool:
    """``pid`` ended within ``within`` seconds (no process, or a zombie its new parent has yet to reap)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.01)
    return False


def test_process_hashes_match_hashlib_in_another_process(tmp_path: Path) -> None:
    """Several files, an empty one and one of several reads among them, the largest first: hashlib's
    digests, from another process; a file that cannot be opened is an ``InputError`` naming it; the
    timeline has a row per file read whole by the hash (``PlannedHashes``' shape); once closed, no
    process, thread or descriptor is left."""
    want = _files(tmp_path, [3, 2 * hashing.HASH_CHUNK + 5, 0, 100_003, hashing.HASH_CHUNK])
    missing = os.path.realpath(tmp_path / "missing")
    before = _open_fds()
    t0 = time.perf_counter()
    hashes = ProcessHashes([*want, missing], max_threads=1)
    try:
        assert {f: hashes.result(f) for f in want} == want
        with pytest.raises(InputError, match="cannot read") as e:
            hashes.result(missing)
        assert e.value.file == missing
        pid = hashes.pid
        assert pid is not None and pid != os.getpid()
        assert t0 < hashes.done_at <= time.perf_counter()
        sizes = {f: os.path.getsize(f) for f in want}
        rows = hashes.timeline()
        assert {r["file"]: r["read_itself"] for r in rows} == sizes
        assert all(r["from_buffers"] == r["wait"] == r["hash"] == 0 for r in rows)
        assert all(0 <= r["start"] <= r["end"] <= hashes.done_at - t0 + 0.001 for r in rows)
        assert rows[0]["file"] == max(sizes, key=sizes.get)  # one thread: the largest first
        assert hashes.read_itself == sum(sizes.values()) and hashes.from_buffers == 0
    finally:
        hashes.close()
    hashes.close()  # twice: harmless
    assert _reaped(pid)
    assert _open_fds() == before
    assert not _our_threads()


def test_the_hashing_process_hashes_while_this_one_holds_the_interpreter_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sum(range(n))`` is one call that holds the interpreter lock throughout: no thread of this
    process runs meanwhile, yet the other process's digests end before it does. The same files hashed
    on threads here (no process to start) end only after it: each read of a chunk lets go of the lock,
    and the next waits for it."""
    want = _files(tmp_path, [6 * hashing.HASH_CHUNK + 5, 1000])
    t = time.perf_counter()
    sum(range(1_000_000))
    per_step = (time.perf_counter() - t) / 1_000_000

    def hold(seconds: float) -> float:
        sum(range(int(seconds / per_step)))
        return time.perf_counter()

    for seconds in (0.25, 1.0, 4.0):  # longer where a loaded machine starts the process late
        with ProcessHashes(want) as hashes:
            held_until = hold(seconds)
            assert {f: hashes.result(f) for f in want} == want
        if hashes.done_at < held_until:
            break
    assert hashes.done_at < held_until
    monkeypatch.setattr(process_hashes, "WORKER", tmp_path / "no-such-script.py")
    with ProcessHashes(want) as hashes:
        held_until = hold(0.25)
        assert {f: hashes.result(f) for f in want} == want
        assert hashes.pid is None
    assert hashes.done_at > held_until


def test_closing_while_hashing_ends_the_process_and_closes_every_descriptor(tmp_path: Path) -> None:
    before = _open_fds()
    big = _sparse(tmp_path / "big")
    hashes = ProcessHashes([big])
    pid = _wait_for_pid(hashes)
    assert not _reaped(pid)  # still hashing
    hashes.close()
    assert _reaped(pid)
    assert _open_fds() == before
    assert not _our_threads()
    with pytest.raises(InputError, match="stopped"):
        hashes.result(big)


def test_a_killed_hashing_process_fails_every_pending_file(tmp_path: Path) -> None:
    """Killed mid-way (the largest file being hashed, the other waiting for the one thread): both
    results raise, at once, and the process is reaped without ``close``."""
    big, small = _sparse(tmp_path / "big"), _sparse(tmp_path / "small", 10)
    with ProcessHashes([big, small], max_threads=1) as hashes, ThreadPoolExecutor(2) as pool:
        pid = _wait_for_pid(hashes)
        os.kill(pid, signal.SIGKILL)
        for f in (big, small):
            with pytest.raises(EnvironmentError_, match=r"killed \(signal 9\)") as e:
                pool.submit(hashes.result, f).result(timeout=30)
            assert e.value.file == f
        assert _reaped(pid)


def test_a_descriptor_the_process_cannot_read_is_an_input_error(tmp_path: Path) -> None:
    want = _files(tmp_path, [10, 20])
    unreadable = os.path.realpath(tmp_path / "write-only")
    Path(unreadable).write_bytes(b"x")

    def open_file(f: str) -> int:
        return os.open(f, (os.O_WRONLY if f == unreadable else os.O_RDONLY) | os.O_CLOEXEC)

    with ProcessHashes([*want, unreadable], open_file=open_file) as hashes:
        assert {f: hashes.result(f) for f in want} == want
        with pytest.raises(InputError, match="cannot read: Bad file descriptor") as e:
            hashes.result(unreadable)
        assert e.value.file == unreadable
        assert hashes.pid is not None


def _worker(tmp_path: Path, body: str) -> Path:
    """A stand-in for ``hash_worker.py``: ``body`` run with ``THREADS CHUNK FD...`` in ``sys.argv``."""
    script = tmp_path / "worker.py"
    script.write_text("import json, os, sys, time\n" + textwrap.dedent(body))
    return script


HELLO = 'print(json.dumps({"pid": os.getpid()}), flush=True)\n'
FD = "int(sys.argv[3])"


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (HELLO + 'print("not json", flush=True); time.sleep(60)\n', "no JSON object"),
        (HELLO + 'print(json.dumps({"fd": 9999, "sha256": "0" * 64}), flush=True)\n', "no descriptor"),
        (HELLO + f'print(json.dumps({{"fd": {FD}, "sha256": "xyz", "bytes": 1, "start": 0, "end": 0}}))\n',
         "no result"),
        ('print("[]", flush=True); time.sleep(60)\n', "no JSON object"),
        (HELLO + 'for a in sys.argv[3:]: print(json.dumps({"fd": int(a), "bug": "ValueError: x"}))\n',
         "hashing failed: ValueError"),
        (HELLO + "sys.exit(0)\n", r"ended \(exit status 0\)"),
        (HELLO + "sys.exit(5)\n", r"ended \(exit status 5\)"),
    ],
)  # fmt: skip
def test_a_hashing_process_that_says_what_it_should_not_is_an_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, said: str
) -> None:
    """Garbage, a line for a descriptor it was not given, a digest that is none, a bug it reports, or an
    end before every file is hashed: every pending file raises an ``InternalError`` (not the file's
    fault), at once, the process ended; no digest is taken from it."""
    want = _files(tmp_path / "in", [10, 20])
    monkeypatch.setattr(process_hashes, "WORKER", _worker(tmp_path, body))
    before = _open_fds()
    with ProcessHashes(want) as hashes, ThreadPoolExecutor(1) as pool:
        for f in want:
            with pytest.raises(InternalError, match=said):
                pool.submit(hashes.result, f).result(timeout=30)
        pid = hashes.pid
    assert pid is None or _reaped(pid)
    assert _open_fds() == before


@pytest.mark.parametrize("how", ["no executable", "no script", "ends before it runs"])
def test_without_a_hashing_process_files_hash_on_threads_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """No ``sys.executable``, no script to run, or a process that ends before it says it runs: the same
    descriptors hash on threads here, with the same digests, timeline and counts."""
    want = _files(tmp_path / "in", [0, hashing.HASH_CHUNK + 3, 77])
    missing = os.path.realpath(tmp_path / "missing")
    if how == "no executable":
        monkeypatch.setattr(sys, "executable", "")
    elif how == "no script":
        monkeypatch.setattr(process_hashes, "WORKER", tmp_path / "no-such-script.py")
    else:
        monkeypatch.setattr(process_hashes, "WORKER", _worker(tmp_path, "sys.exit(2)\n"))
    before = _open_fds()
    with ProcessHashes([*want, missing]) as hashes:
        assert {f: hashes.result(f) for f in want} == want
        with pytest.raises(InputError, match="cannot read"):
            hashes.result(missing)
        assert hashes.pid is None
        rows = hashes.timeline()
        assert {r["file"]: r["read_itself"] for r in rows} == {f: os.path.getsize(f) for f in want}
        assert all(0 <= r["start"] <= r["end"] for r in rows)
        assert hashes.read_itself == sum(os.path.getsize(f) for f in want)
    assert _open_fds() == before
    assert not _our_threads()


def test_the_hashing_process_ends_with_its_parent(tmp_path: Path) -> None:
    """A parent that exits without closing ends and reaps the process at its exit; a parent killed
    outright leaves it the end of its stdin, on which it exits by itself."""
    big = _sparse(tmp_path / "big")
    code = (
        "import sys, time\n"
        "from moetool.io.process_hashes import ProcessHashes\n"
        f"h = ProcessHashes([{big!r}])\n"
        "while h.pid is None: time.sleep(0.005)\n"
        "print(h.pid, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(f"/proc/{int(done.stdout)}")  # reaped before its parent exited
    killed = subprocess.run(
        [sys.executable, "-c", code + "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _gone(int(killed.stdout), within=10)
