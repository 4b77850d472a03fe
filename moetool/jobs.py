"""One ``Job`` of a plan, from the input to the tensors it writes: its source regions read
(:func:`read_source`; FP8 with its scale blocks, INT4 as exact values), or located in their files for a
file-to-file copy (:func:`copy_regions`), and transformed into the tensors of each write
(:func:`job_pieces`). ``moetool.pipeline`` runs jobs on worker threads and writes what they make."""

from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from moetool.errors import InputError, InternalError
from moetool.io.checkpoint import Checkpoint
from moetool.model import e8m0_scale_name, require_scale
from moetool.plan import Job, Src
from moetool.transforms import fp8_block
from moetool.transforms.quant_job import Quantizer, fp4_cast_region, job_scales


def read_source(ckpt: Checkpoint, src: Src, *, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A source region as ``(tensor, None)`` for floats, or ``(q, scales)`` for FP8 (scales sliced by
    128-blocks in their stored dtype, float32 or E8M0; the planner guarantees region edges on block
    boundaries). An INT4 weight (compressed-tensors ``weight_packed``, named by its logical ``...weight``)
    comes as its exact float32 values."""
    if src.name not in ckpt and f"{src.name}_packed" in ckpt:  # int4.stored_names
        return read_int4(ckpt, src), None
    info = ckpt.info(src.name)
    t = ckpt.read(src.name, rows=src.rows, expert=src.expert, pin=pin)  # only the region's rows
    if src.cols:
        t = t[:, src.cols[0] : src.cols[1]]
    if info.dtype != "F8_E4M3":
        return t, None
    sname = require_scale(ckpt.tensors, src.name, file=str(ckpt.root))
    s = ckpt.read(sname, rows=fp8_block.scale_span(src.rows), expert=src.expert)
    return t, fp8_block.slice_scales(s, cols=src.cols)


def read_int4(ckpt: Checkpoint, src: Src) -> torch.Tensor:
    """The exact float32 values of a region of an INT4 weight ``src.name`` (``moetool.transforms.int4``),
    its ``weight_shape`` checked against the packed and scale tensors."""
    from moetool.transforms import int4

    if src.expert is not None:
        raise InternalError("INT4 weights are per-expert tensors", tensor=src.name)
    qc = int4.find_int4_config(ckpt.config)
    if qc is None:
        raise InputError("INT4 weight without a compressed-tensors quantization_config", tensor=src.name)
    group = int4.Int4Scheme.from_config(qc, file=str(ckpt.root / "config.json")).group_size
    packed_name, scale_name_, shape_name = int4.stored_names(src.name)
    for name in (scale_name_, shape_name):
        if name not in ckpt:
            raise InputError("INT4 weight without its companion tensor", file=str(ckpt.root), tensor=name)
    n_rows = ckpt.info(packed_name).shape[0]
    shape = [int(v) for v in ckpt.read(shape_name).tolist()]
    k = ckpt.info(scale_name_).shape[1] * group
    if shape != [n_rows, k]:
        raise InputError(
            f"weight_shape says {shape}, the packed weight and its scales make [{n_rows}, {k}]",
            file=str(ckpt.root),
            tensor=shape_name,
        )
    packed = ckpt.read(packed_name, rows=src.rows)
    scale = ckpt.read(scale_name_, rows=src.rows)
    w = int4.dequantize(packed, scale, k, group)
    return w[:, src.cols[0] : src.cols[1]] if src.cols else w


class BufferPool:
    """CPU buffers passed from the workers that fill them to the thread that writes them, and back:
    each expert's ``q`` reuses memory instead of paying page faults and zeroing for a fresh one."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lent: set[int] = set()
        self._lock = threading.Lock()

    def take(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``dtype`` tensor of ``shape`` (contents undefined)."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            free = self._free.get(nbytes)
            buf = free.pop() if free else torch.empty(nbytes, dtype=torch.uint8)
            self._lent.add(buf.data_ptr())
        return buf.view(dtype).view(shape)

    def give(self, t: torch.Tensor) -> None:
        """Take back ``t`` if it came from ``take`` (anything else is left alone); it must be unused."""
        with self._lock:
            if t.data_ptr() in self._lent and t.is_contiguous():
                self._lent.discard(t.data_ptr())
                self._free.setdefault(t.numel() * t.element_size(), []).append(
                    t.reshape(-1).view(torch.uint8)
                )


def job_pieces(
    ckpt: Checkpoint,
    job: Job,
    quantizer: Quantizer | None,
    sources: SourceFiles | None = None,
    pool: BufferPool | None = None,
    lossy: list[dict[str, Any]] | None = None,
) -> list[list[torch.Tensor]]:
    """Per entry of ``job.writes``, the tensors whose bytes, back to back, are that write: a job that
    concatenates sources along rows (gate and up into ``w13``) hands over its parts uncopied. With
    ``sources`` a CPU quantizer reads float sources into this thread's reused buffer; with ``pool`` it
    quantizes into buffers of the pool (hand them back with ``pool.give`` once written). An
    ``fp4_cast`` appends to ``lossy`` one record per 128x128 block whose values the cast changed (or
    raises, for a ``lossless`` job)."""
    if job.op == "copy":
        (src,) = job.sources
        t, s = read_source(ckpt, src)
        if s is not None:
            check_fp8(ckpt, src, t, s)  # copied as it is, a corrupt FP8 source is still refused
        # an FP8 region travels with its scale blocks when the job writes both
        return [[t], [s]] if len(job.writes) == 2 and s is not None else [[t]]
    if job.op == "quant":
        assert quantizer is not None
        qs, ss = [], []
        reuse = sources is not None and quantizer.device.type == "cpu"
        for src in job.sources:
            t = _read_reused(ckpt, src) if reuse else None
            if t is not None:
                s = None
            else:
                # page-locked reads let the copy to the GPU run asynchronously
                t, s = read_source(ckpt, src, pin=quantizer.device.type == "cuda")
            if s is not None:
                # a corrupt FP8 source is refused, whether its bytes would be kept or requantized
                check_fp8(ckpt, src, t, s)
            try:
                take = pool.take if pool is not None else None
                q, s = quantizer.region(t, s, ue8m0=job.ue8m0, name=src.describe(), take=take)
            except InputError as e:
                if e.file is None:  # the kernels know the tensor; the file is known here
                    e.file = ckpt.info(src.name).file
                raise
            qs.append(q)
            ss.append(s)
        return [qs, job_scales(qs, ss, scale_layout=job.scale_layout)]
    if job.op == "fp4_cast":
        assert quantizer is not None
        qs, ss = [], []
        pin = quantizer.device.type == "cuda"  # page-locked reads let the copy to the GPU run asynchronously
        for src in job.sources:
            packed = ckpt.read(src.name, rows=src.rows, expert=src.expert, pin=pin)
            scale = ckpt.read(e8m0_scale_name(src.name), rows=src.rows, expert=src.expert, pin=pin)
            q, s = fp4_cast_region(
                quantizer,
                packed,
                scale,
                name=src.describe(),
                file=str(ckpt.root),
                lossless=job.lossless,
                lossy=lossy,
            )
            qs.append(q)
            ss.append(s)
        return [qs, job_scales(qs, ss, scale_layout=job.scale_layout, scale_dtype=job.scale_dtype)]
    raise InternalError(f"unknown job op {job.op!r}")


def check_fp8(ckpt: Checkpoint, src: Src, t: torch.Tensor, s: torch.Tensor) -> None:
    """Refuse a corrupt FP8 source region (``fp8_block.check_source``: scales finite and positive, no
    e4m3 NaN byte), naming its file: a region ``[N, K]``, or a stacked ``[E, N, K]`` one expert by
    expert."""
    origin = (src.rows[0] if src.rows else 0, src.cols[0] if src.cols else 0)
    try:
        if t.dim() == 3:
            for e in range(t.shape[0]):
                fp8_block.check_source(t[e], s[e], name=src.name, origin=origin, expert=e)
        else:
            fp8_block.check_source(t, s, name=src.name, origin=origin, expert=src.expert)
    except InputError as e:
        if e.file is None:
            e.file = ckpt.info(src.name).file
        raise


def check_fp8_copy(ckpt: Checkpoint, job: Job) -> None:
    """Before an FP8 source is copied file to file: read it (one expert at a time when stacked, so
    memory stays bounded) and refuse it if corrupt, as every FP8 source moetool writes out is."""
    (src,) = job.sources
    info = ckpt.info(src.name)
    if info.dtype != "F8_E4M3":
        return
    if src.expert is None and len(info.shape) == 3:
        for e in range(info.shape[0]):
            one = Src(src.name, rows=src.rows, cols=src.cols, expert=e)
            t, s = read_source(ckpt, one)
            if s is not None:
                check_fp8(ckpt, one, t, s)
        return
    t, s = read_source(ckpt, src)
    if s is not None:
        check_fp8(ckpt, src, t, s)


@dataclass(frozen=True)
class _Region:
    """Bytes of one source tensor that lie back to back in its file, holding a ``shape`` tensor."""

    name: str
    dtype: str  # safetensors dtype name
    file: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]


# Largest source read into a worker's reused buffer (a routed expert's matrix); larger ones, rarer, get a
# buffer of their own, so that what workers keep stays small whatever the core count.
SCRATCH_MAX = 64 << 20
_scratch = threading.local()


def _read_reused(ckpt: Checkpoint, src: Src) -> torch.Tensor | None:
    """A float source region read into this thread's reused buffer (valid until its next call), or None
    where that does not apply (FP8 with scales, a column slice, over ``SCRATCH_MAX``). Reusing the buffer
    spares the page faults and zeroing of a fresh allocation per expert."""
    if src.cols or src.name not in ckpt:
        return None
    r = _file_region(ckpt, src.name, src.expert, src.rows)
    if r.dtype == "F8_E4M3" or r.nbytes > SCRATCH_MAX or r.nbytes == 0:
        return None
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < r.nbytes:
        buf = _scratch.buf = torch.empty(r.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy()).cast("B")[: r.nbytes]
    ckpt.pread_into(r.file, r.offset, view, tensor=src.name)
    return buf[: r.nbytes].view(ckpt.info(src.name).torch_dtype).reshape(r.shape)


def _file_region(ckpt: Checkpoint, name: str, expert: int | None, rows: tuple[int, int] | None) -> _Region:
    """Where ``name`` (or ``name[expert]``, and/or its rows ``[r0, r1)``) lies in its file; the same
    selection ``Checkpoint.read`` makes."""
    info, offset, nbytes, shape = ckpt.region(name, rows, expert=expert)
    return _Region(name, info.dtype, info.file, offset, nbytes, tuple(shape))


def copy_regions(
    ckpt: Checkpoint, job: Job, out_dtypes: dict[str, str] | None = None
) -> list[_Region] | None:
    """For a copy job whose source bytes lie back to back in the file (no column slice) and whose
    output tensors have the sources' dtypes (``out_dtypes``, by output name), one region per entry of
    ``job.writes``; None when the job must go through memory."""
    if job.op != "copy" or len(job.sources) != 1 or job.sources[0].cols:
        return None
    src = job.sources[0]
    regions = [_file_region(ckpt, src.name, src.expert, src.rows)]
    if len(job.writes) == 2:
        if regions[0].dtype != "F8_E4M3":
            return None
        sname = require_scale(ckpt.tensors, src.name, file=str(ckpt.root))
        regions.append(_file_region(ckpt, sname, src.expert, fp8_block.scale_span(src.rows)))
    if out_dtypes is not None and any(
        out_dtypes.get(w.tensor, r.dtype) != r.dtype for w, r in zip(job.writes, regions)
    ):
        return None
    return regions if len(regions) == len(job.writes) else None


class SourceFiles:
    """Read-only descriptors of the source shards a shard writer copies from, opened on first use (each
    still the file whose header was read: ``Checkpoint.open_shard``)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self._ckpt = ckpt
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = self._ckpt.open_shard(file)
            return fd

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
