"""Reading a checkpoint once, fast: parallel positioned reads into reused buffers, the next step's
reads running while the caller works on the current one.

A caller describes each step's reads as a :class:`ReadPlan`: named tensors (``Field``) laid out in one
byte buffer, the file ranges (``Piece``) that fill them, and copies to run once they are read. A
:class:`Prefetcher` runs the plans in order on a pool of reader threads, each piece split into chunks
of ``CHUNK_BYTES`` (positioned reads release the GIL, so the chunks of one tensor are copied out of the
page cache by several cores at once), and hands back :class:`Batch` es in the same order while it
already reads the next plans.

Other readers of the same bytes take them from the buffers too, as they land (a :class:`BufferHold`:
``feed(plan, view)`` before a plan's reads start, ``filled(plan, start, nbytes)`` as each range of the
buffer is read, the pieces of the files it ``wants`` read first); a buffer is reused only after its
batch is released and every future ``feed`` returned is done (``moetool.io.hashing.PlannedHashes``
hashes files from the buffers this way, each file's hash running while the rest of a step is read).

Memory: plans in flight live in ``slots`` buffers (two by default: the batch the caller holds and the
one being read), each reused from plan to plan. Reuse matters as much as parallelism: reading into a
fresh buffer makes the kernel fault in and zero every page first, which was 4x slower than the copy
itself on a 2-core machine (1.0-1.7 GB/s against 4-7 GB/s into a buffer already touched). Peak memory
is ``slots`` times the largest plan, whatever the size of the checkpoint.

Buffers bound for a CUDA device are best pinned (``pin=True``): a copy from pinned memory is one DMA
at the link's speed, a copy from pageable memory goes through the driver's staging buffers on the
calling thread (about 7 GB/s on an H200's host, where validate spent 5.3 s of 11 copying).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moetool.errors import InputError
from moetool.io.checkpoint import Checkpoint

#: Seconds the reader waits for a buffer that only a ``BufferHold`` keeps before it hurries the hold.
HURRY_AFTER: float | None = 0.02
CHUNK_BYTES = 32 << 20  # a piece per read call: large enough to amortise the call, small enough to spread
ALIGN = 4096  # fields start on page boundaries: aligned views for every dtype, page-aligned reads
MAX_READERS = 16


def reader_threads() -> int:
    """Reader threads for this machine: one per core, at least 2 (a read waits on memory, not on the
    core), at most ``MAX_READERS``."""
    return max(2, min(os.cpu_count() or 1, MAX_READERS))


@dataclass(frozen=True)
class Field:
    """A tensor inside a batch buffer: ``shape`` of ``dtype`` from byte ``offset`` on (row-major)."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Piece:
    """``nbytes`` bytes of ``file`` (a shard of ``ckpt``) from ``file_offset`` on, to byte ``dest`` of the
    batch buffer; ``tensor`` is what an error names."""

    ckpt: Checkpoint
    file: str
    file_offset: int
    nbytes: int
    dest: int
    tensor: str


