"""``moetool.layout``: a ``--layout deepgemm`` checkpoint read back for Python consumers.

``load_experts`` must give DeepGEMM's RHS exactly as stored (shapes, dtypes, K-major strides), and
``unpack_to_hf`` must give back, byte for byte, what ``quantize --layout hf`` writes for the same
source and options (float and UE8M0 scales, and SM100-packed scales after unpacking).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_asserts import assert_bytes, read_dir
from click.testing import CliRunner

from moetool.cli.main import cli
from moetool.errors import InputError
from moetool.kernels.fp8_quant_ref import unpack_sm100_scales_ref
from moetool.layout import StackedExperts, load_experts, unpack_to_hf
from moetool.testing.factory import DEEPGEMM_LEAVES, make_checkpoint

W13, W13S, W2, W2S = DEEPGEMM_LEAVES.values()  # the deepgemm layout's stacked tensors under P

BLOCK = 128
HIDDEN = 576  # 4.5 blocks: ceil scale grids along H, and 5 K blocks pack into 2 SM100 words
INTER = 128
EXPERTS = 3
MOE_LAYERS = (1, 2)
DENSE_LAYER = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The BF16 source (DeepSeek-V3, 3 layers: one dense, two MoE) and its quantized outputs."""
    base = tmp_path_factory.mktemp("layout")
    src = make_checkpoint(
        "deepseek_v3",
        base / "src",
        num_layers=3,
        hidden_size=HIDDEN,
        moe_intermediate_size=INTER,
        num_experts=EXPERTS,
        seed=21,
    )
    runs = {
        "dg-float": ("--layout", "deepgemm"),
        "dg-ue8m0": ("--layout", "deepgemm", "--scale-fmt", "ue8m0"),
        "dg-sm100": ("--layout", "deepgemm", "--scale-fmt", "ue8m0", "--scale-layout", "sm100"),
        "hf-float": ("--layout", "hf"),
        "hf-ue8m0": ("--layout", "hf", "--scale-fmt", "ue8m0"),
    }
    out = {"src": src}
    for key, opts in runs.items():
        out[key] = base / key
        result = CliRunner().invoke(cli, ["quantize", str(src), str(out[key]), *opts, "-q"])
        assert result.exit_code == 0, f"{key}: {result.output}\n{result.exception!r}"
    return out


