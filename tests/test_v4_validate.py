"""``validate`` on DeepSeek-V4 (CPU, the torch references): FP4 originals against their FP8 conversions in
both layouts, hash-routed, learned and MTP layers. It passes on clean conversions (a lossy one included:
its block is where moetool.json says), and fails, naming the tensor, on a flipped FP8 byte, a scale one
binade off, a manifest that hides a lossy block, and a token-id table that routes elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_validate import (
    MANIFEST,
    Workspace,
    assert_consistent,
    assert_fails,
    assert_passes,
    checks,
    flip_fp8_byte,
    refresh_manifest,
    rewrite_shard,
)

from moetool.cli.main import cli
from moetool.io import Checkpoint
from moetool.model import analyze
from moetool.testing.release_formats import write_deepseek_v4_release

LOSSY = ("model.layers.1.ffn.experts.3.w1.weight", (0, 1, 4))
LAYERS = [0, 1, 2, 3]  # three decoder layers (layer 0 hash-routed) and the MTP layer


@pytest.fixture(scope="module")
def v4(v4_float: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("v4v")
    out = {
        "src": write_deepseek_v4_release(v4_float, root / "src", mtp_layers=1),
        "lossy_src": write_deepseek_v4_release(
            v4_float, root / "lossy_src", mtp_layers=1, lossy_blocks=dict([LOSSY])
        ),
    }
    for name, src, opts in (
        ("hf", "src", ("--layout", "hf")),
        ("dg", "src", ("--layout", "deepgemm")),
        ("sm100", "src", ("--layout", "deepgemm", "--scale-fmt", "ue8m0", "--scale-layout", "sm100")),
        ("lossy", "lossy_src", ("--layout", "hf")),
    ):
        result = CliRunner().invoke(cli, ["quantize", str(out[src]), str(root / name), *opts, "-q"])
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path, "cpu", tokens=32)


def edited(ws: Workspace, folder: Path) -> Path:
    copy = ws.scratch("edited")
    shutil.copytree(folder, copy)
    return copy


@pytest.mark.parametrize("conv", ["hf", "dg", "sm100", "lossy"])
def test_clean_v4_conversion_passes(v4: dict[str, Path], ws: Workspace, conv: str) -> None:
    src = v4["lossy_src" if conv == "lossy" else "src"]
    res = ws.validate(src, v4[conv])
    assert_passes(res, LAYERS, fp8=True)
    tensors = {c["scope"]: c for c in checks(res, "tensors")}
    if conv != "sm100":  # (packed scales are compared whole, without the error statistic)
        assert tensors["layer 1"]["value"].startswith("rel err 0.00e+00")  # the FP4 values, exactly


def _names(folder: Path, layer: int) -> tuple[str, str]:
    with Checkpoint(folder) as ck:
        view = analyze(ck)
    store = view.stores[layer]
    if store.kind == "deepgemm":
        return view.arch.deepgemm_names(layer)["w2_weight"], store.prefix
    return f"{store.prefix}.2.w2.weight", store.prefix


@pytest.mark.parametrize("conv", ["hf", "dg"])
def test_flipped_fp8_byte_fails(v4: dict[str, Path], ws: Workspace, conv: str) -> None:
    bad = edited(ws, v4[conv])
    name, _ = _names(bad, 3)  # the MTP layer
    flip_fp8_byte(bad, name, (2, 5, 7) if conv == "dg" else (5, 7))
    refresh_manifest(bad)
    assert_fails(ws.validate(v4["src"], bad), name, ("tensors",))


def test_scale_one_binade_off_fails(v4: dict[str, Path], ws: Workspace) -> None:
    bad = edited(ws, v4["hf"])
    name = "layers.2.ffn.experts.1.w3.scale"

    def bump(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name].clone()
        t[name].view(torch.uint8)[0, 1] += 1

    rewrite_shard(bad, bump)
    refresh_manifest(bad)
    assert_fails(ws.validate(v4["src"], bad), name, ("tensors",))


def test_manifest_hiding_a_lossy_block_fails(v4: dict[str, Path], ws: Workspace) -> None:
    bad = edited(ws, v4["lossy"])
    manifest = json.loads((bad / MANIFEST).read_text())
    assert manifest["fp4_lossy_blocks"]["blocks"] == 1
    manifest["fp4_lossy_blocks"] = {"blocks": 0, "elements": 0, "listed": []}
    (bad / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    res = ws.validate(v4["lossy_src"], bad)
    assert_fails(res, "layers.1.ffn.experts.3.w1.weight", ("tensors",))


def test_token_table_routing_elsewhere_fails(v4: dict[str, Path], ws: Workspace) -> None:
    bad = edited(ws, v4["hf"])
    name = "layers.0.ffn.gate.tid2eid"

    def shift(t: dict[str, torch.Tensor]) -> None:
        t[name] = (t[name] + 1) % 4  # every token to other experts

    rewrite_shard(bad, shift)
    refresh_manifest(bad)
    res = ws.validate(v4["src"], bad)
    assert res.code == 1
    assert_consistent(res)
    moe = {c["scope"]: c for c in checks(res, "moe")}
    assert not moe["layer 0"]["passed"] and "top-k ids differ" in moe["layer 0"]["detail"]
    assert all(moe[f"layer {n}"]["passed"] for n in (1, 2, 3))
    assert any(name in c["detail"] for c in checks(res, "tensors") if not c["passed"])


@pytest.mark.gpu
@pytest.mark.parametrize("conv", ["hf", "dg", "lossy"])
def test_gpu_validate_passes_and_catches_a_flipped_byte(
    v4: dict[str, Path], tmp_path: Path, conv: str
) -> None:
    """validate on CUDA (Triton cast, FP8 grouped GEMM) agrees with the CPU run: clean passes, a flipped
    FP8 byte fails naming its tensor."""
    ws = Workspace(tmp_path, "cuda", tokens=64)
    src = v4["lossy_src" if conv == "lossy" else "src"]
    assert_passes(ws.validate(src, v4[conv]), LAYERS, fp8=True)
    bad = edited(ws, v4[conv])
    name, _ = _names(bad, 1)
    flip_fp8_byte(bad, name, (2, 5, 7) if conv == "dg" else (5, 7))
    refresh_manifest(bad)
    assert_fails(ws.validate(src, bad), name, ("tensors",))
