"""The input is never written, renamed or deleted, and nothing in the work area is followed.

The rule, tested by real path (links followed) in several shapes rather than one example: moetool
creates, writes, renames and deletes nothing that resolves into the input — OUT, OUT.partial, the lock
file, OUT.old-PID — whether the input is named like OUT.partial, lies inside it, or is reached through
a link; and in OUT.partial it never follows a link it did not create (the folder itself, a planted
``<shard>.tmp``, a planted shard, the lock and the progress record). Each case runs plain, with
``--overwrite`` and with ``--resume``, and the whole area around it must be byte-identical afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    DIMS,
    FAMILY,
    MANIFEST,
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
from moetool.io.writer import LOCK_NAME
from moetool.pipeline import PROGRESS_NAME
from moetool.ssm import StateMeta, write_state_file

FLAGS = {"plain": [], "overwrite": ["--overwrite"], "resume": ["--resume"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_checkpoint(FAMILY, tmp_path_factory.mktemp("base") / "model", **DIMS)


@pytest.fixture(scope="module")
def clean(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: the bytes every resumed run must end with."""
    out = tmp_path_factory.mktemp("clean") / "out"
    code, _, err = run_cli("quantize", base, out, "--max-shard-size", SHARD, "-q")
    assert code == 0, err
    return out


# -- 1. nothing that resolves into the input is written, renamed or deleted ---------------------------
def named_like_the_partial(area: Path, base: Path) -> tuple[Path, Path, Path]:
    """``quantize fs/model.partial fs/model``: the input is OUT's work folder by name."""
    model = Path(shutil.copytree(base, area / "model.partial"))
    return model, model, area / "model"


def inside_the_partial(area: Path, base: Path) -> tuple[Path, Path, Path]:
    model = Path(shutil.copytree(base, area / "out.partial" / "model"))
    return model, model, area / "out"


def deep_inside_the_partial(area: Path, base: Path) -> tuple[Path, Path, Path]:
    model = Path(shutil.copytree(base, area / "out.partial" / "a" / "b" / "model"))
    return model, model, area / "out"


def partial_is_a_link_to_the_input(area: Path, base: Path) -> tuple[Path, Path, Path]:
    model = Path(shutil.copytree(base, area / "model"))
    (area / "out.partial").symlink_to(model)
    return model, model, area / "out"


def partial_is_a_link_into_the_input(area: Path, base: Path) -> tuple[Path, Path, Path]:
    model = Path(shutil.copytree(base, area / "model"))
    (model / "extra").mkdir()
    (area / "out.partial").symlink_to(model / "extra")
    return model, model, area / "out"


def out_is_a_link_to_the_input(area: Path, base: Path) -> tuple[Path, Path, Path]:
    model = Path(shutil.copytree(base, area / "model"))
    (area / "out").symlink_to(model)
    return model, model, area / "out"


def out_parent_is_a_link_into_the_input(area: Path, base: Path) -> tuple[Path, Path, Path]:
    model = Path(shutil.copytree(base, area / "model"))
    (area / "alias").symlink_to(model)
    return model, model, area / "alias" / "fp8"


def input_given_through_a_link(area: Path, base: Path) -> tuple[Path, Path, Path]:
    """MODEL is a link; OUT is inside the folder it points to."""
    real = Path(shutil.copytree(base, area / "real"))
    (area / "link").symlink_to(real)
    return real, area / "link", real / "fp8"


def partial_name_is_a_link_to_the_input(area: Path, base: Path) -> tuple[Path, Path, Path]:
    """OUT is a fresh name, but ``OUT.partial`` already exists as a link to the input."""
    real = Path(shutil.copytree(base, area / "weights"))
    (area / "m.partial").symlink_to(real)
    return real, real, area / "m"


def out_spelled_with_dotdot(area: Path, base: Path) -> tuple[Path, Path, Path]:
    model = Path(shutil.copytree(base, area / "model"))
    return model, model, model / "x" / ".."


