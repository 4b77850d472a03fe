"""``inspect`` and ``fuse-shared`` on DeepSeek-V4, and V4 checkpoints the reader refuses: inspect names
FP4/FP8 experts, hash layers, MTP layers and bytes by kind, and the lossy blocks a conversion recorded;
fuse-shared makes the FP8 shared expert one more slot of the FP8 experts (hf and deepgemm layouts, bytes
and the MoE layer), and refuses FP4 experts; a hash layer without its table, or with a table of the
wrong width, exits 2 naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_asserts import assert_bytes, read_dir
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from moetool.cli.main import cli, main
from moetool.io import Checkpoint
from moetool.kernels.fp8_quant_ref import dequant_ref
from moetool.model import analyze
from moetool.moe import FusedSlots, MoeLayerWeights, moe_forward
from moetool.testing.release_formats import write_deepseek_v4_release

LOSSY = ("layers.2.ffn.experts.1.w2.weight", (1, 0, 7))


@pytest.fixture(scope="module")
def v4(v4_float: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("v4c")
    native = write_deepseek_v4_release(v4_float, root / "native", mtp_layers=1)
    lossy = write_deepseek_v4_release(v4_float, root / "lossy", lossy_blocks={"model." + LOSSY[0]: LOSSY[1]})
    out = {"native": native, "lossy": lossy}
    for name, src, opts in (
        ("hf", native, ("--layout", "hf")),
        ("dg", native, ("--layout", "deepgemm")),
        ("lossy_hf", lossy, ("--layout", "hf")),
    ):
        result = CliRunner().invoke(cli, ["quantize", str(src), str(root / name), *opts, "-q"])
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def run_json(*args: str) -> dict:
    result = CliRunner().invoke(cli, [*args, "--json", "-q"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return json.loads(result.stdout)


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_inspect_reports_fp4_experts_hash_and_mtp_layers(v4: dict[str, Path]) -> None:
    r = run_json("inspect", str(v4["native"]))
    assert r["family"] == "deepseek_v4" and r["expert_formats"] == {"fp4": 4}
    assert r["expert_dtype"] == "fp4" and r["hash_layers"] == [0] and r["mtp_layers"] == ["mtp.0.ffn"]
    assert r["swiglu_limit"] == 10.0 and r["routing"]["scoring"] == "sqrtsoftplus"
    kinds = r["bytes_by_kind"]
    fp4 = sum(t.numel() for n, t in read_dir(v4["native"]).items() if ".experts." in n)  # 1-byte dtypes
    assert kinds["routed_experts"] == fp4
    assert kinds["shared_experts"] > 0 and kinds["attention"] > 0 and kinds["embeddings"] > 0
    assert r["bytes_by_dtype"]["I8"] > 0 and r["bytes_by_dtype"]["F8_E8M0"] > 0
    for layout in ("hf", "deepgemm"):
        assert "error" not in r["quantize_would"][layout]
        assert r["quantize_would"][layout]["quantized_tensors"] == 4 * 4 * 3  # layers x experts x w1/w3/w2
    assert r["fp4_lossy_blocks"] is None
    text = CliRunner().invoke(cli, ["inspect", str(v4["native"])])
    assert "fp4 in 4 layer(s)" in text.output and "hash layers" in text.output


def test_inspect_of_a_conversion_reports_its_lossy_blocks(v4: dict[str, Path]) -> None:
    r = run_json("inspect", str(v4["lossy_hf"]))
    assert r["expert_formats"] == {"fp8": 3} and r["expert_dtype"] == "fp8"
    name, (rb, cb, n) = LOSSY
    assert r["fp4_lossy_blocks"] == {
        "blocks": 1,
        "elements": n,
        "listed": [{"tensor": name, "block": [rb, cb], "changed": n}],
    }
    assert (
        f"1 lossy block(s), {n} values changed"
        in CliRunner().invoke(cli, ["inspect", str(v4["lossy_hf"])]).output
    )


def _shared(t: dict[str, torch.Tensor], layer_prefix: str) -> dict[str, torch.Tensor]:
    return {p: t[f"{layer_prefix}.shared_experts.{p}.weight"] for p in ("w1", "w3", "w2")} | {
        p + "_s": t[f"{layer_prefix}.shared_experts.{p}.scale"] for p in ("w1", "w3", "w2")
    }


@pytest.mark.parametrize("layout", ["hf", "dg"])
def test_fuse_shared_makes_the_fp8_shared_expert_a_slot(
    v4: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    src, out = v4[layout], tmp_path / "fused"
    run_json("fuse-shared", str(src), str(out))
    inp, got = read_dir(src), read_dir(out)
    with Checkpoint(out) as ck:
        view = analyze(ck)
    slots = FusedSlots.from_config(view.config)
    assert slots == FusedSlots(first_slot=4, num_slots=1, replicas=1, slot_weight="one")
    for layer, store in view.stores.items():
        block = view.arch.moe_prefix(layer)
        sh = _shared(inp, block)
        assert not any(n.startswith(block + ".shared_experts.") for n in got)
        if layout == "hf":
            for p in ("w1", "w3", "w2"):
                assert_bytes(got[f"{store.prefix}.4.{p}.weight"], sh[p], f"slot {p}")
                assert_bytes(got[f"{store.prefix}.4.{p}.scale"], sh[p + "_s"], f"slot {p} scale")
        else:
            names = view.arch.deepgemm_names(layer)
            assert_bytes(got[names["w13_weight"]][4], torch.cat([sh["w1"], sh["w3"]]), "w13 slot")
            assert_bytes(got[names["w2_weight"]][4], sh["w2"], "w2 slot")
            want = torch.cat([sh["w1_s"], sh["w3_s"]]).float()
            assert_bytes(got[names["w13_weight_scale_inv"]][4], want, "w13 slot scales")
            assert_bytes(got[names["w2_weight_scale_inv"]][4], sh["w2_s"].float(), "w2 slot scales")

    # the fused layer computes what the unfused one does (swiglu_limit clamps the slot as the shared expert)
    layer = 1
    block = view.arch.moe_prefix(layer)
    sh = _shared(inp, block)
    deq = {p: dequant_ref(sh[p], sh[p + "_s"].float()) for p in ("w1", "w3", "w2")}
    router, bias = inp[f"{block}.gate.weight"], inp[f"{block}.gate.bias"]
    prefix = view.stores[layer].prefix
    experts = [
        tuple(
            dequant_ref(inp[f"{prefix}.{e}.{p}.weight"], inp[f"{prefix}.{e}.{p}.scale"].float())
            for p in ("w1", "w3", "w2")
        )
        if layout == "hf"
        else None
        for e in range(4)
    ]
    if layout == "dg":
        return  # the stacked bytes above equal the hf ones, whose layer is checked below
    unfused = MoeLayerWeights.from_experts(
        router, experts, score_bias=bias, shared=(deq["w1"], deq["w3"], deq["w2"])
    )
    fused = MoeLayerWeights.from_experts(
        router, [*experts, (deq["w1"], deq["w3"], deq["w2"])], score_bias=bias
    )
    fused.fused = slots
    x = torch.randn(9, unfused.w13.shape[2], generator=torch.Generator().manual_seed(2)) * 3
    info = view.info
    a, _ = moe_forward(x, unfused, info.routing, "one", swiglu_limit=info.swiglu_limit)
    b, _ = moe_forward(x, fused, info.routing, "one", swiglu_limit=info.swiglu_limit)
    assert float((a - b).norm() / a.norm()) <= 1e-6


def test_fuse_shared_refuses_fp4_experts(
    v4: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(capsys, "fuse-shared", str(v4["native"]), str(tmp_path / "f"))
    assert "routed experts are FP4" in line and "quantize" in line
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("case", ["no_table", "narrow_table"])
def test_hash_layer_without_a_valid_table_is_refused(
    v4: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(v4["native"], bad)
    f = bad / "model.safetensors"
    t = load_file(f)
    name = "layers.0.ffn.gate.tid2eid"
    if case == "no_table":
        del t[name]
    else:
        t[name] = t[name][:, :1].contiguous()
    save_file(t, f, metadata={"format": "pt"})
    line = fails(capsys, "quantize", str(bad), str(tmp_path / "out"))
    assert name in line


@pytest.mark.parametrize("layout", ["hf", "dg"])
def test_transformers_refuses_what_it_would_misread(v4: dict[str, Path], tmp_path: Path, layout: str) -> None:
    """The stacked layout and fused outputs carry the engines' refusal marker: transformers 5.24 refuses to
    load them (at config time) instead of reading V4 with missing or extra experts."""
    from transformers import AutoModelForCausalLM

    fused = tmp_path / "fused"
    run_json("fuse-shared", str(v4[layout]), str(fused))
    for path in ([v4["dg"]] if layout == "dg" else []) + [fused]:
        with pytest.raises(ValueError, match=r"(?i)activation scheme moetool"):
            AutoModelForCausalLM.from_pretrained(path)
    _, info = AutoModelForCausalLM.from_pretrained(v4["hf"], output_loading_info=True)  # the hf output loads
    assert not any(info.values()), info
