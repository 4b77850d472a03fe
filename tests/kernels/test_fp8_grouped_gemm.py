"""FP8 block grouped GEMM: Triton kernel against its torch reference and against the float32 product of
the unquantized inputs; contiguous layout; failure modes that ``validate`` relies on.

CPU runs use Triton's interpreter on tiny shapes; ``-m gpu`` runs real model shapes on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from moetool.errors import InputError
from moetool.kernels.fp8_grouped_gemm import (
    _COMPUTE,
    _COMPUTE_TMA,
    _COMPUTE_TMA_SHORT_K,
    _STREAMING,
    GemmConfig,
    contiguous_config,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    masked_config,
    mn_major_scales,
    select_config,
)
from moetool.kernels.fp8_grouped_gemm_ref import (
    calc_diff,
    contiguous_layout,
    grouped_gemm_ref,
    masked_grouped_gemm_ref,
)
from moetool.kernels.fp8_quant_ref import block_quant_ref, dequant_ref
from moetool.tolerances import GEMM_CALC_DIFF

# Tolerances, each with its reason. Against the float32 product of the unquantized inputs: DeepGEMM's
# bar, from the project's table.
CALC_DIFF_BAR = GEMM_CALC_DIFF
# Kernel vs reference, elementwise: |d - ref| <= BF16_REL·|ref| + eps·(|A|·|B|ᵀ). Both sum the same exact
# FP8 products in float32 (the reference after dequantizing, the kernel per 128-deep block then scaled),
# so they differ only by summation order and by the kernel's bf16 output: round-to-nearest on GPU is
# within 2^-8 relative, the interpreter's truncating cast within 2^-7.
BF16_REL = 2**-7
# Interpreter: float32 sums of K <= 256 terms, error <= K·2^-24 of Σ|a||b|.
ACCUM_EPS_CPU = 2**-16
# Hopper FP8 MMA sums each 128-deep block with about 14 mantissa bits (DeepGEMM's reason for promoting
# to FP32 every 128): a few truncations of 2^-13 of the block's Σ|a||b|.
ACCUM_EPS_GPU = 2**-9
# Kernel vs reference through calc_diff: same quantized inputs, outputs differ by at most about one bf16
# ulp (2^-7 relative), which bounds calc_diff by 2^-15 ≈ 3e-5 even if every element moved.
SAME_INPUTS_BAR = 1e-4
# Unrelated outputs of similar norm have calc_diff near 1; a layout bug must land far above the bar.
WRONG_LAYOUT_MIN = 0.5

_FP8_NAN_BYTE = 0x7F  # e4m3fn: exponent and mantissa all ones
_NAN = float("nan")


@dataclass
class Problem:
    x: torch.Tensor  # [T, K] f32 tokens
    w: torch.Tensor  # [G, N, K] f32 weights
    ids: torch.Tensor  # [T] expert per token
    a_q: torch.Tensor  # [M, K] e4m3, contiguous layout
    a_s: torch.Tensor  # [M, Kb] f32
    b_q: torch.Tensor  # [G, N, K] e4m3
    b_s: torch.Tensor  # [G, Nb, Kb] f32
    m_indices: torch.Tensor  # [M] int32
    row_of_token: torch.Tensor  # [T] int64


def _exact(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 product of the unquantized inputs, token order: ``[T, N]``."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        rows = ids == e
        out[rows] = x[rows] @ w[e].t()
    return out


def _abs_product(a_q, a_s, b_q, b_s, m_indices) -> torch.Tensor:
    """Σ_k |A[m, k]|·|B[e, n, k]| per output element (the scale of float32 summation error)."""
    a = dequant_ref(a_q, a_s, block=(1, 128)).abs()
    out = torch.zeros(a_q.shape[0], b_q.shape[1], dtype=torch.float32, device=a_q.device)
    for e in range(b_q.shape[0]):
        rows = m_indices == e
        if bool(rows.any()):
            out[rows] = a[rows] @ dequant_ref(b_q[e], b_s[e]).abs().t()
    return out


def _assert_close_to_ref(d: torch.Tensor, ref32: torch.Tensor, bound_scale: torch.Tensor, eps: float) -> None:
    err = (d.float() - ref32).abs()
    limit = BF16_REL * ref32.abs() + eps * bound_scale
    worst = (err - limit).max()
    assert bool(worst <= 0), f"kernel exceeds the reference bound by {float(worst):.3g}"


def _poison_padding(a_q: torch.Tensor, a_s: torch.Tensor, pad: torch.Tensor) -> None:
    """NaN activations and scales on padding rows: they must never reach an output."""
    a_q.view(torch.uint8)[pad] = _FP8_NAN_BYTE
    a_s[pad] = _NAN


def _make_problem(
    counts: list[int], n: int, k: int, *, device: str = "cpu", adversarial: bool = True, pad_tile: bool = True
) -> Problem:
    g = len(counts)
    ids = torch.cat([torch.full((c,), e, dtype=torch.int64) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel())].to(device)
    x = torch.randn(ids.numel(), k, device=device)
    w = torch.randn(g, n, k, device=device) * 0.05
    if adversarial:
        w[0, : min(n, 128), : min(k, 128)] = 0.0  # an all-zero weight block (scale at the 1e-4 floor)
        w[-1, -min(n, 128) :, -min(k, 128) :] *= 1e3  # a block at large magnitude
        x[0] = 0.0  # a token of zeros
        x[-1] *= 100.0  # a token at large magnitude
    x_q, x_s = block_quant_ref(x, block=(1, 128))
    b_q, b_s = block_quant_ref(w)
    a_q, m_indices, row_of_token = contiguous_layout(x_q, ids, g)
    a_s, m_idx_s, _ = contiguous_layout(x_s, ids, g)
    assert torch.equal(m_indices, m_idx_s)
    if pad_tile:
        # A whole tile of padding between two experts' segments: written as zeros, weights never read.
        cut = 128 if a_q.shape[0] > 128 else a_q.shape[0]
        a_q = torch.cat([a_q[:cut], torch.empty(128, k, dtype=a_q.dtype, device=device), a_q[cut:]])
        a_s = torch.cat([a_s[:cut], torch.empty(128, a_s.shape[1], device=device), a_s[cut:]])
        filler = torch.full((128,), -1, dtype=torch.int32, device=device)
        m_indices = torch.cat([m_indices[:cut], filler, m_indices[cut:]])
        row_of_token = torch.where(row_of_token >= cut, row_of_token + 128, row_of_token)
    _poison_padding(a_q, a_s, m_indices < 0)
    return Problem(x, w, ids, a_q, a_s, b_q, b_s, m_indices, row_of_token)


def _run_contiguous(p: Problem, **kwargs) -> torch.Tensor:
    out = torch.full((p.a_q.shape[0], p.b_q.shape[1]), _NAN, dtype=torch.bfloat16, device=p.a_q.device)
    d = m_grouped_fp8_gemm_nt_contiguous(p.a_q, p.a_s, p.b_q, p.b_s, p.m_indices, out=out, **kwargs)
    assert d.data_ptr() == out.data_ptr()
    return d


def _check_contiguous(p: Problem, d: torch.Tensor, eps: float) -> None:
    pad = p.m_indices < 0
    assert not bool(torch.isnan(d).any()), "an output element was never written or got NaN"
    assert bool((d[pad] == 0).all()), "padding rows must be exactly zero"
    ref32 = grouped_gemm_ref(p.a_q, p.a_s, p.b_q, p.b_s, p.m_indices, out_dtype=torch.float32)
    assert bool((ref32[pad] == 0).all())
    scale = _abs_product(p.a_q, p.a_s, p.b_q, p.b_s, p.m_indices)
    _assert_close_to_ref(d, ref32, scale, eps)
    exact = _exact(p.x, p.w, p.ids)
    ref_bf16 = grouped_gemm_ref(p.a_q, p.a_s, p.b_q, p.b_s, p.m_indices)
    assert calc_diff(ref_bf16[p.row_of_token], exact) < CALC_DIFF_BAR
    assert calc_diff(d[p.row_of_token], exact) < CALC_DIFF_BAR


# CPU (interpreter) ------------------------------------------------------------------------------------

# M per expert 1, 3, 67, an empty expert, and a two-row expert; K a multiple of 128 and not.
_CPU_SHAPES = [(192, 256), (160, 130)]


@pytest.mark.parametrize(("n", "k"), _CPU_SHAPES)
def test_contiguous_matches_reference_and_fp32(seed, n, k):
    p = _make_problem([1, 3, 0, 67, 2], n, k)
    d = _run_contiguous(p)
    _check_contiguous(p, d, ACCUM_EPS_CPU)


@pytest.mark.parametrize(
    "config",
    [GemmConfig(64, 64, 2, 4, 2), GemmConfig(32, 128, 1, 4, 3)],
    ids=["64x64-grouped", "32x128"],
)
def test_contiguous_tile_shapes(seed, config):
    # Tiles smaller than the 128-row segment: tails of a segment become all-padding tiles, and
    # GROUP_M > 1 reorders the tiles.
    p = _make_problem([67, 1, 0, 3], 96, 130)
    d = _run_contiguous(p, config=config)
    _check_contiguous(p, d, ACCUM_EPS_CPU)


def test_contiguous_streaming_config_and_mn_major_scales(seed):
    # expected_m <= 64 selects the weight-streaming tiles; same results. DeepGEMM's SM90 activation
    # scales are MN-major (a transposed view): the kernel follows strides and gives identical bytes.
    p = _make_problem([3, 1, 0, 2], 192, 256, adversarial=False)
    d = _run_contiguous(p, expected_m=3)
    _check_contiguous(p, d, ACCUM_EPS_CPU)
    p.a_s = p.a_s.t().contiguous().t()
    assert p.a_s.stride(0) == 1
    d_mn = _run_contiguous(p, expected_m=3)
    assert torch.equal(d_mn.view(torch.int16), d.view(torch.int16))


def test_mn_major_scales():
    s = torch.randn(3, 70, 5)
    for x in (s, s[0], s[:, :64]):
        y = mn_major_scales(x)
        assert y.stride(-2) == 1 and torch.equal(y, x)
        assert mn_major_scales(y) is y  # already MN-major: no copy
    one_row = torch.randn(1, 5)
    assert mn_major_scales(one_row) is one_row


def test_all_padding_and_empty(seed):
    k, n = 130, 96
    b_q, b_s = block_quant_ref(torch.randn(3, n, k))
    a_q, a_s = block_quant_ref(torch.randn(256, k), block=(1, 128))
    m_indices = torch.full((256,), -1, dtype=torch.int32)
    _poison_padding(a_q, a_s, m_indices < 0)
    out = torch.full((256, n), _NAN, dtype=torch.bfloat16)
    d = m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, b_q, b_s, m_indices, out=out)
    assert bool((d == 0).all())

    empty = m_grouped_fp8_gemm_nt_contiguous(a_q[:0], a_s[:0], b_q, b_s, m_indices[:0])
    assert empty.shape == (0, n) and empty.dtype == torch.bfloat16
    ref = grouped_gemm_ref(a_q[:0], a_s[:0], b_q, b_s, m_indices[:0])
    assert ref.shape == (0, n)


@pytest.mark.parametrize("config", [None, GemmConfig(64, 64, 2, 4, 2)], ids=["default", "64x64-grouped"])
def test_masked_matches_reference_and_fp32(seed, config):
    g, m_max, n, k = 3, 70, 160, 130
    masked = [67, 0, 3]
    x = torch.randn(g, m_max, k)
    w = torch.randn(g, n, k) * 0.05
    a_q, a_s = block_quant_ref(x.view(g * m_max, k), block=(1, 128))
    a_q, a_s = a_q.view(g, m_max, k), a_s.view(g, m_max, -1)
    b_q, b_s = block_quant_ref(w)
    masked_m = torch.tensor(masked, dtype=torch.int32)
    pad = torch.arange(m_max)[None, :] >= masked_m[:, None]
    _poison_padding(a_q, a_s, pad)

    out = torch.full((g, m_max, n), _NAN, dtype=torch.bfloat16)
    d = m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, masked_m, out=out, config=config)
    assert not bool(torch.isnan(d).any())
    assert bool((d[pad] == 0).all())

    ref32 = masked_grouped_gemm_ref(a_q, a_s, b_q, b_s, masked_m, out_dtype=torch.float32)
    flat_ids = torch.arange(g, dtype=torch.int32)[:, None].expand(g, m_max).clone()
    flat_ids[pad] = -1
    scale = _abs_product(a_q.view(g * m_max, k), a_s.view(g * m_max, -1), b_q, b_s, flat_ids.view(-1)).view(
        g, m_max, n
    )
    _assert_close_to_ref(d, ref32, scale, ACCUM_EPS_CPU)
    for e, c in enumerate(masked):
        if c:
            exact = x[e, :c] @ w[e].t()
            assert calc_diff(d[e, :c], exact) < CALC_DIFF_BAR
            assert calc_diff(ref32[e, :c], exact) < CALC_DIFF_BAR


_TMA = GemmConfig(64, 128, 4, 4, 2, tma=True)


def test_tma_operand_path_contiguous(seed):
    # Operand tiles through TMA descriptors: tiles past the last row and past N read zeros or the
    # neighbouring expert's rows, which must never reach the output.
    p = _make_problem([67, 1, 0, 3], 96, 256)
    d = _run_contiguous(p, config=_TMA)
    _check_contiguous(p, d, ACCUM_EPS_CPU)
    assert torch.equal(
        d.view(torch.int16), _run_contiguous(p, config=GemmConfig(64, 128, 4, 4, 2)).view(torch.int16)
    )


def test_tma_operand_path_masked(seed):
    g, m_max, n, k = 3, 70, 160, 256
    masked_m = torch.tensor([67, 0, 3], dtype=torch.int32)
    a_q, a_s = block_quant_ref(torch.randn(g * m_max, k), block=(1, 128))
    a_q, a_s = a_q.view(g, m_max, k), a_s.view(g, m_max, -1)
    b_q, b_s = block_quant_ref(torch.randn(g, n, k) * 0.05)
    pad = torch.arange(m_max)[None, :] >= masked_m[:, None]
    _poison_padding(a_q, a_s, pad)
    outs = []
    for config in (_TMA, GemmConfig(64, 128, 4, 4, 2)):
        out = torch.full((g, m_max, n), _NAN, dtype=torch.bfloat16)
        outs.append(m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, masked_m, out=out, config=config))
    assert not bool(torch.isnan(outs[0]).any())
    assert bool((outs[0][pad] == 0).all())
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    ref32 = masked_grouped_gemm_ref(a_q, a_s, b_q, b_s, masked_m, out_dtype=torch.float32)
    assert calc_diff(outs[0][~pad], ref32[~pad]) < SAME_INPUTS_BAR


# Tiles 256 wide (two weight-scale blocks per tile: one weight scale per column) and the loop that issues
# each K step's MMA before rescaling the previous one. N = 384: the last 256-wide tile wraps past N.
_WIDE = GemmConfig(64, 256, 2, 4, 2, tma=True)
_WIDE_PIPE = GemmConfig(64, 256, 2, 4, 2, tma=True, pipe_dot=True)
_PIPE = GemmConfig(64, 128, 2, 4, 2, tma=True, pipe_dot=True)
_AHEAD = GemmConfig(64, 128, 2, 4, 2, tma=True, scales_ahead=True)
_WIDE_AHEAD = GemmConfig(64, 256, 2, 4, 2, tma=True, scales_ahead=True)


def test_wide_tiles_and_pipelined_dot_contiguous(seed):
    p = _make_problem([67, 1, 0, 3, 130], 384, 384)
    runs = {
        "wide": _run_contiguous(p, config=_WIDE),
        "wide pipe": _run_contiguous(p, config=_WIDE_PIPE),
        "wide pointers": _run_contiguous(p, config=GemmConfig(64, 256, 2, 4, 2)),
        "pipe": _run_contiguous(p, config=_PIPE),
        "ahead": _run_contiguous(p, config=_AHEAD),
        "wide ahead": _run_contiguous(p, config=_WIDE_AHEAD),
        "plain": _run_contiguous(p, config=GemmConfig(64, 128, 2, 4, 2, tma=True)),
    }
    for d in runs.values():
        _check_contiguous(p, d, ACCUM_EPS_CPU)
    # Same tile, same K order, same scale products: the same bytes.
    bits = {name: d.view(torch.int16) for name, d in runs.items()}
    assert torch.equal(bits["wide pipe"], bits["wide"])
    assert torch.equal(bits["wide pointers"], bits["wide"])
    assert torch.equal(bits["pipe"], bits["plain"])
    assert torch.equal(bits["ahead"], bits["plain"])
    assert torch.equal(bits["wide ahead"], bits["wide"])


def test_wide_tiles_k_not_multiple_of_128(seed):
    # The pointer path's masked K tail with per-column weight scales.
    p = _make_problem([67, 1, 0, 3], 384, 130)
    _check_contiguous(p, _run_contiguous(p, config=GemmConfig(64, 256, 1, 4, 2)), ACCUM_EPS_CPU)


def test_wide_tiles_and_pipelined_dot_masked(seed):
    g, m_max, n, k = 3, 70, 384, 256
    masked_m = torch.tensor([67, 0, 3], dtype=torch.int32)
    a_q, a_s = block_quant_ref(torch.randn(g * m_max, k), block=(1, 128))
    a_q, a_s = a_q.view(g, m_max, k), a_s.view(g, m_max, -1)
    b_q, b_s = block_quant_ref(torch.randn(g, n, k) * 0.05)
    b_s[1, 2] *= 64.0  # the third weight-scale block column differs from its neighbours
    pad = torch.arange(m_max)[None, :] >= masked_m[:, None]
    _poison_padding(a_q, a_s, pad)
    outs = []
    for config in (_WIDE, _WIDE_PIPE, _WIDE_AHEAD):
        out = torch.full((g, m_max, n), _NAN, dtype=torch.bfloat16)
        outs.append(m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, masked_m, out=out, config=config))
    assert not bool(torch.isnan(outs[0]).any())
    assert bool((outs[0][pad] == 0).all())
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    assert torch.equal(outs[0].view(torch.int16), outs[2].view(torch.int16))
    ref32 = masked_grouped_gemm_ref(a_q, a_s, b_q, b_s, masked_m, out_dtype=torch.float32)
    assert calc_diff(outs[0][~pad], ref32[~pad]) < SAME_INPUTS_BAR


def test_config_checks_new_switches():
    GemmConfig(64, 256, 1, 8, 4, tma=True, pipe_dot=True).check()
    with pytest.raises(InputError, match="block_n"):
        GemmConfig(64, 512, 1, 4, 2).check()
    GemmConfig(64, 128, 1, 4, 3, tma=True, scales_ahead=True).check()
    with pytest.raises(InputError, match="pipe_dot"):
        GemmConfig(64, 128, 1, 4, 2, pipe_dot=True).check()
    with pytest.raises(InputError, match="scales_ahead"):
        GemmConfig(64, 128, 1, 4, 2, scales_ahead=True).check()
    with pytest.raises(InputError, match="pick one"):
        GemmConfig(64, 128, 1, 4, 2, tma=True, pipe_dot=True, scales_ahead=True).check()


def test_tma_needs_k_multiple_of_16(seed):
    p = _make_problem([3, 5], 64, 130, adversarial=False, pad_tile=False)
    with pytest.raises(InputError, match="TMA"):
        _run_contiguous(p, config=_TMA)


def test_swapped_experts_fail(seed):
    # The check must be able to fail: the right bytes under the wrong expert index are far off.
    p = _make_problem([5, 0, 7, 4], 96, 256, adversarial=False, pad_tile=False)
    b_q, b_s = p.b_q.clone(), p.b_s.clone()
    b_q[[0, 2]] = p.b_q[[2, 0]]
    b_s[[0, 2]] = p.b_s[[2, 0]]
    d = m_grouped_fp8_gemm_nt_contiguous(p.a_q, p.a_s, b_q, b_s, p.m_indices)
    exact = _exact(p.x, p.w, p.ids)
    swapped = (p.ids == 0) | (p.ids == 2)
    assert calc_diff(d[p.row_of_token][swapped], exact[swapped]) > WRONG_LAYOUT_MIN
    assert calc_diff(d[p.row_of_token], exact) > 100 * CALC_DIFF_BAR
    untouched = p.ids == 3
    assert calc_diff(d[p.row_of_token][untouched], exact[untouched]) < CALC_DIFF_BAR


def test_broken_layout_gives_nan(seed):
    # Two experts in one 128-row tile, or an id past G, break the kernel's contract: loud NaN, not a
    # plausible wrong number, and no out-of-bounds read.
    k, n, g = 130, 64, 3
    b_q, b_s = block_quant_ref(torch.randn(g, n, k))
    a_q, a_s = block_quant_ref(torch.randn(256, k), block=(1, 128))
    m_indices = torch.full((256,), -1, dtype=torch.int32)
    m_indices[:4] = 0
    m_indices[4:6] = 1  # a second expert inside the first tile: the tile computes expert 1
    m_indices[128:130] = g  # no such expert
    d = m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, b_q, b_s, m_indices)
    assert bool(torch.isnan(d[:4]).all())
    assert bool(torch.isnan(d[128:130]).all())
    assert not bool(torch.isnan(d[4:6]).any())
    assert bool((d[6:128] == 0).all()) and bool((d[130:] == 0).all())
    with pytest.raises(InputError):
        grouped_gemm_ref(a_q, a_s, b_q, b_s, m_indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_contiguous_layout_roundtrip(seed, dtype):
    g, t, k, align = 6, 41, 5, 8
    ids = torch.randint(0, g, (t,))
    ids[ids == 4] = 5  # expert 4 gets no tokens
    x = torch.randn(t, k).to(dtype)
    a, m_indices, row_of_token = contiguous_layout(x, ids, g, align=align)
    assert a.dtype == dtype and m_indices.dtype == torch.int32 and row_of_token.dtype == torch.int64
    assert torch.equal(a[row_of_token].view(torch.uint8), x.view(torch.uint8))
    assert torch.equal(m_indices[row_of_token], ids.to(torch.int32))
    pad = torch.ones(a.shape[0], dtype=torch.bool)
    pad[row_of_token] = False
    assert bool((m_indices[pad] == -1).all()) and bool((a[pad].float() == 0).all())
    assert row_of_token.unique().numel() == t
    counts = torch.bincount(ids, minlength=g).tolist()
    start = 0
    for e, c in enumerate(counts):
        rows = row_of_token[ids == e]
        # Segments in expert order, aligned, tokens in their original order.
        assert rows.tolist() == list(range(start, start + c))
        assert start % align == 0
        start += -(-c // align) * align
    assert a.shape[0] == start
    with pytest.raises(InputError):
        contiguous_layout(x, torch.full((t,), g), g)
    a0, m0, r0 = contiguous_layout(x[:0], ids[:0], g, align=align)
    assert a0.shape == (0, k) and m0.shape == (0,) and r0.shape == (0,)


def test_calc_diff():
    x = torch.randn(300, dtype=torch.float64)
    y = torch.randn(300, dtype=torch.float64)
    xs, ys = x.tolist(), y.tolist()
    expected = 1 - 2 * sum(a * b for a, b in zip(xs, ys)) / sum(a * a + b * b for a, b in zip(xs, ys))
    assert calc_diff(x, y) == pytest.approx(expected, rel=1e-12)
    assert calc_diff(x.float(), x.to(torch.bfloat16)) < 1e-4
    assert calc_diff(x, x) == 0.0
    assert calc_diff(x, -x) == pytest.approx(2.0)
    assert calc_diff(torch.zeros(4), torch.zeros(4)) == 0.0
    x[3] = _NAN
    assert calc_diff(x, y) != calc_diff(x, y)  # NaN: any "< bar" check fails


def test_launcher_rejects_bad_inputs(seed):
    k, n, g, m = 256, 64, 2, 128
    b_q, b_s = block_quant_ref(torch.randn(g, n, k))
    a_q, a_s = block_quant_ref(torch.randn(m, k), block=(1, 128))
    m_indices = torch.zeros(m, dtype=torch.int32)
    run = m_grouped_fp8_gemm_nt_contiguous
    with pytest.raises(InputError, match="float8_e4m3fn"):
        run(a_q.float(), a_s, b_q, b_s, m_indices)
    with pytest.raises(InputError, match="a_s"):
        run(a_q, a_s[:, :1], b_q, b_s, m_indices)
    with pytest.raises(InputError, match="b_s"):
        run(a_q, a_s, b_q, b_s.transpose(1, 2), m_indices)
    with pytest.raises(InputError, match="K-major"):
        run(a_q.t().contiguous().t(), a_s, b_q, b_s, m_indices)
    with pytest.raises(InputError, match="int32"):
        run(a_q, a_s, b_q, b_s, m_indices.long())
    with pytest.raises(InputError, match="out"):
        run(a_q, a_s, b_q, b_s, m_indices, out=torch.empty(m, n, dtype=torch.float32))
    with pytest.raises(InputError, match="block_n"):
        run(a_q, a_s, b_q, b_s, m_indices, config=GemmConfig(64, 512, 1, 4, 2))
    with pytest.raises(InputError, match="masked_m"):
        m_grouped_fp8_gemm_nt_masked(
            a_q.view(g, m // g, k), a_s.view(g, m // g, -1), b_q, b_s, torch.zeros(g + 1, dtype=torch.int32)
        )


def test_config_table():
    for cfg in (
        _STREAMING,
        _COMPUTE,
        _COMPUTE_TMA,
        _COMPUTE_TMA_SHORT_K,
        select_config(1, 1536, 2048, 8, 132),
    ):
        cfg.check()
        assert 128 % cfg.block_m == 0 and (128 % cfg.block_n == 0 or cfg.block_n % 128 == 0)
    assert select_config(64, 4096, 7168, 256, 132).block_m == 64
    assert select_config(512, 4096, 7168, 256, 132).block_m == 128
    assert select_config(512, 4096, 7168, 256, 132, tma=True).tma
    assert select_config(512, 4096, 7168, 256, 132, tma=True).mn_major  # compute-bound: scales MN-major
    assert select_config(512, 4096, 7168, 256, 132, tma=True) == _COMPUTE_TMA
    assert select_config(512, 7168, 2048, 256, 132, tma=True) == _COMPUTE_TMA_SHORT_K
    assert _COMPUTE_TMA_SHORT_K.tma and _COMPUTE_TMA_SHORT_K.mn_major
    streaming = select_config(64, 4096, 7168, 256, 132, tma=True)
    assert streaming.tma and not streaming.mn_major  # streaming reads the caller's scales as given
    assert not select_config(64, 4096, 7168, 256, 132).tma
    # Few experts times a narrow N: narrower tiles so every SM gets work.
    assert select_config(1, 1536, 2048, 8, 132).block_n < select_config(1, 1536, 2048, 256, 132).block_n


# GPU --------------------------------------------------------------------------------------------------

_GPU_SHAPES = {
    "dsv3-w13": (4096, 7168),  # DeepSeek-V3 gate_up: N = 2·2048, K = hidden 7168
    "dsv3-w2": (7168, 2048),  # DeepSeek-V3 down: N = hidden, K = 2048
    "qwen3-30b-w13": (1536, 2048),  # Qwen3-30B-A3B gate_up: N = 2·768, K = 2048
    "qwen3-30b-w2": (2048, 768),  # Qwen3-30B-A3B down
}


@pytest.fixture
def ieee_fp32():
    """The fp32 reference must not run in TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 67, 4096])
