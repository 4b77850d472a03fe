"""The families of 2026 on the GPU: ``quantize --device cuda`` writes the CPU's bytes (BF16 originals of
every family, FP8 releases requantized to UE8M0, Kimi-K2.5's INT4 experts), and ``validate --device cuda``
(Triton grouped GEMM and MoE-layer checks) passes on each output and fails naming a corrupted expert.

Needs a CUDA GPU, transformers >= 5.24 and compressed-tensors: ``pytest -m gpu tests/test_families_gpu.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_families import FAMILIES, FP8_RELEASES, _ok

from moetool.cli.main import main
from moetool.testing import hf_families as hf

pytestmark = pytest.mark.gpu

CONVERSIONS = [("deepgemm", "ue8m0"), ("deepgemm", "float"), ("hf", "float")]


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    assert torch.cuda.is_available(), "these tests need a CUDA GPU (run them on the GPU machine)"
    base = tmp_path_factory.mktemp("families-gpu")
    made = {f: hf.make_checkpoint(f, base / f, seed=31) for f in FAMILIES}
    made["qwen3_5_moe_packed"] = hf.make_checkpoint("qwen3_5_moe", base / "qp", seed=32, packed=True)
    for f in FP8_RELEASES:
        made[f + "_fp8"] = hf.write_fp8_release(made[f], base / f"{f}_fp8")
    made["kimi_k25_int4"] = hf.write_int4_release(made["kimi_k25"], base / "kimi_int4")
    return made


def _weights_and_config(path: Path) -> dict[str, bytes]:
    """Every weight shard, the index and config.json (moetool.json records the command, so it differs)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(path.iterdir())
        if p.suffix == ".safetensors" or p.name in ("model.safetensors.index.json", "config.json")
    }


CASES = [*FAMILIES, "qwen3_5_moe_packed", *(f + "_fp8" for f in FP8_RELEASES), "kimi_k25_int4"]


@pytest.mark.parametrize(("layout", "scale_fmt"), CONVERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_cuda_quantize_writes_the_cpu_bytes_and_validates(
    sources: dict[str, Path], tmp_path: Path, case: str, layout: str, scale_fmt: str
) -> None:
    src = sources[case]
    outs = []
    for i, device in enumerate(("cpu", "cuda")):
        outs.append(tmp_path / f"out{i}")
        _ok(
            "quantize",
            str(src),
            str(outs[i]),
            "--layout",
            layout,
            "--scale-fmt",
            scale_fmt,
            "--device",
            device,
            "-q",
        )
    cpu, gpu = _weights_and_config(outs[0]), _weights_and_config(outs[1])
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert cpu[name] == gpu[name], f"{case}: {name} differs between CPU and GPU"
    report = json.loads(_ok("validate", str(src), str(outs[1]), "--device", "cuda", "--json"))
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    assert report["device"].startswith("cuda")
    assert {c["group"] for c in report["checks"]} >= {"structure", "tensors", "kernels", "moe"}


@pytest.mark.parametrize("case", [*FAMILIES, "kimi_k25_int4"])
def test_cuda_validate_names_a_corrupted_expert(
    sources: dict[str, Path], tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    family = case.removesuffix("_int4")
    out = tmp_path / "q"
    _ok("quantize", str(sources[case]), str(out), "--layout", "hf", "--device", "cuda", "-q")
    layer = hf.FAMILIES[family].moe_layers[-1]
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        names = [
            k
            for k in sorted(tensors)
            if f"layers.{layer}." in k and ".experts.2." in k and k.endswith("weight")
        ]
        if names:
            t = tensors[names[0]].view(torch.uint8).clone()
            t.view(-1)[3] ^= 0x40
            tensors[names[0]] = t.view(torch.float8_e4m3fn)
            save_file(tensors, shard, metadata={"format": "pt"})
            break
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(sources[case]), str(out), "--device", "cuda"])
    text = capsys.readouterr().out
    assert exc.value.code == 1 and f"{names[0]} FP8 bytes differ" in text
