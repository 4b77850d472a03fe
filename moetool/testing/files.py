"""Writing checkpoint files as transformers does: a streamed safetensors writer (header first, then each
tensor's bytes chunk by chunk), greedy sharding, shard file names, the index and sorted-key JSON.

This writer is deliberately separate from ``moetool.io``: a fixture that is written by the code under
test proves nothing about that code."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetool.testing.specs import TensorSpec

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float8_e4m3fn: "F8_E4M3",
}


@dataclass(frozen=True)
class DiskTensor:
    """One tensor as stored: ``role`` ``value`` (``source`` as is) or a release format's role for the
    writer that makes it (``fp8``: F8_E4M3 of ``source``; ``scale``: its F32 ``weight_scale_inv``)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str
    source: TensorSpec

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(
    path: str | Path,
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[int], Iterable[torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Stream a safetensors file: the header from ``tensors`` (name, shape, dtype) first, then each
    tensor's bytes from ``produce(i)`` (contiguous chunks of its dtype in row-major order), so memory
    holds one chunk, never the file. Written to ``path.tmp`` and renamed. Returns the file size."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    sizes = []
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        sizes.append(nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (name, _, dtype) in enumerate(tensors):
            written = 0
            for chunk in produce(i):
                if chunk.dtype != dtype:
                    raise ValueError(f"{name}: produced {chunk.dtype}, header says {dtype}")
                data = chunk.contiguous().view(torch.uint8).numpy()
                f.write(data.data)
                written += data.nbytes
            if written != sizes[i]:
                raise ValueError(f"{name}: produced {written} bytes, header says {sizes[i]}")
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def plan_shards(tensors: Sequence[DiskTensor], max_shard_bytes: int | None) -> list[list[DiskTensor]]:
    """Greedy split in order, as transformers shards: a new shard when the next tensor would push the
    current one past ``max_shard_bytes`` (a larger tensor gets a shard of its own). One shard if None."""
    if max_shard_bytes is None:
        return [list(tensors)]
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards: list[list[DiskTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors`` ..."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_json(path: str | Path, obj: Any) -> None:
    """JSON as transformers writes it: sorted keys, indent 2, trailing newline."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_index(out_dir: str | Path, shards: Sequence[Sequence[DiskTensor]], names: Sequence[str]) -> None:
    """``model.safetensors.index.json``: ``metadata.total_size`` (bytes), ``metadata.total_parameters``
    and ``weight_map`` (tensor -> shard file)."""
    weight_map = {t.name: fname for shard, fname in zip(shards, names) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    params = sum(math.prod(t.shape) for shard in shards for t in shard if t.role != "scale")
    write_json(
        Path(out_dir) / "model.safetensors.index.json",
        {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": weight_map},
    )
