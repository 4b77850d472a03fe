"""``--resume`` continues only the run it belongs to, and a refused resume loses nothing.

An interrupted run records, beside each finished shard's sha256, the input files it reads (size, times,
inode, device: ``moetool.pipeline.input_files``). A resume proves its input is that one and refuses
anything else naming the file: another checkpoint with the same headers, the same files rewritten in
place (also with the modification time put back), a file replaced by a copy. The same input reached
by another path resumes. A refused resume — other input, other options, other shard size or layout,
a full disk — keeps OUT.partial byte for byte, and a correct resume afterwards still reuses every
recorded shard and ends with the bytes of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_helpers import (
    DIMS,
    FAMILY,
    SHARD,
    hf_checkpoint,
    interrupt,
    one_error_line,
    partial_of,
    run_cli,
    same_output,
    shards_of,
    tree_digest,
)

from moetool import pipeline
from moetool.pipeline import PROGRESS_NAME

RECORDED = 3  # shards written before the interruption


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_checkpoint(FAMILY, tmp_path_factory.mktemp("base") / "model", **DIMS)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model with other values: identical headers (names, dtypes, shapes, offsets)."""
    return hf_checkpoint(FAMILY, tmp_path_factory.mktemp("other") / "model", seed=1, **DIMS)


@pytest.fixture(scope="module")
def clean(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    code, _, err = run_cli("quantize", base, out, "--max-shard-size", SHARD, "-q")
    assert code == 0, err
    return out


def headers(root: Path) -> dict[str, bytes]:
    out = {}
    for s in shards_of(root):
        raw = (root / s).read_bytes()
        out[s] = raw[: 8 + int.from_bytes(raw[:8], "little")]
    return out


def test_the_other_input_has_the_same_headers_and_other_values(base: Path, other: Path) -> None:
    """What makes the mixing cases below hard: nothing but the values tells the two inputs apart."""
    assert headers(base) == headers(other)
    assert all((base / s).read_bytes() != (other / s).read_bytes() for s in shards_of(base))


def resume(model: Path, out: Path, *extra: str) -> tuple[int, dict, str]:
    code, stdout, err = run_cli(
        "quantize", model, out, "--max-shard-size", SHARD, "-q", "--json", "--resume", *extra
    )
    return code, (json.loads(stdout) if stdout.strip() else {}), err


def assert_resumes_cleanly(model: Path, out: Path, clean: Path) -> None:
    """The kept work is whole: a resume reuses every recorded shard and ends with the clean bytes."""
    code, result, err = resume(model, out)
    assert code == 0, err
    assert len(result["reused_shards"]) >= RECORDED, result["reused_shards"]
    same_output(out, clean)


# -- the same input, by any path, resumes ------------------------------------------------------------
def same_folder(area: Path, model: Path) -> Path:
    return model


def through_a_link(area: Path, model: Path) -> Path:
    (area / "alias").symlink_to(model)
    return area / "alias"


def folder_renamed(area: Path, model: Path) -> Path:
    """The folder moved within its filesystem: the files (inodes, times) are the same files."""
    return Path(shutil.move(model, area / "renamed"))


SAME_INPUT: dict[str, Callable[[Path, Path], Path]] = {
    "same_folder": same_folder,
    "through_a_link": through_a_link,
    "folder_renamed": folder_renamed,
}


@pytest.mark.parametrize("case", list(SAME_INPUT))
def test_the_same_input_resumes_to_the_clean_bytes(
    base: Path, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, untouched
) -> None:
    model = Path(shutil.copytree(base, tmp_path / "model"))
    out = tmp_path / "out"
    interrupt(model, out, RECORDED, monkeypatch)
    arg = SAME_INPUT[case](tmp_path, model)
    untouched(arg)
    assert_resumes_cleanly(arg, out, clean)


# -- another input, however it looks the same, is refused -------------------------------------------
def another_checkpoint(model: Path, other: Path, area: Path) -> tuple[Path, str]:
    """Another folder holding the same model with other values (the issue's case)."""
    b = Path(shutil.copytree(other, area / "b"))
    return b, str(b / shards_of(b)[0])


def files_overwritten_in_place(model: Path, other: Path, area: Path) -> tuple[Path, str]:
    """The other model's bytes written into the same files (same inodes, same sizes)."""
    for s in shards_of(model):
        with open(model / s, "r+b") as f:
            f.write((other / s).read_bytes())
    return model, str(model / shards_of(model)[0])


def one_byte_changed_and_mtime_restored(model: Path, other: Path, area: Path) -> tuple[Path, str]:
    """One value byte of the last shard flipped in place, its modification time put back: only the
    change time, which no unprivileged call can set, still tells."""
    victim = model / shards_of(model)[-1]
    st = os.stat(victim)
    with open(victim, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        b = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x10]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(victim).st_mtime_ns == st.st_mtime_ns
    return model, str(victim)


def shard_replaced_by_a_copy(model: Path, other: Path, area: Path) -> tuple[Path, str]:
    """A shard replaced by a byte-identical copy (a re-download): a new file, so refused, which is
    safe — what cannot be proven the same is not reused."""
    victim = model / shards_of(model)[1]
    shutil.copyfile(victim, area / "copy")
    os.replace(area / "copy", victim)
    return model, str(victim)


OTHER_INPUT: dict[str, Callable[[Path, Path, Path], tuple[Path, str]]] = {
    "another_checkpoint": another_checkpoint,
    "files_overwritten_in_place": files_overwritten_in_place,
    "one_byte_changed_and_mtime_restored": one_byte_changed_and_mtime_restored,
    "shard_replaced_by_a_copy": shard_replaced_by_a_copy,
}


@pytest.mark.parametrize("case", list(OTHER_INPUT))
def test_a_resume_from_another_input_is_refused_and_keeps_the_work(
    base: Path,
    other: Path,
    clean: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    untouched,
) -> None:
    model = Path(shutil.copytree(base, tmp_path / "model"))
    out = tmp_path / "out"
    interrupt(model, out, RECORDED, monkeypatch)
    kept = tree_digest(partial_of(out))
    arg, named = OTHER_INPUT[case](model, other, tmp_path)
    untouched(arg)
    code, _, err = resume(arg, out)
    line = one_error_line(err)
    assert code == 2 and named in line and "OUT.partial is kept" in line, line
    assert not out.exists()
    assert tree_digest(partial_of(out)) == kept, "a refused resume changed OUT.partial"


# -- other options: refused, kept, and the right resume still works ----------------------------------
OTHER_OPTIONS = {
    "scale_fmt": ["--scale-fmt", "ue8m0"],
    "layout": ["--layout", "deepgemm"],  # the other layout (hf is the default)
    "shard_size": ["--max-shard-size", "150KB"],
    "targets": ["--targets", "linear"],
}


@pytest.mark.parametrize("case", list(OTHER_OPTIONS))
def test_a_resume_with_other_options_is_refused_and_keeps_the_work(
    base: Path, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, untouched
) -> None:
    model = Path(shutil.copytree(base, tmp_path / "model"))
    out = tmp_path / "out"
    interrupt(model, out, RECORDED, monkeypatch)
    untouched(model)
    kept = tree_digest(partial_of(out))
    code, _, err = resume(model, out, *OTHER_OPTIONS[case])
    line = one_error_line(err)
    assert code == 2 and "other options" in line and "OUT.partial is kept" in line, line
    assert tree_digest(partial_of(out)) == kept
    assert_resumes_cleanly(model, out, clean)


def test_a_resume_that_runs_out_of_disk_keeps_the_work(
    base: Path, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, untouched
) -> None:
    """A real process with a file-size limit below one shard (EFBIG, as a full disk): exit 2 naming the
    file, the recorded shards and their record kept, the unfinished shard gone; then the resume works."""
    model = Path(shutil.copytree(base, tmp_path / "model"))
    out = tmp_path / "out"
    interrupt(model, out, RECORDED, monkeypatch)
    untouched(model)
    kept = tree_digest(partial_of(out))
    limit = 16 << 10

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moetool",
            "quantize",
            str(model),
            str(out),
            "--max-shard-size",
            SHARD,
            "-q",
            "--resume",
        ],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        env={**os.environ, "MOETOOL_DEBUG": "0"},
        timeout=300,
    )
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "no space" in line and "OUT.partial is kept" in line, line
    assert tree_digest(partial_of(out)) == kept, "the refused resume lost or left something"
    assert not list(partial_of(out).glob("*.tmp"))
    record = json.loads((partial_of(out) / PROGRESS_NAME).read_text())
    assert len([k for k in record if k.endswith(".safetensors")]) == RECORDED
    assert_resumes_cleanly(model, out, clean)


