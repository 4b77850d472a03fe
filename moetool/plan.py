"""The plan: pure data saying what every output shard holds and which job writes each byte range.

A ``Plan`` is built from a checkpoint's headers and an ``ArchSpec`` alone (no tensor data), validated
in full before a byte is written, printable with ``--dry-run`` and executed by ``moetool.pipeline``.
Two operations make every output tensor:

- ``copy``: the bytes of a source region, unchanged.
- ``quant``: block-FP8 of the sources (float, or FP8 with their scales — kept as they are when their
  scales already satisfy the request, else dequantized in float32 and requantized), concatenated along
  rows; writes ``q`` then ``s``.

Each job writes its results at byte offsets inside output tensors, so a stacked ``[E, N, K]`` tensor is
filled expert by expert and never assembled in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moetool.io.safetensors_format import ITEMSIZE


@dataclass(frozen=True)
class Src:
    """A region of a source tensor: ``expert`` indexes dim 0 of a stacked tensor, then ``rows``/``cols``
    slice the remaining 2-D matrix. For an FP8 source the planner names regions in element units; the
    executor slices its ``weight_scale_inv`` by the matching 128-blocks."""

    name: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None

    def describe(self) -> str:
        s = self.name
        if self.expert is not None:
            s += f"[{self.expert}]"
        if self.rows or self.cols:
            r = f"{self.rows[0]}:{self.rows[1]}" if self.rows else ":"
            c = f"{self.cols[0]}:{self.cols[1]}" if self.cols else ":"
            s += f"[{r}, {c}]"
        return s


@dataclass(frozen=True)
class Write:
    """Result ``i`` of a job goes to output tensor ``tensor`` at byte ``start`` of its data."""

    tensor: str
    start: int = 0


@dataclass(frozen=True)
class Job:
    """``op``: ``copy``; ``quant`` (block FP8 of float or FP8 sources); ``fp4_cast`` (DeepSeek's FP4 → FP8
    cast of FP4 sources, :mod:`moetool.kernels.fp4_cast_ref`). ``scale_dtype`` is the dtype of the scale
    tensor written on the sm90 layout: F32, or F8_E8M0 (DeepSeek-V4's ``.scale``, ``fp4_cast`` only).
    ``lossless``: an ``fp4_cast`` whose cast changes a value is an error instead of a recorded loss."""

    op: str  # "copy" | "quant" | "fp4_cast"
    sources: tuple[Src, ...]
    writes: tuple[Write, ...]
    ue8m0: bool = False
    scale_layout: str = "sm90"  # "sm90" (block grid) | "sm100" (packed UE8M0 int32)
    scale_dtype: str = "F32"
    lossless: bool = False

    @property
    def transform(self) -> str:
        if self.op == "copy":
            return "copy"
        base = "fp4_to_fp8_128x128" if self.op == "fp4_cast" else "fp8_block_128x128"
        return base + ("_ue8m0" if self.ue8m0 else "") + ("_sm100" if self.scale_layout == "sm100" else "")


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Unit:
    """Output tensors that travel together (a weight and its scale) and the jobs that fill them."""

    tensors: tuple[OutTensor, ...]
    jobs: tuple[Job, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Shard:
    file: str
    units: tuple[Unit, ...]

    @property
    def tensors(self) -> tuple[OutTensor, ...]:
        return tuple(t for u in self.units for t in u.tensors)

    @property
    def jobs(self) -> tuple[Job, ...]:
        return tuple(j for u in self.units for j in u.jobs)

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)


@dataclass(frozen=True)
class Plan:
    command: str
    options: dict[str, Any] = field(hash=False)
    layout: str  # "hf" | "deepgemm"
    shards: tuple[Shard, ...]
    config: dict[str, Any] = field(hash=False)  # the output config.json
    copy_files: tuple[str, ...]
    shard_metadata: dict[str, str] = field(hash=False)
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.file for s in self.shards for t in s.tensors}

    def provenance(self) -> dict[str, dict[str, Any]]:
        """Per output tensor: the shard it is written to, its source regions and the transform that
        made it (for moetool.json; the shard lets ``validate`` tell a re-sharded checkpoint from a
        corrupt one even where the files keep their names)."""
        out: dict[str, dict[str, Any]] = {}
        for shard in self.shards:
            for unit in shard.units:
                for t in unit.tensors:
                    out[t.name] = {"file": shard.file, "sources": [], "transform": "copy"}
                for job in unit.jobs:
                    for w in job.writes:
                        rec = out[w.tensor]
                        rec["transform"] = job.transform
                        rec["sources"].extend(s.describe() for s in job.sources)
        return out

    def describe(self) -> dict[str, Any]:
        """A printable summary (``--dry-run``)."""
        by_transform: dict[str, int] = {}
        for shard in self.shards:
            for job in shard.jobs:
                by_transform[job.transform] = by_transform.get(job.transform, 0) + 1
        return {
            "command": self.command,
            "layout": self.layout,
            "options": self.options,
            "shards": [
                {"file": s.file, "bytes": s.nbytes, "tensors": len(s.tensors), "jobs": len(s.jobs)}
                for s in self.shards
            ],
            "output_bytes": self.total_bytes,
            "jobs_by_transform": dict(sorted(by_transform.items())),
            "copied_files": list(self.copy_files),
            "notes": list(self.notes),
        }


def pack_shards(units: list[Unit], max_shard_bytes: int) -> tuple[Shard, ...]:
    """Greedy, order-preserving packing into shards of at most ``max_shard_bytes`` (a larger unit gets
    a shard of its own); names follow the Hugging Face ``model-0000i-of-0000n.safetensors`` scheme."""
    groups: list[list[Unit]] = []
    size = 0
    for u in units:
        if not groups or (size + u.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += u.nbytes
    n = len(groups)
    if n == 1:
        return (Shard("model.safetensors", tuple(groups[0])),)
    return tuple(Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups))


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``1GiB`` / plain bytes → bytes (decimal units as Hugging Face uses them)."""
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    suffix = next((u for u in units if t.endswith(u)), "")
    num, mult = t[: len(t) - len(suffix)], units.get(suffix, 1)
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None
    if not math.isfinite(value) or not 0 < value * mult < 2**62:
        raise ValueError(f"size must be a positive, finite number of bytes: {text!r}")
    return int(value * mult)
