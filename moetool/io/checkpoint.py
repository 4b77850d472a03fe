"""A local Hugging Face checkpoint, read lazily: config, index and any tensor (or row slice) of any shard.

Tensors are read with positioned reads into fresh buffers (never memory maps): the file is opened
read-only, so nothing can write back to it, and the process holds only what it is working on, so peak
memory is bounded by the tensors in flight rather than by the size of the checkpoint. ``region`` and
``pread_into`` let a caller place the bytes in buffers of its own instead (``moetool.io.prefetch``
reuses a few buffers, read by several threads at once).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moetool.errors import InputError
from moetool.io.fs import (
    MANIFEST_NAME,
    changed_keys,
    file_identity,
    input_roots,
    is_within,
    kind_of,
    open_regular,
    read_small,
    real_path,
)
from moetool.io.safetensors_format import Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64  # real config.json files nest 3 or 4 levels
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def truncated_shard(file: str | Path, tensor: str | None, done: int, nbytes: int) -> InputError:
    """The error for a shard that ends before a tensor's bytes do."""
    return InputError(
        f"file ended after {done} of {nbytes} bytes",
        file=str(file),
        tensor=tensor,
        fix="the shard is truncated; re-download it",
    )


_CHANGED_FIX = "something replaced or rewrote the input during the run; run again once nothing writes to it"


def _changed(
    file: str,
    changed: list[str],
    *,
    tensor: str | None = None,
    was: dict[str, int] | None = None,
    now: dict[str, int] | None = None,
) -> InputError:
    shrunk = was is not None and now is not None and now["size"] < was["size"]
    return InputError(
        f"shard changed since its header was read ({', '.join(changed)} changed"
        + (f"; it ended after {now['size']} of {was['size']} bytes)" if shrunk else ")"),
        file=os.fspath(file),
        tensor=tensor,
        fix=_CHANGED_FIX,
    )


def read_json(path: Path, *, what: str = "JSON", within: list[Path] | None = None) -> Any:
    """Read a small JSON file with a size and nesting bound; defects are an ``InputError`` naming the file.

    The nesting bound keeps hostile files from reaching code that recurses over the parsed value
    (``copy.deepcopy``, ``json.dumps``) close to the interpreter's recursion limit.
    """
    if not os.path.lexists(path):
        raise InputError(f"{what} not found", file=str(path))
    raw = read_small(path, MAX_JSON_BYTES, what=what, within=within)  # a regular file, never past the limit
    try:
        value = json.loads(raw.decode("utf-8"))
    # ValueError covers JSONDecodeError and integers longer than Python's digit limit
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{what} is not valid JSON ({type(e).__name__})", file=str(path)) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise InputError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels", file=str(path))
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), computed without recursion."""
    depth = 0
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
        else:
            depth = max(depth, d)
            continue
        depth = max(depth, d + 1)
    return depth


def allowed_roots(root: Path) -> list[Path]:
    """Where files of ``root`` may really live (see ``moetool.io.fs.input_roots``)."""
    return input_roots(root)


def _short(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, so a hostile name cannot flood the one-line error."""
    return text if len(text) <= limit else text[:limit] + "..."


def _inside(root: Path, rel: str, *, file: str) -> Path:
    """``root / rel`` if it stays inside ``root`` (no absolute paths, ``..`` or links out of it)."""
    if not rel or "\0" in rel or os.path.isabs(rel) or "\\" in rel or ".." in Path(rel).parts:
        raise InputError(
            f"path {_short(rel)!r} is not a plain relative file name inside the checkpoint",
            file=file,
            fix="refusing to follow it; the index is hostile or corrupt",
        )
    p = real_path(root / rel)
    if not is_within(p, allowed_roots(root)):
        raise InputError(
            f"path {_short(rel)!r} points outside the checkpoint",
            file=file,
            fix="refusing to follow it; the index is hostile or corrupt",
        )
    return p


