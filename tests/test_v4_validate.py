"""``validate`` on DeepSeek-V4 (CPU, the torch references): FP4 originals against their FP8 conversions in
both layouts, hash-routed, learned and MTP layers. It passes on clean conversions (a lossy one included:
its block is where moetool.json says), and fails, naming the tensor, on a flipped FP8 byte, a scale one
binade off, a manifest that hides a lossy block, and a token-id table that routes elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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
    spy_on_stack_proofs,
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


def scale_one_binade_off(ws: Workspace, folder: Path) -> tuple[Path, str]:
    """A copy of the hf-layout ``folder`` with one E8M0 scale of layer 2, expert 1's up projection one
    binade up (sha256 re-recorded), and that scale's name."""
    bad = edited(ws, folder)
    name = "layers.2.ffn.experts.1.w3.scale"

    def bump(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name].clone()
        t[name].view(torch.uint8)[0, 1] += 1

    rewrite_shard(bad, bump)
    refresh_manifest(bad)
    return bad, name


def test_scale_one_binade_off_fails(v4: dict[str, Path], ws: Workspace) -> None:
    bad, name = scale_one_binade_off(ws, v4["hf"])
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


@pytest.mark.parametrize(
    ("conv", "defect"),
    [
        ("hf", None),
        ("dg", None),
        ("lossy", None),
        ("dg", "flip"),
        ("hf", "binade"),
        ("lossy", "hide"),
        ("lossy", "hide-from-a-lying-cast"),
    ],
)
def test_fp4_stacks_are_proven_at_once_with_the_same_report(
    v4: dict[str, Path], ws: Workspace, monkeypatch: pytest.MonkeyPatch, conv: str, defect: str | None
) -> None:
    """The tensors check casts a layer's stacked FP4 experts at once and compares the stacks; the first
    expert (its error statistics), an expert moetool.json lists as lossy, and whatever the stacks cannot
    prove (a chunk with a lossy block, a mismatch) go region by region. The report is the one the
    region-by-region path makes, clean or not. The stacks' exactness is the torch references' word, not
    the cast's: a cast that reports no changed values proves no lossy block exact."""
    from moetool.validate import tensors
    from moetool.validate.tensors import TensorsCheck

    src = v4["lossy_src" if conv == "lossy" else "src"]
    bad = v4[conv]
    if defect == "flip":  # layer 1, expert 2's down projection
        bad = edited(ws, bad)
        name, _ = _names(bad, 1)
        flip_fp8_byte(bad, name, (2, 5, 7))
        refresh_manifest(bad)
    elif defect == "binade":  # layer 2, expert 1's up projection
        bad, _ = scale_one_binade_off(ws, bad)
    elif defect:  # the lossy block of layer 1, expert 3 left out of moetool.json
        bad = edited(ws, bad)
        manifest = json.loads((bad / MANIFEST).read_text())
        manifest["fp4_lossy_blocks"] = {"blocks": 0, "elements": 0, "listed": []}
        (bad / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if defect == "hide-from-a-lying-cast":
        from moetool.kernels import dispatch

        cast = dispatch.fp4_cast

        def lying(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, s, changed = cast(*args, **kwargs)
            return q, s, torch.zeros_like(changed)

        monkeypatch.setattr(dispatch, "fp4_cast", lying)
    proven = spy_on_stack_proofs(monkeypatch)
    if defect in ("flip", "binade"):  # one expert per chunk: the proof stops at the defect's chunk
        monkeypatch.setattr(tensors, "FP4_STACK_BYTES", {"cpu": 1})
    fast = ws.validate(src, bad)
    monkeypatch.setattr(TensorsCheck, "_stacks_equal", lambda *args: set())
    slow = ws.validate(src, bad)
    assert fast.code == slow.code == (1 if defect else 0), (fast.out, fast.err)
    assert checks(fast) == checks(slow)
    everything = {1, 2, 3}
    by_layer = {
        None: {1: {1, 2} if conv == "lossy" else everything},  # expert 3 is listed lossy
        "flip": {1: {1}},
        "binade": {2: set()},
        "hide": {1: set()},  # the chunk holding the lossy block proves nothing
        "hide-from-a-lying-cast": {1: set()},
    }[defect]
    assert proven == [by_layer.get(n, everything) for n in LAYERS], proven


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