def inside_a_hub_blob_store(area: Path, base: Path) -> tuple[Path, Path, Path]:
    """A Hub cache snapshot whose files are links into ``blobs``: OUT inside the blob store is inside
    the input, though not inside the snapshot folder."""
    repo = area / "hub" / "models--org--name"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(base.iterdir()):
        blob = repo / "blobs" / f"blob-{p.name}"
        shutil.copyfile(p, blob)
        (snap / p.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return repo, snap, repo / "blobs" / "fp8"


def out_equals_the_input_through_a_linked_parent(area: Path, base: Path) -> tuple[Path, Path, Path]:
    """OUT names the input itself, through a link to the folder that holds it."""
    model = Path(shutil.copytree(base, area / "model"))
    (area / "alias").symlink_to(area)
    return model, model, area / "alias" / "model"


# Relative paths are taken from the current folder, which the test makes ``area``.
def relative_out_equal_to_the_input(area: Path, base: Path) -> tuple[Path, Path, Path]:
    model = Path(shutil.copytree(base, area / "model"))
    return model, Path("model"), Path("model")


def relative_out_inside_the_input(area: Path, base: Path) -> tuple[Path, Path, Path]:
    model = Path(shutil.copytree(base, area / "model"))
    return model, Path("model"), Path("model") / "fp8"


def relative_out_above_the_input(area: Path, base: Path) -> tuple[Path, Path, Path]:
    """``OUT=model/..``: the folder holding the input, which --overwrite would replace."""
    model = Path(shutil.copytree(base, area / "model"))
    return model, Path("model"), Path("model") / ".."


INTO_INPUT: dict[str, Callable[[Path, Path], tuple[Path, Path, Path]]] = {
    "named_like_the_partial": named_like_the_partial,
    "inside_the_partial": inside_the_partial,
    "deep_inside_the_partial": deep_inside_the_partial,
    "partial_is_a_link_to_the_input": partial_is_a_link_to_the_input,
    "partial_is_a_link_into_the_input": partial_is_a_link_into_the_input,
    "out_is_a_link_to_the_input": out_is_a_link_to_the_input,
    "out_parent_is_a_link_into_the_input": out_parent_is_a_link_into_the_input,
    "input_given_through_a_link": input_given_through_a_link,
    "partial_name_is_a_link_to_the_input": partial_name_is_a_link_to_the_input,
    "out_spelled_with_dotdot": out_spelled_with_dotdot,
    "inside_a_hub_blob_store": inside_a_hub_blob_store,
    "out_equals_the_input_through_a_linked_parent": out_equals_the_input_through_a_linked_parent,
    "relative_out_equal_to_the_input": relative_out_equal_to_the_input,
    "relative_out_inside_the_input": relative_out_inside_the_input,
    "relative_out_above_the_input": relative_out_above_the_input,
}


@pytest.fixture(scope="module")
def shared_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model with a shared expert, for fuse-shared to have work."""
    return hf_checkpoint("deepseek_v3", tmp_path_factory.mktemp("shared") / "model", **DIMS)


@pytest.mark.parametrize("command", ["quantize", "fuse-shared"])
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("case", list(INTO_INPUT))
def test_nothing_is_written_into_the_input(
    base: Path,
    shared_base: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    flags: str,
    command: str,
) -> None:
    """Every writing command goes through the same output protocol (``moetool.io.writer.OutputDir``)."""
    area = tmp_path / "fs"
    area.mkdir()
    monkeypatch.chdir(area)
    _, model_arg, out = INTO_INPUT[case](area, shared_base if command == "fuse-shared" else base)
    before = tree_digest(area)  # the input, the links, and everything next to them
    code, _, err = run_cli(command, model_arg, out, "-q", *FLAGS[flags])
    line = one_error_line(err)
    assert code == 2 and "input" in line, line
    assert str(out) in line or str(partial_of(out)) in line, line
    assert tree_digest(area) == before, "something was created, written, renamed or deleted"


def test_a_hub_snapshot_reached_through_a_link_converts(
    base: Path, clean: Path, tmp_path: Path, untouched
) -> None:
    """A Hub cache snapshot (files that are links into ``blobs``) given through a link of the user's:
    its files lie in the checkpoint (the blobs of the snapshot the link resolves to) and convert."""
    repo, snap, _ = inside_a_hub_blob_store(tmp_path, base)
    (tmp_path / "mymodel").symlink_to(snap)
    untouched(repo)
    out = tmp_path / "out"
    code, _, err = run_cli("quantize", tmp_path / "mymodel", out, "--max-shard-size", SHARD, "-q")
    assert code == 0, err
    same_output(out, clean)


def test_an_input_named_like_the_old_out_is_not_renamed_onto(base: Path, tmp_path: Path, untouched) -> None:
    """``--overwrite`` moves the old OUT aside as ``OUT.old-PID`` before removing it; an input that
    already has that name is neither replaced nor renamed, and no ``OUT.old-*`` is left."""
    model = Path(shutil.copytree(base, tmp_path / f"out.old-{os.getpid()}"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("replaced by the new output")
    untouched(model)
    code, _, err = run_cli("quantize", model, out, "--overwrite", "-q")
    assert code == 0, err
    assert (out / MANIFEST).is_file() and not (out / "stale.txt").exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", model.name]), left


def test_overwrite_replaces_a_linked_out_not_what_it_points_to(base: Path, tmp_path: Path, untouched) -> None:
    model = Path(shutil.copytree(base, tmp_path / "model"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("not moetool's to delete")
    out = tmp_path / "out"
    out.symlink_to(elsewhere)
    untouched(model, elsewhere)
    code, _, err = run_cli("quantize", model, out, "--overwrite", "-q")
    assert code == 0, err
    assert out.is_dir() and not out.is_symlink() and (out / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "model", "out"], "OUT.old-* left"


CAPTURE_OUT = [
    "inside",
    "link_into_the_model",
    "through_a_linked_folder",
    "link_in_the_model_pointing_out",
    "relative_inside",
    "link_to_a_model_file",
    "hard_link_of_a_model_file",
]


@pytest.mark.parametrize("where", CAPTURE_OUT)
def test_capture_ssm_never_writes_into_the_model(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """OUT is refused when what a link there points to, or the entry itself (which the new file would
    replace), lies in the model, however it is spelled."""
    model = Path(shutil.copytree(base, tmp_path / "model"))
    monkeypatch.chdir(tmp_path)
    if where == "through_a_linked_folder":
        (tmp_path / "alias").symlink_to(model)
        dst = tmp_path / "alias" / "state.safetensors"
    elif where == "link_into_the_model":
        dst = tmp_path / "state.safetensors"
        dst.symlink_to(model / "state.safetensors")
    elif where == "link_in_the_model_pointing_out":
        dst = model / "state.safetensors"
        dst.symlink_to(tmp_path / "elsewhere.safetensors")
    elif where == "relative_inside":
        dst = Path("model") / "state.safetensors"
    elif where == "link_to_a_model_file":
        dst = tmp_path / "state.safetensors"
        dst.symlink_to(model / "config.json")
    elif where == "hard_link_of_a_model_file":
        dst = tmp_path / "state.safetensors"
        os.link(model / "config.json", dst)
    else:
        dst = model / "state.safetensors"
    before = tree_digest(tmp_path)
    code, _, err = run_cli("capture-ssm", model, dst, "--token-ids", "1,2,3", "--overwrite", "-q")
    line = one_error_line(err)
    assert code == 2 and "input" in line, line
    assert tree_digest(tmp_path) == before


def _state(path: Path) -> Path:
    meta = StateMeta(layout="k-first", num_value_heads=4, head_k_dim=8, head_v_dim=6, num_key_heads=2)
    g = torch.Generator().manual_seed(3)
    write_state_file(
        path, {"model.layers.0.linear_attn.recurrent_state": torch.randn(2, 4, 8, 6, generator=g)}, meta
    )
    return path


def _same_name(area: Path, src: Path) -> Path:
    return src


def _link_to_it(area: Path, src: Path) -> Path:
    (area / "link.safetensors").symlink_to(src)
    return area / "link.safetensors"


def _through_a_linked_folder(area: Path, src: Path) -> Path:
    (area / "alias").symlink_to(area)
    return area / "alias" / src.name


def _spelled_with_dotdot(area: Path, src: Path) -> Path:
    (area / "sub").mkdir()
    return area / "sub" / ".." / src.name


def _relative(area: Path, src: Path) -> Path:
    return Path(src.name)


def _hard_link(area: Path, src: Path) -> Path:
    """Another name of IN's file: replacing it would change IN's link count and change time."""
    os.link(src, area / "other-name.safetensors")
    return area / "other-name.safetensors"


CONVERT_OUT_IS_IN: dict[str, Callable[[Path, Path], Path]] = {
    "same_name": _same_name,
    "link_to_it": _link_to_it,
    "through_a_linked_folder": _through_a_linked_folder,
    "spelled_with_dotdot": _spelled_with_dotdot,
    "relative": _relative,
    "hard_link": _hard_link,
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", list(CONVERT_OUT_IS_IN))
def test_convert_ssm_never_writes_its_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, overwrite: bool
) -> None:
    """OUT that resolves to IN (the same name, a link to it, a linked folder, ``..``, relative) or is
    another name of its file (a hard link) is refused, with or without --overwrite; the folder is
    byte-identical afterwards, and IN's link count and change time are as they were."""
    area = tmp_path / "fs"
    area.mkdir()
    monkeypatch.chdir(area)
    src = _state(area / "state.safetensors")
    dst = CONVERT_OUT_IS_IN[case](area, src)
    before = (tree_digest(area), _meta(src))
    code, _, err = run_cli("convert-ssm", src, dst, "-q", *(["--overwrite"] if overwrite else []))
    line = one_error_line(err)
    assert code == 2 and ("input" in line or "exists" in line), line
    assert (tree_digest(area), _meta(src)) == before


def _meta(path: Path) -> tuple[int, int, int]:
    """What replacing or removing another name of the file would change: link count, inode, change time."""
    st = os.stat(path)
    return st.st_nlink, st.st_ino, st.st_ctime_ns


def test_an_extra_file_swapped_for_a_link_out_of_the_checkpoint_is_not_copied(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extra files (tokenizer, license) are checked when planned and copied at the end: one replaced
    meanwhile by a link to a file outside the checkpoint is refused when opened, not copied into OUT."""
    model = Path(shutil.copytree(base, tmp_path / "model"))
    secret = tmp_path / "secret.txt"
    secret.write_text("never to be copied")
    out = tmp_path / "out"
    extra = model / "LICENSE"
    real_execute = pipeline.execute

    def swap_then_execute(*args, **kwargs):
        extra.unlink()
        extra.symlink_to(secret)
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(pipeline, "execute", swap_then_execute)
    code, _, err = run_cli("quantize", model, out, "-q", guard_inputs=False)
    line = one_error_line(err)
    assert code == 2 and str(extra) in line and "outside" in line, line
    assert not out.exists() and not partial_of(out).exists()


# -- 2. no link in the work area is followed ---------------------------------------------------------
def partial_links_to_a_folder(area: Path) -> Path:
    victim = area / "victim"
    victim.mkdir()
    (victim / "data.bin").write_bytes(os.urandom(1000))
    (area / "out.partial").symlink_to(victim)
    return area / "out.partial"


def partial_is_a_dangling_link(area: Path) -> Path:
    (area / "out.partial").symlink_to(area / "nowhere")
    return area / "out.partial"


def partial_is_a_file(area: Path) -> Path:
    (area / "out.partial").write_text("a file where the work folder goes")
    return area / "out.partial"


PARTIAL_NOT_A_FOLDER: dict[str, Callable[[Path], Path]] = {
    "link_to_a_folder": partial_links_to_a_folder,
    "dangling_link": partial_is_a_dangling_link,
    "a_file": partial_is_a_file,
}


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("case", list(PARTIAL_NOT_A_FOLDER))
def test_a_work_folder_that_is_not_a_real_folder_is_refused(
    base: Path, tmp_path: Path, case: str, flags: str
) -> None:
    model = Path(shutil.copytree(base, tmp_path / "model"))
    area = tmp_path / "fs"
    area.mkdir()
    named = PARTIAL_NOT_A_FOLDER[case](area)
    before = (tree_digest(area), tree_digest(model))
    code, _, err = run_cli("quantize", model, area / "out", "-q", *FLAGS[flags])
    line = one_error_line(err)
    assert code == 2 and str(named) in line, line
    assert (tree_digest(area), tree_digest(model)) == before


def plant_link_as_next_tmp(partial: Path, model: Path, victim: Path, names: list[str]) -> str | None:
    """``<next shard>.tmp`` is a link to an input shard: creating the shard must not truncate it."""
    nxt = _unrecorded_shards(partial)[0]
    (partial / f"{nxt}.tmp").symlink_to(model / shards_of(model)[0])
    return None


def plant_link_as_next_shard(partial: Path, model: Path, victim: Path, names: list[str]) -> str | None:
    """The next shard's final name is a link to an input shard (as if it were done): not reused, and
    replacing it replaces the link."""
    nxt = _unrecorded_shards(partial)[0]
    (partial / nxt).symlink_to(model / shards_of(model)[0])
    return None


def plant_link_as_recorded_shard(partial: Path, model: Path, victim: Path, names: list[str]) -> str | None:
    """A recorded shard swapped for a link to a copy of itself elsewhere: a link is never reused."""
    done = _recorded_shards(partial)[0]
    shutil.move(partial / done, victim / done)
    (partial / done).symlink_to(victim / done)
    return None


def plant_stray_entries(partial: Path, model: Path, victim: Path, names: list[str]) -> str | None:
    """Files, a folder and a link in the work folder that are no part of the output: OUT holds exactly
    what its manifest lists, and removing them removes the link, not what it points to."""
    (partial / "stray.safetensors").write_bytes(b"not an output")
    (partial / "sub").mkdir()
    (partial / "sub" / "x.json").write_text("{}")
    (partial / "tokenizer.json.tmp").symlink_to(victim / "data.bin")
    (partial / "stray-link").symlink_to(victim)
    return None


def plant_link_as_lock(partial: Path, model: Path, victim: Path, names: list[str]) -> str | None:
    (partial / LOCK_NAME).unlink()
    (partial / LOCK_NAME).symlink_to(victim / "data.bin")
    return LOCK_NAME


def plant_link_as_progress(partial: Path, model: Path, victim: Path, names: list[str]) -> str | None:
    shutil.move(partial / PROGRESS_NAME, victim / "progress.json")
    (partial / PROGRESS_NAME).symlink_to(victim / "progress.json")
    return PROGRESS_NAME


def plant_fifo_as_progress(partial: Path, model: Path, victim: Path, names: list[str]) -> str | None:
    """A FIFO as the progress record: never opened for a blocking read; nothing is reused from it,
    and it is replaced by the real record."""
    (partial / PROGRESS_NAME).unlink()
    os.mkfifo(partial / PROGRESS_NAME)
    return None


def plant_fifo_as_next_tmp(partial: Path, model: Path, victim: Path, names: list[str]) -> str | None:
    """A FIFO as ``<next shard>.tmp``: removed as an entry, never opened."""
    os.mkfifo(partial / f"{_unrecorded_shards(partial)[0]}.tmp")
    return None


def _recorded_shards(partial: Path) -> list[str]:
    record = json.loads((partial / PROGRESS_NAME).read_text())
    return sorted(k for k in record if k.endswith(".safetensors"))


def _unrecorded_shards(partial: Path) -> list[str]:
    done = set(_recorded_shards(partial))
    n = len(done)
    total = int(sorted(done)[0].split("-of-")[1].split(".")[0])
    names = [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    left = [x for x in names if x not in done]
    assert len(left) == total - n and left
    return left


PLANTED: dict[str, Callable[[Path, Path, Path, list[str]], str | None]] = {
    "link_as_next_tmp": plant_link_as_next_tmp,
    "link_as_next_shard": plant_link_as_next_shard,
    "link_as_recorded_shard": plant_link_as_recorded_shard,
    "stray_entries": plant_stray_entries,
    "link_as_lock": plant_link_as_lock,
    "link_as_progress": plant_link_as_progress,
    "fifo_as_progress": plant_fifo_as_progress,
    "fifo_as_next_tmp": plant_fifo_as_next_tmp,
}


@pytest.mark.parametrize("flags", ["resume", "overwrite"])
@pytest.mark.parametrize("case", list(PLANTED))
def test_links_planted_in_the_work_folder_are_never_followed(
    base: Path, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, flags: str, untouched
) -> None:
    model = Path(shutil.copytree(base, tmp_path / "model"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.bin").write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    interrupt(model, out, 2, monkeypatch)
    refused_name = PLANTED[case](partial_of(out), model, victim, shards_of(clean))
    untouched(model, victim)
    code, _, err = run_cli("quantize", model, out, "--max-shard-size", SHARD, "-q", *FLAGS[flags])
    if refused_name == LOCK_NAME or (refused_name is not None and flags == "resume"):
        # A planted lock is refused before anything (the lock comes first), a planted progress record
        # when a resume would read it; either is named, and the work folder stays for a fix.
        line = one_error_line(err)
        assert code == 2 and refused_name in line and "link" in line, line
        assert partial_of(out).is_dir() and not out.exists()
        return
    assert code == 0, err
    same_output(out, clean)
    assert not partial_of(out).exists()


SECOND_NAMES = {
    "a_shard_name_in_the_work_folder": ("resume", lambda out, names: partial_of(out) / names[2]),
    "a_stray_name_in_the_work_folder": ("overwrite", lambda out, names: partial_of(out) / "sub" / "x.bin"),
    "a_file_of_the_old_out": ("overwrite", lambda out, names: out / names[0]),
}


@pytest.mark.parametrize("command", ["quantize", "fuse-shared"])
@pytest.mark.parametrize("case", list(SECOND_NAMES))
def test_a_second_name_of_an_input_file_is_never_replaced_or_removed(
    base: Path, shared_base: Path, tmp_path: Path, case: str, command: str
) -> None:
    """A name in what the run would replace or remove (OUT.partial with --resume or --overwrite, the
    old OUT with --overwrite) that is a hard link of an input file: removing it would change that
    file's link count and change time (and a resume bound to the input would then refuse it). Refused
    before anything, naming the entry; the input's bytes, link counts and change times unchanged."""
    model = Path(shutil.copytree(shared_base if command == "fuse-shared" else base, tmp_path / "model"))
    out = tmp_path / "out"
    flag, where = SECOND_NAMES[case]
    entry = where(out, shards_of(model))
    entry.parent.mkdir(parents=True)
    os.link(model / shards_of(model)[0], entry)
    before = (tree_digest(tmp_path), [_meta(p) for p in sorted(model.iterdir())])
    code, _, err = run_cli(command, model, out, "-q", f"--{flag}")
    line = one_error_line(err)
    assert code == 2 and str(entry) in line and "hard link" in line, line
    assert (tree_digest(tmp_path), [_meta(p) for p in sorted(model.iterdir())]) == before


# -- OUT.partial swapped while the run works ---------------------------------------------------------
def _swap_for_a_link_to_the_input(partial: Path, model: Path, area: Path) -> Path:
    os.rename(partial, area / "moved-away")
    partial.symlink_to(model)
    return model


def _swap_for_another_folder(partial: Path, model: Path, area: Path) -> Path:
    os.rename(partial, area / "moved-away")
    partial.mkdir()
    (partial / "theirs.txt").write_text("another process's file")
    (partial / "model-00001-of-00002.safetensors.tmp").write_text("not this run's to remove")
    return partial


SWAPS: dict[str, Callable[[Path, Path, Path], Path]] = {
    "a_link_to_the_input": _swap_for_a_link_to_the_input,
    "another_folder": _swap_for_another_folder,
}


@pytest.mark.parametrize("when", ["after_a_shard", "before_the_commit"])
@pytest.mark.parametrize("swap", list(SWAPS))
def test_a_work_folder_swapped_during_the_run_is_neither_written_nor_emptied(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str, when: str
) -> None:
    """OUT.partial replaced while the run works (moved away, and a link to the input or another
    folder put under its name): every file is created, and anything removed, only in the folder the run
    locked, so the run stops naming OUT.partial; what was put there is byte-identical afterwards."""
    from moetool.io.writer import OutputDir

    model = Path(shutil.copytree(base, tmp_path / "model"))
    out = tmp_path / "out"
    swapped: list[Path] = []
    before: list[dict[str, str]] = []

    def do_swap() -> None:
        if not swapped:
            swapped.append(SWAPS[swap](partial_of(out), model, tmp_path))
            before.append(tree_digest(swapped[0]))

    if when == "after_a_shard":
        real_write = pipeline.write_shard

        def write_shard(*args, **kwargs):
            result = real_write(*args, **kwargs)
            do_swap()
            return result

        monkeypatch.setattr(pipeline, "write_shard", write_shard)
    else:
        real_prune = OutputDir.prune

        def prune(self, keep):
            do_swap()
            return real_prune(self, keep)

        monkeypatch.setattr(OutputDir, "prune", prune)
    code, _, err = run_cli("quantize", model, out, "--max-shard-size", SHARD, "-q")
    line = one_error_line(err)
    assert code == 2 and str(partial_of(out)) in line and "replaced" in line, line
    assert swapped and tree_digest(swapped[0]) == before[0], "what was put in its place was changed"
    assert not out.exists()