class Checkpoint:
    """A checkpoint directory: ``config``, ``tensors`` (name → ``TensorInfo``), lazy tensor reads."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(
                "not a directory", file=str(self.root), fix="give a checkpoint directory or a Hub repo id"
            )
        # like every file of the checkpoint, config.json and the index lie in it (a link out is refused)
        self.config: dict[str, Any] = read_json(
            self.root / "config.json", what="config.json", within=allowed_roots(self.root)
        )
        if not isinstance(self.config, dict):
            raise InputError("config.json is not a JSON object", file=str(self.root / "config.json"))
        self.shard_files, self.index_metadata = self._find_shards()
        self.headers: dict[str, Header] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for rel in self.shard_files:
            path = _inside(self.root, rel, file=str(self.root / INDEX_NAME))
            header = read_header(path)
            self.headers[rel] = header
            for name, info in header.tensors.items():
                if name in self.tensors:
                    raise InputError(
                        f"tensor appears in two shards ({Path(self.tensors[name].file).name} and {rel})",
                        file=str(path),
                        tensor=name,
                        fix="the checkpoint is corrupt",
                    )
                self.tensors[name] = info
        if self._index_map is not None:
            for name, rel in self._index_map.items():
                info = self.tensors.get(name)
                if info is None or Path(info.file) != _inside(self.root, rel, file=INDEX_NAME):
                    raise InputError(
                        f"index names {rel} but the tensor is not in it",
                        file=str(self.root / INDEX_NAME),
                        tensor=name,
                        fix="the index and shards disagree; re-download",
                    )
            extra = sorted(set(self.tensors) - set(self._index_map))
            if extra:
                raise InputError(
                    "tensor is in a shard but not in the index",
                    file=str(self.root / INDEX_NAME),
                    tensor=extra[0],
                )
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        # each shard's file as its header was read: data is read only from that file, unchanged
        self._identity: dict[str, dict[str, int]] = {
            os.fspath(real_path(self.root / rel)): h.identity
            for rel, h in self.headers.items()
            if h.identity is not None
        }

    def _find_shards(self) -> tuple[list[str], dict[str, Any]]:
        index_path = self.root / INDEX_NAME
        self._index_map: dict[str, str] | None = None
        if os.path.lexists(index_path):  # an index that cannot be read is an error, never ignored
            index = read_json(index_path, what="index", within=allowed_roots(self.root))
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
            ):
                raise InputError("index has no weight_map of names to files", file=str(index_path))
            self._index_map = wm
            files = sorted(set(wm.values()))
            for rel in files:
                p = _inside(self.root, rel, file=str(index_path))
                try:
                    mode = os.stat(p).st_mode
                except FileNotFoundError:
                    raise InputError(
                        f"index names shard {_short(rel)}, which is missing",
                        file=str(index_path),
                        fix="download the missing shard",
                    ) from None
                except OSError as e:  # a name too long for the filesystem, a loop of links
                    raise InputError(
                        f"index names shard {_short(rel)}, which cannot be opened: {e.strerror}",
                        file=str(index_path),
                        fix="replace it with the shard file",
                    ) from None
                if not stat.S_ISREG(mode):
                    raise InputError(
                        f"index names shard {_short(rel)}, which is {kind_of(mode)}, not a regular file",
                        file=str(index_path),
                        fix="moetool reads only regular files",
                    )
            metadata = index.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise InputError("index metadata is not a JSON object", file=str(index_path))
            return files, dict(metadata)
        files = sorted(p.name for p in self.root.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.root.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise InputError(
                    f"only pickle weights ({pickles[0]}); moetool never unpickles",
                    file=str(self.root),
                    fix="convert to safetensors with a trusted tool first",
                )
            raise InputError("no *.safetensors weights", file=str(self.root))
        return files, {}

    # -- reading ------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError("tensor not found in the checkpoint", file=str(self.root), tensor=name) from None

    def _fd(self, file: str, tensor: str | None = None) -> int:
        with self._fd_lock:  # shard workers share the reader; positioned reads need no other lock
            fd = self._fds.get(file)
            if fd is None:
                fd = self.open_shard(file, tensor=tensor)
                self._fds[file] = fd
            return fd

    def open_shard(self, file: str, *, tensor: str | None = None) -> int:
        """A read-only descriptor of shard ``file`` (a ``TensorInfo.file``), refused (``InputError``
        naming it) unless it is still the file whose header was read: a shard replaced or rewritten
        since would be read at the old header's offsets. ``tensor``: the one about to be read, named in
        the error."""
        fd = open_regular(file, what="shard")
        want = self._identity.get(os.fspath(file))
        now = file_identity(os.fstat(fd))
        changed = changed_keys(want, now) if want is not None else []
        if changed:
            os.close(fd)
            raise _changed(file, changed, tensor=tensor, was=want, now=now)
        return fd

    def identity_of(self, file: str | os.PathLike[str]) -> dict[str, int] | None:
        """Shard ``file`` (a ``TensorInfo.file``) as its header was read; None for any other file."""
        want = self._identity.get(os.fspath(file))
        return dict(want) if want is not None else None

    def input_identity(self) -> dict[str, dict[str, int]]:
        """Each shard (relative path) as its header was read (``moetool.io.fs.file_identity``)."""
        return {rel: dict(h.identity) for rel, h in self.headers.items() if h.identity is not None}

    def check_unchanged(self) -> None:
        """Refuse (``InputError`` naming the file) when a shard is no longer the file whose header was
        read: replaced, or written in place, while moetool read it."""
        for file, want in self._identity.items():
            try:
                now = file_identity(os.stat(file))
            except OSError as e:
                raise InputError(
                    f"shard disappeared while it was read ({e.strerror})", file=file, fix=_CHANGED_FIX
                ) from None
            changed = changed_keys(want, now)
            if changed:
                raise _changed(file, changed, was=want, now=now)

    def region(
        self, name: str, rows: tuple[int, int] | None = None, *, expert: int | None = None
    ) -> tuple[TensorInfo, int, int, list[int]]:
        """Where ``name`` — or ``name[expert]`` of a stacked tensor, and/or rows ``[r0, r1)`` of the first
        remaining dimension — lies: ``(info, offset, nbytes, shape)``, with ``offset`` the absolute byte
        offset in ``info.file`` of a contiguous run of ``nbytes`` bytes holding a ``shape`` tensor."""
        info = self.info(name)
        shape = list(info.shape)
        offset, nbytes = info.offset, info.nbytes
        if expert is not None:
            if not shape or not 0 <= expert < shape[0]:
                raise InputError(
                    f"no expert {expert} in a tensor of shape {shape}", file=info.file, tensor=name
                )
            nbytes //= shape[0]
            offset += expert * nbytes
            shape = shape[1:]
        if rows is not None:
            r0, r1 = rows
            row_bytes = nbytes // shape[0] if shape and shape[0] else 0
            offset, nbytes = offset + r0 * row_bytes, (r1 - r0) * row_bytes
            shape[0] = r1 - r0
        return info, offset, nbytes, shape

    def pread_into(self, file: str, offset: int, view: memoryview, *, tensor: str | None = None) -> None:
        """Fill ``view`` (a writable byte buffer) with the bytes of shard ``file`` from ``offset`` on. Safe
        to call from several threads at once (positioned reads, no shared file position). A file that
        ends early is an ``InputError`` naming it and ``tensor``; other ``OSError`` propagate."""
        nbytes = len(view)
        fd = self._fd(file, tensor)
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise truncated_shard(file, tensor, done, nbytes)
            done += n

    def read(
        self, name: str, rows: tuple[int, int] | None = None, *, expert: int | None = None, pin: bool = False
    ) -> torch.Tensor:
        """Tensor ``name`` — or ``name[expert]`` of a stacked tensor, and/or rows ``[r0, r1)`` of the
        first remaining dimension — in a new CPU buffer it owns (page-locked with ``pin=True``, for
        asynchronous copies to a GPU). Only those bytes are read."""
        info, offset, nbytes, shape = self.region(name, rows, expert=expert)
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        if nbytes:
            self.pread_into(info.file, offset, memoryview(buf.numpy()).cast("B"), tensor=name)
        return buf.view(info.torch_dtype).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- listing ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def other_files(self) -> list[str]:
        """Non-weight files to copy unchanged (tokenizer, generation config, license, ...), relative paths."""
        skip = {"config.json", INDEX_NAME, MANIFEST_NAME, *self.shard_files}
        out = []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root).as_posix()
            if rel.startswith(".") or "/." in rel or rel in skip or p.suffix == ".safetensors":
                continue
            if p.is_symlink() and not is_within(real_path(p), allowed_roots(self.root)):
                raise InputError(
                    "symbolic link points outside the checkpoint",
                    file=str(p),
                    fix="replace it with the file it points to",
                )
            if p.suffix in PICKLE_SUFFIXES:
                continue
            try:
                mode = os.stat(p).st_mode
            except OSError as e:  # a dangling link, a loop of links
                raise InputError(
                    f"cannot read: {e.strerror}", file=str(p), fix="remove or replace it"
                ) from None
            if stat.S_ISREG(mode):
                out.append(rel)
            elif not stat.S_ISDIR(mode):
                raise InputError(
                    f"is {kind_of(mode)}, not a regular file",
                    file=str(p),
                    fix="moetool copies only regular files; remove it",
                )
        return out
