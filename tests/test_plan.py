"""The plan: shard packing, ``--max-shard-size`` parsing, and a quantize plan built from a factory
checkpoint — its weight map, provenance and printable summary — plus ``--dry-run`` writing nothing."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import random
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moetool.cli.main import cli
from moetool.io import Checkpoint
from moetool.model import analyze
from moetool.plan import Job, OutTensor, Plan, Src, Unit, Write, pack_shards, parse_size
from moetool.quantize import QuantizeOptions, plan_quantize
from moetool.testing.factory import DEEPGEMM_LEAVES, make_checkpoint

W13, W13S, W2, W2S = DEEPGEMM_LEAVES.values()  # the deepgemm layout's stacked tensors under P

SHARD_NAME = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def _unit(name: str, nbytes: int) -> Unit:
    t = OutTensor(name, "U8", (nbytes,))
    return Unit((t,), (Job("copy", (Src(name),), (Write(name),)),))


def _check_packing(units: list[Unit], limit: int, shards: tuple) -> None:
    flat = [u for s in shards for u in s.units]
    assert flat == units, "packing must keep the order of units"
    for s in shards:
        assert s.units, "no empty shard"
        assert s.nbytes <= limit or len(s.units) == 1, (s.file, s.nbytes, limit)
    for u in units:
        if u.nbytes > limit:
            (home,) = [s for s in shards if u in s.units]
            assert home.units == (u,), "an oversized unit gets a shard of its own"
    for a, b in itertools.pairwise(shards):
        assert a.nbytes + b.units[0].nbytes > limit, "greedy: the next unit would have fitted"
    n = len(shards)
    if n == 1:
        assert shards[0].file == "model.safetensors"
    else:
        for i, s in enumerate(shards, 1):
            m = SHARD_NAME.match(s.file)
            assert m and (int(m.group(1)), int(m.group(2))) == (i, n), s.file


@pytest.mark.parametrize("trial", range(6))
def test_pack_shards_random(trial: int) -> None:
    rng = random.Random(1000 + trial)
    units = [
        _unit(f"t{i}", rng.choice([1, 7, 64, 300, 999, 1000, 1001, 5000])) for i in range(rng.randint(1, 40))
    ]
    limit = rng.choice([1, 500, 1000, 2048, 10**6])
    _check_packing(units, limit, pack_shards(units, limit))


def test_pack_shards_edges() -> None:
    exact = [_unit("a", 600), _unit("b", 400), _unit("c", 1)]
    shards = pack_shards(exact, 1000)
    assert [[u.tensors[0].name for u in s.units] for s in shards] == [["a", "b"], ["c"]]
    assert [s.file for s in shards] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]

    oversized = [_unit("small", 10), _unit("huge", 5000), _unit("tail", 10)]
    shards = pack_shards(oversized, 100)
    assert [[u.tensors[0].name for u in s.units] for s in shards] == [["small"], ["huge"], ["tail"]]

    shards = pack_shards([_unit("only", 10**9)], 10)
    assert [s.file for s in shards] == ["model.safetensors"] and shards[0].nbytes == 10**9

    many = [_unit(f"u{i}", 10) for i in range(12)]
    shards = pack_shards(many, 10)
    assert len(shards) == 12 and shards[-1].file == "model-00012-of-00012.safetensors"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("1GiB", 1 << 30),
        ("10KiB", 10 * 1024),
        ("3MiB", 3 << 20),
        ("2kb", 2000),
        (" 1.5 GB ", 1_500_000_000),
        ("123", 123),
        ("64B", 64),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "abc", "5XB", "-1GB", "0", "0MB", "inf", "nan", "1e400GB"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# -- a quantize plan from a factory checkpoint --------------------------------------------------


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V3 naming: one dense layer, two MoE layers of 4 experts and a shared expert."""
    return make_checkpoint(
        "deepseek_v3",
        tmp_path_factory.mktemp("plan") / "dsv3",
        num_layers=3,
        hidden_size=256,
        moe_intermediate_size=128,
        num_experts=4,
        seed=7,
    )


@pytest.fixture(scope="module")
def packed_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        "qwen2_moe",
        tmp_path_factory.mktemp("plan") / "q2packed",
        num_layers=2,
        hidden_size=128,
        moe_intermediate_size=128,
        num_experts=3,
        packed_experts=True,
        seed=8,
    )