@pytest.mark.parametrize("shape", list(_GPU_SHAPES), ids=list(_GPU_SHAPES))
def test_gpu_contiguous(seed, ieee_fp32, shape, rows):
    n, k = _GPU_SHAPES[shape]
    p = _make_problem([rows, 0, rows, rows], n, k, device="cuda")
    d = _run_contiguous(p, expected_m=rows)
    torch.cuda.synchronize()
    _check_contiguous(p, d, ACCUM_EPS_GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(_GPU_SHAPES), ids=list(_GPU_SHAPES))
def test_gpu_tma_and_pointer_paths_agree(seed, ieee_fp32, shape):
    n, k = _GPU_SHAPES[shape]
    p = _make_problem([640, 0, 129, 512], n, k, device="cuda")
    assert contiguous_config(p.a_q, p.b_q, expected_m=512).tma  # Hopper picks the TMA-fed tiles
    d_tma = _run_contiguous(p, expected_m=512)
    d_ptr = _run_contiguous(p, config=_COMPUTE)
    torch.cuda.synchronize()
    _check_contiguous(p, d_tma, ACCUM_EPS_GPU)
    _check_contiguous(p, d_ptr, ACCUM_EPS_GPU)
    assert calc_diff(d_tma, d_ptr) < SAME_INPUTS_BAR


