"""How ``validate`` reads: one pass, in parallel, prefetched, bounded.

The prefetcher (``moetool.io.prefetch``) reads every byte of its plans once and exactly, in pieces
smaller than a tensor, into at most ``slots`` reused buffers, at most ``slots - 1`` batches ahead of
the caller; a failing read or plan surfaces at its batch as an ``InputError`` naming the file and the
tensor, and leaves no thread behind.

The validator reads each tensor byte of both checkpoints exactly once (all checks on, sampled experts
or not, every layout), keeps at most two steps of a layer's size in its buffers whatever the number of
layers (two read budgets when a layer is read in chunks of experts, with the same report), reports seconds per stage and bytes read, compares an unfused shared expert byte for byte, and
turns a failing read into exit 2 with one line naming the file. The sha256 of the converted files is
taken from the same read buffers (``moetool.io.hashing.PlannedHashes``): it equals hashlib's whatever
order the plans read in, reads itself only what no check reads, and catches a flipped byte either way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import test_validate as tv
import torch
from safetensors.torch import save_file

from moetool.errors import InputError, UsageError
from moetool.io import hashing as hashing_mod
from moetool.io import prefetch, process_hashes
from moetool.io.checkpoint import Checkpoint
from moetool.io.hashing import PlannedHashes, Run, hashed_runs
from moetool.io.prefetch import Prefetcher, ReadPlan
from moetool.io.process_hashes import HashesAhead
from moetool.testing.factory import DEEPGEMM_LEAVES, experts_prefix, make_checkpoint
from moetool.validate import TIMING_KEYS, Report, ValidateOptions, validate_checkpoints
from moetool.validate import run as validate_mod
from moetool.validate.options import hashes_from_reads

W13, W13S, W2, W2S = DEEPGEMM_LEAVES.values()  # the deepgemm layout's stacked tensors under P

THREAD_PREFIXES = ("moetool-pread", "moetool-prefetch", "moetool-sha256", "moetool-compare")


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIXES)]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Two shards of irregular tensors: every dtype validate meets, an empty one, one byte, one larger
    than several read pieces, odd row counts; seeded random bytes (NaN and inf bit patterns included)."""
    gen = torch.Generator().manual_seed(11)

    def rand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = torch.Size(shape).numel() * dtype.itemsize
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)

    root = tmp_path / "ck"
    root.mkdir()
    (root / "config.json").write_text("{}")
    save_file(
        {
            "a.bf16": rand((67, 131), torch.bfloat16),
            "b.stack": rand((5, 37, 29), torch.bfloat16),
            "c.one_byte": rand((1,), torch.uint8),
            "d.empty": rand((0, 7), torch.float32),
        },
        root / "model-00001-of-00002.safetensors",
    )
    save_file(
        {
            "e.fp8": rand((300, 129), torch.float8_e4m3fn),
            "f.scale": rand((3, 2), torch.float32),
            "g.big": rand((97, 1031), torch.float32),
            "h.i32": rand((4, 2, 9), torch.int32),
        },
        root / "model-00002-of-00002.safetensors",
    )
    return root


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


class ReadLog:
    """Wraps ``Checkpoint.pread_into``: records (file, offset, length) of every read, optionally failing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: dict[str, OSError] | None = None) -> None:
        self.reads: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()
        real = Checkpoint.pread_into

        def pread_into(ck: Checkpoint, file: str, offset: int, view: memoryview, *, tensor=None) -> None:
            if fail and tensor in fail:
                raise fail[tensor]
            with self.lock:
                self.reads.append((file, offset, len(view)))
            real(ck, file, offset, view, tensor=tensor)

        monkeypatch.setattr(Checkpoint, "pread_into", pread_into)

    def per_file(self) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for file, off, n in self.reads:
            out.setdefault(file, []).append((off, off + n))
        return {f: sorted(v) for f, v in out.items()}


def assert_each_byte_once(log: ReadLog, ck: Checkpoint) -> None:
    """The reads of ``ck``'s files never overlap and cover exactly the bytes of its tensors."""
    want: dict[str, list[tuple[int, int]]] = {}
    for info in ck.tensors.values():
        if info.nbytes:
            want.setdefault(info.file, []).append((info.offset, info.offset + info.nbytes))
    got = {f: v for f, v in log.per_file().items() if f in {i.file for i in ck.tensors.values()}}
    assert set(got) == set(want), (sorted(got), sorted(want))
    for file, ranges in want.items():
        reads = got[file]
        for (_, e0), (s1, _) in itertools.pairwise(reads):
            assert s1 >= e0, f"{file}: a byte read twice at {s1}"
        merged: list[list[int]] = []
        for s, e in sorted(reads):
            if merged and merged[-1][1] == s:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        expected: list[list[int]] = []
        for s, e in sorted(ranges):
            if expected and expected[-1][1] == s:
                expected[-1][1] = e
            else:
                expected.append([s, e])
        assert merged == expected, f"{file}: read {merged}, tensors lie at {expected}"


# -- the prefetcher -------------------------------------------------------------------------------
def _plans(ck: Checkpoint, seed: int) -> list[ReadPlan]:
    """Every tensor once, shuffled into plans of 1..3 tensors."""
    names = ck.names()
    random.Random(seed).shuffle(names)
    plans, i = [], 0
    while i < len(names):
        k = random.Random(seed + i).randint(1, 3)
        plan = ReadPlan(len(plans))
        for name in names[i : i + k]:
            plan.tensor(name, ck, name)
        plans.append(plan)
        i += k
    return plans


