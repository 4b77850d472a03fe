"""``quantize`` on DeepSeek-V4: FP4 routed experts become block FP8 by DeepSeek's cast, byte for byte
(checked against an implementation of the cast written from its description, tests/fp4_facts.py), in
both layouts; the hf output loads in transformers 5.24 as V4 with FP8 experts and gives the FP4
release's logits bit for bit (a lossless cast keeps every dequantized weight); a lossy block is counted
and named, or refused on request; inputs outside the FP4 contract exit 2 with one line and write nothing.

Checkpoints: a tiny V4 made by transformers (``DeepseekV4Config`` shrunk, ``save_pretrained``, the first
layer hash-routed) rewritten in the release format by :mod:`moetool.testing.release_formats`, under the
release's own names (V4 config, an MTP layer) and under transformers' names (V4.1 config, 2 shards).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from checkpoint_asserts import assert_bytes, read_dir
from click.testing import CliRunner
from fp4_facts import deepseek_cast
from safetensors.torch import load_file, save_file

from moetool.cli.main import cli, main
from moetool.io import Checkpoint
from moetool.kernels.fp4_cast_ref import e8m0_to_float
from moetool.kernels.fp8_quant_ref import sm100_scales_from_storage, unpack_sm100_scales_ref
from moetool.model import analyze
from moetool.testing.release_formats import fp4_quantize, write_deepseek_v4_release

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
LOSSY = ("model.layers.1.ffn.experts.2.w3.weight", (0, 1, 5))  # row block 0, column block 1, 5 values


@pytest.fixture(scope="module")
def v4(v4_float: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("v4q")
    return {
        "native": write_deepseek_v4_release(v4_float, root / "native", mtp_layers=1),
        "hf41": write_deepseek_v4_release(
            v4_float, root / "hf41", native_names=False, expert_dtype_in="quantization_config", num_shards=2
        ),
        "lossy": write_deepseek_v4_release(
            v4_float, root / "lossy", native_names=False, lossy_blocks=dict([LOSSY])
        ),
    }


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def quantize(src: Path, out: Path, *opts: str) -> dict:
    result = CliRunner().invoke(cli, ["quantize", str(src), str(out), *opts, "--json", "-q"])
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return json.loads(result.stdout)


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    assert exc.value.code == 2, f"exit {exc.value.code}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def fp4_experts(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n, t in tensors.items() if t.dtype == torch.int8 and ".experts." in n)


def logits_of(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["native", "hf41"])
def test_hf_layout_is_deepseeks_cast_and_loads_with_identical_logits(
    v4: dict[str, Path], v4_float: Path, tmp_path: Path, kind: str
) -> None:
    src = v4[kind]
    before = digest(src)
    out = tmp_path / "fp8"
    result = quantize(src, out, "--layout", "hf")
    assert result["fp4_lossy_blocks"] == {"blocks": 0, "elements": 0, "listed": []}
    assert digest(src) == before, "the input changed"

    inp, got = read_dir(src), read_dir(out)
    experts = fp4_experts(inp)
    assert experts and (kind != "native" or any(n.startswith("mtp.0.") for n in experts))
    assert set(got) == set(inp)
    for name in experts:
        sname = name.removesuffix("weight") + "scale"
        q, s = deepseek_cast(inp[name], inp[sname])
        assert_bytes(got[name], q, name)
        # the same powers of two, stored float32 (what engines read for expert_dtype fp8)
        assert_bytes(got[sname], s.float(), sname)
    for name in set(inp) - set(experts) - {n.removesuffix("weight") + "scale" for n in experts}:
        assert_bytes(got[name], inp[name], name)  # attention, shared experts, tables: untouched

    cfg, src_cfg = (json.loads((p / "config.json").read_text()) for p in (out, src))
    if kind == "native":
        assert cfg["expert_dtype"] == "fp8" and cfg["quantization_config"].get("expert_dtype", "fp8") == "fp8"
    else:
        assert cfg["quantization_config"]["expert_dtype"] == "fp8" and "expert_dtype" not in cfg
    qc = {k: v for k, v in cfg["quantization_config"].items() if k != "expert_dtype"}
    assert qc == {k: v for k, v in src_cfg["quantization_config"].items() if k != "expert_dtype"}
    manifest = json.loads((out / "moetool.json").read_text())
    assert manifest["tensors"][experts[0]]["transform"] == "fp4_to_fp8_128x128"

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    fp4_logits = logits_of(src, ids)
    assert torch.equal(logits_of(out, ids), fp4_logits)
    assert not torch.equal(fp4_logits, logits_of(v4_float, ids))  # the FP4 release is not the float model


@pytest.mark.parametrize(
    "opts", [(), ("--scale-fmt", "ue8m0", "--scale-layout", "sm100")], ids=["sm90", "sm100"]
)
def test_deepgemm_layout_stacks_the_cast(v4: dict[str, Path], tmp_path: Path, opts: tuple[str, ...]) -> None:
    src, out = v4["native"], tmp_path / "dg"
    quantize(src, out, "--layout", "deepgemm", *opts)
    inp, got = read_dir(src), read_dir(out)
    with Checkpoint(out) as ck:
        view = analyze(ck)
    assert set(view.stores) == {0, 1, 2, 3}  # three decoder layers and the MTP layer
    for layer, store in view.stores.items():
        assert store.kind == "deepgemm" and store.fp8
        names = view.arch.deepgemm_names(layer)
        for e in range(store.num_experts):
            parts = {p: f"{store.prefix}.{e}.{p}.weight" for p in ("w1", "w3", "w2")}
            cast = {
                p: deepseek_cast(inp[n], inp[n.removesuffix("weight") + "scale"]) for p, n in parts.items()
            }
            assert_bytes(got[names["w13_weight"]][e], torch.cat([cast["w1"][0], cast["w3"][0]]), f"w13[{e}]")
            assert_bytes(got[names["w2_weight"]][e], cast["w2"][0], f"w2[{e}]")
            want13 = e8m0_to_float(torch.cat([cast["w1"][1], cast["w3"][1]]))
            want2 = e8m0_to_float(cast["w2"][1])
            s13, s2 = got[names["w13_weight_scale_inv"]][e], got[names["w2_weight_scale_inv"]][e]
            if opts:
                n13, k13 = got[names["w13_weight"]].shape[1:]
                s13 = unpack_sm100_scales_ref(sm100_scales_from_storage(s13, n13), n13, k13)
                n2, k2 = got[names["w2_weight"]].shape[1:]
                s2 = unpack_sm100_scales_ref(sm100_scales_from_storage(s2, n2), n2, k2)
            assert_bytes(s13, want13, f"w13 scales[{e}]")
            assert_bytes(s2, want2, f"w2 scales[{e}]")
    assert "layers.0.ffn.gate.tid2eid" in got and "layers.1.attn.wq_a.scale" in got


def test_lossy_block_is_counted_named_and_refused_on_request(
    v4: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, (rb, cb, elements) = LOSSY
    result = quantize(v4["lossy"], tmp_path / "out", "--layout", "hf")
    want = {
        "blocks": 1,
        "elements": elements,
        "listed": [{"tensor": name, "block": [rb, cb], "changed": elements}],
    }
    assert result["fp4_lossy_blocks"] == want
    assert json.loads((tmp_path / "out" / "moetool.json").read_text())["fp4_lossy_blocks"] == want
    text = CliRunner().invoke(cli, ["quantize", str(v4["lossy"]), str(tmp_path / "out2")])
    assert text.exit_code == 0 and f"1 lossy FP4 block ({elements} values changed)" in text.output

    out = tmp_path / "strict"
    line = fails(capsys, "quantize", str(v4["lossy"]), str(out), "--require-lossless")
    assert (
        name in line and f"row block {rb}, column block {cb}" in line and f"changes {elements} values" in line
    )
    assert not out.exists() and not out.with_name("strict.partial").exists()


def _bad(tmp_path: Path, src: Path, case: str) -> tuple[Path, str]:
    """A copy of ``src`` (one shard, the release's names) broken one way; the name the error must give."""
    bad = tmp_path / case
    bad.mkdir()
    for p in src.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    f = bad / "model.safetensors"
    t = load_file(f)
    cfg = json.loads((bad / "config.json").read_text())
    name = "layers.1.ffn.experts.3.w2.scale"
    if case == "scale_not_e8m0":
        t[name] = t[name].float()
    elif case == "scale_grid":
        t[name] = t[name][:, :-1].contiguous()
    elif case == "nan_scale":
        t[name].view(torch.uint8)[17, 2] = 255
        name = "layers.1.ffn.experts.3.w2.weight"
    elif case == "declared_fp8":
        cfg["expert_dtype"] = "fp8"
        name = "ffn.experts"
    elif case == "k_not_128":
        # hidden 192: every expert (and the shared expert) is rebuilt at that width
        cfg["hidden_size"] = 192
        gen = torch.Generator().manual_seed(1)
        for n in [n for n in t if ".experts." in n or ".shared_experts." in n]:
            del t[n]
        for layer in range(cfg["num_hidden_layers"]):
            for e in range(cfg["n_routed_experts"]):
                for proj, shape in (("w1", (128, 192)), ("w3", (128, 192)), ("w2", (192, 128))):
                    w = f"layers.{layer}.ffn.experts.{e}.{proj}.weight"
                    t[w], t[w.removesuffix("weight") + "scale"] = fp4_quantize(
                        torch.randn(shape, generator=gen)
                    )
                for proj, shape in (("w1", (128, 192)), ("w3", (128, 192)), ("w2", (192, 128))):
                    t[f"layers.{layer}.ffn.shared_experts.{proj}.weight"] = torch.randn(
                        shape, generator=gen
                    ).bfloat16()
        name = "layers.0.ffn.experts.0.w1.weight"
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file(t, f, metadata={"format": "pt"})
    return bad, name


@pytest.mark.parametrize("case", ["scale_not_e8m0", "scale_grid", "nan_scale", "declared_fp8", "k_not_128"])
@pytest.mark.parametrize("layout", ["hf", "deepgemm"])
def test_fp4_inputs_outside_the_contract_exit_2(
    v4: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, layout: str
) -> None:
    bad, name = _bad(tmp_path, v4["lossy"].with_name("native"), case)
    before = digest(bad)
    out = tmp_path / "out"
    line = fails(capsys, "quantize", str(bad), str(out), "--layout", layout)
    assert name in line, line
    assert not out.exists() and not out.with_name("out.partial").exists()
    assert digest(bad) == before


def test_targets_linear_is_refused(
    v4: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(capsys, "quantize", str(v4["native"]), str(tmp_path / "o"), "--targets", "linear")
    assert "--targets linear does not apply to deepseek_v4" in line


@pytest.mark.gpu
@pytest.mark.parametrize(
    "opts",
    [
        ("--layout", "hf"),
        ("--layout", "deepgemm"),
        ("--layout", "deepgemm", "--scale-fmt", "ue8m0", "--scale-layout", "sm100"),
    ],
)
def test_gpu_quantize_equals_cpu_bytes(v4: dict[str, Path], tmp_path: Path, opts: tuple[str, ...]) -> None:
    """quantize --device cuda (the Triton cast) writes the CPU run's shards byte for byte, lossy block
    record included."""
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    a = quantize(v4["lossy"], cpu, *opts, "--device", "cpu")
    b = quantize(v4["lossy"], gpu, *opts, "--device", "cuda")
    assert a["fp4_lossy_blocks"] == b["fp4_lossy_blocks"] and a["fp4_lossy_blocks"]["blocks"] == 1
    files = sorted(p.name for p in cpu.glob("*.safetensors"))
    assert files == sorted(p.name for p in gpu.glob("*.safetensors"))
    for name in [*files, "config.json"]:
        assert (cpu / name).read_bytes() == (gpu / name).read_bytes(), name