# Configurations the compute regime may take (scripts/tune_grouped_gemm.py times them): each must give the
# default configuration's bytes on the card (same MMAs per 128-deep K block, same scale products).
_GPU_CANDIDATES = [
    GemmConfig(128, 128, 8, 8, 4, tma=True, mn_major=True),
    GemmConfig(64, 256, 8, 8, 4, tma=True, mn_major=True),
    GemmConfig(128, 256, 8, 8, 3, tma=True, mn_major=True),
    GemmConfig(64, 128, 32, 4, 3, tma=True, mn_major=True, pipe_dot=True),
    GemmConfig(64, 256, 8, 8, 4, tma=True, mn_major=True, pipe_dot=True),
    GemmConfig(64, 128, 32, 4, 3, tma=True, mn_major=True, scales_ahead=True),
    GemmConfig(64, 256, 8, 8, 4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["dsv3-w13", "dsv3-w2", "qwen3-30b-w2"])
def test_gpu_compute_configs_bit_identical(seed, ieee_fp32, shape):
    n, k = _GPU_SHAPES[shape]
    p = _make_problem([640, 0, 129, 512], n, k, device="cuda")
    base = _run_contiguous(p, expected_m=512)
    torch.cuda.synchronize()
    _check_contiguous(p, base, ACCUM_EPS_GPU)
    for cfg in _GPU_CANDIDATES:
        d = _run_contiguous(p, expected_m=512, config=cfg)
        torch.cuda.synchronize()
        assert torch.equal(d.view(torch.int16), base.view(torch.int16)), f"{cfg} changed output bits"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["dsv3-w13", "dsv3-w2"])
