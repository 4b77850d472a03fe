"""Every output moetool writes loads right in transformers or is refused when loading: the CPU column of
the engine-compatibility matrix (docs/compat.md), for every family the test builders know x
{hf, deepgemm, sm100 scales, fused hf, fused deepgemm, --targets linear} x {float, ue8m0 scales}.

transformers 5.24 on CPU dequantizes block-FP8 checkpoints to BF16 at load. A cell passes when
``from_pretrained`` raises, or when the model it loads computes exactly what the FP8 weights say: its
logits equal, bit for bit, those of the original with every quantized weight replaced by moetool's own
``q * s`` (a weight or scale grid read wrongly changes them), and they stay within FP8 error of the
original's. That error is measured as ``1 - cosine`` of the logits: about 2e-4 for the classic families,
up to 1.4e-2 for DeepSeek-V3.2 and 6e-3 for the Gated DeltaNet families, where weight rounding moves a
few top-k routing choices of the tiny models (the exact comparison is the proof; the bound only catches
a model that is not the original's at all).

Beyond that rule the expectation is exact: the hf layout, unfused (with or without ``--targets linear``),
must load (it is the format engines read) — unless it holds a scale grid transformers' CPU loader
refuses (a dimension not a multiple of its ceil grid, e.g. 576 rows) — and every other variant must be
refused, by moetool when it cannot write the variant (no shared expert to fuse, SM100 scales without
UE8M0, ``--targets linear`` on a release whose Linears are FP8 already) or by transformers, whose error
then carries moetool's refusal sentence. A variant that loads without error fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetool.engines import REFUSED, transformers_cpu_reading
from moetool.testing.engine_matrix import (
    ENGINE_LOADABLE,
    SCALE_FMTS,
    VARIANTS,
    Cells,
    dequantized_copy,
    fp8_shapes,
    logits,
    sources,
    token_ids,
)

pytest.importorskip("transformers", minversion="5.24")
pytest.importorskip("accelerate")

TABLE = sources()
#: 1 - cosine(logits, original logits): FP8 error, routing flips included (module docstring)
COSINE_GAP = 5e-2


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Cells:
    return Cells(tmp_path_factory.mktemp("engine_matrix"), TABLE)


@pytest.fixture(scope="module")
def reference(cells: Cells) -> dict[str, torch.Tensor]:
    """Each family's original logits, computed once."""
    out: dict[str, torch.Tensor] = {}

    class Lazy(dict):
        def __missing__(self, family: str) -> torch.Tensor:
            src = TABLE[family]
            self[family] = logits(src.load(cells.original(family)), token_ids(src.vocab))
            return self[family]

    return Lazy(out)


def test_the_matrix_covers_every_family() -> None:
    from moetool.testing import hf_families
    from moetool.testing.families import FAMILIES

    assert set(FAMILIES) | set(hf_families.FAMILIES) <= set(TABLE)


