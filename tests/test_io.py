"""Checkpoint I/O: the safetensors header parser and builder, the offset shard writer, the index, the
lazy reader and its refusals of corrupt or hostile input, and the output protocol of docs/contract.md §4
(``OUT.partial``, lock, commit/abort, a killed run leaving no OUT, ``--resume``)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from moetool.cli.main import cli
from moetool.errors import InputError, UsageError
from moetool.io import (
    DTYPE_NAMES,
    INDEX_NAME,
    Checkpoint,
    OutputDir,
    ShardWriter,
    build_header,
    read_header,
    sha256_file,
    write_index,
)
from moetool.pipeline import PROGRESS_NAME
from moetool.testing.factory import make_checkpoint

SEED = 20240611


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` as uint8, so NaN payloads and FP8 bit patterns compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _random_bits(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns of ``dtype`` (NaN, inf and subnormals included)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _raw_safetensors(path: Path, header: object, data: bytes, *, length: int | None = None) -> Path:
    """A safetensors-shaped file with any header (valid or not); ``length`` overrides the u64 prefix."""
    raw = json.dumps(header, separators=(",", ":")).encode() if not isinstance(header, bytes) else header
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _config(root: Path) -> None:
    (root / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))


# -- header format ------------------------------------------------------------------------------


def test_build_header_golden_bytes() -> None:
    """Layout fixed by hand: u64 LE length, compact JSON (metadata first, keys sorted), entries in the
    given order with contiguous offsets, spaces padding the header so data starts 8-aligned."""
    prefix, spans = build_header([("a", "F32", (2,)), ("b.w", "BF16", (1, 3))], {"format": "pt", "a": "12"})
    body = (
        b'{"__metadata__":{"a":"12","format":"pt"},'
        b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b.w":{"dtype":"BF16","shape":[1,3],"data_offsets":[8,14]}}'
    )
    assert len(body) == 153
    expected = b"\xa0\x00\x00\x00\x00\x00\x00\x00" + body + b"       "
    assert prefix == expected
    assert spans == {"a": (168, 8), "b.w": (176, 6)}

    empty, none = build_header([])
    assert empty == b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    assert none == {}


def test_build_then_read_header_round_trip(tmp_path: Path) -> None:
    """Every dtype, scalars, empty tensors and metadata survive build → file → read_header, and the
    reference safetensors library reads the same file back bit for bit."""
    g = torch.Generator().manual_seed(SEED)
    shapes = [(3, 5), (), (0, 7), (2, 1, 3), (11,), (4, 4), (1,), (2, 3), (5,), (3,), (2, 2), (6,)]
    entries = [
        (f"t{i}.{name.lower()}", name, shapes[i % len(shapes)])
        for i, name in enumerate(sorted(DTYPE_NAMES.values()))
    ]
    metadata = {"format": "pt", "zz": "last", "moetool.layout": "hf"}
    prefix, spans = build_header(entries, metadata)
    values = {}
    data = bytearray(prefix)
    for name, dtype_name, shape in entries:
        dtype = next(d for d, n in DTYPE_NAMES.items() if n == dtype_name)
        t = (
            torch.randint(0, 2, shape, dtype=torch.uint8, generator=g).bool()
            if dtype == torch.bool
            else _random_bits(shape, dtype, g)
        )
        values[name] = t
        assert spans[name] == (len(data), t.numel() * t.element_size())
        data += _bits(t).numpy().tobytes()
    path = tmp_path / "x.safetensors"
    path.write_bytes(bytes(data))

    header = read_header(path)
    assert header.data_start == len(prefix) and header.data_start % 8 == 0
    assert header.metadata == metadata
    assert list(header.tensors) == [n for n, _, _ in entries]
    for name, dtype_name, shape in entries:
        info = header.tensors[name]
        assert (info.dtype, info.shape, info.file) == (dtype_name, tuple(shape), str(path))
        assert (info.offset, info.nbytes) == spans[name]
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == metadata
        for name, t in values.items():
            assert torch.equal(_bits(f.get_tensor(name)), _bits(t)), name


def test_read_header_of_a_file_the_safetensors_library_wrote(tmp_path: Path) -> None:
    """The reference writer orders tensors its own way; our parser must still find each one."""
    g = torch.Generator().manual_seed(SEED + 1)
    tensors = {
        "w.bf16": torch.randn(3, 67, generator=g).bfloat16(),
        "w.f32": torch.randn(5, generator=g),
        "w.i64": torch.randint(-9, 9, (2, 3), generator=g),
        "w.f8": torch.randn(4, 9, generator=g).to(torch.float8_e4m3fn),
        # DeepSeek-V4's FP4 experts: packed e2m1 bytes and one E8M0 scale per 32 (every byte, NaN too)
        "w.i8": torch.randint(-128, 128, (4, 16), dtype=torch.int8, generator=g),
        "w.e8m0": torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e8m0fnu).view(8, 32),
    }
    path = tmp_path / "lib.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    raw = path.read_bytes()
    for name, t in tensors.items():
        info = header.tensors[name]
        assert info.shape == tuple(t.shape) and info.dtype == DTYPE_NAMES[t.dtype]
        assert raw[info.offset : info.offset + info.nbytes] == _bits(t).numpy().tobytes()


# -- shard writer -------------------------------------------------------------------------------


def _stacked_pieces(e: int, n: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """(expert, r0, r1) row ranges covering every expert exactly once, in shuffled order."""
    pieces = []
    for ex in range(e):
        cut = rng.randrange(1, n)
        pieces += [(ex, 0, cut), (ex, cut, n)]
    rng.shuffle(pieces)
    return pieces


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int32]
)
def test_shard_writer_fills_stacked_tensor_in_any_order(tmp_path: Path, dtype: torch.dtype) -> None:
    """A stacked [E, N, K] tensor written expert by expert (row ranges, shuffled) plus small tensors,
    read back by the safetensors library bit for bit; finish() reports the file's sha256 and size."""
    g = torch.Generator().manual_seed(SEED)
    rng = random.Random(SEED)
    e, n, k = 5, 7, 67
    stacked = _random_bits((e, n, k), dtype, g)
    extra = {
        "model.norm.weight": _random_bits((k,), torch.float32, g),
        "empty.rows": _random_bits((0, 3), dtype, g),
        "model.layers.0.mlp.experts.w13_weight_scale_inv": _random_bits((e, 1, 1), torch.float32, g),
    }
    big = "model.layers.0.mlp.experts.w13_weight"
    name_dt = DTYPE_NAMES[dtype]
    entries = [(big, name_dt, (e, n, k))] + [
        (nm, DTYPE_NAMES[t.dtype], tuple(t.shape)) for nm, t in extra.items()
    ]
    rng.shuffle(entries)
    metadata = {"format": "pt", "moetool.layout": "deepgemm"}
    path = tmp_path / "model-00001-of-00002.safetensors"
    w = ShardWriter(path, entries, metadata)
    itemsize = stacked.element_size()
    jobs: list[tuple[str, torch.Tensor, int]] = [
        (big, stacked[ex, r0:r1], (ex * n + r0) * k * itemsize) for ex, r0, r1 in _stacked_pieces(e, n, rng)
    ]
    jobs += [(nm, t, 0) for nm, t in extra.items() if t.numel()]
    rng.shuffle(jobs)
    for nm, t, start in jobs:
        w.write(nm, t, start)
    assert not path.exists(), "the final name appears only once finish() has checked the file"
    digest, size = w.finish()

    assert path.exists() and not path.with_name(path.name + ".tmp").exists()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert size == path.stat().st_size
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == metadata
        assert set(f.keys()) == {big, *extra}
        got = f.get_tensor(big)
        assert got.dtype == dtype and got.shape == (e, n, k)
        assert torch.equal(_bits(got), _bits(stacked))
        for nm, t in extra.items():
            back = f.get_tensor(nm)
            assert back.dtype == t.dtype and back.shape == t.shape
            assert torch.equal(_bits(back), _bits(t)), nm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_shard_writer_writes_zero_dim_tensors(tmp_path: Path, dtype: torch.dtype) -> None:
    """0-D tensors (per-tensor scales, step counters) are ordinary safetensors entries and get copied."""
    g = torch.Generator().manual_seed(SEED)
    scalar = _random_bits((), dtype, g)
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, [("input_scale", DTYPE_NAMES[dtype], ()), ("v", "F32", (3,))])
    w.write("v", torch.arange(3, dtype=torch.float32))
    w.write("input_scale", scalar)
    w.finish()
    with safe_open(path, framework="pt") as f:
        back = f.get_tensor("input_scale")
    assert back.shape == () and torch.equal(_bits(back), _bits(scalar))


