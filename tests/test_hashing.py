"""File hashes: ``sha256_file`` and ``FileHashes`` agree with hashlib on sizes around the read size, and
the threads of ``FileHashes`` are gone once it is closed."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import pytest
from test_validate_io import _our_threads

from moetool.io import hashing
from moetool.io.hashing import FileHashes
from moetool.io.hashing import sha256_file as sha256_of


@pytest.mark.parametrize(
    "size", [0, 1, hashing.HASH_CHUNK - 1, hashing.HASH_CHUNK, 2 * hashing.HASH_CHUNK + 5]
)
def test_sha256_of_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


def test_file_hashes_in_parallel(tmp_path: Path) -> None:
    files = {}
    for i, size in enumerate([3, hashing.HASH_CHUNK + 17, 0, 100_003]):
        p = tmp_path / f"f{i}"
        p.write_bytes(random.Random(i).randbytes(size))
        files[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    t0 = time.perf_counter()
    with FileHashes(files) as hashes:
        assert {p: hashes.result(p) for p in files} == files
        assert hashes.done_at >= t0
    assert not _our_threads()