@pytest.mark.parametrize("scale_fmt", SCALE_FMTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", sorted(TABLE))
def test_transformers_loads_right_or_refuses(
    cells: Cells,
    reference: dict[str, torch.Tensor],
    tmp_path: Path,
    family: str,
    variant: str,
    scale_fmt: str,
) -> None:
    src = TABLE[family]
    cell = cells.output(family, variant, scale_fmt)
    if cell.path is None:
        # moetool wrote nothing: only where the variant cannot exist for this input
        fused_without_shared = variant.startswith("fused") and not src.shared
        sm100_without_ue8m0 = variant == "sm100" and scale_fmt != "ue8m0"
        linear_on_fp8_linears = variant == "linear" and src.fp8_linears
        assert fused_without_shared or sm100_without_ue8m0 or linear_on_fp8_linears, (
            f"moetool refused: {cell.refusal}"
        )
        return
    try:
        model = src.load(cell.path)
    except Exception as exc:
        if variant in ENGINE_LOADABLE:
            # transformers' CPU loader refuses a ceil scale grid whose rows do not divide (576-row
            # kv_a_proj_with_mqa); it may refuse nothing else moetool writes for engines
            ceil = [
                n for n, shape in fp8_shapes(cell.path).items() if transformers_cpu_reading(shape) == "raises"
            ]
            assert ceil and "automatic conversion of the weights" in str(exc), (
                f"transformers refused the {variant} layout: {exc!r}"
            )
            return
        assert REFUSED in str(exc), f"refused, but not by moetool's marker: {exc!r}"
        return
    assert variant in ENGINE_LOADABLE, f"{variant} loaded in transformers: its config should refuse it"
    ids = token_ids(src.vocab)
    got = logits(model, ids)
    if src.exact:
        want = reference[family]
    else:
        copy = tmp_path / "dequantized"
        assert dequantized_copy(cells.original(family), cell.path, copy) > 0
        want = logits(src.load(copy), ids)
    assert torch.equal(got, want), f"{family} {variant} {scale_fmt}: transformers reads other weights"
    gap = 1 - float(torch.nn.functional.cosine_similarity(got.flatten(), reference[family].flatten(), dim=0))
    assert gap < COSINE_GAP, f"{family} {variant} {scale_fmt}: 1 - cos {gap:.3g} to the original"


# -- ceil scale grids (dimensions that are not multiples of 128) -------------------------------------
@pytest.mark.parametrize("n", [64, 96, 128, 192, 200, 256, 320, 384, 576, 640, 1408])
@pytest.mark.parametrize("k", [128, 192, 576])
def test_transformers_cpu_reading_is_what_transformers_does(n: int, k: int) -> None:
    """The rule in moetool.engines against transformers' own CPU dequantizer, on seeded FP8 bytes."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from moetool.engines import transformers_cpu_reading
    from moetool.kernels.fp8_quant_ref import dequant_ref

    g = torch.Generator().manual_seed(n * 1000 + k)
    q = (torch.randn(n, k, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(-(-n // 128), -(-k // 128), generator=g) + 0.5
    try:
        got = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
    except ValueError as exc:
        assert "not divisible by scale grid" in str(exc)
        seen = "raises"
    else:
        seen = "right" if torch.equal(got, dequant_ref(q, s)) else "misreads"
    assert transformers_cpu_reading((n, k)) == seen


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        # q_a_proj [192, H] and q_b_proj [192, 192]: grids of two 96-blocks, which transformers would misread
        ({"q_lora_rank": 192}, "loads"),
        # kv_a_proj_with_mqa [512 + 64, H], as DeepSeek-V3 ships it: 5 row blocks, transformers refuses
        ({"kv_lora_rank": 512, "qk_rope_head_dim": 64}, "raises"),
    ],
)
def test_targets_linear_on_ceil_grids_loads_right_or_is_refused(
    tmp_path: Path, overrides: dict, expect: str
) -> None:
    import json

    from moetool.testing.engine_matrix import config_of, run_moetool
    from moetool.testing.hf_models import load_hf_model, make_hf_checkpoint

    src = make_hf_checkpoint(
        "deepseek_v3",
        tmp_path / "src",
        num_layers=2,
        hidden_size=256,
        moe_intermediate_size=128,
        num_experts=4,
        seed=9,
        config_overrides=overrides,
    )
    out = tmp_path / "fp8"
    code, err = run_moetool("quantize", str(src), str(out), "--targets", "linear")
    assert code == 0, err
    skipped = config_of(out)["quantization_config"]["modules_to_not_convert"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    if expect == "raises":
        assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv" in index
        # transformers logs "not divisible by scale grid" for the weight, then refuses the checkpoint
        with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
            load_hf_model(out)
        return
    for layer in (0, 1):
        for proj in ("q_a_proj", "q_b_proj"):
            assert f"model.layers.{layer}.self_attn.{proj}" in skipped
            assert f"model.layers.{layer}.self_attn.{proj}.weight_scale_inv" not in index
        assert f"model.layers.{layer}.self_attn.o_proj.weight_scale_inv" in index
    ids = token_ids(512)
    copy = tmp_path / "dequantized"
    assert dequantized_copy(src, out, copy) > 0
    assert torch.equal(logits(load_hf_model(out), ids), logits(load_hf_model(copy), ids))


@pytest.mark.parametrize("fp8", [False, True])
def test_experts_transformers_would_misread_are_refused_in_the_hf_layout(tmp_path: Path, fp8: bool) -> None:
    """Experts of [128, 192]: transformers would read their 2-block K grids as 96-column blocks. The hf
    layout is refused in one line naming the tensor, from BF16 and from an FP8 release alike; the deepgemm
    layout (refused by engines) is written."""
    from moetool.testing.engine_matrix import run_moetool
    from moetool.testing.factory import make_checkpoint

    src = make_checkpoint(
        "qwen3_moe",
        tmp_path / "src",
        num_layers=1,
        hidden_size=192,
        moe_intermediate_size=128,
        num_experts=4,
        seed=4,
        fp8=fp8,
    )
    code, err = run_moetool("quantize", str(src), str(tmp_path / "hf"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in err and "--layout deepgemm" in err, err
    assert not (tmp_path / "hf").exists()
    code, err = run_moetool("quantize", str(src), str(tmp_path / "dg"), "--layout", "deepgemm")
    assert code == 0, err


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral", "qwen3_5_moe"])
def test_transformers_on_cpu_misreads_the_stacked_layout_without_its_marker(
    cells: Cells, reference: dict[str, torch.Tensor], tmp_path: Path, family: str
) -> None:
    """Why the deepgemm layout keeps its refusal marker in transformers although its names are those of
    transformers' FP8Experts (read right on CUDA, tests/test_engine_gpu.py): on CPU transformers
    dequantizes at load, pairs only ``weight`` with ``weight_scale_inv``, casts the stacked FP8 experts
    unscaled and only warns about the unexpected scales. A config cannot tell where it will be loaded."""
    import json
    import shutil

    cell = cells.output(family, "deepgemm", "float")
    assert cell.path is not None, cell.refusal
    unmarked = tmp_path / "unmarked"
    shutil.copytree(cell.path, unmarked)
    cfg = json.loads((unmarked / "config.json").read_text())
    marked = [
        c["quantization_config"] for c in (cfg, cfg.get("text_config") or {}) if "quantization_config" in c
    ]
    assert marked
    for qc in marked:
        assert REFUSED in qc["activation_scheme"]
        qc["activation_scheme"] = "dynamic"
    (unmarked / "config.json").write_text(json.dumps(cfg))
    model, info = TABLE[family].load(unmarked, output_loading_info=True)
    assert any(k.endswith("experts.gate_up_proj_scale_inv") for k in info["unexpected_keys"]), info
    got = logits(model, token_ids(TABLE[family].vocab))
    gap = 1 - float(torch.nn.functional.cosine_similarity(got.flatten(), reference[family].flatten(), dim=0))
    assert gap > 0.3, (
        f"transformers now reads the stacked layout on CPU (1 - cos {gap:.3g}): revisit the marker"
    )


def test_fp8_release_linears_transformers_would_misread_are_refused_in_the_hf_layout(tmp_path: Path) -> None:
    """An FP8 release whose own FP8 Linears have grids transformers' CPU loader misreads: q_b_proj of
    4 heads x 48 rows is [192, 96], a 2-block row grid read as two 96-row blocks. Kept FP8 in the hf
    layout it would load wrong (as the release itself does), and no other precision holds the release's
    values, so the hf layout is refused in one line naming the tensor and the fix; the deepgemm layout
    (refused by engines) is written."""
    from moetool.testing.engine_matrix import run_moetool
    from moetool.testing.factory import make_checkpoint

    src = make_checkpoint(
        "deepseek_v3",
        tmp_path / "src",
        num_layers=2,
        hidden_size=256,
        moe_intermediate_size=128,
        num_experts=4,
        seed=5,
        fp8=True,
    )

    shapes = fp8_shapes(src)
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (192, 96)
    misread = sorted(n for n, s in shapes.items() if transformers_cpu_reading(s) == "misreads")
    assert misread and all(".q_b_proj." in n for n in misread), misread
    for opts in ((), ("--scale-fmt", "ue8m0")):
        out = tmp_path / f"hf{len(opts)}"
        code, err = run_moetool("quantize", str(src), str(out), *opts)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert misread[0] in err and "--layout deepgemm" in err, err
        assert not out.exists()
    code, err = run_moetool("quantize", str(src), str(tmp_path / "dg"), "--layout", "deepgemm")
    assert code == 0, err
    # a shared expert of such a grid: from BF16 too it is refused in the hf layout, so the BF16 checkpoint
    # is no fix there
    shared = make_checkpoint(
        "qwen2_moe",
        tmp_path / "shared",
        num_layers=1,
        hidden_size=256,
        moe_intermediate_size=128,
        num_experts=4,
        seed=5,
        fp8=True,
        config_overrides={"shared_expert_intermediate_size": 192},
    )
    code, err = run_moetool("quantize", str(shared), str(tmp_path / "shared-hf"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert ".mlp.shared_expert." in err and "--layout deepgemm" in err and "BF16" not in err, err
