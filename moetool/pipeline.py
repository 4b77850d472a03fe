"""Executes a ``Plan``: per output shard, read → transform → write, overlapped, then index, config and
manifest last. The output protocol of docs/contract.md §4 lives here: ``OUT.partial/``, atomic shards with sha256,
``--resume`` reusing finished shards whose recorded hash still matches, and rename to OUT at the end.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetool import __version__, resume
from moetool.errors import EnvironmentError_, InternalError, MoetoolError, UsageError
from moetool.hub import Source
from moetool.io.checkpoint import INDEX_NAME, MANIFEST_NAME, Checkpoint
from moetool.io.fs import input_roots
from moetool.io.hashing import sha256_file
from moetool.io.writer import OutputDir, ShardWriter, os_error, write_index
from moetool.jobs import BufferPool, SourceFiles, check_fp8_copy, copy_regions, job_pieces, read_source
from moetool.plan import Job, Plan, Shard
from moetool.resume import PROGRESS_NAME, input_files
from moetool.transforms.quant_job import Quantizer, as_stored

__all__ = [
    "PROGRESS_NAME",
    "RunResult",
    "execute",
    "input_files",
    "pick_device",
    "read_source",
    "write_shard",
]

SHARD_WORKERS_PER_GPU = 4
QUEUE_DEPTH = 2


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


# -- execution
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
    out.check()  # OUT.partial is still the folder this run locked
    writer = ShardWriter(out.path(shard.file), entries, metadata, fsync=out.fsync)
    sources = SourceFiles(ckpt)
    pool = BufferPool() if quantizer is not None and quantizer.device.type == "cpu" else None

    def produce(job: Job) -> list[list[torch.Tensor]] | int:
        regions = copy_regions(ckpt, job, out_dtypes)
        if regions is None:
            mine: list[dict[str, Any]] = []
            pieces = job_pieces(ckpt, job, quantizer, sources, pool, lossy=mine)
            if mine:
                with lock:
                    found.extend(mine)
            return pieces
        if regions[0].dtype == "F8_E4M3":
            check_fp8_copy(ckpt, job)  # copied file to file, a corrupt FP8 source is still refused
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
    done = resume.start_record(out, progress_name, plan, ckpt)
    files: dict[str, dict[str, Any]] = {}
    reused: list[str] = []
    todo: list[Shard] = []
    for shard in shards:
        rec = done.get(shard.file) if isinstance(done.get(shard.file), dict) else None
        if rec and resume.reusable(out.path(shard.file), rec):
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
            ckpt.check_unchanged()  # nothing was replaced or rewritten while it was read
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
                out.copy_file(ckpt.root / rel, rel, within=input_roots(ckpt.root))
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
