"""``--fsync`` on the writing commands: it syncs every output file and folder (background
``fdatasync`` as a shard grows, ``fsync`` before each rename); without it nothing is synced. The
output is byte-identical either way, and identical when unchanged tensors are copied through memory
instead of in the kernel.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import moetool.io.writer as writer_mod
from moetool.cli.main import main
from moetool.testing.factory import make_checkpoint

MANIFEST = "moetool.json"


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V3 BF16 with a shared expert, hidden 320 (a ragged 64-wide block), 3 experts, 2 shards."""
    return make_checkpoint(
        "deepseek_v3",
        tmp_path_factory.mktemp("fsync_src") / "ds",
        num_layers=3,
        hidden_size=320,
        moe_intermediate_size=128,
        num_experts=3,
        vocab_size=389,
        max_shard_bytes=1_500_000,
        seed=7,
    )


@pytest.fixture
def sync_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Counts os.fsync / os.fdatasync calls from every thread; the calls still happen."""
    calls: Counter = Counter()
    lock = threading.Lock()
    real = {"fsync": os.fsync, "fdatasync": os.fdatasync}

    def counting(name: str):
        def call(fd: int) -> None:
            with lock:
                calls[name] += 1
            real[name](fd)

        return call

    for name in real:
        monkeypatch.setattr(os, name, counting(name))
    yield calls


def _run(*args: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*args, "-q"])
    assert exc.value.code == 0


def _tree(out: Path) -> dict[str, bytes]:
    """Every file of OUT by relative path; moetool.json without its argv (which names the options)."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop(MANIFEST))
    manifest.pop("argv")
    files[MANIFEST] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest.mark.parametrize(
    "command",
    [
        ("quantize",),
        ("quantize", "--layout", "hf", "--scale-fmt", "ue8m0"),
        ("fuse-shared", "--replicas", "2"),
    ],
    ids=["quantize-deepgemm", "quantize-hf-ue8m0", "fuse-shared"],
)
def test_fsync_syncs_and_its_absence_never_does_with_the_same_bytes(
    src: Path,
    tmp_path: Path,
    sync_calls: Counter,
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
    untouched,
) -> None:
    untouched(src)  # the input's bytes are compared at the end
    name, *opts = command
    plain = tmp_path / "plain"
    _run(name, str(src), str(plain), *opts, "--max-shard-size", "700KB")
    assert sync_calls == Counter(), "no file or folder is synced without --fsync"

    monkeypatch.setattr(writer_mod, "FLUSH_EVERY", 64 << 10)  # background syncs start on small shards
    synced = tmp_path / "synced"
    _run(name, str(src), str(synced), *opts, "--max-shard-size", "700KB", "--fsync")
    shards = len(list(synced.glob("*.safetensors")))
    assert shards >= 2
    # each shard before its rename, the small files, OUT.partial and its parent around the commit
    assert sync_calls["fsync"] >= shards + 2
    assert sync_calls["fdatasync"] >= 1, "background syncs while a shard grows"
    assert _tree(plain) == _tree(synced)


def test_unchanged_tensors_copied_through_memory_give_the_same_bytes(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, untouched
) -> None:
    """Where copy_file_range is refused (another filesystem, an old kernel), the same output."""
    untouched(src)
    in_kernel = tmp_path / "kernel"
    _run("quantize", str(src), str(in_kernel))
    calls = Counter()

    def refuse(*args: object, **kwargs: object) -> int:
        calls["copy_file_range"] += 1
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    through_memory = tmp_path / "memory"
    _run("quantize", str(src), str(through_memory))
    assert calls["copy_file_range"] > 0
    assert _tree(in_kernel) == _tree(through_memory)