def _plan(root: Path, **opts: Any) -> tuple[Plan, dict[str, tuple[str, tuple[int, ...]]], list[str]]:
    with Checkpoint(root) as ckpt:
        view = analyze(ckpt)
        plan = plan_quantize(view, QuantizeOptions(**opts))
        inputs = {n: (ckpt.info(n).dtype, ckpt.info(n).shape) for n in ckpt.names()}
        others = ckpt.other_files()
    return plan, inputs, others


def _base(source: str) -> str:
    """``name[e][r0:r1, :]`` → ``name``."""
    return source.split("[", 1)[0]


EXPERT = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
SHARED = re.compile(r"^model\.layers\.\d+\.mlp\.shared_experts\.(gate|up|down)_proj\.weight$")


def _check_common(plan: Plan, inputs: dict[str, tuple[str, tuple[int, ...]]], limit: int) -> dict[str, Any]:
    wm = plan.weight_map()
    prov = plan.provenance()
    tensors = {t.name: t for s in plan.shards for t in s.tensors}
    assert len(tensors) == sum(len(s.tensors) for s in plan.shards), "an output tensor in two shards"
    assert set(wm) == set(prov) == set(tensors)
    files = {s.file for s in plan.shards}
    for name, file in wm.items():
        (shard,) = [s for s in plan.shards if s.file == file]
        assert name in {t.name for t in shard.tensors}
    # every input tensor is the source of some output, and every source is an input tensor
    sources = {_base(src) for rec in prov.values() for src in rec["sources"]}
    assert sources == set(inputs)
    # each output tensor's writes tile its bytes: k writes of nbytes / k at 0, nbytes / k, ...
    starts: dict[str, list[int]] = {}
    for s in plan.shards:
        for job in s.jobs:
            for w in job.writes:
                starts.setdefault(w.tensor, []).append(w.start)
    assert set(starts) == set(tensors), "an output tensor no job writes"
    for name, st in starts.items():
        k, nbytes = len(st), tensors[name].nbytes
        assert nbytes % k == 0, name
        assert sorted(st) == [i * (nbytes // k) for i in range(k)], name
    for s in plan.shards:
        assert s.nbytes <= limit or len(s.units) == 1
    d = plan.describe()
    json.dumps(d)
    assert d["output_bytes"] == plan.total_bytes == sum(s.nbytes for s in plan.shards)
    assert plan.total_bytes == sum(t.nbytes for t in tensors.values())
    assert [x["file"] for x in d["shards"]] == [s.file for s in plan.shards] and files == set(wm.values())
    assert sum(x["tensors"] for x in d["shards"]) == len(tensors)
    assert sum(d["jobs_by_transform"].values()) == sum(len(s.jobs) for s in plan.shards)
    # the plan is plain data: no tensors, no file handles
    assert b"torch" not in pickle.dumps(plan)
    return {"wm": wm, "prov": prov, "tensors": tensors, "describe": d}


def test_hf_quantize_plan(src: Path) -> None:
    limit = 300_000
    plan, inputs, others = _plan(src, layout="hf", max_shard_size=limit)
    r = _check_common(plan, inputs, limit)
    prov, tensors, d = r["prov"], r["tensors"], r["describe"]
    wm = plan.weight_map()
    assert len(plan.shards) > 1
    quantized = sorted(n for n in inputs if EXPERT.match(n) or SHARED.match(n))
    assert len(quantized) == 2 * (4 * 3 + 3)
    expected_names = set(inputs) | {n + "_scale_inv" for n in quantized}
    assert set(tensors) == expected_names
    for name in quantized:
        n, k = inputs[name][1]
        assert tensors[name].dtype == "F8_E4M3" and tensors[name].shape == (n, k)
        scale = tensors[name + "_scale_inv"]
        assert scale.dtype == "F32" and scale.shape == (-(-n // 128), -(-k // 128))
        for out in (name, name + "_scale_inv"):
            assert prov[out] == {"file": wm[out], "sources": [name], "transform": "fp8_block_128x128"}
    for name in set(inputs) - set(quantized):
        assert tensors[name].dtype == inputs[name][0] and tensors[name].shape == inputs[name][1]
        assert prov[name] == {"file": wm[name], "sources": [name], "transform": "copy"}
    assert d["jobs_by_transform"] == {
        "copy": len(inputs) - len(quantized),
        "fp8_block_128x128": len(quantized),
    }
    assert d["layout"] == "hf" and d["command"] == "quantize"
    assert d["options"]["layout"] == "hf" and d["options"]["max_shard_size"] == limit
    assert sorted(d["copied_files"]) == sorted(others)
    assert sorted(others) == sorted(
        p.name for p in src.iterdir() if p.suffix != ".safetensors" and p.name != "config.json"
    )
    qc = plan.config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert "scale_fmt" not in qc


def test_deepgemm_quantize_plan(src: Path) -> None:
    limit = 10**9
    plan, inputs, _ = _plan(src, layout="deepgemm", scale_fmt="ue8m0", max_shard_size=limit)
    r = _check_common(plan, inputs, limit)
    prov, tensors, d = r["prov"], r["tensors"], r["describe"]
    wm = plan.weight_map()
    assert [s.file for s in plan.shards] == ["model.safetensors"]
    e, i, h = 4, 128, 256
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts"
        assert not any(n.startswith(p + ".0.") for n in tensors), "per-expert names are gone"
        assert (tensors[f"{p}.{W13}"].dtype, tensors[f"{p}.{W13}"].shape) == (
            "F8_E4M3",
            (e, 2 * i, h),
        )
        assert tensors[f"{p}.{W13S}"].shape == (e, 2 * i // 128, h // 128)
        assert tensors[f"{p}.{W2}"].shape == (e, h, i)
        assert tensors[f"{p}.{W2S}"].shape == (e, h // 128, i // 128)
        w13_sources = [f"{p}.{x}.{proj}_proj.weight" for x in range(e) for proj in ("gate", "up")]
        w2_sources = [f"{p}.{x}.down_proj.weight" for x in range(e)]
        for name, sources in ((W13, w13_sources), (W2, w2_sources)):
            for out in (f"{p}.{name}", f"{p}.{name}_scale_inv"):
                assert prov[out] == {
                    "file": wm[out],
                    "sources": sources,
                    "transform": "fp8_block_128x128_ue8m0",
                }
    assert d["jobs_by_transform"]["fp8_block_128x128_ue8m0"] == 2 * (2 * e + 3)
    assert plan.config["quantization_config"]["scale_fmt"] == "ue8m0"


def test_quantize_plan_from_packed_experts(packed_src: Path) -> None:
    plan, inputs, _ = _plan(packed_src, layout="deepgemm", max_shard_size=10**9)
    r = _check_common(plan, inputs, 10**9)
    prov = r["prov"]
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp.experts"
        assert prov[f"{p}.{W13}"]["sources"] == [
            f"{p}.gate_up_proj[{x}][{a}:{b}, :]" for x in range(3) for a, b in ((0, 128), (128, 256))
        ]
        assert prov[f"{p}.{W2}"]["sources"] == [f"{p}.down_proj[{x}]" for x in range(3)]


def test_plan_is_deterministic(src: Path) -> None:
    a, _, _ = _plan(src, layout="hf", max_shard_size=200_000)
    b, _, _ = _plan(src, layout="hf", max_shard_size=200_000)
    assert a == b
    assert json.dumps(a.describe(), sort_keys=True) == json.dumps(b.describe(), sort_keys=True)
    assert a.provenance() == b.provenance()


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("command", ["quantize", "fuse-shared"])
def test_dry_run_writes_nothing(src: Path, tmp_path: Path, command: str, as_json: bool) -> None:
    before = _digest(src)
    out = tmp_path / "out"
    args = [command, str(src), str(out), "--dry-run", "--max-shard-size", "300KB"] + (
        ["--json"] if as_json else []
    )
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert list(tmp_path.iterdir()) == []
    assert _digest(src) == before
    if as_json:
        described = json.loads(result.stdout)
        assert described["command"] == command
        assert described["shards"] and all(s["bytes"] > 0 for s in described["shards"])
        assert described["output_bytes"] == sum(s["bytes"] for s in described["shards"])
    else:
        assert "model-00001-of-" in result.stdout


def test_dry_run_json_is_the_plan(src: Path, tmp_path: Path) -> None:
    plan, _, _ = _plan(src, layout="hf", max_shard_size=parse_size("300KB"))
    result = CliRunner().invoke(
        cli,
        [
            "quantize",
            str(src),
            str(tmp_path / "o"),
            "--layout",
            "hf",
            "--max-shard-size",
            "300KB",
            "--dry-run",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(plan.describe(), default=str))