def test_shard_writer_finish_refuses_a_tensor_left_partly_unwritten(tmp_path: Path) -> None:
    e, n, k = 3, 4, 5
    x = torch.arange(e * n * k, dtype=torch.float32).reshape(e, n, k)
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, [("stack", "F32", (e, n, k)), ("b", "F32", (2,))])
    w.write("b", torch.ones(2))
    for ex in range(e - 1):  # the last expert never arrives
        w.write("stack", x[ex], ex * n * k * 4)
    with pytest.raises(InputError) as err:
        w.finish()
    assert "stack" in str(err.value)
    w.close()
    assert not path.exists()


def test_shard_writer_finish_refuses_a_range_written_twice_while_another_is_missing(tmp_path: Path) -> None:
    """Coverage, not a byte count: expert 0 written twice must not stand in for expert 1."""
    e, n, k = 2, 4, 5
    x = torch.arange(e * n * k, dtype=torch.float32).reshape(e, n, k)
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, [("stack", "F32", (e, n, k))])
    w.write("stack", x[0], 0)
    w.write("stack", x[0], 0)
    with pytest.raises(InputError) as err:
        w.finish()
    assert "stack" in str(err.value)
    w.close()
    assert not path.exists()


def test_shard_writer_refuses_overrun_and_wrong_dtype(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "s.safetensors", [("a", "BF16", (2, 3))])
    with pytest.raises(InputError, match="a"):
        w.write("a", torch.zeros(2, 3, dtype=torch.bfloat16), start=2)
    with pytest.raises(InputError, match="a"):
        w.write("a", torch.zeros(2, 3, dtype=torch.float16))
    w.close()


