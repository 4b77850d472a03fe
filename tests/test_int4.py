"""INT4 compressed-tensors inputs (Kimi-K2.5's routed experts): the unpacking and dequantization in
moetool.transforms.int4 against compressed-tensors' own compressor and decompressor, the scheme refusals,
and quantize on a Kimi-K2.5 release written with compressed-tensors' compressor: one rounding from the
exact INT4 values, byte for byte, and an output transformers loads with the INT4 model's logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_asserts import assert_bytes, read_dir
from click.testing import CliRunner

from moetool.cli.main import cli, main
from moetool.errors import InputError
from moetool.kernels.fp8_quant_ref import block_quant_ref
from moetool.transforms import int4

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is a test extra")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

from moetool.testing import hf_families as hf  # noqa: E402


def _scheme(group: int) -> tuple[QuantizationArgs, QuantizationScheme]:
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    return args, QuantizationScheme(targets=["Linear"], weights=args)


def _compress(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``w`` packed by compressed-tensors' own compressor, scales in ``scale_dtype``."""
    args, scheme = _scheme(group)
    g = w.float().reshape(w.shape[0], -1, group)
    scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
    state = {"weight": w, "weight_scale": scale.to(scale_dtype), "weight_zero_point": zero}
    return PackedQuantizationCompressor.compress(state, scheme)


def _decompress(packed: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    return PackedQuantizationCompressor.decompress(packed, _scheme(group)[1])["weight"]


# rows, columns, group: irregular rows, K not a power of two, the smallest group, Kimi's group of 32
SHAPES = [(1, 32, 32), (3, 96, 32), (67, 160, 32), (5, 24, 8), (128, 256, 32)]


@pytest.mark.parametrize(("n", "k", "group"), SHAPES)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_dequantization_is_bit_identical_to_compressed_tensors(
    n: int, k: int, group: int, scale_dtype: torch.dtype, seed: int
) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + n)) * 0.05
    w[0, :group] = 0.0  # an all-zero group
    w[-1, -group:] *= 1e4  # a group of large magnitude
    packed = _compress(w.to(scale_dtype), group, scale_dtype)
    ours = int4.dequantize(packed["weight_packed"], packed["weight_scale"], k, group)
    assert ours.dtype == torch.float32 and ours.shape == (n, k)
    # compressed-tensors computes q * scale in the scale's dtype: float32 scales give the exact product,
    # which is what we return; BF16 scales give that product rounded once to BF16
    theirs = _decompress(packed, group)
    assert theirs.dtype == scale_dtype
    assert_bytes(ours.to(scale_dtype), theirs, f"[{n}, {k}] group {group}")
    f32 = _decompress({**packed, "weight_scale": packed["weight_scale"].float()}, group)
    assert_bytes(ours, f32, "exact product")


def test_unpack_reads_what_compressed_tensors_packs() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    for k in (8, 24, 200):  # whole words only: the format's rows are groups of 8 or more
        values = (torch.arange(3 * k) % 16 - 8).to(torch.int8).reshape(3, k)
        values = values[:, torch.randperm(k, generator=torch.Generator().manual_seed(k))]
        got = int4.unpack(pack_to_int32(values, 4), k)
        assert got.dtype == torch.int8 and torch.equal(got, values)


def test_dequantize_refuses_scales_of_another_grid() -> None:
    packed = _compress(torch.randn(4, 64), 32, torch.bfloat16)
    with pytest.raises(InputError, match="one scale per 16 values"):
        int4.dequantize(packed["weight_packed"], packed["weight_scale"], 64, 16)


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("format",), "int-quantized", "format 'int-quantized'"),
        (("config_groups", "group_0", "weights", "num_bits"), 8, "num_bits is 8"),
        (("config_groups", "group_0", "weights", "symmetric"), False, "symmetric is False"),
        (("config_groups", "group_0", "weights", "strategy"), "channel", "strategy is 'channel'"),
        (("config_groups", "group_0", "weights", "actorder"), "group", "actorder is 'group'"),
        (("config_groups", "group_0", "weights", "group_size"), 12, "group_size is 12"),
        (("quant_method",), "fp8", "quant_method 'fp8'"),
    ],
)
def test_scheme_outside_the_format_is_refused_by_name(
    path: tuple[str, ...], value: object, named: str
) -> None:
    qc = hf.int4_quantization_config(32)
    assert int4.Int4Scheme.from_config(qc).group_size == 32
    node = qc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(InputError, match=named) as err:
        int4.Int4Scheme.from_config(qc, file="/k/config.json")
    assert "/k/config.json" in str(err.value)


