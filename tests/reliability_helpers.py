"""What the reliability tests share: running the real command line, judging a refusal, hashing trees,
editing safetensors files by hand, and a transformers-made input checkpoint.

A refusal is judged the same way everywhere: the exit code, one line on stderr naming the culprit,
every input byte-identical before and after (files, links and folders), and no OUT / OUT.partial left.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from safetensors.torch import load_file, save_file

from moetool import pipeline
from moetool.cli.main import cli, main

INDEX = "model.safetensors.index.json"
MANIFEST = "moetool.json"
TIME_LIMIT_S = 5.0  # a bounded-time case runs in well under a second; a hang is minutes or more


def tree_digest(root: Path) -> dict[str, str]:
    """Every file (sha256), symbolic link (its target), folder and other entry (its kind) under
    ``root``, by relative path; ``root`` itself included, so a file or a link given as root counts."""
    out = {}
    entries = [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]
    for p in entries:
        rel = p.relative_to(root).as_posix() if p != root else "."
        mode = os.lstat(p).st_mode
        if stat.S_ISLNK(mode):
            out[rel] = "-> " + os.readlink(p)
        elif stat.S_ISDIR(mode):
            out[rel] = "dir"
        elif stat.S_ISREG(mode):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = f"mode {stat.S_IFMT(mode):o}"
    return out


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


INPUT_ARGUMENTS = ("model", "src", "original", "converted")  # MODEL, IN, ORIGINAL, CONVERTED


def input_paths(args: list[str]) -> list[Path]:
    """The local paths ``moetool ARGS`` reads as its inputs (MODEL, IN, ORIGINAL, CONVERTED), as the
    command's own parser reads its arguments; a Hub repo id or a missing path is none."""
    cmd = cli.commands.get(args[0]) if args else None
    if cmd is None:
        return []
    try:
        ctx = cmd.make_context(args[0], list(args[1:]), resilient_parsing=True)
    except click.exceptions.ClickException:
        return []
    found = [ctx.params.get(k) for k in INPUT_ARGUMENTS]
    return [Path(p) for p in found if isinstance(p, str) and os.path.lexists(p)]


def run_cli(*args: Any, guard_inputs: bool = True, time_limit_s: float | None = None) -> tuple[int, str, str]:
    """``moetool ARGS`` in this process through the real entry point: (exit code, stdout, stderr).

    Whatever it does, its inputs (files, links and folders) must hash the same before and after: every
    command run here, writing or not, refused or not, is held to never touching its input
    (``guard_inputs=False`` only where the test itself changes the input while the command runs).
    ``time_limit_s`` bounds the command itself (not the hashing around it): past it the test fails."""
    argv = [str(a) for a in args]
    inputs = input_paths(argv) if guard_inputs else []
    before = [tree_digest(p) for p in inputs]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with time_limit(time_limit_s) if time_limit_s else contextlib.nullcontext():
                main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    for p, was in zip(inputs, before, strict=True):
        assert tree_digest(p) == was, f"moetool {' '.join(argv)} modified its input {p}"
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    """The single line a failing command prints: never a traceback, never an internal error."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err and "internal error" not in err, err
    assert lines[0].startswith("moetool: error: "), lines[0]
    return lines[0]


def refused(
    args: list[Any],
    names: list[str],
    *,
    inputs: list[Path],
    out: Path | None = None,
    code: int = 2,
    time_limit_s: float | None = None,
) -> str:
    """Run ``moetool ARGS``; assert exit ``code``, one line naming every string of ``names``, every
    input tree unchanged and no OUT / OUT.partial. Returns the line."""
    before = [tree_digest(p) for p in inputs]
    got, stdout, err = run_cli(*args, time_limit_s=time_limit_s)
    assert got == code, f"exit {got}, expected {code}; stderr: {err.strip()[:2000]}; stdout: {stdout[:300]}"
    line = one_error_line(err)
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    assert [tree_digest(p) for p in inputs] == before, "the input was modified"
    if out is not None:
        assert not os.path.lexists(out), f"{out} was left behind"
        assert not os.path.lexists(partial_of(out)), f"{partial_of(out)} was left behind"
    return line


class Untouched:
    """Paths whose trees must be byte-identical at the end of the test to when they were registered."""

    def __init__(self) -> None:
        self.digests: dict[Path, dict[str, str]] = {}

    def __call__(self, *paths: Path) -> None:
        for p in paths:
            self.digests[p] = tree_digest(p)

    def check(self) -> None:
        for p, before in self.digests.items():
            assert tree_digest(p) == before, f"{p} was modified"


class _TimeLimit(BaseException):
    """Raised by the alarm; a BaseException so the CLI funnel's catch-all cannot swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise _TimeLimit(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def weight_map(root: Path) -> dict[str, str]:
    return json.loads((root / INDEX).read_text())["weight_map"]


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file as (header dict, data section)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def last_tensor(header: dict[str, Any]) -> str:
    """The tensor whose bytes end the file."""
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def shards_of(root: Path) -> list[str]:
    """The checkpoint's weight files, by name."""
    if (root / INDEX).exists():
        return sorted(set(weight_map(root).values()))
    return sorted(p.name for p in root.glob("*.safetensors"))