def test_write_index_golden_bytes(tmp_path: Path) -> None:
    """Sorted keys, 2-space indent, trailing newline: the exact bytes Hugging Face tooling expects."""
    out = OutputDir(tmp_path / "out", source=None)
    write_index(
        out,
        {
            "model.layers.10.w": "model-00002-of-00002.safetensors",
            "lm_head.weight": "model-00001-of-00002.safetensors",
            "model.layers.2.w": "model-00001-of-00002.safetensors",
        },
        123456789,
    )
    expected = (
        b"{\n"
        b'  "metadata": {\n'
        b'    "total_size": 123456789\n'
        b"  },\n"
        b'  "weight_map": {\n'
        b'    "lm_head.weight": "model-00001-of-00002.safetensors",\n'
        b'    "model.layers.10.w": "model-00002-of-00002.safetensors",\n'
        b'    "model.layers.2.w": "model-00001-of-00002.safetensors"\n'
        b"  }\n"
        b"}\n"
    )
    assert out.path(INDEX_NAME).read_bytes() == expected
    out.abort()


# -- reading checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Factory checkpoints: single file, sharded with an index, packed experts, FP8."""
    base = tmp_path_factory.mktemp("io_ckpts")
    dims = {"num_layers": 2, "hidden_size": 160, "moe_intermediate_size": 96, "num_experts": 3}
    return {
        "single": make_checkpoint("qwen3_moe", base / "single", seed=3, **dims),
        "sharded": make_checkpoint("deepseek_v3", base / "sharded", seed=4, max_shard_bytes=60_000, **dims),
        "packed_fp8": make_checkpoint(
            "qwen2_moe",
            base / "packed_fp8",
            seed=5,
            packed_experts=True,
            fp8=True,
            max_shard_bytes=90_000,
            **dims,
        ),
    }


def _files_of(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("*.safetensors"))