# -- an input changed while a run reads it ------------------------------------------------------------
# Kernel timestamps advance by scheduler ticks (1 to 10 ms): a write this long after the header was read
# is sure to give the file a new change time.
TICK_S = 0.05


@pytest.fixture(scope="module")
def shared_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A deepseek_v3 model (a shared expert, so fuse-shared has work) and the same model with other
    values: identical headers."""
    root = tmp_path_factory.mktemp("shared")
    a = hf_checkpoint("deepseek_v3", root / "a", **DIMS)
    b = hf_checkpoint("deepseek_v3", root / "b", seed=1, **DIMS)
    assert headers(a) == headers(b)
    return a, b


def replaced(model: Path, other: Path) -> None:
    """Every shard replaced (renamed over) by the other model's file."""
    for s in shards_of(model):
        shutil.copyfile(other / s, model / f".{s}.new")
        os.replace(model / f".{s}.new", model / s)


def rewritten_in_place(model: Path, other: Path) -> None:
    """The other model's bytes written into every shard file (same inodes, same sizes, same headers)."""
    time.sleep(TICK_S)
    for s in shards_of(model):
        with open(model / s, "r+b") as f:
            f.write((other / s).read_bytes())


CHANGES: dict[str, Callable[[Path, Path], None]] = {
    "replaced": replaced,
    "rewritten_in_place": rewritten_in_place,
}


