"""The safetensors file format, read and written by moetool itself.

A file is ``u64 little-endian N`` + ``N`` bytes of JSON header + data. The header maps each tensor name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section) and may
hold ``"__metadata__": {str: str}``. Parsing it ourselves lets moetool check a downloaded file fully
(offsets inside the file, no overlaps, sizes that match shapes) before reading a byte of data, and lay
out an output file from a precomputed header so tensors can be filled in any order.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from moetool.errors import InputError
from moetool.io.fs import file_identity, open_regular

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
HEADER_ALIGN = 8

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # power-of-two scales 2 ** (byte - 127), 255 = NaN (DeepSeek-V4)
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty(0, dtype=v).element_size() for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` (a path), absolute byte ``offset`` and ``nbytes`` in it."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    # the file the header was read from (``moetool.io.fs.file_identity``): its data is read only from
    # that same file, unchanged
    identity: dict[str, int] | None = None


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check a safetensors header; every defect is an ``InputError`` naming the file."""
    path = os.fspath(path)
    fd = open_regular(path, what="shard")  # never a FIFO or a device: those would block or never end
    try:
        with open(fd, "rb", closefd=False) as f:
            st = os.fstat(fd)
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise InputError(
                    "not a safetensors file (shorter than 8 bytes)", file=path, fix="re-download the shard"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(
                    f"header length {n} is larger than the file or the 100 MB limit",
                    file=path,
                    fix="the file is truncated or not safetensors; re-download it",
                )
            raw = f.read(n)
            if len(raw) < n:
                raise InputError(
                    f"file ended inside its {n}-byte header",
                    file=path,
                    fix="the file is truncated; re-download it",
                )
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", file=path) from None
    finally:
        os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError("header is not valid JSON", file=path, fix="re-download the shard") from None
    if not isinstance(header, dict):
        raise InputError("header is not a JSON object", file=path)
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError("__metadata__ must map strings to strings", file=path)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise InputError("header entry is not an object", file=path, tensor=name)
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise InputError(
                f"unsupported dtype {dtype!r}", file=path, tensor=name, fix=f"supported: {', '.join(DTYPES)}"
            )
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise InputError(f"bad shape {shape!r}", file=path, tensor=name)
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise InputError(f"bad data_offsets {offs!r}", file=path, tensor=name)
        begin, end = offs
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if not 0 <= begin <= end <= data_len:
            raise InputError(
                f"data_offsets {offs} run past the end of the file ({data_len} data bytes)",
                file=path,
                tensor=name,
                fix="the file is truncated; re-download it",
            )
        if end - begin != nbytes:
            raise InputError(
                f"data_offsets span {end - begin} bytes but {dtype}{shape} needs {nbytes}",
                file=path,
                tensor=name,
            )
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, nbytes)
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise InputError(f"tensors {n0} and {n1} overlap", file=path, fix="the file is corrupt")
    return Header(tensors, dict(metadata), data_start, file_identity(st))


def build_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Lay out a file for ``entries`` (name, dtype, shape) in the given order.

    Returns the full prefix (8-byte length + JSON header padded with spaces to a multiple of 8, so data
    starts aligned) and each tensor's absolute ``(offset, nbytes)``. Deterministic: same entries, same bytes.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    pos = 0
    spans: dict[str, tuple[int, int]] = {}
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        spans[name] = (pos, nbytes)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % HEADER_ALIGN)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {k: (len(prefix) + off, n) for k, (off, n) in spans.items()}