@pytest.mark.parametrize("kind", ["single", "sharded", "packed_fp8"])
def test_checkpoint_reads_every_tensor_like_safetensors(ckpts: dict[str, Path], kind: str) -> None:
    root = ckpts[kind]
    reference: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for p in _files_of(root):
        with safe_open(p, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                reference[name] = f.get_tensor(name)
                where[name] = p.name
    if kind != "single":
        index = json.loads((root / INDEX_NAME).read_text())
        assert index["weight_map"] == where
    with Checkpoint(root) as ckpt:
        assert ckpt.names() == sorted(reference)
        assert sorted(ckpt.shard_files) == sorted(set(where.values()))
        assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in reference.values())
        for name, ref in reference.items():
            got = ckpt.read(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape, name
            assert torch.equal(_bits(got), _bits(ref)), name
            assert Path(ckpt.info(name).file).name == where[name]


@pytest.mark.parametrize("kind", ["single", "sharded", "packed_fp8"])
def test_checkpoint_row_slices_equal_full_tensor_slices(ckpts: dict[str, Path], kind: str) -> None:
    rng = random.Random(SEED)
    with Checkpoint(ckpts[kind]) as ckpt:
        names = [n for n in ckpt.names() if len(ckpt.info(n).shape) >= 2 and ckpt.info(n).shape[0] > 1]
        assert names
        for name in names:
            full = ckpt.read(name)
            rows = full.shape[0]
            mid = rng.randrange(rows)
            for r0, r1 in (
                (0, 1),
                (rows - 1, rows),
                (0, rows),
                (mid, mid),
                (mid, rng.randrange(mid, rows + 1)),
            ):
                part = ckpt.read(name, rows=(r0, r1))
                assert part.shape == full[r0:r1].shape
                assert torch.equal(_bits(part), _bits(full[r0:r1])), (name, r0, r1)


def test_checkpoint_never_writes_back_to_the_input(ckpts: dict[str, Path]) -> None:
    """An in-place op on a returned tensor changes nothing on disk, nor what a later read returns."""
    root = ckpts["sharded"]
    before = _tree_digest(root)
    with Checkpoint(root) as ckpt:
        names = ckpt.names()
        originals = {n: ckpt.read(n).clone() for n in names}
        for n in names:
            t = ckpt.read(n)
            if t.numel():
                t.view(torch.uint8).bitwise_not_()
            rows = ckpt.info(n).shape[0] if ckpt.info(n).shape else 0
            if rows > 1:
                ckpt.read(n, rows=(1, rows)).view(torch.uint8).zero_()
        for n, t in originals.items():
            assert torch.equal(_bits(ckpt.read(n)), _bits(t)), n
    assert _tree_digest(root) == before
    with Checkpoint(root) as again:
        for n, t in originals.items():
            assert torch.equal(_bits(again.read(n)), _bits(t)), n


def test_checkpoint_reads_a_sharded_checkpoint_the_safetensors_library_wrote(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(SEED + 2)
    shard1 = {"a.weight": torch.randn(3, 5, generator=g).bfloat16(), "b": torch.randn(7, generator=g)}
    shard2 = {"c.weight": torch.randn(2, 4, generator=g).to(torch.float8_e4m3fn)}
    _config(tmp_path)
    save_file(shard1, tmp_path / "model-00001-of-00002.safetensors")
    save_file(shard2, tmp_path / "model-00002-of-00002.safetensors")
    wm = {n: "model-00001-of-00002.safetensors" for n in shard1} | {
        n: "model-00002-of-00002.safetensors" for n in shard2
    }
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    with Checkpoint(tmp_path) as ckpt:
        for name, t in {**shard1, **shard2}.items():
            assert torch.equal(_bits(ckpt.read(name)), _bits(t)), name


# -- corrupt and hostile inputs -----------------------------------------------------------------


def _valid_pair() -> tuple[dict[str, object], bytes]:
    header = {
        "alpha.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "beta.weight": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
    }
    return header, bytes(range(32))


def _case_truncated(root: Path) -> list[str]:
    header, data = _valid_pair()
    _raw_safetensors(root / "model.safetensors", header, data[:-5])
    return ["model.safetensors", "beta.weight"]


def _case_tiny_file(root: Path) -> list[str]:
    (root / "model.safetensors").write_bytes(b"\x10\x00\x00")
    return ["model.safetensors"]


def _case_garbage_header(root: Path) -> list[str]:
    _raw_safetensors(root / "model.safetensors", b"\xff\xfe{not json at all", b"")
    return ["model.safetensors"]


def _case_header_not_object(root: Path) -> list[str]:
    _raw_safetensors(root / "model.safetensors", [1, 2, 3], b"")
    return ["model.safetensors"]


def _case_header_longer_than_file(root: Path) -> list[str]:
    header, data = _valid_pair()
    _raw_safetensors(root / "model.safetensors", header, data, length=1 << 20)
    return ["model.safetensors"]


def _bad_beta(entry: dict[str, object], *expected: str) -> Callable[[Path], list[str]]:
    """A case whose second tensor, ``beta.weight``, has header entry ``entry``; the error must name the
    shard, beta and ``expected``."""

    def case(root: Path) -> list[str]:
        header, data = _valid_pair()
        header["beta.weight"] = entry
        _raw_safetensors(root / "model.safetensors", header, data)
        return ["model.safetensors", "beta.weight", *expected]

    return case


_case_offsets_past_end = _bad_beta({"dtype": "F32", "shape": [4], "data_offsets": [32, 48]})
_case_overlap = _bad_beta({"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}, "alpha.weight")
_case_span_shape_mismatch = _bad_beta({"dtype": "F32", "shape": [3], "data_offsets": [16, 32]})
_case_unsupported_dtype = _bad_beta({"dtype": "C64", "shape": [2], "data_offsets": [16, 32]}, "C64")
_case_negative_dim = _bad_beta({"dtype": "F32", "shape": [-4], "data_offsets": [16, 32]})


def _two_shards(root: Path) -> dict[str, str]:
    save_file({"a": torch.ones(2)}, root / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, root / "model-00002-of-00002.safetensors")
    return {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}


def _write_index(root: Path, wm: dict[str, str]) -> None:
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _case_index_missing_shard(root: Path) -> list[str]:
    wm = _two_shards(root)
    wm["c"] = "model-00003-of-00003.safetensors"
    _write_index(root, wm)
    return [INDEX_NAME, "model-00003-of-00003.safetensors"]


def _case_index_tensor_absent(root: Path) -> list[str]:
    wm = _two_shards(root)
    wm["ghost.weight"] = "model-00001-of-00002.safetensors"
    _write_index(root, wm)
    return [INDEX_NAME, "ghost.weight"]


def _case_index_wrong_shard(root: Path) -> list[str]:
    wm = _two_shards(root)
    wm["a"] = "model-00002-of-00002.safetensors"
    _write_index(root, wm)
    return [INDEX_NAME, "tensor a"]


def _case_tensor_not_in_index(root: Path) -> list[str]:
    wm = _two_shards(root)
    del wm["b"]
    wm["a2"] = "model-00002-of-00002.safetensors"
    save_file({"b": torch.zeros(3), "a2": torch.ones(1)}, root / "model-00002-of-00002.safetensors")
    _write_index(root, wm)
    return [INDEX_NAME, "tensor b"]


def _case_tensor_in_two_shards(root: Path) -> list[str]:
    save_file({"dup.weight": torch.ones(2), "x": torch.ones(1)}, root / "model-00001-of-00002.safetensors")
    save_file({"dup.weight": torch.ones(2)}, root / "model-00002-of-00002.safetensors")
    return ["model-00002-of-00002.safetensors", "dup.weight"]


def _case_tensor_in_two_indexed_shards(root: Path) -> list[str]:
    save_file({"dup.weight": torch.ones(2), "x": torch.ones(1)}, root / "model-00001-of-00002.safetensors")
    save_file({"dup.weight": torch.ones(2), "y": torch.ones(1)}, root / "model-00002-of-00002.safetensors")
    _write_index(
        root,
        {
            "dup.weight": "model-00001-of-00002.safetensors",
            "x": "model-00001-of-00002.safetensors",
            "y": "model-00002-of-00002.safetensors",
        },
    )
    return ["dup.weight"]


def _case_index_dotdot(root: Path) -> list[str]:
    save_file({"a": torch.ones(2)}, root.parent / f"{root.name}-outside.safetensors")
    _write_index(root, {"a": f"../{root.name}-outside.safetensors"})
    return [INDEX_NAME, "outside.safetensors"]


def _case_index_absolute(root: Path) -> list[str]:
    target = root.parent / f"{root.name}-abs.safetensors"
    save_file({"a": torch.ones(2)}, target)
    _write_index(root, {"a": str(target)})
    return [INDEX_NAME, str(target)]


def _case_symlink_out(root: Path) -> list[str]:
    target = root.parent / f"{root.name}-linked.safetensors"
    save_file({"a": torch.ones(2)}, target)
    (root / "model.safetensors").symlink_to(target)
    return ["model.safetensors"]


def _case_index_not_json(root: Path) -> list[str]:
    _two_shards(root)
    (root / INDEX_NAME).write_text('{"weight_map": {"a": ')
    return [INDEX_NAME]


CORRUPT_CASES = {
    "truncated_shard": _case_truncated,
    "shorter_than_8_bytes": _case_tiny_file,
    "garbage_header": _case_garbage_header,
    "header_not_an_object": _case_header_not_object,
    "header_length_past_file": _case_header_longer_than_file,
    "offsets_past_end": _case_offsets_past_end,
    "overlapping_offsets": _case_overlap,
    "span_shape_mismatch": _case_span_shape_mismatch,
    "unsupported_dtype": _case_unsupported_dtype,
    "negative_dim": _case_negative_dim,
    "index_names_missing_shard": _case_index_missing_shard,
    "index_names_absent_tensor": _case_index_tensor_absent,
    "index_names_wrong_shard": _case_index_wrong_shard,
    "shard_tensor_not_in_index": _case_tensor_not_in_index,
    "tensor_in_two_shards": _case_tensor_in_two_shards,
    "tensor_in_two_indexed_shards": _case_tensor_in_two_indexed_shards,
    "index_path_dotdot": _case_index_dotdot,
    "index_path_absolute": _case_index_absolute,
    "shard_symlink_outside": _case_symlink_out,
    "index_not_json": _case_index_not_json,
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_input_is_refused_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    _config(root)
    expected = CORRUPT_CASES[case](root)
    with pytest.raises(InputError) as err:
        Checkpoint(root)
    msg = str(err.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg, f"{case}: {part!r} not in {msg!r}"


class _Tripwire:
    """Unpickling this creates a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    _config(root)
    marker = tmp_path / "unpickled"
    (root / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    with pytest.raises(InputError) as err:
        Checkpoint(root)
    assert "pytorch_model.bin" in str(err.value)
    assert not marker.exists()


def test_missing_config_and_missing_weights_are_input_errors(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(InputError, match=r"config\.json"):
        Checkpoint(tmp_path / "a")
    _config(tmp_path / "a")
    with pytest.raises(InputError, match="safetensors"):
        Checkpoint(tmp_path / "a")
    with pytest.raises(InputError, match="not a directory"):
        Checkpoint(tmp_path / "nope")


# -- output directory protocol ------------------------------------------------------------------


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    _config(src)
    return src


def test_output_dir_refuses_existing_out(tmp_path: Path) -> None:
    src = _src(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UsageError, match="exists"):
        OutputDir(out, source=src)
    assert (out / "keep.txt").read_text() == "old"
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["equal", "inside", "nested_inside"])
def test_output_dir_refuses_out_equal_to_or_inside_the_input(
    tmp_path: Path, where: str, overwrite: bool
) -> None:
    src = _src(tmp_path)
    before = _tree_digest(src)
    out = {"equal": src, "inside": src / "fp8", "nested_inside": src / "a" / "b"}[where]
    with pytest.raises(UsageError):
        OutputDir(out, source=src, overwrite=overwrite)
    assert _tree_digest(src) == before
    assert sorted(p.name for p in src.iterdir()) == ["config.json"]


def test_output_dir_refuses_out_reached_through_a_link_into_the_input(tmp_path: Path) -> None:
    src = _src(tmp_path)
    (tmp_path / "alias").symlink_to(src)
    with pytest.raises(UsageError):
        OutputDir(tmp_path / "alias" / "out", source=src)
    assert sorted(p.name for p in src.iterdir()) == ["config.json"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_dir_refuses_input_inside_out(tmp_path: Path, overwrite: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    src = _src(out)
    before = _tree_digest(out)
    with pytest.raises(UsageError):
        OutputDir(out, source=src, overwrite=overwrite)
    assert _tree_digest(out) == before


def test_output_dir_commit_renames_partial(tmp_path: Path) -> None:
    src = _src(tmp_path)
    out = tmp_path / "out"
    od = OutputDir(out, source=src)
    assert od.partial == tmp_path / "out.partial" and od.partial.is_dir()
    assert not out.exists()
    od.write_json("config.json", {"b": 1, "a": [1, 2]})
    od.write_bytes("sub/file.bin", b"\x00\x01")
    assert od.commit() == out
    assert not od.partial.exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "config.json",
        "sub/file.bin",
    ]
    assert (out / "config.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert (out / "sub" / "file.bin").read_bytes() == b"\x00\x01"


def test_output_dir_abort_leaves_nothing(tmp_path: Path) -> None:
    src = _src(tmp_path)
    od = OutputDir(tmp_path / "out", source=src)
    od.write_bytes("x", b"1")
    od.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_output_dir_abort_under_overwrite_keeps_the_old_out(tmp_path: Path) -> None:
    src = _src(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    od = OutputDir(out, source=src, overwrite=True)
    od.write_bytes("new.txt", b"new")
    od.abort()
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert not od.partial.exists()


def test_output_dir_overwrite_replaces_old_out_only_at_commit(tmp_path: Path) -> None:
    src = _src(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    od = OutputDir(out, source=src, overwrite=True)
    od.write_bytes("new.txt", b"new")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    od.commit()
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}])
def test_second_output_dir_on_a_locked_out_is_refused(tmp_path: Path, flags: dict[str, bool]) -> None:
    """While one run holds OUT.partial, no second run may write, resume or wipe it."""
    src = _src(tmp_path)
    out = tmp_path / "out"
    first = OutputDir(out, source=src)
    first.write_bytes("shard.bin", b"first run's work")
    with pytest.raises(UsageError):
        OutputDir(out, source=src, **flags)
    assert (first.partial / "shard.bin").read_bytes() == b"first run's work"
    first.write_bytes("more.bin", b"x")
    first.commit()
    assert sorted(p.name for p in out.iterdir()) == ["more.bin", "shard.bin"]


def test_output_dir_after_release_can_be_resumed_not_reused(tmp_path: Path) -> None:
    src = _src(tmp_path)
    out = tmp_path / "out"
    first = OutputDir(out, source=src)
    first.write_bytes("a.bin", b"a")
    first.release()
    with pytest.raises(UsageError, match="resume"):
        OutputDir(out, source=src)
    again = OutputDir(out, source=src, resume=True)
    assert again.resumed and (again.partial / "a.bin").read_bytes() == b"a"
    again.commit()
    assert (out / "a.bin").read_bytes() == b"a"


# -- a killed writer ----------------------------------------------------------------------------

KILL_SHARD_SIZE = "300KB"


@pytest.fixture(scope="module")
def kill_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough that quantizing it into several shards outlasts by far the poll that kills it."""
    return make_checkpoint(
        "qwen3_moe",
        tmp_path_factory.mktemp("kill") / "src",
        num_layers=2,
        hidden_size=256,
        moe_intermediate_size=128,
        num_experts=8,
        seed=11,
    )


def _quantize_argv(src: Path, out: Path) -> list[str]:
    return ["quantize", str(src), str(out), "--layout", "hf", "--max-shard-size", KILL_SHARD_SIZE, "-q"]


def test_killed_quantize_leaves_no_out_and_resume_matches_a_clean_run(kill_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    env = {**os.environ, "MOETOOL_DEBUG": "0"}
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moetool", *_quantize_argv(kill_src, out)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    deadline = time.monotonic() + 300
    killed = False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            # at least one finished shard recorded for --resume, then kill without warning
            if (partial / PROGRESS_NAME).exists():
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait(timeout=60)
    assert killed, f"the run ended (rc {proc.returncode}) before a shard was recorded: {log.read_text()}"
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert partial.is_dir()

    resumed = CliRunner().invoke(cli, [*_quantize_argv(kill_src, out), "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    report = json.loads(resumed.stdout)
    assert report["reused_shards"], "--resume rewrote every shard instead of reusing the finished ones"
    assert out.is_dir() and not partial.exists()

    clean = tmp_path / "clean"
    result = CliRunner().invoke(cli, _quantize_argv(kill_src, clean))
    assert result.exit_code == 0, result.output
    got, want = _tree_digest(out), _tree_digest(clean)
    assert sorted(got) == sorted(want)
    assert len([f for f in got if f.endswith(".safetensors")]) > 2
    for rel in want:
        if rel != "moetool.json":
            assert got[rel] == want[rel], rel
    m_got = json.loads((out / "moetool.json").read_text())
    m_want = json.loads((clean / "moetool.json").read_text())
    # argv differs by construction (--resume, the OUT path); everything else is a function of the input
    m_got.pop("argv"), m_want.pop("argv")
    assert m_got == m_want
