"""The MoE families of 2026 end to end, on tiny checkpoints transformers 5.24 writes itself
(``moetool.testing.hf_families``): DeepSeek-V3.2, GLM-5 (glm_moe_dsa), Qwen3.5-MoE (its vision-language
release form, per-expert and packed), MiniMax-M2 and Kimi-K2.5 (its release form).

For each: ``inspect`` reports the experts and linear-attention layers transformers builds; ``quantize``
(both layouts, float and UE8M0 scales) writes each expert byte for byte as the recipe applied to the
original and ``validate`` passes on it; the ``hf`` output loads in transformers with the original's
logits within FP8 error; ``fuse-shared`` gives transformers' own MoE block (float32); a planted
corruption makes ``validate`` fail naming the expert. FP8 releases (DeepSeek-V3.2, GLM-5, MiniMax-M2
style) requantize to UE8M0 and take the DeepGEMM layout. moetool's MoE reference against transformers'
MoE block of each family is in tests/test_moe.py, INT4 inputs in tests/test_int4.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_asserts import assert_bytes, read_dir
from click.testing import CliRunner
from test_hf_compat import dequantized_copy

from moetool.cli.main import cli, main
from moetool.io import Checkpoint
from moetool.kernels.fp8_quant_ref import block_quant_ref, ceil_to_ue8m0
from moetool.layout import unpack_to_hf
from moetool.model import analyze
from moetool.moe import FusedSlots, MoeLayerWeights, moe_forward
from moetool.pipeline import read_source
from moetool.testing import hf_families as hf

FAMILIES = sorted(hf.FAMILIES)
SHARED = [f for f in FAMILIES if hf.FAMILIES[f].shared]
FP8_RELEASES = ["deepseek_v32", "glm_moe_dsa", "minimax_m2"]
# 1 - cosine of the logits against the BF16 original, experts in FP8. Each rounded matrix adds about
# (2**-4/sqrt(3))**2 / 2 (tests/test_hf_compat.py), and these models route 8 experts in up to 3 layers on
# scores a rounding can reorder, so a token may take another expert: measured 5e-4 (Kimi-K2.5) to 1.1e-2
# (Qwen3.5-MoE, with a shared expert in each of 3 layers). That the weights were read right is checked
# exactly, against the dequantized copy.
COSINE_GAP = 2e-2
# fused slots against transformers' block in float32: the same products, summed in another order
FUSED_TOL = 1e-5


def _ok(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}"
    return result.output


@pytest.fixture(scope="session")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """BF16 checkpoints of every family (Qwen3.5-MoE also with packed experts, as its releases ship)."""
    base = tmp_path_factory.mktemp("families")
    made = {f: hf.make_checkpoint(f, base / f, seed=21) for f in FAMILIES}
    made["qwen3_5_moe_packed"] = hf.make_checkpoint("qwen3_5_moe", base / "qwen_packed", seed=22, packed=True)
    return made


def _family(case: str) -> str:
    return case.removesuffix("_packed")


def _expert_sources(path: Path, layer: int) -> dict[str, torch.Tensor]:
    """The original's experts of ``layer`` as float tensors under their per-expert (``--layout hf``) names,
    whatever the storage (a packed ``gate_up_proj`` is cut by moetool's own reader)."""
    out = {}
    with Checkpoint(path) as ckpt:
        view = analyze(ckpt)
        store, inter = view.stores[layer], view.info.moe_intermediate_size
        for e in range(store.num_experts):
            gate, up = store.gate_up(e, inter)
            for proj, src in (("gate", gate), ("up", up), ("down", store.down(e))):
                t, s = read_source(ckpt, src)
                assert s is None
                out[f"{store.prefix}.{e}.{store.proj[proj]}.weight"] = t
    return out


# -- inspect ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_reports_experts_and_linear_attention(originals: dict[str, Path], family: str) -> None:
    report = json.loads(_ok("inspect", str(originals[family]), "--json"))
    truth = hf.FAMILIES[family]
    assert (report["family"], report["model_type"]) == (family, truth.model_type)
    assert report["routed_experts"] == hf.DIMS["experts"] and report["top_k"] == hf.DIMS["top_k"]
    assert report["moe_layers"] == list(truth.moe_layers)
    assert report["gdn_layers"] == list(truth.gdn_layers)
    model = hf.build_model(family)
    block = hf.moe_block(model, family, truth.moe_layers[0])
    shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
    assert report["shared_expert_intermediate_size"] == (shared.gate_proj.out_features if shared else 0)
    assert report["expert_storage"] == ["per_expert"] and report["expert_dtypes"] == ["BF16"]
    assert report["quantize_would"]["deepgemm"]["quantized_tensors"] > 0


# -- quantize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "deepgemm"])
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("case", [*FAMILIES, "qwen3_5_moe_packed"])
def test_quantize_is_the_recipe_byte_for_byte(
    originals: dict[str, Path], tmp_path: Path, case: str, layout: str, scale_fmt: str
) -> None:
    src, out = originals[case], tmp_path / "q"
    _ok("quantize", str(src), str(out), "--layout", layout, "--scale-fmt", scale_fmt, "-q")
    layer = hf.FAMILIES[_family(case)].moe_layers[-1]
    want = _expert_sources(src, layer)
    got = unpack_to_hf(out, layer) if layout == "deepgemm" else read_dir(out)
    for name, w in want.items():
        q, s = block_quant_ref(w.float(), ue8m0=scale_fmt == "ue8m0", name=name)
        assert_bytes(got[name], q, name)
        assert_bytes(got[name + "_scale_inv"], s, name + "_scale_inv")
    if (layout, scale_fmt) in (("hf", "float"), ("deepgemm", "ue8m0")):
        _ok("validate", str(src), str(out), "--device", "cpu", "-q")


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_output_loads_in_transformers_with_the_original_logits(
    originals: dict[str, Path], tmp_path: Path, family: str
) -> None:
    out = tmp_path / "q"
    _ok("quantize", str(originals[family]), str(out), "--layout", "hf", "-q")
    model, info = hf.load_model(out, output_loading_info=True)
    assert not any(info.values()), info
    # transformers holds exactly dequant_ref(q, s) in BF16 for every FP8 weight: the same model as the
    # original with those weights replaced
    ref_dir = tmp_path / "dequantized"
    assert dequantized_copy(originals[family], out, ref_dir) > 0
    reference = hf.load_model(ref_dir)
    got_sd, want_sd = model.state_dict(), reference.state_dict()
    assert set(got_sd) == set(want_sd)
    for name, t in want_sd.items():
        assert torch.equal(got_sd[name], t), f"{name} differs from dequant_ref(q, s)"
    ids = torch.arange(5, 45) % hf.DIMS["vocab"]
    got = hf.hf_logits(model, ids)
    assert torch.equal(got, hf.hf_logits(reference, ids))
    original = hf.hf_logits(hf.load_model(originals[family]), ids)
    gap = 1 - float(torch.nn.functional.cosine_similarity(got.flatten(), original.flatten(), dim=0))
    assert 0 < gap < COSINE_GAP, gap


# -- fuse-shared against transformers' MoE block ----------------------------------------------------


def _layer_weights(path: Path, layer: int) -> tuple[MoeLayerWeights, object, str | None]:
    """One MoE layer of a checkpoint as ``MoeLayerWeights`` (read with moetool's reader), its routing and
    the family's shared-expert weight."""
    with Checkpoint(path) as ckpt:
        view = analyze(ckpt)
        store, arch, inter = view.stores[layer], view.arch, view.info.moe_intermediate_size
        w13, w2 = [], []
        for e in range(store.num_experts):
            w13.append(torch.cat([read_source(ckpt, s)[0] for s in store.gate_up(e, inter)]))
            w2.append(read_source(ckpt, store.down(e))[0])
        bias, gate = arch.router_bias(layer), arch.shared_gate_weight(layer)
        sh = view.shared.get(layer)
        kw = {}
        if sh is not None:
            kw = {
                "shared_w13": torch.cat([ckpt.read(sh.gate), ckpt.read(sh.up)]),
                "shared_w2": ckpt.read(sh.down),
            }
        w = MoeLayerWeights(
            router_weight=ckpt.read(arch.router_weight(layer)),
            score_bias=ckpt.read(bias) if bias else None,
            w13=torch.stack(w13),
            w2=torch.stack(w2),
            shared_gate=ckpt.read(gate) if gate else None,
            fused=FusedSlots.from_config(ckpt.config),
            **kw,
        )
        return w, view.info.routing, arch.slot_weight


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("family", SHARED)
def test_fuse_shared_gives_transformers_moe_block(tmp_path: Path, family: str, replicas: int) -> None:
    model = hf.build_model(family, dtype=torch.float32, seed=5)
    src = hf.save(model, tmp_path / "f32")
    out = tmp_path / "fused"
    _ok("fuse-shared", str(src), str(out), "--replicas", str(replicas), "-q")
    x = torch.randn(29, hf.DIMS["hidden"], generator=torch.Generator().manual_seed(3))
    for layer in hf.FAMILIES[family].moe_layers:
        with torch.no_grad():
            ref = hf.moe_block(model, family, layer)(x[None])
        ref = (ref[0] if isinstance(ref, tuple) else ref)[0]
        w, routing, _ = _layer_weights(out, layer)
        assert w.fused is not None and w.shared_w13 is None
        for r in range(replicas):
            got, _ = moe_forward(x, w, routing, None, replica_of_token=torch.full((x.shape[0],), r))
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err <= FUSED_TOL, f"layer {layer} replica {r}: {err:.3g}"
        unfused, routing, slot_weight = _layer_weights(src, layer)
        plain, _ = moe_forward(x, unfused, routing, slot_weight)
        assert float((plain - ref).abs().max() / ref.abs().max()) <= FUSED_TOL


# -- validate fails on a planted corruption, naming the expert --------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_validate_names_a_corrupted_expert(
    originals: dict[str, Path], tmp_path: Path, family: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    out = tmp_path / "q"
    _ok("quantize", str(originals[family]), str(out), "--layout", "hf", "-q")
    layer = hf.FAMILIES[family].moe_layers[-1]
    shard = next(
        f
        for f in sorted(out.glob("*.safetensors"))
        if any(f".{layer}.mlp" in k or f".{layer}.block" in k for k in load_file(f))
    )
    tensors = load_file(shard)
    name = next(
        k for k in sorted(tensors) if f"layers.{layer}." in k and ".experts.5." in k and k.endswith("weight")
    )
    t = tensors[name].view(torch.uint8).clone()
    t.view(-1)[7] ^= 0x40
    tensors[name] = t.view(torch.float8_e4m3fn)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(originals[family]), str(out), "--device", "cpu"])
    report = capsys.readouterr().out
    assert exc.value.code == 1, report
    assert f"FAIL tensors layer {layer}: {name} FP8 bytes differ" in report