@pytest.mark.parametrize("key", ["dg-float", "dg-ue8m0"])
def test_load_experts_shapes_dtypes_strides(ckpts: dict[str, Path], key: str) -> None:
    stored = read_dir(ckpts[key])
    for layer in MOE_LAYERS:
        w = load_experts(ckpts[key], layer)
        assert isinstance(w, StackedExperts)
        p = f"model.layers.{layer}.mlp.experts"
        assert (w.layer, w.prefix, w.num_experts, w.scale_layout) == (layer, p, EXPERTS, "sm90")
        for t, dtype, shape in (
            (w.w13, torch.float8_e4m3fn, (EXPERTS, 2 * INTER, HIDDEN)),
            (w.w2, torch.float8_e4m3fn, (EXPERTS, HIDDEN, INTER)),
            (w.w13_scale, torch.float32, (EXPERTS, 2 * INTER // BLOCK, cdiv(HIDDEN, BLOCK))),
            (w.w2_scale, torch.float32, (EXPERTS, cdiv(HIDDEN, BLOCK), INTER // BLOCK)),
        ):
            assert t.dtype == dtype and tuple(t.shape) == shape
            # K-major, experts back to back: stride(0) == N·K
            n, k = shape[1:]
            assert t.stride() == (n * k, k, 1)
        for t, name in (
            (w.w13, W13),
            (w.w13_scale, W13S),
            (w.w2, W2),
            (w.w2_scale, W2S),
        ):
            assert_bytes(t, stored[f"{p}.{name}"], name)


def test_load_experts_sm100(ckpts: dict[str, Path]) -> None:
    ref = {layer: load_experts(ckpts["dg-ue8m0"], layer) for layer in MOE_LAYERS}
    for layer in MOE_LAYERS:
        packed = load_experts(ckpts["dg-sm100"], layer)
        assert packed.scale_layout == "sm100"
        assert_bytes(packed.w13, ref[layer].w13, "w13")
        assert_bytes(packed.w2, ref[layer].w2, "w2")
        for scale, want, mn, k in (
            (packed.w13_scale, ref[layer].w13_scale, 2 * INTER, HIDDEN),
            (packed.w2_scale, ref[layer].w2_scale, HIDDEN, INTER),
        ):
            pk, mn4 = cdiv(cdiv(k, BLOCK), 4), cdiv(mn, 4) * 4
            # DeepGEMM's SM100 operand: int32 [E, MN, PK], MN-major with TMA-aligned columns
            assert scale.dtype == torch.int32 and tuple(scale.shape) == (EXPERTS, mn, pk)
            assert scale.stride()[1:] == (1, mn4)
            for e in range(EXPERTS):
                assert_bytes(unpack_sm100_scales_ref(scale[e], mn, k), want[e], f"layer {layer} expert {e}")
        unpacked = load_experts(ckpts["dg-sm100"], layer, unpack_scales=True)
        assert unpacked.scale_layout == "sm90"
        assert_bytes(unpacked.w13_scale, ref[layer].w13_scale, "w13 scales")
        assert_bytes(unpacked.w2_scale, ref[layer].w2_scale, "w2 scales")


@pytest.mark.parametrize(
    ("dg", "hf"), [("dg-float", "hf-float"), ("dg-ue8m0", "hf-ue8m0"), ("dg-sm100", "hf-ue8m0")]
)
def test_unpack_to_hf_equals_hf_layout(ckpts: dict[str, Path], dg: str, hf: str) -> None:
    hf_tensors = read_dir(ckpts[hf])
    for layer in MOE_LAYERS:
        got = unpack_to_hf(ckpts[dg], layer)
        prefix = f"model.layers.{layer}.mlp.experts."
        want = {n: t for n, t in hf_tensors.items() if n.startswith(prefix)}
        assert len(want) == EXPERTS * 6
        assert set(got) == set(want)
        for name, t in want.items():
            assert got[name].is_contiguous(), name
            assert_bytes(got[name], t, name)


def test_non_deepgemm_is_refused(ckpts: dict[str, Path]) -> None:
    for key, layer in (("hf-float", 1), ("src", 2), ("dg-float", DENSE_LAYER)):
        with pytest.raises(InputError) as exc:
            load_experts(ckpts[key], layer)
        msg = exc.value.line()
        assert "deepgemm" in msg and str(ckpts[key]) in msg and f"layer {layer}" in msg, msg
    with pytest.raises(InputError, match="deepgemm"):
        unpack_to_hf(ckpts["hf-ue8m0"], 1)
    cfg = json.loads((ckpts["hf-float"] / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"  # refused although it is an FP8 checkpoint


LEGACY = {W13: "w13_weight", W13S: "w13_weight_scale_inv", W2: "w2_weight", W2S: "w2_weight_scale_inv"}


def _as_legacy(src: Path, out: Path) -> Path:
    """A copy of a deepgemm checkpoint with its stacked tensors under the names moetool 0.1 wrote."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    renamed = 0
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            new = {}
            for name, t in load_file(f).items():
                head, _, leaf = name.rpartition(".")
                if leaf in LEGACY and head.endswith(".experts"):
                    name, renamed = f"{head}.{LEGACY[leaf]}", renamed + 1
                new[name] = t
            save_file(new, out / f.name, metadata={"format": "pt"})
        elif f.name == "model.safetensors.index.json":
            index = json.loads(f.read_text())
            index["weight_map"] = {
                (
                    f"{n.rpartition('.')[0]}.{LEGACY[n.rpartition('.')[2]]}"
                    if n.rpartition(".")[2] in LEGACY
                    else n
                ): s
                for n, s in index["weight_map"].items()
            }
            (out / f.name).write_text(json.dumps(index))
        elif f.name != "moetool.json":
            (out / f.name).write_bytes(f.read_bytes())
    assert renamed == 4 * len(MOE_LAYERS)
    return out


def test_legacy_names_are_read_and_never_written(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Outputs of moetool 0.1 (``P.w13_weight`` ...) load as before; fuse-shared and quantize rewrite them
    under today's names, byte for byte what the current layout gives."""
    legacy = _as_legacy(ckpts["dg-float"], tmp_path / "legacy")
    for layer in MOE_LAYERS:
        old, new = load_experts(legacy, layer), load_experts(ckpts["dg-float"], layer)
        for field in ("w13", "w13_scale", "w2", "w2_scale"):
            assert_bytes(getattr(old, field), getattr(new, field), f"layer {layer} {field}")
    runs = {}
    for key, src in (("legacy", legacy), ("current", ckpts["dg-float"])):
        runs[key] = tmp_path / f"fused-{key}"
        result = CliRunner().invoke(cli, ["fuse-shared", str(src), str(runs[key]), "-q"])
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    requant = tmp_path / "requant"
    result = CliRunner().invoke(cli, ["quantize", str(legacy), str(requant), "--layout", "deepgemm", "-q"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    for out, want in ((runs["legacy"], read_dir(runs["current"])), (requant, read_dir(ckpts["dg-float"]))):
        got = read_dir(out)
        assert not [n for n in got if n.rpartition(".")[2] in LEGACY.values()], out
        assert set(got) == set(want)
        for name, t in want.items():
            assert_bytes(got[name], t, name)
