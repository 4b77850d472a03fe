"""``validate``'s one pass: read both checkpoints once (``reads.py`` plans the steps, the prefetcher
reads them on threads while the previous step is checked) and feed every step to the layer checks
(``protocol.py``), then assemble the report in a fixed order whatever order the work ran in.

Memory: a layer larger than the read budget is read in chunks of whole experts, so the read buffers hold
two chunks whatever the number of experts per layer. Each chunk is checked as it arrives (copied to the
GPU, or where it was read on ``--device cpu``) and its buffer given back; each check takes its experts
in turn (the same operations in the same order as on the whole layer, so the report is the same). Host
and device hold the layer's other tensors (router, shared expert) besides the chunks, never the layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moetool.errors import InputError
from moetool.io.checkpoint import Checkpoint
from moetool.io.prefetch import Batch, Field, Prefetcher, reader_threads
from moetool.io.process_hashes import HashesAhead
from moetool.model import CheckpointView, analyze
from moetool.pipeline import pick_device
from moetool.validate.backend import model_dims, resolve_backend
from moetool.validate.kernels import KernelsCheck
from moetool.validate.moe import MoeCheck
from moetool.validate.options import ValidateOptions, hashes_from_reads
from moetool.validate.protocol import Context, LayerCheck, Tensors
from moetool.validate.reads import Chunk, LayerStep, ReadSchedule
from moetool.validate.report import TIMING_KEYS, Check, Report
from moetool.validate.structure import StructureCheck
from moetool.validate.tensors import TensorsCheck

#: read buffers: the step being checked and the one being read
READ_SLOTS = 2


class _LayerTensors:
    """A layer step's fields as tensors of their own (``step.layout``), filled chunk by chunk; read by
    the checks like a :class:`Batch`."""

    def __init__(self, layout: dict[str, Field], device: torch.device) -> None:
        self.tensors = {k: torch.empty(f.shape, dtype=f.dtype, device=device) for k, f in layout.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get(self, key: str) -> torch.Tensor | None:
        return self.tensors.get(key)


class _Overlay:
    """A chunk's batch (its experts) over the whole tensors of the layer kept so far; read by the checks
    like a :class:`Batch`."""

    def __init__(self, batch: Batch, whole: _LayerTensors) -> None:
        self.batch, self.whole = batch, whole

    def __contains__(self, key: str) -> bool:
        return key in self.batch or key in self.whole

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.batch[key] if key in self.batch else self.whole[key]

    def get(self, key: str) -> torch.Tensor | None:
        found = self.batch.get(key)
        return found if found is not None else self.whole.get(key)


@dataclass
class _Streamed:
    """A layer checked chunk by chunk: its whole tensors (router, shared expert, other tensors of the
    step) kept as they arrive, and which checks have started."""

    whole: _LayerTensors
    started: set[str] = field(default_factory=set)


def process_age() -> float | None:
    """Seconds since this process started (Linux; None elsewhere), to 10 ms."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return round(time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class Validator:
    """Runs the checks in one pass over both checkpoints.

    Every MoE layer is one read step: the original's experts (and shared expert), the converted
    experts, and the router tensors, read once, into one buffer, by several threads, while the
    previous step is checked on the device; the tensors, kernels and MoE checks all take their
    weights from that step. A layer larger than the read budget is read in chunks instead (its whole
    tensors, then runs of experts), each checked as it arrives, every check taking its experts in
    turn, so neither host nor device holds the layer. The remaining non-expert tensors are read in
    steps of at most the largest step, between the layers where they lie in the converted files. The
    sha256 of every converted file is computed on other threads meanwhile, from the same read buffers
    as they fill (each byte of both checkpoints is read once, unless a hash falls so far behind that
    the reader wants its buffer back: it then reads the rest of those bytes itself). Checks are reported in a fixed order whatever the
    order they ran in.
    """

    def __init__(
        self,
        orig: CheckpointView,
        conv: CheckpointView,
        opts: ValidateOptions,
        hashes_ahead: HashesAhead | None = None,
    ) -> None:
        self.opts = opts
        self.hashes_ahead = hashes_ahead
        self.ctx = Context(orig, conv, opts, pick_device(opts.device))
        self.schedule = ReadSchedule(orig, conv, opts)
        self.read_budget = self.schedule.read_budget
        # which GEMM backend (on CUDA: importing deep_gemm, the CUDA runtime's start) is settled on a
        # thread of its own while the first step is read; the report names it before any check runs
        self._backend_name: Future[str] = Future()
        threading.Thread(
            target=self._resolve_backend, args=(model_dims(orig.info),), name="moetool-backend", daemon=True
        ).start()
        self.report = Report(str(orig.ckpt.root), str(conv.ckpt.root), str(self.ctx.device), "")
        self.timings: dict[str, float] = dict.fromkeys(TIMING_KEYS, 0.0)
        self.tensors = TensorsCheck(self.ctx)
        #: the layer checks in the order they run on each layer
        self.checks: list[LayerCheck] = [
            c for c in (self.tensors, KernelsCheck(self.ctx), MoeCheck(self.ctx)) if c.group in opts.checks
        ]
        self._results: dict[str, dict[int, Check]] = {"tensors": {}, "kernels": {}, "moe": {}}
        self._streamed: _Streamed | None = None  # the layer being checked chunk by chunk

    def _resolve_backend(self, dims: tuple[int, int]) -> None:
        try:
            self._backend_name.set_result(resolve_backend(self.opts.backend, self.ctx.device, dims))
        except BaseException as e:  # a usage error (sizes DeepGEMM does not take) is raised by run()
            self._backend_name.set_exception(e)

    @contextlib.contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] += time.perf_counter() - t0

    def run(self) -> Report:
        t0 = time.perf_counter()
        self.report.timeline["pass_started"] = process_age()
        ctx = self.ctx
        layers = self.schedule.layers()
        structure = StructureCheck(ctx) if "structure" in self.opts.checks else None
        if structure is not None:
            structure.start()
        try:
            plans = self.schedule.all_plans(layers)
            hold = None
            if structure is not None:
                from_reads = hashes_from_reads(self.opts.hash_source, ctx.device.type)
                self.report.timeline["hashes_from_reads"] = from_reads
                hold = structure.hash_with(plans, from_reads=from_reads, ahead=self.hashes_ahead)
                self.report.timeline["hashes_ahead"] = structure.took_ahead
                age = process_age()
                if structure.took_ahead and age is not None:
                    began = age - (time.perf_counter() - self.hashes_ahead.started)
                    self.report.timeline["hashes_began"] = round(max(began, 0.0), 2)
            elif self.hashes_ahead is not None:
                self.hashes_ahead.close()
            if plans:
                ctx.pool = ThreadPoolExecutor(
                    max_workers=reader_threads(), thread_name_prefix="moetool-compare"
                )
                pin = ctx.device.type == "cuda"  # one DMA per step instead of staged copies
                with Prefetcher(
                    plans,
                    threads=reader_threads(),
                    slots=READ_SLOTS,
                    hold=hold,
                    pin=pin,
                    min_buffer=max(p.nbytes for p in plans),
                ) as pf:
                    self.report.backend = self._backend_name.result()
                    for batch in pf:
                        if isinstance(batch.label, LayerStep):
                            self._run_layer(batch)
                        elif isinstance(batch.label, Chunk):
                            self._run_chunk(batch)
                        else:
                            self._run_others(batch)
                    self.timings["read_wait"] = pf.wait_s
                    self.report.io = self._io(pf)
                    self.report.timeline.update(
                        reader_blocked=round(pf.blocked_s, 3),
                        held_by_hashes=round(pf.held_s, 3),
                        pinned=pf.pinned,
                    )
            self.report.backend = self._backend_name.result()
            checks = structure.result() if structure is not None else []
            if structure is not None and self.report.io:
                self.report.io.update(structure.io())
                self.report.timeline["hashes"] = structure.timeline()
                self.report.timeline["hashes_by"] = structure.hashed_by()
        finally:
            if structure is not None:
                structure.close()
                self.timings["structure"] += structure.seconds
            if ctx.pool is not None:
                ctx.pool.shutdown(wait=True)
                ctx.pool = None
        self.report.checks = checks + self._assemble(layers)
        self.timings["total"] = time.perf_counter() - t0
        self.report.timings = {k: round(v, 3) for k, v in self.timings.items()}
        return self.report

    def _assemble(self, layers: list[int]) -> list[Check]:
        """The layer checks in the report's order: tensors per layer, other tensors, then kernels and
        MoE layer by layer."""
        out: list[Check] = []
        if "tensors" in self.opts.checks:
            out += [self._results["tensors"][layer] for layer in layers]
            out.append(self.tensors.others_result(self.schedule.others_names()))
        for layer in layers:
            for name in ("kernels", "moe"):
                check = self._results[name].get(layer)
                if check is not None:
                    out.append(check)
        return out

    def _io(self, pf: Prefetcher) -> dict[str, int]:
        """Bytes of tensor data in each checkpoint and bytes the checks read from it, and the bytes of
        the read buffers (the structure check adds what its hashing took from them and read itself)."""
        out: dict[str, int] = {}
        for side, ck in (("original", self.ctx.o_ck), ("converted", self.ctx.c_ck)):
            out[f"{side}_bytes"] = sum(t.nbytes for t in ck.tensors.values())
            out[f"{side}_read"] = sum(pf.bytes_read.get(f, 0) for f in {t.file for t in ck.tensors.values()})
        out["buffer_bytes"] = pf.buffer_bytes
        return out

    def _run_layer(self, batch: Batch) -> None:
        """A layer read whole: each check takes all its experts at once."""
        step: LayerStep = batch.label
        with self._timed("transfer"):
            b = batch.to(self.ctx.device)
            if b is not batch:
                batch.release()  # the host buffer is free for the step after next
        for check in self.checks:
            if check.wants(step):
                with self._timed(check.group):
                    check.start(step, b)
                    check.part(step, b, step.experts)
                    self._results[check.group][step.layer] = check.result(step, b)
        self.ctx.forget_layer()  # the layer's weights go with its step

    def _run_others(self, batch: Batch) -> None:
        """Other tensors, compared where the checks run: on the device after one transfer (its read
        buffer given back at once), as a layer's are; comparing gigabytes of an embedding or an LM head
        on the host would take the cores and the memory bandwidth the reader threads need."""
        with self._timed("transfer"):
            b = batch.to(self.ctx.device)
            if b is not batch:
                batch.release()
        with self._timed("tensors"):
            self.tensors.compare_others(b.label.names, b, b.label.rows)
        b.release()

    def _run_chunk(self, batch: Batch) -> None:
        """Check a chunk of a layer on the device (one transfer, its read buffer given back as soon as
        it is done; on the CPU the read buffer itself): keep its whole tensors, add its experts to every
        check; the layer's results follow its last chunk. Neither host nor device ever holds the layer:
        the host two read buffers, the device one chunk, besides the layer's tensors that are not
        experts."""
        chunk: Chunk = batch.label
        step = chunk.step
        if chunk.index == 0 or self._streamed is None:
            self._streamed = None  # a previous layer's tensors go before the next are allocated
            whole = {k: f for k, f in step.layout.items() if k[1] != "|"}
            self._streamed = _Streamed(_LayerTensors(whole, self.ctx.device))
        st = self._streamed
        with self._timed("transfer"):
            b = batch.to(self.ctx.device)
            if b is not batch:
                batch.release()  # the reader can refill it while this chunk is checked
            for key in b.plan.fields:
                if key[1] != "|":
                    st.whole[key].copy_(b[key])
        if chunk.experts:
            view = _Overlay(b, st.whole)
            part = dataclasses.replace(step, experts=chunk.experts, orig=chunk.orig, conv=chunk.conv)
            for check in self.checks:
                if check.wants(step):
                    with self._timed(check.group):
                        if check.group not in st.started:
                            st.started.add(check.group)
                            check.start(step, view)
                        check.part(part, view, chunk.experts)
            self.ctx.forget_layer()  # views of this chunk
        b.release()
        if chunk.index == chunk.count - 1:
            self._finish_chunked(step, st)
            self._streamed = None

    def _finish_chunked(self, step: LayerStep, st: _Streamed) -> None:
        """The results of a layer read in chunks, once every chunk has been added."""
        whole: Tensors = st.whole
        for check in self.checks:
            if check.wants(step):
                with self._timed(check.group):
                    if check.group not in st.started:  # a layer without experts to check
                        check.start(step, whole)
                        check.part(step, whole, step.experts)
                    self._results[check.group][step.layer] = check.result(step, whole)
        self.ctx.forget_layer()