def rewrite_tensors(root: Path, change: Callable[[str, torch.Tensor], torch.Tensor | None]) -> None:
    """Re-save every shard with ``change(name, tensor)`` applied (None keeps the tensor as it is)."""
    for shard in shards_of(root):
        tensors = load_file(root / shard)
        new = {}
        for name, t in tensors.items():
            c = change(name, t)
            new[name] = t if c is None else c
        save_file(new, root / shard, metadata={"format": "pt"})


DELETE = object()  # a set_config value that removes the key


def set_config(root: Path, **changes: Any) -> None:
    """Rewrite config.json with ``changes`` applied."""
    cfg = json.loads((root / "config.json").read_text())
    for k, v in changes.items():
        if v is DELETE:
            del cfg[k]
        else:
            cfg[k] = v
    (root / "config.json").write_text(json.dumps(cfg))


def hf_checkpoint(
    family: str, out: Path, *, max_shard_size: str = "300KB", seed: int = 0, **dims: Any
) -> Path:
    """A tiny ``family`` checkpoint written by transformers itself (``from_config`` under a seed, then
    ``save_pretrained`` in shards with an index), plus tokenizer and license files to copy."""
    from transformers import AutoModelForCausalLM

    from moetool.testing.factory import family_config, write_extra_files
    from moetool.testing.hf_models import hf_config

    config = family_config(family, dtype=torch.bfloat16, **dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    write_extra_files(out, config)
    return out


# -- a transformers-made input and interrupted runs --------------------------------------------------
FAMILY = "qwen3_moe"
DIMS = {"num_layers": 2, "hidden_size": 256, "moe_intermediate_size": 128, "num_experts": 4, "top_k": 2}
SHARD = "200KB"  # several output shards, so a run can be interrupted between them


def same_output(got: Path, want: Path) -> None:
    """Byte-identical trees; the manifest may differ only in argv and the source path."""
    a, b = tree_digest(got), tree_digest(want)
    assert sorted(a) == sorted(b)
    for rel in b:
        if rel != MANIFEST:
            assert a[rel] == b[rel], f"{rel} differs from a clean run"
    ma, mb = json.loads((got / MANIFEST).read_text()), json.loads((want / MANIFEST).read_text())
    for m in (ma, mb):
        m.pop("argv")
        m["source"].pop("path")
    assert ma == mb


def interrupt(model: Path, out: Path, after: int, monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:
    """A quantize interrupted (Ctrl-C) once ``after`` shards are written: OUT.partial stays for --resume."""
    real = pipeline.write_shard
    written = [0]

    def write_then_stop(*args, **kwargs):
        if written[0] >= after:
            raise KeyboardInterrupt
        written[0] += 1
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "write_shard", write_then_stop)
        code, _, err = run_cli("quantize", model, out, "--max-shard-size", SHARD, "-q", *extra)
    assert code == 130, err
    assert partial_of(out).is_dir() and not out.exists()