def change_during(when: str, change: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> None:
    """Apply ``change`` once the plan is made from the headers and before any data is read
    (``before_any_data``), or once the first output shard is written (``after_a_shard``)."""
    if when == "before_any_data":
        real_execute = pipeline.execute

        def execute(*args, **kwargs):
            change()
            return real_execute(*args, **kwargs)

        monkeypatch.setattr(pipeline, "execute", execute)
        return
    real_write = pipeline.write_shard
    done = [0]

    def write_shard(*args, **kwargs):
        result = real_write(*args, **kwargs)
        done[0] += 1
        if done[0] == 1:
            change()
        return result

    monkeypatch.setattr(pipeline, "write_shard", write_shard)


@pytest.mark.parametrize("command", ["quantize", "fuse-shared"])
@pytest.mark.parametrize("how", list(CHANGES))
@pytest.mark.parametrize("when", ["before_any_data", "after_a_shard", "during_a_resume"])
def test_an_input_changed_while_it_is_read_is_refused(
    shared_pair: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    how: str,
    when: str,
) -> None:
    """Headers are read (and the plan made) before the data: a shard replaced or rewritten in between,
    or while the run converts, would be read at the old header's offsets and mix two models. It is
    refused naming the file, whether it changed before its first byte was read or after; a fresh run
    leaves nothing, a resumed one keeps OUT.partial, and the next resume refuses the changed input."""
    a, b = shared_pair
    model = Path(shutil.copytree(a, tmp_path / "model"))
    out = tmp_path / "out"
    args = [command, model, out, "--max-shard-size", SHARD, "-q"]
    if when == "during_a_resume":
        with monkeypatch.context() as m:
            m.setattr(pipeline, "write_shard", _stop_after(pipeline.write_shard, 1))
            code, _, err = run_cli(*args)
        assert code == 130, err
        args.append("--resume")
    with monkeypatch.context() as m:
        change_during(
            "before_any_data" if when == "before_any_data" else "after_a_shard",
            lambda: CHANGES[how](model, b),
            m,
        )
        code, _, err = run_cli(*args, guard_inputs=False)  # the test itself changes the input
    line = one_error_line(err)
    assert code == 2, line
    assert "changed since its header was read" in line, line
    assert any(str(model / s) in line for s in shards_of(model)), line
    assert not out.exists()
    if when != "during_a_resume":
        assert not partial_of(out).exists(), "a failed fresh run left OUT.partial"
        return
    assert "OUT.partial is kept" in line and partial_of(out).is_dir(), line
    kept = tree_digest(partial_of(out))
    code, _, err = run_cli(*args)
    line = one_error_line(err)
    assert code == 2 and "is not the file OUT.partial was written from" in line, line
    assert tree_digest(partial_of(out)) == kept


def _stop_after(real: Callable, n: int) -> Callable:
    """``real`` (``write_shard``) that is interrupted (Ctrl-C) once ``n`` shards are written."""
    done = [0]

    def write_shard(*args, **kwargs):
        if done[0] >= n:
            raise KeyboardInterrupt
        done[0] += 1
        return real(*args, **kwargs)

    return write_shard
