"""``quantize --layout hf`` output loads in transformers and computes what its FP8 weights say.

Tiny models are built by transformers' own classes (``moetool.testing.hf_models``: hidden 256,
moe_intermediate 128, BF16, two layers). Without a GPU transformers dequantizes FP8 checkpoints to BF16
at load time, so on CPU:

- the load report must have no missing, unexpected or mismatched keys;
- every parameter must equal the original model's parameter with each quantized weight replaced by
  ``dequant_ref(q, s)`` rounded once to BF16, and the logits must then be identical (same BF16
  weights, same modules, same input: a deterministic CPU forward gives the same bits);
- the logits stay within FP8 error of the original model's, measured as ``1 - cosine``. e4m3 rounds
  each weight with a relative error of at most 2**-4 (about 2**-4/√3 RMS); independent roundings add
  in quadrature, so ``1 - cos ≈ ε²/2`` grows with the number of rounded matrices on a token's path.
  Experts only (gate/up/down of routed and shared experts): below 1e-3 (measured 0.4e-4 to 3e-4).
  ``--targets linear`` adds attention's four projections per layer, up to four times the error
  variance: below 4e-3 (measured 1.5e-3). This catches weights read wrongly as a whole (scales taken
  as their inverse, transposed grids, experts out of order); single wrong blocks are caught by the
  exact comparison above.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_asserts import read_dir
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from moetool.cli.main import cli
from moetool.kernels.fp8_quant_ref import dequant_ref
from moetool.testing.hf_models import load_hf_model, make_hf_checkpoint

FP8 = torch.float8_e4m3fn
# 1 - cosine(logits, original logits), by --targets (module docstring)
COSINE_GAP = {"experts": 1e-3, "linear": 4e-3}

CASES = [
    ("deepseek_v3", ()),
    ("deepseek_v3", ("--scale-fmt", "ue8m0")),
    ("qwen2_moe", ()),
    ("qwen3_moe", ()),
    ("mixtral", ()),
    # every Linear of this model has 128-multiple dimensions (transformers' CPU dequantizer derives the
    # block size from the scale grid, so ceil grids are out of its reach)
    ("qwen2_moe", ("--targets", "linear", "--scale-fmt", "ue8m0")),
]


@pytest.fixture(scope="session")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf_models")
    made: dict[str, Path] = {}
    for family in sorted({f for f, _ in CASES}):
        made[family] = make_hf_checkpoint(
            family,
            base / family,
            num_layers=2,
            hidden_size=256,
            moe_intermediate_size=128,
            num_experts=4,
            dtype=torch.bfloat16,
            seed=31,
        )
    return made


def dequantized_copy(original: Path, quantized: Path, out: Path) -> int:
    """``original`` with every tensor that ``quantized`` stores in FP8 replaced by ``dequant_ref(q, s)``
    in BF16 (original names, no scales, no quantization_config). Returns how many were replaced."""
    shutil.copytree(original, out)
    q = read_dir(quantized)
    replaced = 0
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(f)
        for name, t in tensors.items():
            if name in q and q[name].dtype == FP8:
                assert t.dtype == torch.bfloat16, name
                tensors[name] = dequant_ref(q[name], q[name + "_scale_inv"]).to(torch.bfloat16)
                replaced += 1
        save_file(tensors, f, metadata={"format": "pt"})
    return replaced


def load_quantized(path: Path) -> tuple[torch.nn.Module, dict]:
    """The FP8 checkpoint through transformers' own loader, dequantized at load as it is on CPU."""
    kwargs = {}
    if torch.cuda.is_available():
        # with a GPU transformers would keep FP8 and run its kernels; ask for what it does on CPU
        from transformers import FineGrainedFP8Config

        qc = json.loads((path / "config.json").read_text())["quantization_config"]
        kwargs["quantization_config"] = FineGrainedFP8Config(
            dequantize=True, modules_to_not_convert=qc["modules_to_not_convert"]
        )
    return load_hf_model(path, output_loading_info=True, **kwargs)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize(
    ("family", "opts"), CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v) or "experts"
)
def test_hf_layout_loads_in_transformers(
    originals: dict[str, Path], tmp_path: Path, family: str, opts: tuple[str, ...]
) -> None:
    original = originals[family]
    out = tmp_path / "fp8"
    result = CliRunner().invoke(cli, ["quantize", str(original), str(out), "--layout", "hf", *opts, "-q"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    stored = read_dir(out)
    fp8_names = [n for n, t in stored.items() if t.dtype == FP8]
    if "linear" in opts:
        assert any(".self_attn." in n for n in fp8_names)

    model, info = load_quantized(out)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info.get(key)}"

    ref_dir = tmp_path / "dequantized"
    assert dequantized_copy(original, out, ref_dir) == len(fp8_names) > 0
    reference = load_hf_model(ref_dir)
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), (
            f"{name} differs from dequant_ref(q, s)"
        )

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=g)
    out_logits = logits(model, ids)
    assert torch.equal(out_logits, logits(reference, ids))

    base = logits(load_hf_model(original), ids)
    assert not torch.equal(out_logits, base), "quantization changed nothing"
    cosine = torch.nn.functional.cosine_similarity(out_logits.flatten(), base.flatten(), dim=0)
    gap = COSINE_GAP["linear" if "linear" in opts else "experts"]
    assert 1 - float(cosine) < gap, f"1 - cosine = {1 - float(cosine):.3g}, bound {gap}"
    cfg = json.loads((out / "config.json").read_text())
    assert ("scale_fmt" in cfg["quantization_config"]) == ("ue8m0" in opts)
