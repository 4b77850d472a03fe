"""Block FP8 (docs/contract.md §6): the torch reference against a naive re-implementation written here, the Triton
kernels against the reference byte for byte (interpreter on CPU, real sizes on GPU), UE8M0 bit rounding,
non-finite input errors, SM100 scale packing and the dequantization error bound."""

from __future__ import annotations

import math

import pytest
import torch

from moetool.errors import InputError
from moetool.kernels.fp8_quant import block_quant, token_quant
from moetool.kernels.fp8_quant_ref import (
    block_quant_ref,
    ceil_to_ue8m0,
    dequant_ref,
    pack_sm100_scales_ref,
    sm100_scales_from_storage,
    sm100_scales_to_storage,
    unpack_sm100_scales_ref,
)

FP8 = torch.float8_e4m3fn


def naive_pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s, clamped to the normal float32 exponents [2**-126, 2**127]."""
    mant, exp = torch.frexp(s)
    up = torch.where(mant == 0.5, s, torch.ldexp(torch.ones_like(s), exp))
    return up.clamp(2.0**-126, 2.0**127)


def naive_quant(
    x: torch.Tensor, ue8m0: bool, bn: int = 128, bk: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe written the plain way: pad, view, amax, divide, cast (2-D ``x``)."""
    m, n = x.shape
    pm, pn = -(-m // bn) * bn, -(-n // bk) * bk
    padded = torch.zeros(pm, pn, dtype=torch.float32)
    padded[:m, :n] = x.float()
    view = padded.view(pm // bn, bn, pn // bk, bk)
    amax = view.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4)
    sf = amax / 448.0
    if ue8m0:
        sf = naive_pow2_ceil(sf)
    q = (view * (1.0 / sf)).clamp(-448.0, 448.0).to(FP8)
    return q.view(pm, pn)[:m, :n].contiguous(), sf.view(pm // bn, pn // bk)


def assert_same_bytes(q: torch.Tensor, s: torch.Tensor, q_ref: torch.Tensor, s_ref: torch.Tensor) -> None:
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    qb, qrb = q.cpu().view(torch.uint8), q_ref.cpu().view(torch.uint8)
    diff = (qb != qrb).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} q bytes differ, first at {diff[0].tolist()}"
    assert torch.equal(s.cpu().view(torch.int32), s_ref.cpu().view(torch.int32)), "scale bits differ"


def weights(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal weights with a per-row spread of four orders of magnitude (rows of tiny and huge blocks)."""
    rows = torch.exp(torch.empty(*shape[:-1], 1).uniform_(-6.0, 3.0, generator=gen))
    return (torch.randn(shape, generator=gen) * rows).to(dtype)


def e4m3_grid() -> torch.Tensor:
    """float32 values at, between and just around every finite e4m3 value (both signs), including
    round-half-even ties in the subnormal range and ties whose rounding carries into the next binade."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(FP8).float()  # 0 .. 448, ascending
    mids = (codes[1:] + codes[:-1]) / 2
    nudged = torch.cat([mids * (1 + 2.0**-7), mids * (1 - 2.0**-7)])
    pos = torch.cat([codes, mids, nudged])
    return torch.cat([pos, -pos])


def adversarial(dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[256, 640]: block (0,0) zeros with -0.0; (0,1) ±448·k and the dtype's max; (0,2) subnormals and
    values under the 1e-4 floor; (0,3) huge and tiny mixed; (0,4) the e4m3 tie grid at scale 1;
    (1,*) random with a max-magnitude row."""
    w = torch.randn(256, 640, generator=gen, dtype=torch.float32)
    w[:128, :128] = 0.0
    w[:128:2, :128:3] = -0.0
    big = torch.finfo(dtype).max
    w[:128, 128:256] = torch.randint(-3, 4, (128, 128), generator=gen).float() * 448.0
    w[5, 130], w[77, 255] = big, -big
    tiny = torch.finfo(dtype).smallest_normal
    w[:128, 256:384] = torch.randn(128, 128, generator=gen) * tiny * 0.3
    w[3, 300] = 9e-5
    w[:128, 384:512] = torch.randn(128, 128, generator=gen) * 1e-3
    w[:128:7, 384:512] = 6e4 if dtype == torch.float16 else 3e5
    grid = e4m3_grid()
    blk = torch.zeros(128 * 128)
    blk[: grid.numel()] = grid
    w[:128, 512:640] = blk[torch.randperm(blk.numel(), generator=gen)].view(128, 128)
    w[200, :] *= 1e4 if dtype != torch.float16 else 10.0
    return w.to(dtype)


# -- reference against the naive recipe -------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 128), (192, 256), (3, 130), (67, 1000), (576, 7168)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_ref_matches_naive(shape: tuple[int, int], ue8m0: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w = weights(shape, dtype, gen)
        q, s = block_quant_ref(w, ue8m0=ue8m0)
        assert q.is_contiguous() and s.is_contiguous()
        assert_same_bytes(q, s, *naive_quant(w, ue8m0))


@pytest.mark.parametrize("shape", [(3, 256, 384), (2, 130, 200)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_ref_stacked_is_per_expert(shape: tuple[int, int, int], ue8m0: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = weights(shape, torch.bfloat16, gen)
    q, s = block_quant_ref(w, ue8m0=ue8m0)
    assert s.shape == (shape[0], -(-shape[1] // 128), -(-shape[2] // 128))
    for e in range(shape[0]):
        assert_same_bytes(q[e], s[e], *naive_quant(w[e], ue8m0))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_ref_per_token(ue8m0: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for shape in [(1, 128), (67, 300), (5, 7168)]:
        w = weights(shape, torch.bfloat16, gen)
        q, s = block_quant_ref(w, ue8m0=ue8m0, block=(1, 128))
        assert s.shape == (shape[0], -(-shape[1] // 128))
        assert_same_bytes(q, s, *naive_quant(w, ue8m0, bn=1, bk=128))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_ref_adversarial_blocks(dtype: torch.dtype, ue8m0: bool, seed: int) -> None:
    w = adversarial(dtype, torch.Generator().manual_seed(seed))
    q, s = block_quant_ref(w, ue8m0=ue8m0)
    assert_same_bytes(q, s, *naive_quant(w, ue8m0))
    assert s[0, 0] == (2.0**-22 if ue8m0 else torch.tensor(1e-4) / 448.0)  # zero block: the 1e-4 floor
    assert (q[:128, :128].view(torch.uint8) & 0x7F).eq(0).all()  # ±0 only
    top = q[:128, 128:256].float().abs().max()
    assert top == 448.0 if not ue8m0 else 224.0 < top <= 448.0  # the dtype's max maps to the e4m3 max
    assert s[0, 4] == 1.0  # the tie grid is quantized at scale 1, so q must equal e4m3(w) there
    assert torch.equal(q[:128, 512:640].view(torch.uint8), w[:128, 512:640].float().to(FP8).view(torch.uint8))


def test_ref_any_float_dtype_and_layout(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = weights((130, 260), torch.float64, gen)
    assert_same_bytes(*block_quant_ref(w), *naive_quant(w.float(), False))
    wt = weights((260, 130), torch.bfloat16, gen).t()  # non-contiguous input
    assert_same_bytes(*block_quant_ref(wt, ue8m0=True), *naive_quant(wt, True))


def test_ref_empty() -> None:
    q, s = block_quant_ref(torch.empty(0, 256, dtype=torch.bfloat16))
    assert q.shape == (0, 256) and s.shape == (0, 2)


# -- UE8M0 bit rounding ------------------------------------------------------------------------------
def frexp_pow2_ceil(v: float) -> float:
    if v == 0.0:
        return 2.0**-126
    m, e = math.frexp(v)
    up = v if m == 0.5 else math.ldexp(1.0, e)
    return min(max(up, 2.0**-126), 2.0**127)


def test_ceil_to_ue8m0_bits() -> None:
    def f32(v: float) -> float:
        return float(torch.tensor(v, dtype=torch.float32))

    values = [
        1.0,
        2.0,
        0.5,
        2.0**-126,
        2.0**127,
        2.0**-20,
        f32(1.0000001),
        f32(0.99999994),
        3.0,
        0.75,
        f32(448.0 / 448.0),
        f32(0.017 / 448.0),
        1e-40,
        2.0**-149,
        2.0**-130,
        0.0,
        f32(3.4e38),
        f32(1e-4 / 448.0),
    ]
    s = torch.tensor(values, dtype=torch.float32)
    got = ceil_to_ue8m0(s)
    want = torch.tensor([frexp_pow2_ceil(float(v)) for v in s], dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), list(zip(values, got.tolist()))
    assert got[6] == 2.0 and got[0] == 1.0 and got[12] == 2.0**-126  # 1.0000001 -> 2, 1e-40 -> exponent 1
    assert ((got.view(torch.int32) & 0x7FFFFF) == 0).all()


# -- non-finite input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_ref_nonfinite_names_block(bad: float, ue8m0: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = weights((3, 260, 300), torch.bfloat16, gen)
    w[2, 200, 290] = bad
    w[2, 259, 0] = bad  # later in order: the first bad block is reported
    with pytest.raises(InputError) as err:
        block_quant_ref(w, ue8m0=ue8m0, name="model.layers.3.mlp.experts.w13")
    msg = str(err.value)
    assert "model.layers.3.mlp.experts.w13" in msg and "expert 2" in msg
    assert "row block 1, column block 2" in msg and ("NaN" in msg) == (bad != bad)
    w2 = weights((130, 260), torch.float32, gen)
    w2[129, 3] = bad
    with pytest.raises(InputError, match=r"block \(row block 1, column block 0\)"):
        block_quant_ref(w2, ue8m0=ue8m0)


# -- Triton (interpreter on CPU) against the reference ----------------------------------------------------
TRITON_CASES = [
    ((1, 128), torch.bfloat16, False),
    ((1, 128), torch.float32, True),
    ((192, 256), torch.bfloat16, True),
    ((192, 256), torch.float16, False),
    ((3, 130), torch.float32, False),
    ((3, 130), torch.bfloat16, True),
    ((3, 256, 384), torch.bfloat16, True),
    ((2, 130, 200), torch.float32, False),
]


@pytest.mark.parametrize("shape,dtype,ue8m0", TRITON_CASES)
def test_triton_matches_ref(shape: tuple[int, ...], dtype: torch.dtype, ue8m0: bool, seed: int) -> None:
    w = weights(shape, dtype, torch.Generator().manual_seed(seed))
    assert_same_bytes(*block_quant(w, ue8m0=ue8m0), *block_quant_ref(w, ue8m0=ue8m0))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_triton_adversarial_into_poisoned_outputs(ue8m0: bool, seed: int) -> None:
    w = adversarial(torch.bfloat16, torch.Generator().manual_seed(seed))[:, 128:]
    w = w.contiguous()
    out_q = torch.full(w.shape, 0xFF, dtype=torch.uint8).view(FP8)
    out_s = torch.full((2, 4), float("nan"))
    q, s = block_quant(w, ue8m0=ue8m0, out_q=out_q, out_s=out_s)
    assert q is out_q and s is out_s
    assert_same_bytes(q, s, *block_quant_ref(w, ue8m0=ue8m0))


@pytest.mark.parametrize("mn_major", [False, True])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_triton_token_quant(ue8m0: bool, mn_major: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for shape, dtype in [((3, 130), torch.bfloat16), ((67, 256), torch.float32)]:
        x = weights(shape, dtype, gen)
        q, s = token_quant(x, ue8m0=ue8m0, mn_major=mn_major)
        # MN-major: the same [M, K/128] values over a transposed buffer (DeepGEMM's activation-scale layout)
        assert s.stride() == ((1, shape[0]) if mn_major else (s.shape[1], 1))
        assert_same_bytes(q, s.contiguous(), *block_quant_ref(x, ue8m0=ue8m0, block=(1, 128)))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_triton_nonfinite_names_block(bad: float, seed: int) -> None:
    w = weights((2, 130, 256), torch.bfloat16, torch.Generator().manual_seed(seed))
    w[1, 129, 200] = bad
    with pytest.raises(InputError) as err:
        block_quant(w, ue8m0=True, name="experts.w2")
    ref_msg = None
    try:
        block_quant_ref(w, ue8m0=True, name="experts.w2")
    except InputError as e:
        ref_msg = str(e)
    assert str(err.value) == ref_msg and "expert 1" in ref_msg and "row block 1, column block 1" in ref_msg
    x = weights((5, 200), torch.float32, torch.Generator().manual_seed(seed))
    x[3, 150] = bad
    with pytest.raises(InputError, match=r"row block 3, column block 1"):
        token_quant(x)


# -- dequantization ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ue8m0", [False, True])
def test_dequant_error_bound(ue8m0: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Values near float32's max are left out: q·s of such a block can round past it to inf.
    for w in (
        weights((3, 200, 300), torch.bfloat16, gen),
        adversarial(torch.float32, gen).clamp(-1e30, 1e30),
    ):
        q, s = block_quant_ref(w, ue8m0=ue8m0)
        deq = dequant_ref(q, s)
        assert deq.dtype == torch.float32 and deq.shape == w.shape
        s_full = s.double().repeat_interleave(128, -2)[..., : w.shape[-2], :]
        s_full = s_full.repeat_interleave(128, -1)[..., : w.shape[-1]]
        y = w.double() / s_full
        # e4m3 keeps 3 mantissa bits: half an ulp is |y|·2^-4 for normals, 2^-10 below 2^-6.
        bound = s_full * torch.maximum(y.abs() * 2.0**-4, torch.full_like(y, 2.0**-10)) * (1 + 2.0**-20)
        err = (deq.double() - w.double()).abs()
        assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
        assert torch.equal(dequant_ref(q, s, dtype=torch.bfloat16), deq.bfloat16())


# -- SM100 scale layout -------------------------------------------------------------------------------------
def expected_word(s: torch.Tensor, row: int, p: int) -> int:
    """int32 word p of weight row ``row`` built from math.frexp exponents, byte j = K block 4p + j."""
    word = 0
    for j in range(4):
        kb = 4 * p + j
        if kb < s.shape[-1]:
            _, e = math.frexp(float(s[row // 128, kb]))
            word |= (e - 1 + 127) << (8 * j)
    return word - (1 << 32) if word >= 1 << 31 else word


@pytest.mark.parametrize("lead,mn,k", [((), 256, 7168), ((2,), 130, 640), ((3,), 300, 384), ((), 1, 128)])
def test_sm100_pack_layout(lead: tuple[int, ...], mn: int, k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    sk, pk, mn4 = -(-k // 128), -(-k // 512), -(-mn // 4) * 4
    s = ceil_to_ue8m0(
        torch.rand(*lead, -(-mn // 128), sk, generator=gen) * 10.0 ** torch.randint(-8, 3, (1,)).item()
    )
    packed = pack_sm100_scales_ref(s, mn)
    assert packed.dtype == torch.int32 and packed.shape == (*lead, mn, pk)
    assert packed.stride()[-2:] == (1, mn4) and (not lead or packed.stride(0) == pk * mn4)
    flat_s = s.reshape(-1, *s.shape[-2:])
    flat_p = packed.reshape(-1, mn, pk)
    for g in range(flat_s.shape[0]):
        got = flat_p[g].tolist()
        for row in range(mn):
            for p in range(pk):
                assert got[row][p] == expected_word(flat_s[g], row, p), (g, row, p)
    stored = sm100_scales_to_storage(packed)
    assert stored.shape == (*lead, pk, mn4) and stored.is_contiguous()
    assert stored.data_ptr() == packed.data_ptr()  # the buffer behind the view, no copy
    assert (stored[..., mn:] == 0).all()
    again = sm100_scales_from_storage(stored.clone(), mn)
    assert torch.equal(again, packed) and again.stride() == packed.stride()
    back = unpack_sm100_scales_ref(packed, mn, k)
    assert torch.equal(back.view(torch.int32), s.view(torch.int32))
    assert torch.equal(unpack_sm100_scales_ref(packed.contiguous(), mn, k), back)


def test_sm100_rejects_bad_scales(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    s = ceil_to_ue8m0(torch.rand(2, 3, generator=gen))
    for bad in (1.5, 0.0, -0.5, float("inf"), 2.0**-130):
        t = s.clone()
        t[1, 2] = bad
        with pytest.raises(InputError, match="power"):
            pack_sm100_scales_ref(t, 256)
    with pytest.raises(InputError):
        pack_sm100_scales_ref(s, 100)  # 3 row blocks do not cover 100 rows
    packed = pack_sm100_scales_ref(s, 256).clone()
    packed[200, 0] += 1  # one row of block 1 disagrees with its block
    with pytest.raises(InputError, match="rows of one 128-row block"):
        unpack_sm100_scales_ref(packed, 256, 384)
    padded = pack_sm100_scales_ref(s, 256).clone()
    padded[:, 0] |= 1 << 24  # byte 3 lies past the 3 K blocks
    with pytest.raises(InputError, match="padding"):
        unpack_sm100_scales_ref(padded, 256, 384)


# -- GPU: real sizes, native conversion --------------------------------------------------------------------
def gpu_weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = torch.exp(torch.empty(*shape[:-1], 1, device="cuda").uniform_(-6.0, 3.0, generator=gen))
    w = torch.randn(shape, device="cuda", generator=gen) * rows
    grid = e4m3_grid()
    blk = torch.zeros(128 * 128)
    blk[: grid.numel()] = grid
    w.view(-1, shape[-1])[:128, :128] = blk.view(128, 128).cuda()  # a tie-grid block at scale 1
    return w.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(576, 7168), (8, 4096, 7168)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_gpu_triton_matches_cpu_ref(
    shape: tuple[int, ...], dtype: torch.dtype, ue8m0: bool, seed: int
) -> None:
    w = gpu_weights(shape, dtype, seed)
    q_cpu, s_cpu = block_quant_ref(w.cpu(), ue8m0=ue8m0)
    q, s = block_quant(w, ue8m0=ue8m0)
    assert q.is_cuda and s.is_cuda
    assert_same_bytes(q, s, q_cpu, s_cpu)
    q_exact, s_exact = block_quant(w, ue8m0=ue8m0, _exact_cvt=True)  # integer rounding path on the GPU
    assert_same_bytes(q_exact, s_exact, q_cpu, s_cpu)
    del q, s, q_exact, s_exact
    assert_same_bytes(*block_quant_ref(w, ue8m0=ue8m0), q_cpu, s_cpu)  # torch reference on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("ue8m0", [False, True])
def test_gpu_token_quant_matches_cpu_ref(ue8m0: bool, seed: int) -> None:
    x = gpu_weights((4096, 7168), torch.bfloat16, seed)
    assert_same_bytes(*token_quant(x, ue8m0=ue8m0), *block_quant_ref(x.cpu(), ue8m0=ue8m0, block=(1, 128)))


@pytest.mark.gpu
def test_gpu_nonfinite_and_out_params(seed: int) -> None:
    w = gpu_weights((3, 256, 7168), torch.bfloat16, seed)
    out_q = torch.full(w.shape, 0xFF, dtype=torch.uint8, device="cuda").view(FP8)
    out_s = torch.full((3, 2, 56), float("nan"), device="cuda")
    block_quant(w, out_q=out_q, out_s=out_s)
    assert_same_bytes(out_q, out_s, *block_quant_ref(w.cpu()))
    w[1, 130, 7000] = float("nan")
    with pytest.raises(InputError, match=r"expert 1, block \(row block 1, column block 54\)"):
        block_quant(w, name="w13")