# -- a Kimi-K2.5 release --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kimi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("kimi")
    bf16 = hf.make_checkpoint("kimi_k25", base / "bf16", seed=11)
    return {"bf16": bf16, "int4": hf.write_int4_release(bf16, base / "int4")}


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def _refused(capsys: pytest.CaptureFixture[str]):
    """Run ``main`` (the CLI's one error funnel): exit 2 with one line on stderr, which is returned."""

    def run(*args: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        err = capsys.readouterr().err
        assert exc.value.code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    return run


def test_inspect_reports_int4_experts(kimi: dict[str, Path]) -> None:
    report = json.loads(_run("inspect", str(kimi["int4"]), "--json"))
    assert (report["family"], report["model_type"], report["routed_experts"]) == ("kimi_k25", "kimi_k25", 8)
    assert report["expert_dtypes"] == ["INT4"] and report["expert_formats"] == {"int4": 1}
    assert report["moe_layers"] == [1] and report["shared_expert_intermediate_size"] == 128


@pytest.mark.parametrize("layout", ["hf", "deepgemm"])
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_quantize_rounds_once_from_the_exact_int4_values(
    kimi: dict[str, Path], tmp_path: Path, layout: str, scale_fmt: str
) -> None:
    out = tmp_path / "fp8"
    _run("quantize", str(kimi["int4"]), str(out), "--layout", layout, "--scale-fmt", scale_fmt, "-q")
    src, got = read_dir(kimi["int4"]), read_dir(out)
    if layout == "deepgemm":
        from moetool.layout import unpack_to_hf

        got = unpack_to_hf(out, 1)
    prefix = "language_model.model.layers.1.mlp.experts"
    for e in range(8):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            base = f"{prefix}.{e}.{proj}."
            k = int(src[base + "weight_shape"][1])
            exact = int4.dequantize(src[base + "weight_packed"], src[base + "weight_scale"], k, 32)
            q, s = block_quant_ref(exact, ue8m0=scale_fmt == "ue8m0", name=base)
            assert_bytes(got[base + "weight"], q, base + "weight")
            assert_bytes(got[base + "weight_scale_inv"], s, base + "weight_scale_inv")
            assert base + "weight_packed" not in got
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    # SGLang reads text_config's quantization_config over the top level's: it must not stay INT4's
    assert cfg["text_config"]["quantization_config"] == cfg["quantization_config"]


def test_hf_output_loads_in_transformers_with_the_int4_models_logits(
    kimi: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "fp8"
    _run("quantize", str(kimi["int4"]), str(out), "--layout", "hf", "-q")
    ids = torch.arange(3, 40) % 512
    original = hf.hf_logits(hf.load_model(kimi["int4"]), ids)
    model, info = hf.load_model(out, output_loading_info=True)
    assert not any(info.values()), info
    got = hf.hf_logits(model, ids)
    # FP8 error on top of the INT4 values: 1 - cos below 1e-3 (tests/test_hf_compat.py says why)
    assert 1 - float(torch.nn.functional.cosine_similarity(got.flatten(), original.flatten(), dim=0)) < 1e-3
    # and the INT4 model itself is the BF16 one within INT4 error, so the comparison means something
    bf16 = hf.hf_logits(hf.load_model(kimi["bf16"]), ids)
    assert 1 - float(torch.nn.functional.cosine_similarity(bf16.flatten(), original.flatten(), dim=0)) < 2e-2


def _broken(kimi: dict[str, Path], tmp_path: Path, edit) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(kimi["int4"], bad)
    edit(bad)
    return bad


def _edit_tensor(path: Path, name: str, value: torch.Tensor | None) -> None:
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    t = load_file(f)
    if value is None:
        del t[name]
    else:
        t[name] = value
    save_file(t, f, metadata={"format": "pt"})


def test_bad_int4_inputs_are_one_line_exit_2(kimi: dict[str, Path], tmp_path: Path, _refused) -> None:
    name = "language_model.model.layers.1.mlp.experts.3.up_proj.weight_shape"
    bad = _broken(kimi, tmp_path / "a", lambda p: _edit_tensor(p, name, torch.tensor([128, 512])))
    line = _refused("quantize", str(bad), str(tmp_path / "a" / "out"), "--layout", "hf")
    assert name in line and "weight_shape says [128, 512]" in line
    assert not (tmp_path / "a" / "out").exists()
    bad = _broken(kimi, tmp_path / "b", lambda p: _edit_tensor(p, name, None))
    line = _refused("inspect", str(bad))
    assert name in line and "missing" in line

    def no_config(p: Path) -> None:
        cfg = json.loads((p / "config.json").read_text())
        del cfg["text_config"]["quantization_config"]
        (p / "config.json").write_text(json.dumps(cfg))

    bad = _broken(kimi, tmp_path / "c", no_config)
    assert "no compressed-tensors quantization_config" in _refused("inspect", str(bad))


def test_fuse_shared_refuses_int4_experts(kimi: dict[str, Path], tmp_path: Path, _refused) -> None:
    line = _refused("fuse-shared", str(kimi["int4"]), str(tmp_path / "f"))
    assert "INT4" in line and "quantize to FP8 first" in line


@pytest.mark.parametrize("layout", ["hf", "deepgemm"])
def test_validate_against_the_int4_original(
    kimi: dict[str, Path], tmp_path: Path, layout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fp8"
    _run("quantize", str(kimi["int4"]), str(out), "--layout", layout, "--scale-fmt", "ue8m0", "-q")
    report = json.loads(_run("validate", str(kimi["int4"]), str(out), "--device", "cpu", "--json"))
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    assert {c["group"] for c in report["checks"]} >= {"structure", "tensors", "kernels", "moe"}
    if layout == "hf":
        from safetensors.torch import load_file, save_file

        name = "language_model.model.layers.1.mlp.experts.6.gate_proj.weight"
        f = out / "model.safetensors"
        t = load_file(f)
        t[name] = (t[name].view(torch.uint8) ^ 1).view(torch.float8_e4m3fn)
        save_file(t, f, metadata={"format": "pt"})
        with pytest.raises(SystemExit) as exc:
            main(["validate", str(kimi["int4"]), str(out), "--device", "cpu"])
        text = capsys.readouterr().out
        assert exc.value.code == 1 and f"FAIL tensors layer 1: {name} FP8 bytes differ" in text