def test_gpu_streaming_tma_and_pointer_paths_agree(seed, ieee_fp32, shape):
    # At <= 64 rows per expert Hopper feeds the 64x128 streaming tiles through TMA: the same tiles and MMAs
    # as the pointer path, so the same bytes, with row-major or MN-major activation scales, contiguous and
    # masked.
    n, k = _GPU_SHAPES[shape]
    p = _make_problem([64, 0, 37, 64, 1, 64, 64, 64], n, k, device="cuda")
    cfg = contiguous_config(p.a_q, p.b_q, expected_m=64)
    assert cfg.tma and cfg.block_m == 64 and cfg.block_n == 128
    d_tma = _run_contiguous(p, expected_m=64)
    d_ptr = _run_contiguous(p, config=_STREAMING)
    p.a_s = p.a_s.t().contiguous().t()
    d_mn = _run_contiguous(p, expected_m=64)
    torch.cuda.synchronize()
    _check_contiguous(p, d_tma, ACCUM_EPS_GPU)
    assert torch.equal(d_tma.view(torch.int16), d_ptr.view(torch.int16))
    assert torch.equal(d_tma.view(torch.int16), d_mn.view(torch.int16))
    g, m_max = 8, 64
    a_q, a_s = block_quant_ref(torch.randn(g * m_max, k, device="cuda"), block=(1, 128))
    a_q, a_s = a_q.view(g, m_max, k), a_s.view(g, m_max, -1)
    b_q, b_s = block_quant_ref(torch.randn(g, n, k, device="cuda") * 0.05)
    masked_m = torch.tensor([64, 0, 3, 64, 17, 64, 64, 1], dtype=torch.int32, device="cuda")
    assert masked_config(a_q, b_q, expected_m=64).tma
    outs = [
        m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, masked_m, expected_m=64),
        m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, masked_m, config=_STREAMING),
    ]
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    ref32 = masked_grouped_gemm_ref(a_q, a_s, b_q, b_s, masked_m, out_dtype=torch.float32)
    live = torch.arange(m_max, device="cuda")[None, :] < masked_m[:, None]
    assert calc_diff(outs[0][live], ref32[live]) < SAME_INPUTS_BAR


