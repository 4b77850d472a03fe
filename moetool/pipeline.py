"""Executes a ``Plan``: per output shard, read → transform → write, overlapped, then index, config and
manifest last. The output protocol of docs/contract.md §4 lives here: ``OUT.partial/``, atomic shards with sha256,
``--resume`` reusing finished shards whose recorded hash still matches, and rename to OUT at the end.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetool import __version__
from moetool.errors import EnvironmentError_, InputError, InternalError, MoetoolError, UsageError
from moetool.hub import Source
from moetool.io.checkpoint import INDEX_NAME, MANIFEST_NAME, Checkpoint
from moetool.io.fs import open_regular, real_path
from moetool.io.hashing import sha256_file
from moetool.io.writer import OutputDir, ShardWriter, os_error, write_index
from moetool.model import e8m0_scale_name, find_scale
from moetool.plan import Job, Plan, Shard, Src
from moetool.transforms import fp8_block
from moetool.transforms.quant_job import Quantizer, as_stored, fp4_cast_region, job_scales

PROGRESS_NAME = ".moetool-progress.json"
SHARD_WORKERS_PER_GPU = 4
QUEUE_DEPTH = 2
FP8 = torch.float8_e4m3fn


MAX_LOSSY_RECORDS = 10_000  # lossy FP4 blocks listed by name in moetool.json (all are counted)


@dataclass
class RunResult:
    out: Path
    files: dict[str, dict[str, Any]]
    reused: list[str]
    bytes_written: int
    lossy: dict[str, Any] | None = None  # FP4 blocks the cast to FP8 changed (lossy_summary)


def lossy_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``moetool.json`` says of FP4 blocks the cast to FP8 changed: totals, and the first
    ``MAX_LOSSY_RECORDS`` blocks by name (``{"tensor", "block": [row block, column block], "changed"}``)."""
    ordered = sorted(records, key=lambda r: (r["tensor"], r["block"]))
    return {
        "blocks": len(ordered),
        "elements": sum(r["changed"] for r in ordered),
        "listed": ordered[:MAX_LOSSY_RECORDS],
    }


