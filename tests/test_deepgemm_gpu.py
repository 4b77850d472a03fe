"""DeepGEMM itself on our ``quantize --layout deepgemm`` output. Needs a CUDA GPU and DeepGEMM built by
``scripts/build_deepgemm.sh``::

    eval "$(bash scripts/build_deepgemm.sh env)"; pytest -m gpu tests/test_deepgemm_gpu.py

Without an importable ``deep_gemm`` every test here is skipped and says why.

A small DeepSeek-V3 written by transformers' own classes (hidden 320, so w13's K and w2's N end in a
ragged 64-wide block; 8 experts of intermediate 256) is quantized on the GPU three ways: ``--layout
deepgemm`` with float scales, with ``--scale-fmt ue8m0``, and with ``--scale-fmt ue8m0 --scale-layout
sm100``. The stacked experts come back through ``moetool.layout.load_experts`` (never by tensor name) and
the activations through DeepGEMM's own per-token cast (``deep_gemm.utils.per_token_cast_to_fp8``). Then:

- DeepGEMM's ``m_grouped_fp8_gemm_nt_contiguous`` and ``_masked`` (irregular rows per expert: none, one,
  a tile and a half; an all-zero token and a token 1000x larger than the rest) against the float32
  product of the original bf16 weights: ``calc_diff`` below ``tolerances.GEMM_CALC_DIFF``;
- the same operands through our Triton grouped GEMM: bit-identical on every real row. Both kernels sum
  each 128-deep block of FP8 products on the tensor cores and add it, times ``a_s · b_s``, to a float32
  accumulator, block after block in K order, then round once to bfloat16;
- the SM100 scales we store equal, bytes and strides, what DeepGEMM's own packing kernel makes of the
  UE8M0 scales (any card), and DeepGEMM's SM100 GEMM runs on them where the card is an SM100;
- ``moetool validate --backend deepgemm`` passes on the clean outputs and fails on two swapped experts,
  naming the expert; without ``--backend`` it picks DeepGEMM and its report says so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import test_validate as tv
import torch

from moetool import tolerances as tol
from moetool.io.checkpoint import Checkpoint
from moetool.kernels.fp8_grouped_gemm import m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked
from moetool.kernels.fp8_grouped_gemm_ref import calc_diff, contiguous_layout
from moetool.layout import StackedExperts, load_experts
from moetool.testing.factory import expert_weight_name, moe_layers, packed_expert_names

pytestmark = pytest.mark.gpu

HIDDEN = 320  # 2.5 scale blocks: w13's K and w2's N end in a ragged block
INTER = 256
EXPERTS = 8
# Rows per expert in the contiguous layout: an empty expert, a single row, a full 128-row tile, a tile
# and a bit (two tiles, the second nearly empty), odd counts.
CONTIGUOUS_ROWS = [3, 0, 130, 1, 128, 67, 5, 200]
# DeepGEMM's masked layout needs M_max a multiple of its 64/128-row block (it stores D through one 2-D TMA
# descriptor over [G·M_max, N]); ours takes any M_max.
MASKED_MAX = 128
MASKED_ROWS = [0, 1, 3, 64, 128, 17, 100, 5]
QUANTIZATIONS = {
    "float": ("--layout", "deepgemm"),
    "ue8m0": ("--layout", "deepgemm", "--scale-fmt", "ue8m0"),
    "sm100": ("--layout", "deepgemm", "--scale-fmt", "ue8m0", "--scale-layout", "sm100"),
}


@pytest.fixture(scope="module")
def deep_gemm() -> ModuleType:
    assert torch.cuda.is_available(), "these tests need a CUDA GPU (run them on the GPU machine)"
    try:
        import deep_gemm
    except Exception as exc:  # ImportError, or a broken build failing to load
        pytest.skip(
            f"DeepGEMM is not importable ({type(exc).__name__}: {exc}); build it with "
            "'bash scripts/build_deepgemm.sh', then 'eval \"$(bash scripts/build_deepgemm.sh env)\"'"
        )
    return deep_gemm


@dataclass
class Model:
    source: Path
    outputs: dict[str, Path]
    layer: int

    def experts(self, quantization: str, *, unpack_scales: bool = False) -> StackedExperts:
        return load_experts(self.outputs[quantization], self.layer, unpack_scales=unpack_scales)

    def original(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The original bf16 experts of the layer as ``w13 [E, 2I, H]`` (gate rows, then up) and ``w2 [E, H,
        I]``, read from the transformers-written source: per-expert tensors, or the packed v5 ones
        (``gate_up_proj`` gate rows first), whichever this transformers version saved."""
        cfg = tv.config_of(self.source)
        with Checkpoint(self.source) as ckpt:
            if expert_weight_name(cfg, self.layer, 0, "gate") not in ckpt:
                gate_up, down = packed_expert_names(cfg, self.layer)
                return ckpt.read(gate_up), ckpt.read(down)

            def w(e: int, proj: str) -> torch.Tensor:
                return ckpt.read(expert_weight_name(cfg, self.layer, e, proj))

            w13 = torch.stack([torch.cat([w(e, "gate"), w(e, "up")]) for e in range(EXPERTS)])
            w2 = torch.stack([w(e, "down") for e in range(EXPERTS)])
        return w13, w2


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, deep_gemm: ModuleType) -> Model:
    from moetool.testing.hf_models import make_hf_checkpoint

    root = tmp_path_factory.mktemp("deepgemm")
    src = make_hf_checkpoint(
        "deepseek_v3",
        root / "src",
        num_layers=2,
        hidden_size=HIDDEN,
        moe_intermediate_size=INTER,
        num_experts=EXPERTS,
        top_k=2,
        dense_layers=1,
        seed=7,
    )
    outputs = {}
    for name, opts in QUANTIZATIONS.items():
        outputs[name] = root / f"out-{name}"
        tv.run_ok("quantize", src, outputs[name], *opts, "--device", "cuda")
    (layer,) = moe_layers(tv.config_of(src))
    return Model(src, outputs, layer)