# -- FP8 releases: float scales to UE8M0, the DeepGEMM layout ------------------------------------------


@pytest.fixture(scope="session")
def fp8_releases(originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fp8")
    made = {}
    for family in FP8_RELEASES:
        made[family] = hf.write_fp8_release(originals[family], base / family)
        made[family + "_ue8m0"] = hf.write_fp8_release(originals[family], base / f"{family}_u", ue8m0=True)
    return made


@pytest.mark.parametrize("family", FP8_RELEASES)
def test_fp8_release_requantizes_to_ue8m0_in_the_deepgemm_layout(
    fp8_releases: dict[str, Path], tmp_path: Path, family: str
) -> None:
    src = fp8_releases[family]
    report = json.loads(_ok("inspect", str(src), "--json"))
    assert report["expert_dtypes"] == ["F8_E4M3"] and report["quantization"]["scale_fmt"] == "float"
    out = tmp_path / "dg"
    _ok("quantize", str(src), str(out), "--layout", "deepgemm", "--scale-fmt", "ue8m0", "-q")
    layer = hf.FAMILIES[family].moe_layers[-1]
    got, orig = unpack_to_hf(out, layer), read_dir(src)
    for name, q in got.items():
        if not name.endswith(".weight"):
            continue
        s = got[name + "_scale_inv"]
        assert torch.equal(ceil_to_ue8m0(s), s), f"{name}: scales are not powers of two"
        # one rounding from the release's own values: float32 q * s, requantized
        from moetool.kernels.fp8_quant_ref import dequant_ref

        want_q, want_s = block_quant_ref(
            dequant_ref(orig[name], orig[name + "_scale_inv"]), ue8m0=True, name=name
        )
        assert_bytes(q, want_q, name)
        assert_bytes(s, want_s, name + "_scale_inv")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    _ok("validate", str(src), str(out), "--device", "cpu", "-q")


@pytest.mark.parametrize("family", FP8_RELEASES)
def test_fp8_release_keeps_its_bytes_when_its_scales_satisfy_the_request(
    fp8_releases: dict[str, Path], tmp_path: Path, family: str
) -> None:
    for src, fmt in ((fp8_releases[family], "float"), (fp8_releases[family + "_ue8m0"], "ue8m0")):
        out = tmp_path / fmt
        _ok("quantize", str(src), str(out), "--layout", "hf", "--scale-fmt", fmt, "-q")
        orig, got = read_dir(src), read_dir(out)
        fp8 = [n for n, t in orig.items() if t.dtype == torch.float8_e4m3fn]
        assert fp8
        for name in fp8:
            assert_bytes(got[name], orig[name], name)
            assert_bytes(got[name + "_scale_inv"], orig[name + "_scale_inv"], name)


@pytest.mark.parametrize("family", FP8_RELEASES)
def test_fp8_release_output_loads_in_transformers(
    originals: dict[str, Path], fp8_releases: dict[str, Path], tmp_path: Path, family: str
) -> None:
    """The UE8M0 requantization loads as exactly its dequantized values; kept bytes load as the input."""
    src = fp8_releases[family]
    out = tmp_path / "u"
    _ok("quantize", str(src), str(out), "--layout", "hf", "--scale-fmt", "ue8m0", "-q")
    model, info = hf.load_model(out, output_loading_info=True)
    assert not any(info.values()), info
    ref_dir = tmp_path / "dequantized"
    assert dequantized_copy(originals[family], out, ref_dir) > 0
    want = hf.load_model(ref_dir).state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, want[name]), f"{name} differs from dequant_ref(q, s)"
    ids = torch.arange(5, 45) % hf.DIMS["vocab"]
    kept = tmp_path / "f"
    _ok("quantize", str(src), str(kept), "--layout", "hf", "-q")
    assert torch.equal(hf.hf_logits(hf.load_model(kept), ids), hf.hf_logits(hf.load_model(src), ids))