@pytest.mark.gpu
def test_gpu_tma_scale_layouts_agree(seed):
    # The compute-regime TMA path reads activation scales MN-major and transposes row-major ones first:
    # both layouts, contiguous and masked, give the same bytes.
    n, k = _GPU_SHAPES["dsv3-w13"]
    p = _make_problem([640, 0, 129, 512], n, k, device="cuda")
    assert p.a_s.stride(-1) == 1 and contiguous_config(p.a_q, p.b_q, expected_m=512).tma
    d_row = _run_contiguous(p, expected_m=512)
    p.a_s = p.a_s.t().contiguous().t()
    d_mn = _run_contiguous(p, expected_m=512)
    assert torch.equal(d_row.view(torch.int16), d_mn.view(torch.int16))
    g, m_max = 3, 256
    a_q, a_s = block_quant_ref(torch.randn(g * m_max, k, device="cuda"), block=(1, 128))
    a_q, a_s = a_q.view(g, m_max, k), a_s.view(g, m_max, -1)
    b_q, b_s = block_quant_ref(torch.randn(g, n, k, device="cuda") * 0.05)
    masked_m = torch.tensor([200, 0, 256], dtype=torch.int32, device="cuda")
    outs = [
        m_grouped_fp8_gemm_nt_masked(a_q, s, b_q, b_s, masked_m, expected_m=200)
        for s in (a_s, a_s.transpose(1, 2).contiguous().transpose(1, 2))
    ]
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 67])
@pytest.mark.parametrize("shape", ["dsv3-w13", "qwen3-30b-w2"])
def test_gpu_masked(seed, ieee_fp32, shape, rows):
    n, k = _GPU_SHAPES[shape]
    g, m_max = 4, 128
    x = torch.randn(g, m_max, k, device="cuda")
    w = torch.randn(g, n, k, device="cuda") * 0.05
    a_q, a_s = block_quant_ref(x.view(g * m_max, k), block=(1, 128))
    a_q, a_s = a_q.view(g, m_max, k), a_s.view(g, m_max, -1)
    b_q, b_s = block_quant_ref(w)
    masked = [rows, 0, rows, min(m_max, rows + 5)]
    masked_m = torch.tensor(masked, dtype=torch.int32, device="cuda")
    pad = torch.arange(m_max, device="cuda")[None, :] >= masked_m[:, None]
    _poison_padding(a_q, a_s, pad)
    out = torch.full((g, m_max, n), _NAN, dtype=torch.bfloat16, device="cuda")
    d = m_grouped_fp8_gemm_nt_masked(a_q, a_s, b_q, b_s, masked_m, out=out, expected_m=rows)
    assert not bool(torch.isnan(d).any())
    assert bool((d[pad] == 0).all())
    ref = masked_grouped_gemm_ref(a_q, a_s, b_q, b_s, masked_m)
    for e, c in enumerate(masked):
        if c:
            exact = x[e, :c] @ w[e].t()
            assert calc_diff(d[e, :c], exact) < CALC_DIFF_BAR
            assert calc_diff(ref[e, :c], exact) < CALC_DIFF_BAR
            assert calc_diff(d[e, :c], ref[e, :c]) < SAME_INPUTS_BAR