class ReadPlan:
    """One step's reads: fields laid out in a single buffer, the pieces that fill them, and functions run
    on the filled :class:`Batch` before the caller sees it (copies between fields). ``label`` is the
    caller's own description of the step, handed back with the batch."""

    def __init__(self, label: Any = None) -> None:
        self.label = label
        self.fields: dict[str, Field] = {}
        self.pieces: list[Piece] = []
        self.after: list[Callable[[Batch], None]] = []
        self.nbytes = 0

    def field(self, key: str, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> Field:
        """Reserve ``key``: a ``shape`` tensor of ``dtype``, page-aligned after the previous field."""
        if key in self.fields:
            raise ValueError(f"field {key!r} is already in the plan")
        f = Field(-(-self.nbytes // ALIGN) * ALIGN, dtype, tuple(int(d) for d in shape))
        self.fields[key] = f
        self.nbytes = f.offset + f.nbytes
        return f

    def read(
        self,
        key: str,
        ckpt: Checkpoint,
        name: str,
        rows: tuple[int, int] | None = None,
        *,
        expert: int | None = None,
        at: int = 0,
    ) -> None:
        """Read tensor ``name`` (or ``name[expert]``, rows ``[r0, r1)``; see ``Checkpoint.region``) into
        field ``key`` from its flat element ``at`` on. The region's dtype must be the field's."""
        f = self.fields[key]
        info, offset, nbytes, _ = ckpt.region(name, rows, expert=expert)
        if info.torch_dtype != f.dtype:
            raise ValueError(f"{name} is {info.torch_dtype}, field {key!r} holds {f.dtype}")
        start = at * f.dtype.itemsize
        if start + nbytes > f.nbytes:
            raise ValueError(f"{name} ({nbytes} bytes at byte {start}) overruns field {key!r}")
        if nbytes:
            self.pieces.append(Piece(ckpt, info.file, offset, nbytes, f.offset + start, name))

    def tensor(
        self,
        key: str,
        ckpt: Checkpoint,
        name: str,
        rows: tuple[int, int] | None = None,
        *,
        expert: int | None = None,
    ) -> Field:
        """A field holding exactly the region of ``name`` (as ``Checkpoint.read`` would return it)."""
        info, _, _, shape = ckpt.region(name, rows, expert=expert)
        f = self.field(key, info.torch_dtype, shape)
        self.read(key, ckpt, name, rows, expert=expert)
        return f

    def then(self, fn: Callable[[Batch], None]) -> None:
        """Run ``fn(batch)`` once every piece is read (on the reading side, before the batch is handed out)."""
        self.after.append(fn)


class Batch:
    """A filled plan: ``batch[key]`` is field ``key`` as a tensor view of the buffer.

    A batch from a :class:`Prefetcher` borrows one of its buffers: once released (``release()``, or the
    next batch taken from the iterator, so ``list(prefetcher)`` holds only released batches) the buffer
    is refilled, and views taken earlier must not be used any more. ``to(device)`` for another device
    makes an owned copy (one transfer for all fields) that outlives the release.
    """

    def __init__(self, plan: ReadPlan, buffer: torch.Tensor, on_release: Callable[[], None] | None) -> None:
        self.plan = plan
        self.label = plan.label
        self._buffer: torch.Tensor | None = buffer
        self._on_release = on_release

    @property
    def device(self) -> torch.device:
        return self._buf().device

    def _buf(self) -> torch.Tensor:
        if self._buffer is None:
            raise RuntimeError("the batch was released; its buffer holds other data now")
        return self._buffer

    def __contains__(self, key: str) -> bool:
        return key in self.plan.fields

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self.plan.fields[key]
        return self._buf()[f.offset : f.offset + f.nbytes].view(f.dtype).view(f.shape)

    def get(self, key: str) -> torch.Tensor | None:
        return self[key] if key in self.plan.fields else None

    def to(self, device: torch.device) -> Batch:
        """This batch on ``device``: itself when already there, else a copy of its bytes in one transfer."""
        buf = self._buf()
        if buf.device == device:
            return self
        return Batch(self.plan, buf[: self.plan.nbytes].to(device), None)

    def release(self) -> None:
        """Give the buffer back for the next plans (idempotent)."""
        if self._buffer is None:
            return
        self._buffer = None
        if self._on_release is not None:
            cb, self._on_release = self._on_release, None
            cb()


class BufferHold(Protocol):
    """Another reader of the prefetcher's buffers (see the module's docstring)."""

    def feed(self, plan: ReadPlan, view: memoryview) -> list[Future[Any]]:
        """``plan`` is about to be read into ``view``; the buffer is kept until the futures are done."""
        ...

    def filled(self, plan: ReadPlan, start: int, nbytes: int) -> None:
        """Bytes ``[start, start + nbytes)`` of ``plan``'s buffer are read (called from reader threads)."""
        ...

    def wants(self, file: str) -> bool:
        """Whether pieces of ``file`` should be read before the others of a plan."""
        ...

    def hurry(self, plan: ReadPlan) -> None:
        """The reader waits for ``plan``'s buffer, released by the caller, kept by ``feed``'s futures:
        they should finish at once (and take what they still lack elsewhere)."""
        ...


_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """Reads ``plans`` in order on ``threads`` reader threads into ``slots`` reused buffers and yields
    one :class:`Batch` per plan, in order. Reading runs ahead of the caller as far as free buffers allow.

    ``plans`` is consumed on a background thread, so building a plan may itself be lazy; an exception
    from building or reading a plan (a read error is an ``InputError`` naming the file and the tensor)
    is raised by the iterator where that batch would have come. Use as a context manager: leaving it
    stops the reads and joins the threads.

    ``hold`` (a :class:`BufferHold`): ``feed(plan, view)`` is called on the reading side with each plan
    and its buffer (a byte view) before its pieces are read, ``filled`` as each range lands; the futures
    ``feed`` returns keep the buffer from reuse until they are done, but once the caller has released
    the batch and the reader has waited ``HURRY_AFTER`` seconds for a buffer, ``hurry(plan)`` asks
    them to finish at once (the reader is never held long by another reader that can take its bytes
    elsewhere). What it does with the view must only read the ranges ``filled`` named, as the caller
    does.

    ``pin``: allocate the buffers in pinned (page-locked) memory, for fast copies to a CUDA device
    (pageable memory where pinning fails); ``min_buffer``: allocate each buffer at least this large at
    once (pinned memory freed to grow a buffer stays cached, so give the largest plan's size).

    Statistics: ``bytes_read`` (per file), ``wait_s`` (time the caller spent waiting for batches),
    ``blocked_s`` (time the reading side waited for a free buffer), ``held_s`` (time buffers stayed
    taken after their batch was released, for the futures of ``hold`` alone), ``buffer_bytes``
    (bytes held by the buffers now) and ``peak_in_use`` (most batches held at once).
    """

    def __init__(
        self,
        plans: Iterable[ReadPlan],
        *,
        threads: int | None = None,
        slots: int = 2,
        chunk: int = CHUNK_BYTES,
        hold: BufferHold | None = None,
        pin: bool = False,
        min_buffer: int = 0,
    ) -> None:
        if slots < 1 or chunk < 1:
            raise ValueError("slots and chunk must be positive")
        self._plans = plans
        self._chunk = chunk
        self._hold = hold
        self._pin = pin
        self._min_buffer = max(0, min_buffer)
        self._pool = ThreadPoolExecutor(
            max_workers=threads or reader_threads(), thread_name_prefix="moetool-pread"
        )
        self._buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8) for _ in range(slots)]
        self._free: queue.Queue[int | None] = queue.Queue()
        for i in range(slots):
            self._free.put(i)
        self._out: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._current: Batch | None = None
        self._held: dict[int, ReadPlan] = {}  # slots released by the caller, kept by holds
        self._in_use = 0
        self.bytes_read: dict[str, int] = {}
        self.wait_s = 0.0
        self.blocked_s = 0.0
        self.held_s = 0.0
        self.peak_in_use = 0
        self._loader = threading.Thread(target=self._load_all, name="moetool-prefetch", daemon=True)
        self._loader.start()

    @property
    def pinned(self) -> bool:
        """Whether the buffers are pinned (asked for, and pinning worked)."""
        return self._pin

    @property
    def buffer_bytes(self) -> int:
        return sum(b.numel() for b in self._buffers)

    # -- reading side -------------------------------------------------------------------------
    def _load_all(self) -> None:
        try:
            for plan in self._plans:
                t0 = time.perf_counter()
                slot = self._next_free()
                self.blocked_s += time.perf_counter() - t0
                if slot is None or self._stop.is_set():
                    return
                with self._lock:
                    self._in_use += 1
                    self.peak_in_use = max(self.peak_in_use, self._in_use)
                if self._buffers[slot].numel() < plan.nbytes:
                    self._buffers[slot] = torch.empty(0, dtype=torch.uint8)  # free before growing
                    self._buffers[slot] = self._allocate(max(plan.nbytes, self._min_buffer))
                buf = self._buffers[slot]
                view = memoryview(buf.numpy()).cast("B") if buf.numel() else memoryview(b"")
                holds = self._hold.feed(plan, view) if self._hold is not None else []
                self._read(plan, view)
                batch = Batch(plan, buf, lambda s=slot, p=plan, h=holds: self._give_back_after(s, p, h))
                for fn in plan.after:
                    fn(batch)
                self._out.put(batch)
            self._out.put(_END)
        except BaseException as e:
            self._out.put(_Failed(e))

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self._pin:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:  # no pinned memory to be had: pageable, slower copies, same bytes
                self._pin = False
        return torch.empty(nbytes, dtype=torch.uint8)

    def _next_free(self) -> int | None:
        """A free buffer's slot (None once stopping), hurrying the holds that alone keep buffers the
        caller has released whenever it waits ``HURRY_AFTER`` seconds."""
        while True:
            patience = HURRY_AFTER if self._hold is not None else None
            try:
                return self._free.get(timeout=patience)
            except queue.Empty:
                with self._lock:
                    held = list(self._held.values())
                for plan in held:
                    self._hold.hurry(plan)

    def _give_back_after(self, slot: int, plan: ReadPlan, holds: list[Future[Any]]) -> None:
        """Give ``slot`` back once every future in ``holds`` is done (at once when none is pending)."""
        pending = [len(holds) + 1]
        lock = threading.Lock()
        released = [0.0]

        def one_done(_: object = None) -> None:
            with lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                if released[0]:
                    with self._lock:
                        self.held_s += time.perf_counter() - released[0]
                        self._held.pop(slot, None)
                self._give_back(slot)

        for fut in holds:
            fut.add_done_callback(one_done)
        if pending[0] > 1:
            released[0] = time.perf_counter()
            with self._lock:
                self._held[slot] = plan
        one_done()

    def _give_back(self, slot: int) -> None:
        with self._lock:
            self._in_use -= 1
        self._free.put(slot)

    def _read(self, plan: ReadPlan, view: memoryview) -> None:
        pieces = plan.pieces
        if self._hold is not None:  # what the other reader waits for first (stable: plan order otherwise)
            pieces = sorted(pieces, key=lambda p: not self._hold.wants(p.file))
        futures: list[Future[None]] = []
        for p in pieces:
            for start in range(0, p.nbytes, self._chunk):
                n = min(self._chunk, p.nbytes - start)
                futures.append(self._pool.submit(self._read_chunk, plan, p, start, n, view))
        error: BaseException | None = None
        for fut in futures:  # every read finishes before the buffer is handed out or reused
            try:
                fut.result()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    def _read_chunk(self, plan: ReadPlan, p: Piece, start: int, n: int, view: memoryview) -> None:
        if self._stop.is_set():
            raise InputError("reading was stopped", file=p.file, tensor=p.tensor)
        dest = p.dest + start
        try:
            p.ckpt.pread_into(p.file, p.file_offset + start, view[dest : dest + n], tensor=p.tensor)
        except OSError as e:
            raise InputError(f"cannot read: {e.strerror or e}", file=p.file, tensor=p.tensor) from None
        with self._lock:
            self.bytes_read[p.file] = self.bytes_read.get(p.file, 0) + n
        if self._hold is not None:
            self._hold.filled(plan, dest, n)

    # -- caller side --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._current is not None:
            self._current.release()
            self._current = None
        t0 = time.perf_counter()
        item = self._out.get()
        self.wait_s += time.perf_counter() - t0
        if item is _END:
            self._out.put(_END)
            raise StopIteration
        if isinstance(item, _Failed):
            self._out.put(item)
            raise item.error
        self._current = item
        return item

    def close(self) -> None:
        if self._current is not None:
            self._current.release()
            self._current = None
        self._stop.set()
        self._free.put(None)  # wakes the loader if it waits for a buffer
        self._loader.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        while not self._out.empty():
            item = self._out.get()
            if isinstance(item, Batch):
                item.release()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