def test_copy_of_an_original_keeps_family_detection(originals: dict[str, Path], tmp_path: Path) -> None:
    """A Qwen3.5-MoE checkpoint relabelled with a model_type nobody knows reads as qwen3_5_moe through
    its text_config, and the note says so."""
    src = tmp_path / "q"
    shutil.copytree(originals["qwen3_5_moe"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "qwen3_5_moe_custom_vl"
    (src / "config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(cli, ["inspect", str(src), "--json"])
    assert result.exit_code == 0, result.output
    assert "wraps a 'qwen3_5_moe_text' text model: read as family qwen3_5_moe" in result.stderr
    assert json.loads(result.stdout)["text_model_root"] == "model.language_model"


# -- Gated DeltaNet state of Qwen3.5-MoE ----------------------------------------------------------------


def test_capture_and_convert_ssm_on_qwen3_5_moe(tmp_path: Path) -> None:
    """capture-ssm on the vision-language release gives the states transformers' own wrapper computes;
    convert-ssm makes them K-last and validate proves the decode from both the same."""
    from safetensors.torch import load_file

    from moetool.capture import _layer_states

    model = hf.build_model("qwen3_5_moe", dtype=torch.float32, seed=9)
    src = hf.save(model, tmp_path / "q35")
    state = tmp_path / "state.safetensors"
    _ok("capture-ssm", str(src), str(state), "--token-ids", "3,1,4,1,5,9,2,6", "-q")
    captured = load_file(state)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]), use_cache=True)
    for layer in hf.FAMILIES["qwen3_5_moe"].gdn_layers:
        rs, _ = _layer_states(out.past_key_values, layer)
        assert torch.equal(captured[f"model.layers.{layer}.linear_attn.recurrent_state"], rs.float())
    klast = tmp_path / "klast.safetensors"
    _ok("convert-ssm", str(state), str(klast), "--to", "k-last", "--pool", "-q")
    _ok("validate", str(state), str(klast), "--device", "cpu", "-q")


def test_qwen3_5_moe_text_model_alone(tmp_path: Path) -> None:
    """The text-only Qwen3.5-MoE (model_type qwen3_5_moe_text, model.layers.*) is the same family."""
    src = hf.save(hf.build_model("qwen3_5_moe", seed=4, wrapped=False), tmp_path / "text")
    report = json.loads(_ok("inspect", str(src), "--json"))
    assert (report["family"], report["model_type"], report["text_model_root"]) == (
        "qwen3_5_moe",
        "qwen3_5_moe_text",
        "model",
    )
    assert report["gdn_layers"] == list(hf.FAMILIES["qwen3_5_moe"].gdn_layers)
    out = tmp_path / "q"
    _ok("quantize", str(src), str(out), "--layout", "hf", "--scale-fmt", "ue8m0", "-q")
    model, info = hf.load_model(out, output_loading_info=True)
    assert not any(info.values()), info
    ref_dir = tmp_path / "dequantized"
    assert dequantized_copy(src, out, ref_dir) > 0
    want = hf.load_model(ref_dir).state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, want[name]), name
    _ok("validate", str(src), str(out), "--device", "cpu", "-q")
