"""The shard writer's durability switch, its background read-back hash and its file-to-file copies.

``ShardWriter`` takes the sha256 from bytes read back from the file while the rest is still being
written; the digest must be that of the final file whatever the order of the writes, from however many
threads, and also when a range already read back is written again. ``fsync=True`` (the CLI's
``--fsync``) must sync (background ``fdatasync`` as the file grows, ``fsync`` before the rename, folders
around the commit); without it nothing is synced. Either way the bytes are the same.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moetool.io.writer as writer_mod
from moetool.errors import InputError
from moetool.io.hashing import sha256_file
from moetool.io.safetensors_format import DTYPE_NAMES
from moetool.io.writer import OutputDir, ShardWriter

SEED = 20261126


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (NaN and inf patterns included: the writer must not care)."""
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


@pytest.fixture
def sync_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Counts os.fsync / os.fdatasync calls (they still run) from every thread."""
    calls: Counter = Counter()
    lock = threading.Lock()
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fsync(fd: int) -> None:
        with lock:
            calls["fsync"] += 1
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        with lock:
            calls["fdatasync"] += 1
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    yield calls


def _write_stack(path: Path, *, fsync: bool, seed: int, threads: int = 1) -> tuple[str, int, torch.Tensor]:
    """A stacked ``[e, n, k]`` tensor written expert-slice by expert-slice, shuffled, from ``threads``
    threads, plus a small tensor; returns (digest, size, the stack)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    e, n, k = 7, 45, 131  # slices of 17 to 45 rows of an odd width
    stack = _random((e, n, k), torch.bfloat16, g)
    bias = _random((k,), torch.float32, g)
    w = ShardWriter(
        path, [("stack", "BF16", (e, n, k)), ("bias", "F32", (k,))], {"format": "pt"}, fsync=fsync
    )
    jobs = [("bias", bias, 0)]
    for ex in range(e):
        r0 = 0
        while r0 < n:
            r1 = min(n, r0 + rng.randint(17, 45))
            jobs.append(("stack", stack[ex, r0:r1], (ex * n + r0) * k * 2))
            r0 = r1
    rng.shuffle(jobs)
    chunks = [jobs[i::threads] for i in range(threads)]
    errors: list[BaseException] = []

    def run(part: list[tuple[str, torch.Tensor, int]]) -> None:
        try:
            for name, t, start in part:
                w.write(name, t, start)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(c,)) for c in chunks]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors
    digest, size = w.finish()
    return digest, size, stack


@pytest.mark.parametrize("threads", [1, 3])
def test_digest_is_of_the_final_file_whatever_the_write_order(tmp_path: Path, threads: int) -> None:
    path = tmp_path / "s.safetensors"
    digest, size, stack = _write_stack(path, fsync=False, seed=SEED + threads, threads=threads)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert size == path.stat().st_size
    with safe_open(path, framework="pt") as f:
        assert torch.equal(_bits(f.get_tensor("stack")), _bits(stack))


def test_rewriting_a_range_already_read_back_gives_the_digest_of_the_new_bytes(tmp_path: Path) -> None:
    """The read-back thread may already have hashed a range when it is written again with other bytes:
    the digest must still be that of the file as it ends up."""
    g = torch.Generator().manual_seed(SEED)
    first, second = _random((3000, 67), torch.float32, g), _random((3000, 67), torch.float32, g)
    tail = _random((5,), torch.float32, g)
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, [("a", "F32", (3000, 67)), ("t", "F32", (5,))])
    w.write("a", first)
    deadline = time.monotonic() + 10
    while w._readback._claimed < w.spans["a"][0] + first.numel() * 4 and time.monotonic() < deadline:
        time.sleep(0.001)  # until the first bytes have been read back
    assert w._readback._claimed >= w.spans["a"][0] + first.numel() * 4
    w.write("a", second)
    w.write("t", tail)
    digest, _ = w.finish()
    data = path.read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    with safe_open(path, framework="pt") as f:
        assert torch.equal(_bits(f.get_tensor("a")), _bits(second))


def test_fsync_option_syncs_and_no_option_never_does(
    tmp_path: Path, sync_calls: Counter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_mod, "FLUSH_EVERY", 4096)  # so background syncs start on a small file
    plain, _, _ = _write_stack(tmp_path / "plain.safetensors", fsync=False, seed=SEED)
    assert sync_calls == Counter()
    synced, _, _ = _write_stack(tmp_path / "synced.safetensors", fsync=True, seed=SEED)
    assert sync_calls["fsync"] >= 1 and sync_calls["fdatasync"] >= 1
    assert plain == synced
    assert (tmp_path / "plain.safetensors").read_bytes() == (tmp_path / "synced.safetensors").read_bytes()