def _tokens(rows: int, k: int, seed: int, zero: int = 0, big: int = 1) -> torch.Tensor:
    """``rows`` bf16 activations of width ``k``: Gaussian, but row ``zero`` all zero and row ``big`` 1000x
    larger than the rest."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, device="cuda", generator=gen)
    x[zero] = 0
    x[big] *= 1000
    return x.to(torch.bfloat16)


def _reference(x: torch.Tensor, ids: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """float32 ``x[t] @ orig[ids[t]]ᵀ`` for bf16 tokens ``x [T, K]`` and original weights ``orig [G, N, K]``."""
    ref = torch.empty(x.shape[0], orig.shape[1], device=x.device)
    for e in ids.unique().tolist():
        sel = ids == e
        ref[sel] = x[sel].float() @ orig[e].float().t()
    return ref


def _assert_close_to_original(got: torch.Tensor, ref: torch.Tensor, big: torch.Tensor, what: str) -> None:
    """calc_diff of DeepGEMM's rows against the original weights' product, below the GEMM bar: over the
    ordinary tokens and, on its own, over the 1000x token (which would otherwise dominate the sums)."""
    for sel, name in ((~big, "tokens"), (big, "the 1000x token")):
        diff = calc_diff(got[sel], ref[sel])
        assert diff < tol.GEMM_CALC_DIFF, f"{what}: DeepGEMM vs original weights on {name}: {diff:.2e}"


def _cuda_keeping_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the GPU with its strides (``.cuda()`` makes a view with gaps contiguous): SM100 scales are
    an MN-major view with TMA-aligned strides, and DeepGEMM checks those strides."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda").copy_(t)


def _assert_same_rows(dg: torch.Tensor, ours: torch.Tensor, what: str) -> None:
    assert not torch.isnan(dg).any(), f"{what}: NaN in DeepGEMM's output"
    if not torch.equal(dg, ours):
        d = (dg.float() - ours.float()).abs()
        pytest.fail(
            f"{what}: DeepGEMM and the Triton GEMM differ on {int((d > 0).sum())} of {d.numel()} values "
            f"(max abs {float(d.max()):.3e}, calc_diff {calc_diff(dg, ours):.2e})"
        )


@pytest.mark.parametrize("which", ["w13", "w2"])
@pytest.mark.parametrize("quantization", ["float", "ue8m0"])
def test_contiguous_matches_original_and_triton(
    deep_gemm: ModuleType, model: Model, which: str, quantization: str
) -> None:
    w = model.experts(quantization)
    b_q = (w.w13 if which == "w13" else w.w2).cuda()
    b_s = (w.w13_scale if which == "w13" else w.w2_scale).cuda()
    orig = model.original()[0 if which == "w13" else 1].cuda()
    g, n, k = b_q.shape
    assert (g, n, k) == ((EXPERTS, 2 * INTER, HIDDEN) if which == "w13" else (EXPERTS, HIDDEN, INTER))

    ids = torch.repeat_interleave(torch.arange(g), torch.tensor(CONTIGUOUS_ROWS))
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(3))].cuda()
    x = _tokens(ids.numel(), k, seed=11)
    a, m_indices, row_of_token = contiguous_layout(x, ids, g)
    a_q, a_s = deep_gemm.utils.per_token_cast_to_fp8(a, use_ue8m0=quantization == "ue8m0")

    d = torch.full((a.shape[0], n), float("nan"), dtype=torch.bfloat16, device="cuda")
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a_q, a_s), (b_q, b_s), d, m_indices)
    ours = m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, b_q, b_s, m_indices)
    torch.cuda.synchronize()

    got = d[row_of_token]  # token order, real rows only
    big = torch.arange(ids.numel(), device="cuda") == 1
    _assert_close_to_original(got, _reference(x, ids, orig), big, f"{which} {quantization} contiguous")
    _assert_same_rows(got, ours[row_of_token], f"{which} {quantization} contiguous")


@pytest.mark.parametrize("which", ["w13", "w2"])
def test_masked_matches_original_and_triton(deep_gemm: ModuleType, model: Model, which: str) -> None:
    w = model.experts("float")
    b_q = (w.w13 if which == "w13" else w.w2).cuda()
    b_s = (w.w13_scale if which == "w13" else w.w2_scale).cuda()
    orig = model.original()[0 if which == "w13" else 1].cuda()
    g, n, k = b_q.shape
    masked_m = torch.tensor(MASKED_ROWS, dtype=torch.int32, device="cuda")
    big_row = 4 * MASKED_MAX + 1  # expert 4, second row
    x = _tokens(g * MASKED_MAX, k, seed=13, zero=3 * MASKED_MAX, big=big_row).view(g, MASKED_MAX, k)
    for e, m in enumerate(MASKED_ROWS):
        x[e, m:] = 0  # rows past masked_m hold nothing (as DeepGEMM's own tests lay them out)
    a_q, a_s = deep_gemm.utils.per_token_cast_to_fp8(x.view(-1, k), use_ue8m0=False)
    a_q, a_s = a_q.view(g, MASKED_MAX, k), a_s.view(g, MASKED_MAX, -1)

    expected = sum(MASKED_ROWS) // g
    d = torch.full((g, MASKED_MAX, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    deep_gemm.m_grouped_fp8_gemm_nt_masked((a_q, a_s), (b_q, b_s), d, masked_m, expected)
    ours = m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, masked_m, expected_m=expected)
    torch.cuda.synchronize()

    valid = torch.arange(MASKED_MAX, device="cuda")[None, :] < masked_m[:, None]  # [G, M_max]
    ids = torch.arange(g, device="cuda")[:, None].expand(g, MASKED_MAX)[valid]
    big = (torch.arange(g * MASKED_MAX, device="cuda") == big_row).view(g, MASKED_MAX)[valid]
    got = d[valid]
    _assert_close_to_original(got, _reference(x[valid], ids, orig), big, f"{which} masked")
    _assert_same_rows(got, ours[valid], f"{which} masked")


@pytest.mark.parametrize("which", ["w13", "w2"])
def test_sm100_scales_are_deepgemms_packing(deep_gemm: ModuleType, model: Model, which: str) -> None:
    """The ``--scale-layout sm100`` words equal DeepGEMM's own packing of the same UE8M0 scales (taken
    from the independently quantized ``--scale-fmt ue8m0`` output, broadcast to one row per output
    channel as DeepGEMM's ``transform_sf_into_required_layout`` does for 128x128 weight blocks)."""
    packed = model.experts("sm100")
    floats = model.experts("ue8m0")
    assert packed.scale_layout == "sm100" and floats.scale_layout == "sm90"
    ours = _cuda_keeping_strides(packed.w13_scale if which == "w13" else packed.w2_scale)
    sf = (floats.w13_scale if which == "w13" else floats.w2_scale).cuda()
    n = (floats.w13 if which == "w13" else floats.w2).shape[1]
    rows = sf.index_select(1, torch.arange(n, device="cuda") // 128).contiguous()
    theirs = deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(rows)
    torch.cuda.synchronize()
    assert theirs.dtype == ours.dtype == torch.int32
    assert theirs.shape == ours.shape, (theirs.shape, ours.shape)
    assert theirs.stride() == ours.stride(), (theirs.stride(), ours.stride())
    assert torch.equal(theirs, ours), (
        f"{which}: packed words differ at {(theirs != ours).nonzero()[:4].tolist()}"
    )


def test_sm100_gemm_on_packed_scales(deep_gemm: ModuleType, model: Model) -> None:
    major, minor = torch.cuda.get_device_capability()
    if major != 10:
        pytest.skip(
            f"DeepGEMM runs packed UE8M0 weight scales only on SM100 cards; this one is sm_{major}{minor} "
            "(its packing is checked by test_sm100_scales_are_deepgemms_packing)"
        )
    w = model.experts("sm100")
    floats = model.experts("sm100", unpack_scales=True)
    orig = model.original()[0].cuda()
    b_q, b_s = w.w13.cuda(), _cuda_keeping_strides(w.w13_scale)
    g, n, k = b_q.shape
    ids = torch.repeat_interleave(torch.arange(g), torch.tensor(CONTIGUOUS_ROWS)).cuda()
    x = _tokens(ids.numel(), k, seed=17)
    a, m_indices, row_of_token = contiguous_layout(x, ids, g)
    a_q, a_s = deep_gemm.utils.per_token_cast_to_fp8(a, use_ue8m0=True)
    d = torch.full((a.shape[0], n), float("nan"), dtype=torch.bfloat16, device="cuda")
    deep_gemm.m_grouped_fp8_fp4_gemm_nt_contiguous((a_q, a_s), (b_q, b_s), d, m_indices)
    ours = m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, b_q, floats.w13_scale.cuda(), m_indices)
    torch.cuda.synchronize()
    got = d[row_of_token]
    big = torch.arange(ids.numel(), device="cuda") == 1
    _assert_close_to_original(got, _reference(x, ids, orig), big, "w13 sm100 contiguous")
    # Same FP8 bytes and scales, but SM100's kernel scales on the tensor cores rather than promoting each
    # 128-deep block in registers, so bit-identity is not expected: about one bf16 ulp apart at most
    # (the bar of scripts/bench_grouped_gemm.py for two GEMMs on the same operands).
    assert calc_diff(got, ours[row_of_token]) < 1e-4