def pick_device(device: str) -> torch.device:
    """``auto`` → the first CUDA device if there is one, else CPU; ``cuda[:N]`` must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}", fix="use auto, cpu or cuda[:N]") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise EnvironmentError_(
            f"{device} requested but no such CUDA device is available", fix="use --device cpu or auto"
        )
    if d.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {device!r}", fix="use auto, cpu or cuda[:N]")
    return d


# -- reading sources --------------------------------------------------------------------------
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
    sname = find_scale(ckpt.tensors, src.name)
    if sname is None:
        raise InputError(
            "FP8 tensor without its block scales (weight_scale_inv or scale)",
            file=str(ckpt.root),
            tensor=src.name,
        )
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


class _BufferPool:
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
    sources: _SourceFiles | None = None,
    pool: _BufferPool | None = None,
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
            try:
                if s is not None:
                    # a corrupt FP8 source is refused, whether its bytes would be kept or requantized
                    fp8_block.check_source(
                        t,
                        s,
                        name=src.name,
                        origin=(src.rows[0] if src.rows else 0, src.cols[0] if src.cols else 0),
                        expert=src.expert,
                    )
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
        sname = find_scale(ckpt.tensors, src.name)
        if sname is None:
            raise InputError(
                "FP8 tensor without its block scales (weight_scale_inv or scale)",
                file=str(ckpt.root),
                tensor=src.name,
            )
        regions.append(_file_region(ckpt, sname, src.expert, fp8_block.scale_span(src.rows)))
    if out_dtypes is not None and any(
        out_dtypes.get(w.tensor, r.dtype) != r.dtype for w, r in zip(job.writes, regions)
    ):
        return None
    return regions if len(regions) == len(job.writes) else None


# -- execution --------------------------------------------------------------------------------
def _pipelined(
    items: list[Job], produce: Callable[[Job], list[torch.Tensor]], producers: int = 1
) -> Iterator[tuple[Job, list[torch.Tensor]]]:
    """Yield ``(job, produce(job))`` in order while the next jobs are computed on ``producers`` worker
    threads (torch kernels release the GIL, so reading/quantizing overlaps with the caller's writing).
    At most ``producers + QUEUE_DEPTH`` results are in memory at once."""
    if len(items) <= 1:
        for j in items:
            yield j, produce(j)
        return
    with ThreadPoolExecutor(max_workers=producers) as pool:
        pending: queue.Queue = queue.Queue()
        it = iter(items)
        for _ in range(QUEUE_DEPTH + producers - 1):
            j = next(it, None)
            if j is None:
                break
            pending.put((j, pool.submit(produce, j)))
        while not pending.empty():
            j, fut = pending.get()
            result = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.put((nxt, pool.submit(produce, nxt)))
            yield j, result


def cpu_producers() -> int:
    """Jobs quantized at once on the CPU: one per core, each single-threaded (see ``single_threaded_ops``)."""
    return max(1, min(os.cpu_count() or 1, 16))


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """On the CPU, cores work best on different experts: torch ops split across cores wait for each
    other whenever the writer thread takes one of them (measured 1.6x slower on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _SourceFiles:
    """Read-only descriptors of the source shards a shard writer copies from, opened on first use."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = open_regular(file, what="shard")
            return fd

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def write_shard(
    ckpt: Checkpoint,
    shard: Shard,
    out: OutputDir,
    quantizer: Quantizer | None,
    metadata: dict[str, str],
    progress: Callable[[int], None] | None = None,
    lossy: list[dict[str, Any]] | None = None,
) -> tuple[str, int]:
    """Write one output shard. Unchanged tensors go file to file (``copy_file_range``) on the worker
    threads; computed ones are written by this thread in job order while the next are computed.
    Lossy FP4 blocks of its ``fp4_cast`` jobs are appended to ``lossy``."""
    entries = [(t.name, t.dtype, t.shape) for t in shard.tensors]
    out_dtypes = {t.name: t.dtype for t in shard.tensors}
    found: list[dict[str, Any]] = []
    lock = threading.Lock()
    writer = ShardWriter(out.path(shard.file), entries, metadata, fsync=out.fsync)
    sources = _SourceFiles()
    pool = _BufferPool() if quantizer is not None and quantizer.device.type == "cpu" else None

    def produce(job: Job) -> list[list[torch.Tensor]] | int:
        regions = copy_regions(ckpt, job, out_dtypes)
        if regions is None:
            mine: list[dict[str, Any]] = []
            pieces = job_pieces(ckpt, job, quantizer, sources, pool, lossy=mine)
            if mine:
                with lock:
                    found.extend(mine)
            return pieces
        for w, r in zip(job.writes, regions):
            writer.copy_from(w.tensor, r.dtype, sources.fd(r.file), r.offset, r.nbytes, w.start, src=r.file)
        return sum(r.nbytes for r in regions)

    try:
        producers = cpu_producers() if quantizer is None or quantizer.device.type == "cpu" else 1
        for job, results in _pipelined(list(shard.jobs), produce, producers):
            if isinstance(results, int):
                if progress:
                    progress(results)
                continue
            if len(results) != len(job.writes):
                raise InternalError(f"job made {len(results)} tensors for {len(job.writes)} writes")
            for w, pieces in zip(job.writes, results):
                start = w.start
                for t in pieces:
                    t = as_stored(t, out_dtypes[w.tensor])
                    writer.write(w.tensor, t, start)
                    nbytes = t.numel() * t.element_size()
                    start += nbytes
                    if progress:
                        progress(nbytes)
                    if pool is not None:
                        pool.give(t)
        result = writer.finish()
        if lossy is not None:
            lossy.extend(found)
        return result
    except BaseException:
        writer.close()
        raise
    finally:
        sources.close()


def _load_progress(out: OutputDir, name: str) -> dict[str, Any]:
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
    """What binds a progress record to the input it was written from: per input shard, its size,
    modification and change times (ns), inode and device, as the kernel reports them for the real file.

    A file with other values under the same name — another checkpoint with the same headers, or the
    same file rewritten, truncated, or replaced by a download — changes its inode or its change time,
    which the kernel sets on every write and no unprivileged call can set back. Hashing the input bytes
    instead would cost every run a second pass over the input (sha256 runs at about the speed the CPU
    quantizes) and every ``--resume`` a full re-read; these values cost one ``stat`` per file. A
    checkpoint copied elsewhere between the kill and the resume has new inodes and is refused, which
    is safe: ``--overwrite`` converts it again."""
    out = {}
    for rel in ckpt.shard_files:
        st = os.stat(real_path(ckpt.root / rel))
        out[rel] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino,
            "device": st.st_dev,
        }
    return out


def _check_inputs(recorded: Any, now: dict[str, dict[str, int]], ckpt: Checkpoint, out: OutputDir) -> None:
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
            changed = [
                k for k in ("size", "inode", "device", "mtime_ns", "ctime_ns") if was.get(k) != is_.get(k)
            ]
            what = f"is not the file OUT.partial was written from ({', '.join(changed)} changed)"
        raise UsageError(what, file=str(ckpt.root / rel), fix=fix)


class _Dist:
    """torchrun's world (RANK / WORLD_SIZE set): a gloo group for the few control messages moetool
    exchanges (setup status, per-rank results); tensors never travel between ranks."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.active = self.world > 1
        if self.active:
            import torch.distributed as dist

            self.dist = dist
            if not dist.is_initialized():
                # conversions between two collectives can take hours on a large checkpoint
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


PLAN_KEY = "__plan__"
INPUTS_KEY = "__inputs__"
MAX_PROGRESS_BYTES = 64 << 20


def _reusable(path: Path, rec: dict[str, Any]) -> bool:
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
    import hashlib

    text = repr((plan.shards, sorted(plan.shard_metadata.items()), json.dumps(plan.config, sort_keys=True)))
    return hashlib.sha256(text.encode()).hexdigest()


def _convert_shards(
    plan: Plan,
    ckpt: Checkpoint,
    out: OutputDir,
    shards: list[Shard],
    devices: list[torch.device],
    progress_name: str,
    bar: Any,
    lossy: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Write ``shards`` (one worker thread per device, shards dealt round-robin); returns each shard's
    record and which were reused from an earlier run (``--resume``). Lossy FP4 blocks of every shard,
    written now or reused (its progress record keeps them), are appended to ``lossy``."""
    needs_quant = any(j.op in ("quant", "fp4_cast") for s in shards for j in s.jobs)
    done = _load_progress(out, progress_name) if out.resumed else {}
    fingerprint = plan_fingerprint(plan)
    inputs = input_files(ckpt)
    if done:
        if done.get(PLAN_KEY) != fingerprint:
            raise UsageError(
                "OUT.partial was written from another input or with other options",
                file=str(out.partial),
                fix="pass --overwrite to start again (or resume with the same command)",
            )
        _check_inputs(done.get(INPUTS_KEY), inputs, ckpt, out)
    done[PLAN_KEY] = fingerprint
    done[INPUTS_KEY] = inputs
    files: dict[str, dict[str, Any]] = {}
    reused: list[str] = []
    todo: list[Shard] = []
    for shard in shards:
        rec = done.get(shard.file) if isinstance(done.get(shard.file), dict) else None
        if rec and _reusable(out.path(shard.file), rec):
            files[shard.file] = {"sha256": rec["sha256"], "size": rec["size"]}
            reused.append(shard.file)
            if lossy is not None:
                lossy.extend(rec.get("lossy", []))
            if bar:
                bar.update(shard.nbytes)
        else:
            todo.append(shard)
    lock = threading.Lock()

    def worker(idx: int) -> None:
        quantizer = Quantizer(devices[idx]) if needs_quant else None
        for shard in todo[idx :: len(devices)]:
            found: list[dict[str, Any]] = []
            digest, size = write_shard(
                ckpt, shard, out, quantizer, plan.shard_metadata, bar.update if bar else None, lossy=found
            )
            with lock:
                files[shard.file] = {"sha256": digest, "size": size}
                done[shard.file] = {"sha256": digest, "size": size, **({"lossy": found} if found else {})}
                if lossy is not None:
                    lossy.extend(found)
                out.write_json(progress_name, done)

    workers = min(len(devices), len(todo))  # worker i takes shards i, i + len(devices), ...
    if workers == 1:
        worker(0)
    elif workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(worker, i) for i in range(workers)]:
                fut.result()
    return files, reused


def _kept_fix(fix: str | None) -> str:
    base = (fix or "").replace("; nothing was kept", "")
    return (base + "; " if base else "") + "OUT.partial is kept for --resume"


def execute(
    plan: Plan,
    ckpt: Checkpoint,
    source: Source,
    out_path: str | Path,
    *,
    device: str = "auto",
    devices: list[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    fsync: bool = False,
    argv: list[str] | None = None,
    progress_factory: Callable[[int], Any] | None = None,
) -> RunResult:
    """Run ``plan`` into ``out_path`` under the output protocol (docs/contract.md §4).

    ``fsync`` (``--fsync``) puts every file on disk before the renames that publish it; without it the
    output is complete and checked when OUT appears, and reaches the disk when the kernel writes it back.

    ``devices`` (``--devices cuda:0,cuda:1``) runs one worker per device over disjoint shards. Under
    torchrun each rank converts shards ``i`` with ``i % WORLD_SIZE == RANK`` into the shared
    ``OUT.partial`` (on its ``LOCAL_RANK`` GPU when ``device`` is ``auto``); rank 0 writes index, config
    and manifest and renames once every rank has succeeded. The bytes are the same however the work is
    split. A failing rank fails the run on every rank, and nothing is left at OUT.
    """
    dist = _Dist()
    if devices:
        devs = [pick_device(d) for d in devices]
    elif dist.active and device == "auto" and torch.cuda.is_available():
        devs = [torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())]
    else:
        devs = [pick_device(device)]
    if all(d.type == "cuda" for d in devs):
        # A GPU quantizes a shard far faster than one thread reads, writes, syncs and hashes it: give
        # each device several shard workers so that I/O and hashing of different shards overlap.
        devs = [d for d in devs for _ in range(SHARD_WORKERS_PER_GPU)]
    setup_error = None
    if dist.rank == 0:
        try:
            out = OutputDir(out_path, source=ckpt.root, overwrite=overwrite, resume=resume, fsync=fsync)
        except MoetoolError as e:
            setup_error = e
    if dist.active:
        line = dist.broadcast(setup_error.line() if setup_error else None)
        if line is not None:
            raise setup_error or MoetoolError(f"rank 0: {line}")
        if dist.rank != 0:
            out = OutputDir.join(out_path, resumed=resume, fsync=fsync)
    elif setup_error:
        raise setup_error
    assert out is not None
    committed = False
    progress_name = PROGRESS_NAME if not dist.active else f"{PROGRESS_NAME}.rank{dist.rank}"
    try:
        mine = [s for i, s in enumerate(plan.shards) if i % dist.world == dist.rank]
        bar = progress_factory(sum(s.nbytes for s in mine)) if progress_factory else None
        error = None
        files: dict[str, dict[str, Any]] = {}
        reused: list[str] = []
        lossy: list[dict[str, Any]] = []
        try:
            cpu_only = all(d.type == "cpu" for d in devs)
            with single_threaded_ops() if cpu_only else contextlib.nullcontext():
                files, reused = _convert_shards(plan, ckpt, out, mine, devs, progress_name, bar, lossy)
        except MoetoolError as e:
            error = e
        finally:
            if bar:
                bar.close()
        results = dist.gather((files, reused, error.line() if error else None, lossy))
        errors = [(r, res[2]) for r, res in enumerate(results) if res[2]]
        if errors:
            if error is not None:
                raise error
            raise MoetoolError(f"rank {errors[0][0]} failed: {errors[0][1]}")
        files, reused, lossy = {}, [], []
        for f, r, _, lo in results:
            files.update(f)
            reused.extend(r)
            lossy.extend(lo)
        fp4 = any(j.op == "fp4_cast" for s in plan.shards for j in s.jobs)
        summary = lossy_summary(lossy) if fp4 else None
        if dist.rank == 0:
            write_index(out, plan.weight_map(), plan.total_bytes)
            out.write_json("config.json", plan.config)
            for rel in plan.copy_files:
                out.copy_file(ckpt.root / rel, rel)
            for rel in (INDEX_NAME, "config.json", *plan.copy_files):
                p = out.path(rel)
                files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
            manifest = {
                "moetool_version": __version__,
                "command": plan.command,
                "argv": argv or [],
                "options": plan.options,
                "source": source.describe(),
                "layout": plan.layout,
                "files": dict(sorted(files.items())),
                "tensors": plan.provenance(),
            }
            if summary is not None:
                manifest["fp4_lossy_blocks"] = summary
            out.write_json(MANIFEST_NAME, manifest)
            # The progress records go only once the manifest is written (until then a failure keeps
            # them), with anything else that is not this run's output: OUT holds what the manifest lists.
            out.prune(set(files) | {MANIFEST_NAME})
            final = out.commit()
            committed = True
        else:
            final = Path(out_path).absolute()
            out.release()
        dist.gather(None)  # every rank returns after OUT exists
        return RunResult(final, files, sorted(reused), sum(f["size"] for f in files.values()), summary)
    except KeyboardInterrupt:
        out.release()
        raise
    except BaseException as e:
        if isinstance(e, OSError):
            e = os_error(e, out.partial)
        if committed or dist.rank != 0:
            out.release()
        elif out.resumed:
            # a resumed run that fails (refused, disk full, a bad input) keeps what the earlier run
            # recorded, as the refusal's message promises
            out.keep()
            if isinstance(e, MoetoolError):
                e.fix = _kept_fix(e.fix)
        else:
            out.abort()
        if isinstance(e, MoetoolError):
            raise e from None
        raise
