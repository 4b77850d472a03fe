"""The record that lets ``--resume`` reuse the shards of an interrupted run (docs/contract.md §4): what
the run was (the plan's fingerprint), which input it read (size, times, inode and device of each shard),
and each finished shard's size and sha256, kept in ``OUT.partial`` beside the shards."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from moetool.errors import UsageError
from moetool.io.checkpoint import Checkpoint
from moetool.io.fs import changed_keys
from moetool.io.hashing import sha256_file
from moetool.io.writer import OutputDir
from moetool.plan import Plan

PROGRESS_NAME = ".moetool-progress.json"

PLAN_KEY = "__plan__"
INPUTS_KEY = "__inputs__"
MAX_PROGRESS_BYTES = 64 << 20


def reusable(path: Path, rec: dict[str, Any]) -> bool:
    """Whether the shard at ``path`` is the one the progress record describes: a regular file this run's
    predecessor created (not a link, no other name for it), of the recorded size and sha256."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != rec.get("size"):
        return False
    try:
        return sha256_file(path, follow=False) == rec.get("sha256")
    except OSError:
        return False


def plan_fingerprint(plan: Plan) -> str:
    """sha256 of everything that decides the output bytes (shards, tensors, jobs, config, metadata):
    ``--resume`` reuses shards only under the same fingerprint."""
    text = repr((plan.shards, sorted(plan.shard_metadata.items()), json.dumps(plan.config, sort_keys=True)))
    return hashlib.sha256(text.encode()).hexdigest()


def load_progress(out: OutputDir, name: str) -> dict[str, Any]:
    """The progress record an interrupted run left, or ``{}`` when there is none or it is unreadable
    (then no shard is reused). A link in its place is refused: nothing in the work folder is followed."""
    p = out.path(name)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(
                "is a symbolic link in the output's work folder",
                file=str(p),
                fix="remove it; moetool never follows a link it did not create",
            ) from None
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        with open(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_PROGRESS_BYTES + 1)
        data = json.loads(raw) if len(raw) <= MAX_PROGRESS_BYTES else None
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}
    finally:
        os.close(fd)


def input_files(ckpt: Checkpoint) -> dict[str, dict[str, int]]:
    """What binds a progress record to the input it was written from: per input shard, the file its
    header was read from, as the kernel reports it (``moetool.io.fs.file_identity``: size, inode,
    device, modification and change times, in ns); the run reads data only from those same files
    (``Checkpoint.open_shard``).

    A file with other values under the same name — another checkpoint with the same headers, or the
    same file rewritten, truncated, or replaced by a download — changes its inode or its change time,
    which the kernel sets on every write and no unprivileged call can set back. Hashing the input bytes
    instead would cost every run a second pass over the input (sha256 runs at about the speed the CPU
    quantizes) and every ``--resume`` a full re-read; these values cost one ``stat`` per file. A
    checkpoint copied elsewhere between the kill and the resume has new inodes and is refused, which
    is safe: ``--overwrite`` converts it again."""
    return ckpt.input_identity()


def check_inputs(recorded: Any, now: dict[str, dict[str, int]], ckpt: Checkpoint, out: OutputDir) -> None:
    """Refuse a resume whose input is not the one ``OUT.partial`` was written from, naming the file."""
    fix = "resume with the input OUT.partial was written from, or pass --overwrite to start again"
    if not isinstance(recorded, dict):
        raise UsageError("OUT.partial records no input to resume from", file=str(out.partial), fix=fix)
    for rel in sorted(set(recorded) | set(now)):
        was, is_ = recorded.get(rel), now.get(rel)
        if was == is_:
            continue
        if is_ is None:
            what = "was read by the interrupted run but is not in this input"
        elif not isinstance(was, dict):
            what = "was not read by the interrupted run"
        else:
            changed = changed_keys(was, is_)
            what = f"is not the file OUT.partial was written from ({', '.join(changed)} changed)"
        raise UsageError(what, file=str(ckpt.root / rel), fix=fix)


def start_record(out: OutputDir, name: str, plan: Plan, ckpt: Checkpoint) -> dict[str, Any]:
    """The progress record this run keeps: under ``--resume`` the interrupted run's, once its plan and
    its input are shown to be this run's (else a ``UsageError``), otherwise a new one."""
    done = load_progress(out, name) if out.resumed else {}
    fingerprint = plan_fingerprint(plan)
    inputs = input_files(ckpt)
    if done:
        if done.get(PLAN_KEY) != fingerprint:
            raise UsageError(
                "OUT.partial was written from another input or with other options",
                file=str(out.partial),
                fix="pass --overwrite to start again (or resume with the same command)",
            )
        check_inputs(done.get(INPUTS_KEY), inputs, ckpt, out)
    done[PLAN_KEY] = fingerprint
    done[INPUTS_KEY] = inputs
    return done