@pytest.mark.parametrize(("threads", "slots", "chunk"), [(1, 1, 1 << 20), (3, 2, 4099), (4, 3, 64)])
def test_prefetcher_reads_every_byte_once_and_exactly(
    shards: Path, monkeypatch: pytest.MonkeyPatch, threads: int, slots: int, chunk: int
) -> None:
    with Checkpoint(shards) as ck:
        want = {name: _bytes(ck.read(name)) for name in ck.names()}
        log = ReadLog(monkeypatch)
        plans = _plans(ck, seed=threads)
        seen = []
        with Prefetcher(plans, threads=threads, slots=slots, chunk=chunk) as pf:
            for batch in pf:
                seen.append(batch.label)
                for name in batch.plan.fields:
                    t = batch[name]
                    assert t.dtype == ck.info(name).torch_dtype and tuple(t.shape) == tuple(
                        ck.info(name).shape
                    )
                    assert _bytes(t) == want[name], name
            assert pf.bytes_read == {
                f: sum(i.nbytes for i in ck.tensors.values() if i.file == f)
                for f in {i.file for i in ck.tensors.values() if i.nbytes}
            }
        assert seen == list(range(len(plans)))
        assert_each_byte_once(log, ck)
        assert max(n for _, _, n in log.reads) <= chunk
        big = ck.info("g.big")
        pieces = [r for r in log.reads if r[0] == big.file and big.offset <= r[1] < big.offset + big.nbytes]
        assert len(pieces) == -(-big.nbytes // chunk)  # a large tensor is read in pieces, by several threads
    assert not _our_threads()


def test_plan_regions_land_where_asked(shards: Path) -> None:
    """Rows of an expert of a stacked tensor and rows of a matrix, placed at element offsets of one
    field, hold what ``Checkpoint.read`` returns for the same regions; fields stay page-aligned."""
    with Checkpoint(shards) as ck:
        plan = ReadPlan()
        plan.field("stack", torch.bfloat16, (3, 11, 29))
        plan.read("stack", ck, "b.stack", expert=4, rows=(2, 13))
        plan.read("stack", ck, "b.stack", expert=0, rows=(26, 37), at=11 * 29)
        plan.read("stack", ck, "b.stack", expert=2, rows=(0, 11), at=2 * 11 * 29)
        plan.tensor("rows", ck, "e.fp8", rows=(129, 257))
        assert all(f.offset % prefetch.ALIGN == 0 for f in plan.fields.values())
        with Prefetcher([plan], threads=2, chunk=100) as pf:
            batch = next(iter(pf))
            got = batch["stack"]
            assert _bytes(got[0]) == _bytes(ck.read("b.stack", (2, 13), expert=4))
            assert _bytes(got[1]) == _bytes(ck.read("b.stack", (26, 37), expert=0))
            assert _bytes(got[2]) == _bytes(ck.read("b.stack", (0, 11), expert=2))
            assert _bytes(batch["rows"]) == _bytes(ck.read("e.fp8", (129, 257)))


def test_plan_refuses_what_does_not_fit(shards: Path) -> None:
    with Checkpoint(shards) as ck:
        plan = ReadPlan()
        plan.field("x", torch.float32, (2, 1031))
        with pytest.raises(ValueError, match="holds"):
            plan.read("x", ck, "a.bf16")  # bf16 bytes into a float32 field
        with pytest.raises(ValueError, match="overruns"):
            plan.read("x", ck, "g.big", rows=(0, 2), at=1)
        with pytest.raises(ValueError, match="already"):
            plan.field("x", torch.float32, (1,))
        assert not plan.pieces


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_prefetcher_runs_ahead_but_never_more_than_its_buffers(shards: Path, slots: int) -> None:
    """A slow caller: plan k is read only once the batch ``slots`` places before it was given back,
    at most ``slots`` batches are held at once, the buffers hold at most ``slots`` of the largest plan,
    and with more than one buffer some batch is ready before it is asked for."""
    with Checkpoint(shards) as ck:
        n = 9
        asked = 0
        loaded_at: dict[int, int] = {}
        plans = []
        for k in range(n):
            plan = ReadPlan(k)
            for j, name in enumerate(ck.names()[k % 3 :: 3]):  # plans of different sizes
                plan.tensor(f"{j}", ck, name)
            plan.then(lambda b, k=k: loaded_at.setdefault(k, asked))
            plans.append(plan)
        with Prefetcher(plans, threads=2, slots=slots, chunk=512) as pf:
            it = iter(pf)
            for k in range(n):
                asked += 1  # asking for batch k gives batch k - 1 back
                batch = next(it)
                assert batch.label == k
                time.sleep(0.03)
            with pytest.raises(StopIteration):
                next(it)
            assert pf.peak_in_use <= slots
            assert pf.buffer_bytes <= slots * max(p.nbytes for p in plans)
        for k in range(slots, n):  # plan k needs the buffer of batch k - slots, given back when
            assert loaded_at[k] >= k - slots + 2, (k, loaded_at)  # batch k - slots + 1 is asked for
        if slots > 1:
            assert any(loaded_at[k] <= k for k in range(1, n)), loaded_at


def test_released_batch_cannot_be_read(shards: Path) -> None:
    with Checkpoint(shards) as ck:
        plan = ReadPlan()
        plan.tensor("t", ck, "a.bf16")
        with Prefetcher([plan, ReadPlan()], threads=1) as pf:
            it = iter(pf)
            first = next(it)
            assert "t" in first and first.get("absent") is None
            first.release()
            first.release()  # idempotent
            with pytest.raises(RuntimeError, match="released"):
                first["t"]
            assert next(it).plan.nbytes == 0


def test_truncated_shard_is_named_at_its_batch(shards: Path) -> None:
    """The shard shrinks after its header was read: batches before the cut arrive, the one reading
    past the end raises an ``InputError`` naming the file and the tensor."""
    with Checkpoint(shards) as ck:
        last = max(ck.tensors.values(), key=lambda i: i.offset)
        early = [n for n, i in ck.tensors.items() if i.file != last.file and i.nbytes]
        with open(last.file, "r+b") as f:
            f.truncate(last.offset + last.nbytes // 2)
        plans = [ReadPlan(0), ReadPlan(1)]
        for name in early:
            plans[0].tensor(name, ck, name)
        plans[1].tensor(last.name, ck, last.name)
        with Prefetcher(plans, threads=3, chunk=256) as pf:
            it = iter(pf)
            assert next(it).label == 0
            with pytest.raises(InputError) as e:
                next(it)
        line = e.value.line()
        assert last.file in line and last.name in line and "ended" in line, line
    assert not _our_threads()


def test_read_error_names_file_and_tensor(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Checkpoint(shards) as ck:
        ReadLog(monkeypatch, fail={"g.big": OSError(errno.EIO, "Input/output error")})
        plan = ReadPlan()
        for name in ck.names():
            plan.tensor(name, ck, name)
        with Prefetcher([plan], threads=4, chunk=1000) as pf, pytest.raises(InputError) as e:
            next(iter(pf))
        line = e.value.line()
        assert "Input/output error" in line and ck.info("g.big").file in line and "g.big" in line, line
    assert not _our_threads()


def test_error_building_a_plan_surfaces_at_its_batch(shards: Path) -> None:
    with Checkpoint(shards) as ck:

        def plans():
            plan = ReadPlan("first")
            plan.tensor("a", ck, "a.bf16")
            yield plan
            ck.info("no.such.tensor")
            yield ReadPlan("never")

        with Prefetcher(plans(), threads=2) as pf:
            it = iter(pf)
            assert next(it).label == "first"
            with pytest.raises(InputError, match=r"no\.such\.tensor"):
                next(it)
    assert not _our_threads()


# -- the validator ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> tv.Workspace:
    return tv.Workspace(tmp_path_factory.mktemp("validate-io"), "cpu")


@pytest.mark.parametrize(
    ("conversion", "sample"),
    [
        ("deepgemm-float", None),
        ("hf-ue8m0", None),
        ("deepgemm-ue8m0+fuse-r2", None),
        ("hf-float+fuse-r2", "2"),
        ("bf16+fuse-r1", None),
        ("deepgemm-float", "1"),
    ],
)
def test_validate_reads_each_tensor_byte_once(
    ws: tv.Workspace, monkeypatch: pytest.MonkeyPatch, conversion: str, sample: str | None
) -> None:
    """All checks on (sampled experts or not: the MoE check takes every expert): both checkpoints'
    tensor bytes are read exactly once, and the report's io figures say so."""
    orig, conv = ws.source("deepseek_v3"), ws.converted("deepseek_v3", conversion)
    log = ReadLog(monkeypatch)
    opts = ValidateOptions(device=ws.device, tokens=ws.tokens, experts=int(sample) if sample else None)
    report = validate_checkpoints(orig, conv, opts)
    assert report.passed, [c for c in report.checks if not c.passed]
    with Checkpoint(orig) as o, Checkpoint(conv) as c:
        assert_each_byte_once(log, o)
        assert_each_byte_once(log, c)
        assert report.io["original_read"] == report.io["original_bytes"] == o.total_bytes
        assert report.io["converted_read"] == report.io["converted_bytes"] == c.total_bytes


def test_validate_buffers_hold_two_layers_whatever_the_depth(tmp_path: Path) -> None:
    """Six MoE layers: the read buffers hold at most two steps of one layer's size (the experts, shared
    expert and router of both checkpoints, page-aligned), far less than the checkpoints."""
    orig = make_checkpoint(
        "deepseek_v3", tmp_path / "src", num_layers=7, hidden_size=256, moe_intermediate_size=128,
        num_experts=6, top_k=2, vocab_size=300, seed=5,
    )  # fmt: skip
    conv = tmp_path / "q"
    tv.run_ok("quantize", orig, conv, "--device", "cpu")
    report = validate_checkpoints(orig, conv, ValidateOptions(device="cpu", tokens=4))
    assert report.passed
    with Checkpoint(orig) as o, Checkpoint(conv) as c:
        per_layer = []
        for layer in range(1, 7):
            block = f"model.layers.{layer}.mlp."
            names = [(ck, n) for ck in (o, c) for n in ck.tensors if n.startswith(block)]
            per_layer.append(sum(ck.tensors[n].nbytes + prefetch.ALIGN for ck, n in names))
        total = o.total_bytes + c.total_bytes
    assert 0 < report.io["buffer_bytes"] <= 2 * max(per_layer)
    assert report.io["buffer_bytes"] < total / 2


def test_report_has_seconds_per_stage(ws: tv.Workspace) -> None:
    orig = ws.source("deepseek_v3")
    res = ws.validate(orig, ws.converted("deepseek_v3", "deepgemm-ue8m0"), "-v")
    assert res.code == 0, res.out
    t = res.report["timings"]
    assert set(t) == set(TIMING_KEYS), t
    assert all(isinstance(v, float) and v >= 0 for v in t.values()), t
    assert t["tensors"] > 0 and t["kernels"] > 0 and t["moe"] > 0 and t["structure"] > 0
    # one copy of each layer's step to the GPU; none on the CPU, where the checks use the read buffers
    assert (t["transfer"] > 0) == ws.device.startswith("cuda"), t
    # the checks run one after another on the calling thread; hashing runs beside them
    assert t["tensors"] + t["kernels"] + t["moe"] + t["transfer"] + t["read_wait"] <= t["total"] + 0.01
    assert t["structure"] <= t["total"] + 0.01
    assert "timings (s, overlapping): structure" in res.err and "read original" in res.err, res.err
    state_orig, state_conv = ws.scratch("o.safetensors"), ws.scratch("c.safetensors")
    tv.write_state_file(state_orig, tv.k_first_state(torch.float32), tv.ssm_meta("k-first"))
    tv.run_ok("convert-ssm", state_orig, state_conv, "--to", "k-last")
    res = ws.validate(state_orig, state_conv)
    assert res.code == 0 and res.report["timings"]["ssm"] > 0
    assert res.report["timings"]["total"] >= res.report["timings"]["ssm"]


@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
def test_flipped_byte_in_unfused_shared_expert_fails(ws: tv.Workspace, layout: str) -> None:
    """The shared expert is quantized in place (not fused): its FP8 bytes are compared with the recipe
    like every other tensor, so a flipped byte fails the tensors check by name even with the sha256
    re-recorded."""
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", f"{layout}-float"))
    name = "model.layers.2.mlp.shared_experts.down_proj.weight"
    tv.flip_fp8_byte(conv, name, (77, 3))
    tv.refresh_manifest(conv)
    res = ws.validate(orig, conv)
    assert tv.passed(res, "structure")
    tv.assert_fails(res, name, groups=("tensors",))
    other = next(c for c in tv.checks(res, "tensors") if c["scope"] == "other tensors")
    assert "FP8 bytes differ" in other["detail"] and "[77, 3]" in other["detail"], other


def test_failing_read_is_one_line_naming_the_file(ws: tv.Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk error while reading the converted experts: exit 2, one line naming the shard and the
    tensor, no report, no thread left reading or hashing."""
    orig, conv = ws.source("deepseek_v3"), ws.converted("deepseek_v3", "deepgemm-float")
    victim = f"{experts_prefix(tv.config_of(conv), 2)}.{W2}"
    ReadLog(monkeypatch, fail={victim: OSError(errno.EIO, "Input/output error")})
    res = ws.validate(orig, conv)
    assert res.code == 2, (res.code, res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.err, res.err
    assert str(conv / tv.SHARD) in lines[0] and victim in lines[0] and "Input/output error" in lines[0]
    assert not _our_threads()


def test_non_finite_original_stops_with_one_line(ws: tv.Workspace) -> None:
    """A NaN in an original expert (the conversion made before it appeared): the recipe cannot be
    applied, so validate stops with one line naming the tensor (exit 2), in the middle of its pass,
    and leaves no thread reading or hashing."""
    conv = ws.converted("deepseek_v3", "hf-float")
    orig = ws.copy(ws.source("deepseek_v3"))
    name = f"{experts_prefix(tv.config_of(orig), 2)}.3.up_proj.weight"
    shard, off, _, dtype, shape = tv.tensor_at(orig, name)
    assert dtype == "BF16"
    tv.write_bytes(shard, off + tv.element_offset(shape, (5, 131), 2), b"\xc0\x7f")  # bf16 NaN
    res = ws.validate(orig, conv)
    assert res.code == 2, (res.code, res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "NaN" in lines[0], res.err
    assert not _our_threads()


# -- the sha256 of the converted files, from the read buffers -------------------------------------------
def _sparse_plans(ck: Checkpoint, seed: int) -> list[ReadPlan]:
    """Tensors in a shuffled order, some as row slices, some read twice, some not at all."""
    rng = random.Random(seed)
    plans: list[ReadPlan] = []
    for name in rng.sample(ck.names(), len(ck.names())) * 2:
        info = ck.info(name)
        if rng.random() < 0.3 or not info.nbytes:
            continue
        plan = ReadPlan(len(plans))
        if len(info.shape) >= 1 and info.shape[0] > 2 and rng.random() < 0.5:
            r0 = rng.randrange(info.shape[0] - 1)
            plan.tensor("x", ck, name, (r0, rng.randrange(r0 + 1, info.shape[0] + 1)))
        else:
            plan.tensor("x", ck, name)
        plans.append(plan)
    return plans


@pytest.mark.parametrize("order", ["in-file-order", "shuffled", "sparse"])
@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("hurry", [None, 0.001])
def test_hashes_from_read_buffers_equal_hashlib(
    shards: Path, monkeypatch: pytest.MonkeyPatch, order: str, slots: int, hurry: float | None
) -> None:
    """``PlannedHashes`` fed by a prefetcher gives each file the sha256 hashlib gives the whole file,
    whatever order and overlap the plans read in (a file no plan reads included); it hashes every byte
    once, from the buffers or read itself, and reads itself only what the plans never read when they
    read the files in order and the reader never hurries it. Hurried whenever the reader waits for a
    buffer (after 1 ms), the hashes let go of the buffers mid-way and still give hashlib's digests."""
    monkeypatch.setattr(prefetch, "HURRY_AFTER", hurry)
    files = [shards / "model-00001-of-00002.safetensors", shards / "model-00002-of-00002.safetensors"]
    files.append(shards / "config.json")
    with Checkpoint(shards) as ck:
        if order == "in-file-order":
            plans = []
            for name in sorted(ck.names(), key=lambda n: (ck.info(n).file, ck.info(n).offset)):
                plan = ReadPlan(name)
                plan.tensor("x", ck, name)
                plans.append(plan)
        else:
            plans = _plans(ck, 5) if order == "shuffled" else _sparse_plans(ck, 5)
        keys = [str(p.resolve()) for p in files]
        with PlannedHashes(keys, plans) as hashes:
            with Prefetcher(plans, threads=3, slots=slots, chunk=1000, hold=hashes) as pf:
                assert sum(1 for _ in pf) == len(plans)
            got = {k: hashes.result(k) for k in keys}
        total = sum(p.stat().st_size for p in files)
        tensor_bytes = ck.total_bytes
    assert got == {str(p.resolve()): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert hashes.from_buffers + hashes.read_itself == total
    if order == "in-file-order" and hurry is None:
        assert hashes.from_buffers == tensor_bytes
    assert not _our_threads()


def test_a_hash_behind_the_reader_lets_go_of_its_buffers(
    shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hash far slower than the reads (a pause per 4 KiB update): once the caller has
    released a batch and the reader waits for its buffer, the hash is hurried, lets go of it and reads
    what it still lacks from the file itself; the digests are still hashlib's, and the hash read more
    than the headers itself."""
    files = [shards / "model-00001-of-00002.safetensors", shards / "model-00002-of-00002.safetensors"]
    keys = [str(p.resolve()) for p in files]
    want = {str(p.resolve()): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    real = hashlib.sha256

    class Slow:
        def __init__(self) -> None:
            self.h = real()

        def update(self, data: memoryview) -> None:
            time.sleep(0.002)
            self.h.update(data)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(prefetch, "HURRY_AFTER", 0.001)
    monkeypatch.setattr(hashing_mod, "HASH_CHUNK", 4096)  # at most this much per update
    monkeypatch.setattr(hashing_mod.hashlib, "sha256", Slow)
    with Checkpoint(shards) as ck:
        plans = []
        for name in sorted(ck.names(), key=lambda n: (ck.info(n).file, ck.info(n).offset)):
            plan = ReadPlan(name)
            plan.tensor("x", ck, name)
            plans.append(plan)
        headers = sum(p.stat().st_size for p in files) - ck.total_bytes
        with PlannedHashes(keys, plans) as hashes:
            with Prefetcher(plans, threads=3, slots=1, chunk=1000, hold=hashes) as pf:
                assert sum(1 for _ in pf) == len(plans)
            got = {k: hashes.result(k) for k in keys}
    monkeypatch.undo()
    assert got == want
    assert hashes.from_buffers + hashes.read_itself == headers + ck.total_bytes
    assert hashes.read_itself > headers, (hashes.read_itself, headers)
    assert not _our_threads()


def test_hashed_runs_take_the_heaviest_chain_in_reading_order() -> None:
    """Runs read out of file order: the chain keeps the most bytes whose offsets rise in reading order
    (a router read before the experts it follows in the file gives way to the experts)."""
    runs = [Run(0, 900, 1000), Run(1, 0, 400), Run(1, 400, 800), Run(2, 850, 900), Run(3, 100, 200)]
    assert [(r.plan, r.start) for r in hashed_runs(runs)] == [(1, 0), (1, 400), (2, 850)]
    assert hashed_runs([]) == []
    assert [(r.plan, r.start) for r in hashed_runs([Run(0, 10, 20), Run(1, 15, 40)])] == [(1, 15)]


def validated_hashing(
    ws: tv.Workspace, monkeypatch: pytest.MonkeyPatch, conversion: str, hash_source: str, opts: dict
) -> tuple[Report, ReadLog, Path, dict, int]:
    """``validate_checkpoints`` of a DeepSeek-V3 conversion with ``hash_source``, its reads logged, passed
    with its files' hashes: the report, the read log, the converted folder, the files moetool.json lists
    and their total size."""
    orig, conv = ws.source("deepseek_v3"), ws.converted("deepseek_v3", conversion)
    log = ReadLog(monkeypatch)
    report = validate_checkpoints(
        orig, conv, ValidateOptions(device=ws.device, tokens=ws.tokens, hash_source=hash_source, **opts)
    )
    assert report.passed, [c for c in report.checks if not c.passed]
    assert any(c.scope == "files" and c.passed for c in report.checks)
    listed = json.loads((conv / "moetool.json").read_text())["files"]
    return report, log, conv, listed, sum((conv / rel).stat().st_size for rel in listed)


@pytest.mark.parametrize(
    ("conversion", "opts"),
    [
        ("deepgemm-float", {}),
        ("hf-ue8m0", {}),
        ("deepgemm-ue8m0+fuse-r2", {}),
        ("hf-float", {"experts": 1}),
        ("deepgemm-float", {"layers": (1,)}),
        ("deepgemm-float", {"read_budget": 1}),
    ],
)
def test_validate_hashes_the_converted_files_from_its_reads(
    ws: tv.Workspace, monkeypatch: pytest.MonkeyPatch, conversion: str, opts: dict
) -> None:
    """The structure check's sha256 of every converted file comes from the bytes the other checks read
    (no second read of a tensor byte: the checks' reads still cover each byte once, and the hashing
    reads itself only headers, files without tensors and what the checks skip), and the report says
    how many bytes came from where. (The reader never hurries the hashes here: on a loaded machine a
    hash may fall behind, and then reads what it missed itself.)"""
    monkeypatch.setattr(prefetch, "HURRY_AFTER", None)
    report, log, conv, listed, total = validated_hashing(ws, monkeypatch, conversion, "reads", opts)
    assert report.timeline["hashes_from_reads"] is True
    io = report.io
    assert io["converted_hashed_from_reads"] + io["hash_read"] == total
    with Checkpoint(conv) as c:
        if "layers" not in opts:
            assert_each_byte_once(log, c)
        if not opts.get("layers") and not opts.get("read_budget"):
            # every tensor byte was read by the checks and hashed from their buffers
            assert io["converted_hashed_from_reads"] == io["converted_read"] == c.total_bytes
            assert io["hash_read"] == total - c.total_bytes
        else:
            assert 0 < io["converted_hashed_from_reads"] <= io["converted_read"]
    # the timeline: one row per listed file, its bytes those of the io counts; buffers pinned on CUDA
    tl = report.timeline
    assert tl["pinned"] is ws.device.startswith("cuda")
    assert 0 < tl["called"] <= tl["pass_started"]
    rows = tl["hashes"]
    assert sorted(r["file"] for r in rows) == sorted(listed)
    assert sum(r["from_buffers"] for r in rows) == io["converted_hashed_from_reads"]
    assert sum(r["read_itself"] for r in rows) == io["hash_read"]
    assert all(0 <= r["start"] <= r["end"] and min(r["wait"], r["hash"], r["read"]) >= 0 for r in rows)
    assert tl["held_by_hashes"] >= 0 and tl["reader_blocked"] >= 0


@pytest.mark.parametrize(("conversion", "opts"), [("deepgemm-float", {}), ("hf-ue8m0", {"read_budget": 1})])
def test_validate_hashes_each_converted_file_by_itself_with_hash_source_files(
    ws: tv.Workspace, monkeypatch: pytest.MonkeyPatch, conversion: str, opts: dict
) -> None:
    """``hash_source="files"``: every converted file is hashed by a thread reading it itself, nothing
    from the checks' buffers, so no buffer ever waits for a hash; the checks' own reads still cover each
    tensor byte once, and the digests still prove the files."""
    report, log, conv, listed, total = validated_hashing(ws, monkeypatch, conversion, "files", opts)
    io = report.io
    assert io["converted_hashed_from_reads"] == 0 and io["hash_read"] == total
    with Checkpoint(conv) as c:
        assert_each_byte_once(log, c)
    tl = report.timeline
    assert tl["hashes_from_reads"] is False and tl["held_by_hashes"] == 0
    rows = tl["hashes"]
    assert sorted(r["file"] for r in rows) == sorted(listed)
    assert all(r["from_buffers"] == 0 and r["wait"] == 0 and r["hash"] == 0 for r in rows)
    assert sum(r["read_itself"] for r in rows) == total
    assert not _our_threads()


@pytest.mark.parametrize("flipped", [False, True])
def test_validate_takes_over_hashes_started_ahead(ws: tv.Workspace, flipped: bool) -> None:
    """Hashes started before validate (``HashesAhead``, as the CLI starts them before torch is
    imported) are the structure check's where it hashes each file itself: taken over, not started
    again, and they prove the files (a byte flipped in a layer the checks skip fails them)."""
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", "deepgemm-float"))
    if flipped:
        tv.flip_fp8_byte(conv, f"{experts_prefix(tv.config_of(conv), 2)}.{W2}", (2, 100, 50))
    ahead = HashesAhead(conv)
    listed = json.loads((conv / "moetool.json").read_text())["files"]
    assert ahead.files == {str((conv / rel).resolve()) for rel in listed}
    report = validate_checkpoints(
        orig,
        conv,
        ValidateOptions(device=ws.device, tokens=ws.tokens, layers=(1,), hash_source="files"),
        hashes_ahead=ahead,
    )
    tl = report.timeline
    assert tl["hashes_ahead"] is True and tl["hashes_from_reads"] is False
    assert sorted(r["file"] for r in tl["hashes"]) == sorted(listed)
    assert report.io["hash_read"] == sum((conv / rel).stat().st_size for rel in listed)
    files = next(c for c in report.checks if c.group == "structure" and c.scope == "files")
    assert files.passed is not flipped and report.passed is not flipped, files
    assert all(c.passed for c in report.checks if c.group == "tensors")
    assert not _our_threads()


def test_hashes_ahead_of_a_file_changed_since_are_not_taken(ws: tv.Workspace) -> None:
    """A shard written after the hashes ahead read it (the recorded sha256 kept): validate reads its
    header from the changed file, sees the hashes ahead were of another file, and hashes it again,
    so the flipped byte fails the check the stale digest would have passed."""
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", "deepgemm-float"))
    ahead = HashesAhead(conv)
    listed = json.loads((conv / "moetool.json").read_text())["files"]
    for f in ahead.files:
        ahead.hashes.result(f)  # every file hashed as it was, the recorded sha256 matching
    name = f"{experts_prefix(tv.config_of(conv), 2)}.{W2}"
    shard = tv.tensor_at(conv, name)[0]
    assert ahead.hashes.result(str(shard.resolve())) == listed[shard.name]["sha256"]
    time.sleep(0.01)  # a change time of its own, on file systems with coarse timestamps
    tv.flip_fp8_byte(conv, name, (2, 100, 50))
    report = validate_checkpoints(
        orig,
        conv,
        ValidateOptions(device=ws.device, tokens=ws.tokens, layers=(1,), hash_source="files"),
        hashes_ahead=ahead,
    )
    assert report.timeline["hashes_ahead"] is False
    files = next(c for c in report.checks if c.group == "structure" and c.scope == "files")
    assert not files.passed and shard.name in files.detail, files
    assert not report.passed
    assert not _our_threads()


def test_hashes_ahead_are_dropped_where_hashes_come_from_reads(ws: tv.Workspace) -> None:
    orig, conv = ws.source("deepseek_v3"), ws.converted("deepseek_v3", "deepgemm-float")
    report = validate_checkpoints(
        orig,
        conv,
        ValidateOptions(device=ws.device, tokens=ws.tokens, hash_source="reads"),
        hashes_ahead=HashesAhead(conv),
    )
    assert report.passed, [c for c in report.checks if not c.passed]
    tl = report.timeline
    assert tl["hashes_ahead"] is False and tl["hashes_from_reads"] is True
    assert report.io["converted_hashed_from_reads"] > 0
    assert not _our_threads()


def test_hashes_ahead_hash_only_listed_files_of_the_recorded_size(tmp_path: Path) -> None:
    """Nothing outside the checkpoint, nothing of another size, nothing without a readable manifest."""
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "b").write_bytes(b"y" * 3)
    (tmp_path.parent / "outside").write_bytes(b"z")
    files = {"a": {"size": 10}, "b": {"size": 4}, "../outside": {"size": 1}, "gone": {"size": 1}}
    (tmp_path / "moetool.json").write_text(json.dumps({"files": files}))
    with contextlib.closing(HashesAhead(tmp_path)) as ahead:
        assert ahead.files == {str((tmp_path / "a").resolve())}
        assert ahead.hashes.result(str((tmp_path / "a").resolve())) == hashlib.sha256(b"x" * 10).hexdigest()
    (tmp_path / "moetool.json").write_text("[1, 2")
    with contextlib.closing(HashesAhead(tmp_path)) as ahead:
        assert ahead.files == frozenset()
    assert not _our_threads()


def test_validate_command_starts_hashing_before_torch_is_imported(tmp_path: Path) -> None:
    """What the command runs before it starts the hashes ahead (the Hub path resolution, the report
    target's checks, ``HashesAhead`` itself) imports no torch: the hashes run while torch is imported."""
    code = (
        "import sys\n"
        "import moetool.cli.main, moetool.cli.validate, moetool.hub, moetool.io.fs, moetool.io.hashing\n"
        "from moetool.io.process_hashes import HashesAhead\n"
        f"HashesAhead({str(tmp_path)!r}).close()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_hashes_ahead_run_in_a_process_that_imports_neither_torch_nor_moetool(tmp_path: Path) -> None:
    """The hashes ahead of a real file: hashlib's digest, from another process, and still no torch in
    this one; the hashing process itself imports the standard library only (``-X importtime`` lists
    what it imports)."""
    (tmp_path / "a").write_bytes(b"x" * 100_000)
    (tmp_path / "moetool.json").write_text(json.dumps({"files": {"a": {"size": 100_000}}}))
    a = str((tmp_path / "a").resolve())
    code = (
        "import os, sys\n"
        "from moetool.io.process_hashes import HashesAhead\n"
        f"ahead = HashesAhead({str(tmp_path)!r})\n"
        f"print(ahead.hashes.result({a!r}), ahead.hashes.pid != os.getpid())\n"
        "ahead.close()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [hashlib.sha256(b"x" * 100_000).hexdigest(), "True"]
    worker = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", str(process_hashes.WORKER), "1", "4096"],
        stdin=subprocess.PIPE,
        capture_output=True,
        text=True,
    )
    assert worker.returncode == 0 and '"pid"' in worker.stdout, worker.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in worker.stderr.splitlines() if "|" in line}
    assert {"hashlib", "threading"} <= imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "moetool", "numpy")}, imported


def test_validate_command_guesses_where_hashes_will_come_from() -> None:
    from moetool.cli.validate import hashes_likely_from_files

    assert hashes_likely_from_files("files", "cpu") is True
    assert hashes_likely_from_files("reads", "cuda") is False
    assert hashes_likely_from_files("auto", "cpu") is False
    assert hashes_likely_from_files("auto", "cuda:1") is True
    assert hashes_likely_from_files("auto", "auto") is os.path.exists("/dev/nvidiactl")


def test_hash_source_auto_reads_on_the_cpu_and_files_on_cuda() -> None:
    assert hashes_from_reads("auto", "cpu") is True
    assert hashes_from_reads("auto", "cuda") is False
    assert hashes_from_reads("reads", "cuda") is True
    assert hashes_from_reads("files", "cpu") is False
    with pytest.raises(UsageError, match="hash_source"):
        hashes_from_reads("both", "cpu")


def test_validate_says_where_its_hashes_read(ws: tv.Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--hash-source`` on the command line; ``-v`` and the report say which source ran: the checks'
    buffers, a hashing process, or threads of this process where that process cannot start."""
    orig, conv = ws.source("deepseek_v3"), ws.converted("deepseek_v3", "deepgemm-float")
    for source, said, by in [
        ("files", "from each file, read in a process of its own", "process"),
        ("reads", "from the checks' read buffers", "reads"),
        ("files", "from each file, read by threads of this process", "threads"),
    ]:
        from_reads = by == "reads"
        if by == "threads":
            monkeypatch.setattr(process_hashes, "WORKER", ws.scratch("no-such-worker.py"))
        res = ws.validate(orig, conv, "-v", "--hash-source", source)
        assert res.code == 0, res.err
        assert said in res.err, res.err
        assert res.report["timeline"]["hashes_from_reads"] is from_reads
        assert res.report["timeline"]["hashes_by"] == by
        # the command starts the files' hashes before anything else, and validate takes them over
        assert res.report["timeline"]["hashes_ahead"] is not from_reads
        assert ("before torch was imported" in res.err) is not from_reads, res.err
        assert (res.report["io"]["converted_hashed_from_reads"] > 0) is from_reads
    res = ws.validate(orig, conv, "--hash-source", "both")
    assert res.code == 2 and "--hash-source" in res.err, res.err


def test_validate_hashes_many_shards_from_its_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A converted checkpoint in many small shards, layers straddling them: every shard's steps still
    come in the order they lie in it, so every tensor byte is hashed from the checks' reads and each
    byte of both checkpoints is read once (the reader never hurrying the hashes)."""
    monkeypatch.setattr(prefetch, "HURRY_AFTER", None)
    orig = make_checkpoint(
        "deepseek_v3", tmp_path / "src", num_layers=4, hidden_size=256, moe_intermediate_size=128,
        num_experts=6, top_k=2, vocab_size=300, seed=9,
    )  # fmt: skip
    conv = tmp_path / "q"
    tv.run_ok("quantize", orig, conv, "--device", "cpu", "--max-shard-size", "150KB")
    report = validate_checkpoints(orig, conv, ValidateOptions(device="cpu", tokens=4))
    assert report.passed, [c for c in report.checks if not c.passed]
    listed = json.loads((conv / "moetool.json").read_text())["files"]
    assert sum(rel.endswith(".safetensors") for rel in listed) > 5
    with Checkpoint(conv) as c:
        assert report.io["converted_hashed_from_reads"] == report.io["converted_read"] == c.total_bytes
    assert report.io["hash_read"] == sum((conv / rel).stat().st_size for rel in listed) - c.total_bytes


@pytest.mark.parametrize("hash_source", ["reads", "files"])
@pytest.mark.parametrize("where", ["read", "skipped"])
def test_flipped_byte_fails_structure_where_checks_read_and_where_they_skip(
    ws: tv.Workspace, monkeypatch: pytest.MonkeyPatch, where: str, hash_source: str
) -> None:
    """With ``--layers 1`` the checks read layer 1's experts and skip layer 2's: a byte flipped in
    either (the recorded sha256 kept) fails the structure check's file hashes, whether the hash took
    the byte from the checks' buffers or read it itself (either hash source)."""
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", "deepgemm-float"))
    layer = 1 if where == "read" else 2
    name = f"{experts_prefix(tv.config_of(conv), layer)}.{W2}"
    shard, off, _, _, shape = tv.tensor_at(conv, name)
    pos = off + tv.element_offset(shape, (2, 100, 50), 1)
    tv.flip_fp8_byte(conv, name, (2, 100, 50))
    log = ReadLog(monkeypatch)
    report = validate_checkpoints(
        orig, conv, ValidateOptions(device=ws.device, tokens=ws.tokens, layers=(1,), hash_source=hash_source)
    )
    read = any(s <= pos < e for s, e in log.per_file().get(str(shard.resolve()), []))
    assert read == (where == "read")
    files = next(c for c in report.checks if c.group == "structure" and c.scope == "files")
    assert not files.passed and tv.SHARD in files.detail, files
    tensors_ok = all(c.passed for c in report.checks if c.group == "tensors")
    assert tensors_ok == (where == "skipped")  # layer 2 is not checked, layer 1 is
    assert not report.passed
    assert not _our_threads()


# -- a layer read in chunks ---------------------------------------------------------------------------
UNLIMITED = 1 << 60


def expert_bytes(conv: Path) -> int:
    """Bytes of one expert in both checkpoints of the test models (bf16 original, FP8 converted), with
    the page alignment of the fields a chunk lays out."""
    per = 3 * tv.HIDDEN * tv.INTER
    return 2 * per + per + 8 * prefetch.ALIGN


def reports_chunked_and_whole(
    ws: tv.Workspace, orig: Path, conv: Path, budget: int, experts: int | None = None
) -> tuple[dict, dict, int]:
    """Validate with ``budget`` bytes per read step and with no limit; returns both reports (as dicts)
    and the bytes of the largest step read whole without a limit that a budget cannot cut (a tensor
    and its original, with their scales)."""
    reports = []
    for b in (budget, UNLIMITED):
        opts = ValidateOptions(
            device=ws.device, backend="triton", tokens=ws.tokens, experts=experts, read_budget=b
        )
        reports.append(validate_checkpoints(orig, conv, opts).to_dict())
    with Checkpoint(orig) as o, Checkpoint(conv) as c:
        o_names = {n for n in o.tensors if ".experts." not in n}
        c_names = {n for n in c.tensors if ".experts." not in n}
        oversized = max(
            o.tensors[n].nbytes + c.tensors[n].nbytes + 4 * prefetch.ALIGN
            + sum(ck.tensors[n + "_scale_inv"].nbytes for ck in (o, c) if n + "_scale_inv" in ck.tensors)
            for n in o_names & c_names
        )  # fmt: skip
    return reports[0], reports[1], oversized


def assert_same_report(chunked: dict, whole: dict) -> None:
    """The same checks, values and verdict; each byte read once either way."""
    assert chunked["checks"] == whole["checks"]
    assert chunked["passed"] == whole["passed"]
    for io in (chunked["io"], whole["io"]):
        assert io["original_read"] == io["original_bytes"] and io["converted_read"] == io["converted_bytes"]


@pytest.mark.parametrize(
    ("conversion", "sample", "per_chunk"),
    [
        ("deepgemm-float", None, 2),
        ("hf-ue8m0", None, 1),
        ("deepgemm-ue8m0+fuse-r2", None, 2),
        ("hf-float+fuse-r2", "2", 1),
        ("bf16+fuse-r1", None, 1),
    ],
)
def test_layer_in_chunks_reports_what_the_whole_layer_does(
    ws: tv.Workspace, monkeypatch: pytest.MonkeyPatch, conversion: str, sample: str | None, per_chunk: int
) -> None:
    """A read budget of one or two experts splits every layer into several chunks: the same report as
    one read per layer, every byte read once, and the read buffers bounded by two budgets (or two of
    the one step a budget cannot cut) instead of two layers."""
    orig, conv = ws.source("deepseek_v3"), ws.converted("deepseek_v3", conversion)
    budget = expert_bytes(conv) * per_chunk + expert_bytes(conv) // 2
    log = ReadLog(monkeypatch)
    opts = ValidateOptions(device=ws.device, tokens=ws.tokens, experts=int(sample) if sample else None)
    chunked = validate_checkpoints(orig, conv, ValidateOptions(**{**opts.__dict__, "read_budget": budget}))
    with Checkpoint(orig) as o, Checkpoint(conv) as c:
        assert_each_byte_once(log, o)
        assert_each_byte_once(log, c)
    chunked_d, whole, oversized = reports_chunked_and_whole(ws, orig, conv, budget, opts.experts)
    assert chunked.passed and chunked_d["checks"] == chunked.to_dict()["checks"]
    assert_same_report(chunked_d, whole)
    assert chunked.io["buffer_bytes"] <= 2 * max(budget, oversized), (chunked.io, budget, oversized)
    assert chunked.io["buffer_bytes"] < whole["io"]["buffer_bytes"]


@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
def test_defects_across_chunks_report_what_the_whole_layer_does(ws: tv.Workspace, layout: str) -> None:
    """Chunks of two experts: a flipped byte in expert 2 (the second chunk) and experts 1 and 2
    exchanged across the chunk boundary fail the same way as with one read per layer."""
    flipped = ws.copy(ws.converted("deepseek_v3", f"{layout}-float"))
    name = tv.down_proj_name(tv.config_of(flipped), 2, layout, e=2)
    tv.flip_fp8_byte(flipped, name, (2, 100, 50) if layout == "deepgemm" else (100, 50))
    swapped = ws.copy(ws.converted("deepseek_v3", f"{layout}-float"))
    culprit = tv.swap_whole_experts(swapped, 1, layout, 1, 2)
    tv.refresh_manifest(swapped)
    orig = ws.source("deepseek_v3")
    for conv, bad, layer in ((flipped, name, 2), (swapped, culprit, 1)):
        budget = 2 * expert_bytes(conv) + expert_bytes(conv) // 2
        chunked, whole, _ = reports_chunked_and_whole(ws, orig, conv, budget)
        assert_same_report(chunked, whole)
        tensors = next(
            c for c in chunked["checks"] if c["group"] == "tensors" and c["scope"] == f"layer {layer}"
        )
        assert not tensors["passed"] and bad in tensors["detail"], tensors
        assert chunked["io"]["buffer_bytes"] < whole["io"]["buffer_bytes"]  # it was read in chunks
    # the first expert of the swap is named, in either layout
    assert f"{W13}[1," in tensors["detail"] or "experts.1.gate_proj" in tensors["detail"], tensors


@pytest.mark.parametrize("family", sorted(tv.MODELS))
def test_every_family_in_chunks_keeps_no_expert_stack(
    ws: tv.Workspace, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    """Chunks of one expert, every family (fused where it has a shared expert): the report of one read
    per layer, and the checks run chunk by chunk: the validator allocates the layers' whole tensors
    (router, shared expert) and never a stack of experts, so host and device hold two read buffers (two
    chunks) and what is not an expert, not a layer."""
    conversion = "deepgemm-ue8m0+fuse-r2" if tv.MODELS[family].has_shared else "hf-float"
    orig, conv = ws.source(family), ws.converted(family, conversion)
    allocated: list[list[str]] = []
    init = validate_mod._LayerTensors.__init__

    def spy(self: validate_mod._LayerTensors, layout: dict, device: torch.device) -> None:
        allocated.append(sorted(layout))
        init(self, layout, device)

    monkeypatch.setattr(validate_mod._LayerTensors, "__init__", spy)
    budget = expert_bytes(conv) + expert_bytes(conv) // 2
    chunked, whole, _ = reports_chunked_and_whole(ws, orig, conv, budget)
    assert chunked["passed"], chunked["checks"]
    assert {c["group"] for c in chunked["checks"]} >= {"tensors", "kernels", "moe"}
    assert_same_report(chunked, whole)
    assert allocated, "no layer was read in chunks"
    assert not [k for keys in allocated for k in keys if k[1] == "|"], allocated


def test_fp8_original_in_chunks_reports_what_the_whole_layer_does(ws: tv.Workspace) -> None:
    """An FP8 original requantized to power-of-two scales in the DeepGEMM layout, read in chunks: its
    experts are dequantized chunk by chunk, and the report is the one of one read per layer."""
    orig = ws.converted("deepseek_v3", "hf-float")
    conv = ws.scratch("requantized")
    tv.run_ok("quantize", orig, conv, "--layout", "deepgemm", "--scale-fmt", "ue8m0", "--device", ws.device)
    budget = 2 * expert_bytes(conv) + expert_bytes(conv) // 2
    chunked, whole, _ = reports_chunked_and_whole(ws, orig, conv, budget)
    assert chunked["passed"], chunked["checks"]
    assert_same_report(chunked, whole)
    assert chunked["io"]["buffer_bytes"] < whole["io"]["buffer_bytes"]  # it was read in chunks


@pytest.mark.parametrize("targets", ["experts", "linear"])
@pytest.mark.parametrize("flip", [False, True], ids=["clean", "flipped"])
def test_other_tensors_larger_than_a_step_are_read_in_runs_of_rows(
    ws: tv.Workspace, monkeypatch: pytest.MonkeyPatch, targets: str, flip: bool
) -> None:
    """A tensor outside the experts that does not fit a read step (the embedding copied; an attention
    projection quantized in place with ``--targets linear``) is read in runs of 128-row blocks, one
    step each, instead of making every read buffer as large as it: each byte still read once, and the
    report the one a read of the whole tensor makes, a flipped byte in the second run named where it
    lies in the whole tensor."""
    from moetool.validate.tensors import TensorsCheck

    orig = ws.source("deepseek_v3")
    conv = ws.scratch(f"runs-{targets}")
    tv.run_ok("quantize", orig, conv, "--layout", "hf", "--targets", targets)
    name = "model.embed_tokens.weight" if targets == "experts" else "model.layers.1.self_attn.o_proj.weight"
    shard, off, _, dtype, shape = tv.tensor_at(conv, name)
    assert dtype == ("BF16" if targets == "experts" else "F8_E4M3") and shape[0] >= 2 * 128, (dtype, shape)
    where = (200, 7)  # in the second run of 128 rows
    if flip:
        if dtype == "F8_E4M3":
            tv.flip_fp8_byte(conv, name, where)
        else:
            pos = off + tv.element_offset(shape, where, 2)
            tv.write_bytes(shard, pos, bytes([tv.read_bytes(shard, pos, 1)[0] ^ 0x01]))
        tv.refresh_manifest(conv)
    runs: list[tuple[int, int]] = []
    compare_others = TensorsCheck.compare_others

    def spy(self: TensorsCheck, names: list[str], batch: Any, rows: Any = None) -> None:
        runs.extend(span for n, span in (rows or {}).items() if n == name)
        compare_others(self, names, batch, rows)

    monkeypatch.setattr(TensorsCheck, "compare_others", spy)
    log = ReadLog(monkeypatch)
    opts = ValidateOptions(device=ws.device, backend="triton", tokens=ws.tokens)
    in_runs = validate_checkpoints(orig, conv, ValidateOptions(**{**opts.__dict__, "read_budget": 1}))
    with Checkpoint(orig) as o, Checkpoint(conv) as c:
        assert_each_byte_once(log, o)
        assert_each_byte_once(log, c)
    assert runs == [(r, min(r + 128, shape[0])) for r in range(0, shape[0], 128)], runs
    runs.clear()
    whole = validate_checkpoints(orig, conv, ValidateOptions(**{**opts.__dict__, "read_budget": UNLIMITED}))
    assert runs == []  # read whole
    assert in_runs.to_dict()["checks"] == whole.to_dict()["checks"]
    assert in_runs.passed is whole.passed is (not flip)
    if flip:
        other = next(c for c in in_runs.checks if c.scope == "other tensors")
        assert name in other.detail and str(list(where)) in other.detail, other