# -- validate --backend deepgemm -------------------------------------------------------------------
def _validate(model: Model, converted: Path, tmp_path: Path, *opts: str) -> tv.Outcome:
    report = tmp_path / "report.json"
    res = tv.moetool(
        "validate", model.source, converted, "--device", "cuda", "--tokens", "96", "--report", report, *opts
    )
    if res.code in (0, 1):
        res.report = json.loads(report.read_text())
    return res


@pytest.mark.parametrize("quantization", ["float", "sm100"])
def test_validate_with_deepgemm_passes(model: Model, tmp_path: Path, quantization: str) -> None:
    res = _validate(model, model.outputs[quantization], tmp_path, "--backend", "deepgemm")
    tv.assert_passes(res, [model.layer], fp8=True)
    assert res.report is not None and res.report["backend"] == "deepgemm", res.report
    assert all("deepgemm" in c["metric"] for c in tv.checks(res, "kernels")), tv.checks(res, "kernels")
    assert "(deepgemm)" in res.out.strip().splitlines()[-1]


def test_validate_picks_deepgemm(model: Model, tmp_path: Path) -> None:
    res = _validate(model, model.outputs["float"], tmp_path)
    assert res.code == 0, f"exit {res.code}\n{res.out}\n{res.err}"
    assert res.report is not None and res.report["backend"] == "deepgemm", res.report


def test_validate_with_deepgemm_names_swapped_expert(model: Model, tmp_path: Path) -> None:
    conv = tmp_path / "swapped"
    shutil.copytree(model.outputs["float"], conv)
    culprit = tv.swap_whole_experts(conv, model.layer, "deepgemm", 2, 5)
    tv.refresh_manifest(conv)
    res = _validate(model, conv, tmp_path, "--backend", "deepgemm")
    assert tv.passed(res, "structure"), tv.checks(res, "structure")
    tv.assert_fails(res, culprit, groups=("tensors",))
    (kernels,) = tv.checks(res, "kernels")
    assert not kernels["passed"], kernels
    assert "deepgemm" in kernels["metric"]
    assert "expert 2" in kernels["detail"] or "expert 5" in kernels["detail"], kernels