@pytest.mark.parametrize("fsync", [False, True])
def test_output_dir_syncs_files_and_folders_only_when_asked(
    tmp_path: Path, sync_calls: Counter, fsync: bool
) -> None:
    src = tmp_path / "tokenizer.json"
    src.write_bytes(os.urandom(1000))
    out = OutputDir(tmp_path / "out", source=None, fsync=fsync)
    out.write_json("config.json", {"a": [1, 2.5, None]})
    out.copy_file(src, "tokenizer.json")
    final = out.commit()
    if fsync:
        # config.json, the copied file, OUT.partial before the rename, OUT's parent after it
        assert sync_calls["fsync"] >= 4
    else:
        assert sync_calls == Counter()
    assert (final / "tokenizer.json").read_bytes() == src.read_bytes()
    assert (final / "config.json").read_text() == '{\n  "a": [\n    1,\n    2.5,\n    null\n  ]\n}\n'


def _source_file(tmp_path: Path, nbytes: int, seed: int) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(nbytes)
    p = tmp_path / f"src-{seed}.bin"
    p.write_bytes(data)
    return p, data


@pytest.mark.parametrize("through_memory", [False, True])
def test_copy_from_puts_the_source_bytes_at_the_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, through_memory: bool
) -> None:
    """In the kernel, or through memory where copy_file_range refuses (another filesystem), same bytes."""
    if through_memory:

        def refuse(*args: object, **kwargs: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse)
        monkeypatch.setattr(writer_mod, "COPY_CHUNK", 1000)  # several rounds through the buffer
    src, data = _source_file(tmp_path, 20011, SEED)
    g = torch.Generator().manual_seed(SEED)
    head = _random((3, 11), torch.bfloat16, g)
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, [("head", "BF16", (3, 11)), ("w", "BF16", (2, 4999))])
    fd = os.open(src, os.O_RDONLY)
    try:
        # two halves of w from two places of the source, the second half first
        w.copy_from("w", "BF16", fd, 13 + 9998, 9998, 9998, src=str(src))
        w.copy_from("w", "BF16", fd, 13, 9998, 0, src=str(src))
        w.write("head", head)
        digest, _ = w.finish()
    finally:
        os.close(fd)
    with safe_open(path, framework="pt") as f:
        got = f.get_tensor("w")
    assert bytes(_bits(got).numpy()) == data[13 : 13 + 2 * 9998]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_copy_from_refuses_wrong_dtype_overrun_and_a_short_source(tmp_path: Path) -> None:
    src, _ = _source_file(tmp_path, 300, SEED + 1)
    w = ShardWriter(tmp_path / "s.safetensors", [("w", "F32", (10, 10))])
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(InputError, match="w"):
            w.copy_from("w", "BF16", fd, 0, 200, src=str(src))
        with pytest.raises(InputError, match="overruns"):
            w.copy_from("w", "F32", fd, 0, 200, 300, src=str(src))
        with pytest.raises(InputError) as err:  # 400 bytes wanted, the source holds 300 from 0
            w.copy_from("w", "F32", fd, 0, 400, src=str(src))
        assert "src-" in str(err.value) and "w" in str(err.value) and "ended" in str(err.value)
    finally:
        os.close(fd)
        w.close()
    assert not (tmp_path / "s.safetensors").exists()


def test_close_stops_the_read_back_thread_of_an_unfinished_file(tmp_path: Path) -> None:
    before = {t.ident for t in threading.enumerate()}
    w = ShardWriter(tmp_path / "s.safetensors", [("w", "F32", (4, 4)), ("v", "F32", (3,))])
    w.write("w", torch.ones(4, 4))
    w.close()
    left = [t for t in threading.enumerate() if t.ident not in before and t.name == "moetool-readback"]
    assert not left
    assert not (tmp_path / "s.safetensors").exists()


def test_zero_dim_and_empty_tensors_finish_with_the_file_digest(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(SEED)
    scalar = _random((), torch.float32, g)
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, [("e", "BF16", (0, 5)), ("s", DTYPE_NAMES[torch.float32], ())])
    w.write("s", scalar)
    digest, size = w.finish()
    assert size == path.stat().st_size
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