def validate_checkpoints(
    original: str | Path,
    converted: str | Path,
    opts: ValidateOptions,
    hashes_ahead: HashesAhead | None = None,
) -> Report:
    """Validate ``converted`` against ``original``. ``hashes_ahead``: the converted files' sha256,
    started before this was called (``moetool.io.process_hashes.HashesAhead``, which imports no torch: the
    CLI starts it before torch is imported); the structure check takes them over where it hashes each
    file by itself (``hash_source``) and they are its files, else they are stopped. Stopped on return
    either way."""
    try:
        return _validate_checkpoints(original, converted, opts, hashes_ahead)
    finally:
        if hashes_ahead is not None:
            hashes_ahead.close()


def _validate_checkpoints(
    original: str | Path, converted: str | Path, opts: ValidateOptions, hashes_ahead: HashesAhead | None
) -> Report:
    t0 = time.perf_counter()
    called = process_age()
    with Checkpoint(original) as o, Checkpoint(converted) as c:
        orig = analyze(o, family=opts.family)  # an unreadable original: a usage problem (exit 2)
        try:
            conv = analyze(c, family=opts.family)
            if conv.arch.family != orig.arch.family:
                raise InputError(
                    f"it is a {conv.arch.family} checkpoint, the original a {orig.arch.family} one",
                    file=str(c.root),
                    fix="give the original it was converted from",
                )
        except InputError as e:
            # the converted checkpoint contradicts itself (e.g. a fused slot dropped but still in
            # config.json): that is what validate exists to find, so it is a failed check (exit 1)
            dev = pick_device(opts.device)
            report = Report(
                str(o.root), str(c.root), str(dev), resolve_backend(opts.backend, dev, model_dims(orig.info))
            )
            report.checks.append(
                Check(
                    "structure",
                    "converted checkpoint",
                    "consistent with its config",
                    "inconsistent",
                    "consistent",
                    False,
                    e.line(),
                )
            )
            report.timings = {"total": round(time.perf_counter() - t0, 3)}
            return report
        report = Validator(orig, conv, opts, hashes_ahead).run()
        report.timeline = {"called": called, **report.timeline}
        # a shard replaced or rewritten while it was checked: the report would describe no one file
        o.check_unchanged()
        c.check_unchanged()
        return report
