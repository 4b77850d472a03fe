"""DeepSeek's FP4 → FP8 cast: the torch reference against an implementation of DeepSeek's cast written
here from its published description, the lossless theorem of docs/formats.md element by element, the
decoder against transformers' own FP4 dequantizer, the Triton kernel against the reference byte for byte
(interpreter on CPU, V4-Flash's expert shapes on GPU), and every input outside the contract refused."""

from __future__ import annotations

import pytest
import torch
from fp4_facts import deepseek_cast

from moetool.errors import InputError
from moetool.kernels.fp4_cast import DEFAULT_CONFIG, Config, fp4_cast
from moetool.kernels.fp4_cast_ref import (
    CAST_TABLE_D,
    cast_octets,
    cast_tables,
    dequant_fp4_ref,
    dequant_fp8_e8m0_ref,
    e8m0_to_float,
    fp4_cast_ref,
    unpack_e2m1,
)
from moetool.testing.release_formats import adversarial_fp4

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu


def trailing_zeros(m: int) -> int:
    return (m & -m).bit_length() - 1


def exact_by_theorem(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bool ``[N, K]``: the lossless rule of docs/formats.md per element — ``v = 0`` or
    ``E - b <= 14 + tz(2|v|)``, with E the block's largest FP4 scale byte and E >= 6."""
    codes = (
        torch.stack([packed.view(torch.uint8) & 0xF, packed.view(torch.uint8) >> 4], -1).flatten(-2).long()
    )
    twice = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12] * 2)[codes]  # 2|v|
    tz = torch.tensor([trailing_zeros(m) if m else 99 for m in [0, 1, 2, 3, 4, 6, 8, 12] * 2])[codes]
    b = scale.view(torch.uint8).long().repeat_interleave(32, dim=-1)  # [N, K]
    n, k = b.shape
    e_max = b.view(n // 128, 128, k // 128, 128).amax(dim=(1, 3), keepdim=True).expand(-1, 128, -1, 128)
    e_max = e_max.reshape(n, k)
    assert bool((e_max >= 6).all()), "the rule is stated for blocks whose FP8 scale is representable"
    return (twice == 0) | (e_max - b <= 14 + tz)


def fp4(
    shape: tuple[int, ...], span: int, gen: torch.Generator, center: int = 120
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed codes (every byte value) for ``[..., N, K]`` and E8M0 scales whose bytes spread over
    ``span + 1`` binades around ``center``."""
    *lead, n, k = shape
    packed = torch.randint(-128, 128, (*lead, n, k // 2), dtype=torch.int8, generator=gen)
    lo = center - span // 2
    scale = torch.randint(lo, lo + span + 1, (*lead, n, k // 32), dtype=torch.int32, generator=gen)
    return packed, scale.to(torch.uint8).view(E8M0)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))
    )


# -- decoding ---------------------------------------------------------------------------------------
def test_low_nibble_holds_the_even_column() -> None:
    packed = torch.tensor([[0x72, 0x0F, 0x8A]], dtype=torch.uint8)  # (2, 7), (15, 0), (10, 8)
    assert unpack_e2m1(packed).tolist() == [[1.0, 6.0, -6.0, 0.0, -1.0, -0.0]]
    assert torch.signbit(unpack_e2m1(packed))[0, 5]  # code 8 decodes to -0.0


def test_e8m0_decoding_is_exact_for_every_byte() -> None:
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for dtype in (torch.float32, torch.float64):
        got = e8m0_to_float(b.view(E8M0), dtype)
        assert torch.isnan(got[255]) and not torch.isnan(got[:255]).any()
        want = torch.tensor([2.0 ** (i - 127) for i in range(255)], dtype=torch.float64)
        assert torch.equal(got[:255].double(), want)
        assert torch.equal(got[:255], b[:255].view(E8M0).to(dtype))  # torch's own conversion agrees


def test_dequant_matches_transformers(seed: int) -> None:
    """transformers 5.24 decodes V4's FP4 experts in ``Fp8Dequantize``; ours must give the same floats."""
    fg = pytest.importorskip("transformers.integrations.finegrained_fp8")
    gen = torch.Generator().manual_seed(seed)
    packed, scale = fp4((256, 512), 30, gen)
    theirs = fg.Fp8Dequantize(None)._dequantize_one(packed, scale, output_dtype=torch.float32)
    ours = dequant_fp4_ref(packed, scale)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))  # -0.0 included


# -- the reference against DeepSeek's cast -------------------------------------------------------------
@pytest.mark.parametrize("span", [0, 3, 14, 15, 17, 40])
@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (384, 256)])
def test_ref_equals_deepseek_cast(shape: tuple[int, int], span: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + span)
    packed, scale = fp4(shape, span, gen)
    q, s, changed = fp4_cast_ref(packed, scale)
    q_ds, s_ds = deepseek_cast(packed, scale)
    assert same_bytes(q, q_ds) and same_bytes(s, s_ds)
    assert q.is_contiguous() and s.shape == changed.shape == (shape[0] // 128, shape[1] // 128)
    # the count is the number of elements whose dequantized value moved
    moved = dequant_fp4_ref(packed, scale, torch.float64) != dequant_fp8_e8m0_ref(q, s, torch.float64)
    assert int(changed.sum()) == int(moved.sum())
    if span <= 14:
        assert (changed == 0).all()  # within 14 binades every block is exact
    if span == 40:
        assert (changed > 0).all()


def test_ref_stacked_is_per_expert(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    packed, scale = fp4((3, 256, 256), 16, gen)
    q, s, changed = fp4_cast_ref(packed, scale)
    for e in range(3):
        qe, se, ce = fp4_cast_ref(packed[e], scale[e])
        assert same_bytes(q[e], qe) and same_bytes(s[e], se) and torch.equal(changed[e], ce)


def test_code_8_is_plus_zero_and_other_zeros_keep_their_sign() -> None:
    packed = torch.full((128, 64), 0x88, dtype=torch.uint8).view(torch.int8)  # -0.0 everywhere
    scale = torch.full((128, 4), 127, dtype=torch.uint8).view(E8M0)
    # the block's FP8 scale becomes 2**34: every other scale lies 40 binades below the largest
    scale.view(torch.uint8)[0, 0] = 127 + 40
    packed.view(torch.uint8)[5, 0] = 0x99  # columns 0, 1: -0.5, -0.5 under scale 1, flushed to -0
    packed.view(torch.uint8)[5, 1] = 0x09  # columns 2, 3: -0.5 (flushed to -0), +0.0
    q, s, changed = fp4_cast_ref(packed, scale)
    qb = q.view(torch.uint8)
    assert int(s.view(torch.uint8)) == 127 + 40 - 6
    assert qb[0, :32].eq(0).all() and qb[6:, :].eq(0).all()  # code 8 -> byte 0x00
    assert qb[5, 0] == 0x80 and qb[5, 1] == 0x80 and qb[5, 2] == 0x80 and qb[5, 3] == 0x00  # -0.5 -> -0
    assert int(changed) == 3  # three -0.5 values flushed to zero


def test_lossless_theorem_element_by_element(seed: int) -> None:
    """Every (code, binade distance) pair: the element survives exactly when the rule says so."""
    gen = torch.Generator().manual_seed(seed)
    for span in (12, 14, 15, 16, 17, 18, 25):
        packed, scale = fp4((512, 1024), span, gen)
        q, s, changed = fp4_cast_ref(packed, scale)
        exact = dequant_fp4_ref(packed, scale, torch.float64) == dequant_fp8_e8m0_ref(q, s, torch.float64)
        rule = exact_by_theorem(packed, scale)
        assert torch.equal(exact, rule), f"span {span}: {int((exact != rule).sum())} elements disagree"
        assert int(changed.sum()) == int((~rule).sum())
        if span <= 14:
            assert int(changed.sum()) == 0


def test_block_whose_scale_underflows_e8m0_is_counted() -> None:
    """Largest FP4 scale byte below 6: DeepSeek's FP8 scale 2**(E-133) has no E8M0 byte and is stored
    as byte 0 (2**-127), so nonzero values do not come back; an all-zero block does."""
    packed = torch.zeros(128, 64, dtype=torch.int8)
    scale = torch.full((128, 4), 2, dtype=torch.uint8).view(E8M0)
    q, s, changed = fp4_cast_ref(packed, scale)
    assert int(s.view(torch.uint8)) == 0 and int(changed) == 0
    packed.view(torch.uint8)[0, 0] = 0x02  # 1.0 at column 0
    q, s, changed = fp4_cast_ref(packed, scale)
    q_ds, s_ds = deepseek_cast(packed, scale)
    assert same_bytes(q, q_ds) and same_bytes(s, s_ds) and int(changed) == 1


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("packed", "scale", "message"),
    [
        (torch.zeros(128, 96, dtype=torch.int8), torch.zeros(128, 6, dtype=torch.uint8), "multiple of 128"),
        (torch.zeros(100, 64, dtype=torch.int8), torch.zeros(100, 4, dtype=torch.uint8), "multiple of 128"),
        (torch.zeros(128, 64, dtype=torch.int8), torch.zeros(128, 8, dtype=torch.uint8), "scale grid"),
        (torch.zeros(128, 64, dtype=torch.int8), torch.zeros(1, 1, dtype=torch.uint8), "scale grid"),
        (torch.zeros(128, 64, dtype=torch.int8), torch.ones(128, 4, dtype=torch.float32), "E8M0"),
        (torch.zeros(128, 64, dtype=torch.int8), torch.ones(128, 4, dtype=torch.bfloat16), "E8M0"),
        (torch.zeros(128, 128, dtype=torch.bfloat16), torch.zeros(128, 8, dtype=torch.uint8), "int8"),
        (torch.zeros(2, 2, 128, 64, dtype=torch.int8), torch.zeros(2, 2, 128, 4, dtype=torch.uint8), "int8"),
    ],
)
def test_inputs_outside_the_contract_are_refused(
    packed: torch.Tensor, scale: torch.Tensor, message: str
) -> None:
    for cast in (fp4_cast_ref, fp4_cast):
        with pytest.raises(InputError, match=message) as err:
            cast(packed, scale, name="layers.3.ffn.experts.7.w1.weight")
        assert "layers.3.ffn.experts.7.w1.weight" in str(err.value)


def test_nan_scale_is_refused_naming_the_row() -> None:
    packed = torch.zeros(2, 256, 128, dtype=torch.int8)
    scale = torch.full((2, 256, 8), 120, dtype=torch.uint8)
    scale[1, 200, 5] = 255
    for cast in (fp4_cast_ref, fp4_cast):
        with pytest.raises(InputError, match=r"expert 1, row 200, columns 160\.\.191") as err:
            cast(packed, scale.view(E8M0), name="w")
        assert "tensor w" in str(err.value)


# -- Triton kernel against the reference --------------------------------------------------------------
# one launch of each kind: the column-block loop (a partial last group of blocks with 3), the same
# prefetching (4 and 2 cut to a divisor of 5 column blocks), the persistent grid (2 or 3 programs on CPU,
# each walking many blocks) and the pipelined one; with the scale max/min from [128, 4] or [128, 32],
# and lean (32-bit offsets, the column-block count compiled in: 3, 2 and 5 here)
INTERPRETER_CONFIGS = [
    DEFAULT_CONFIG,
    Config("loop", 4, 1),
    Config("loop", 4, 3, scale4=True),
    Config("loop", 4, 3, lean=1),
    Config("prefetch", 4, 4),
    Config("prefetch", 2, 2, scale4=True, lean=1),
    Config("persistent", 4, 2),
    Config("persistent", 8, 3, scale4=True, lean=1),
    Config("pipelined", 4, 2, stages=3, lean=1),
    Config("loop", 4, 2, lean=3),
    Config("persistent", 4, 2, lean=2),
]


@pytest.mark.parametrize("config", INTERPRETER_CONFIGS, ids=str)
def test_kernel_matches_ref_in_interpreter(config: Config, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + config.blocks)
    for shape, span in (((2, 256, 384), 18), ((128, 256), 10), ((1, 128, 640), 40)):
        packed, scale = fp4(shape, span, gen)
        scale.view(torch.uint8).view(-1)[:7] = torch.tensor([0, 1, 5, 254, 250, 127, 3], dtype=torch.uint8)
        want = fp4_cast_ref(packed, scale)
        got = fp4_cast(packed, scale, _config=config)
        assert same_bytes(got[0], want[0]) and same_bytes(got[1], want[1])
        assert torch.equal(got[2], want[2])


def test_unknown_launch_is_refused() -> None:
    packed, scale = fp4((128, 128), 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unknown fp4_cast variant 'tiled'"):
        fp4_cast(packed, scale, _config=Config("tiled", 4, 1))


def test_kernel_accepts_uint8_views(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    packed, scale = fp4((128, 256), 20, gen)
    want = fp4_cast_ref(packed, scale)
    got = fp4_cast(packed.view(torch.uint8), scale.view(torch.uint8))
    assert same_bytes(got[0], want[0]) and same_bytes(got[1], want[1]) and torch.equal(got[2], want[2])


def test_magnitude_tables_and_sign_give_the_reference_bytes() -> None:
    """The kernel's premise: at every distance d, a code's FP8 byte is its magnitude's byte from
    ``cast_octets`` with bit 7 set for a nonzero negative code — the reference's byte-pair table."""
    pairs = cast_tables()[0].view(torch.uint8).view(CAST_TABLE_D + 1, 256, 2).long()
    octets = cast_octets().view(torch.uint8).view(CAST_TABLE_D + 1, 8).long()
    byte = torch.arange(256)
    for half, code in enumerate((byte & 0xF, byte >> 4)):
        negative = ((code & 8) != 0) & ((code & 7) != 0)
        want = octets[:, code & 7] | (negative.long() * 0x80)
        assert torch.equal(pairs[..., half], want)


def test_kernel_matches_ref_on_adversarial_blocks(seed: int) -> None:
    """Every block a different case (spans 0..254, E < 6, zero rows, code 8); both the lossless shortcut
    and the counted blocks occur, and the kernel's bytes and counts equal the reference's."""
    packed, scale = adversarial_fp4((3, 384, 512), seed=seed)
    want = fp4_cast_ref(packed, scale)
    assert bool((want[2] == 0).any()) and bool((want[2] > 0).any())
    for config in (
        DEFAULT_CONFIG,
        Config("loop", 8, 3),
        Config("prefetch", 4, 2),
        Config("persistent", 4, 3),
    ):
        got = fp4_cast(packed, scale, _config=config)
        assert same_bytes(got[0], want[0]) and same_bytes(got[1], want[1])
        assert torch.equal(got[2], want[2])


def test_adversarial_input_reaches_every_case(seed: int) -> None:
    packed, scale = adversarial_fp4((2, 1024, 1024), seed=seed)
    b = scale.view(torch.uint8).long().view(2, 8, 128, 8, 4)
    top, low = b.amax(dim=(2, 4)), b.amin(dim=(2, 4))
    assert bool((top < 6).any()) and bool((top > 200).any())
    spans = set((top - low).flatten().tolist())
    assert {0, 14, 15, 21}.issubset(spans) and max(spans) > 40
    u8 = packed.view(torch.uint8)
    assert bool(u8.eq(0x88).all(dim=-1).any()) and bool(u8.eq(0x80).all(dim=-1).any())
    assert len(torch.unique(u8)) == 256


GPU_CONFIGS = [
    Config("loop", 4, 4),
    Config("loop", 8, 1),
    Config("prefetch", 4, 4),
    Config("persistent", 8, 2),
    Config("pipelined", 4, 1, stages=2),
    Config("loop", 4, 8, lean=1),
    Config("persistent", 4, 3, lean=1),
    Config("loop", 4, 4, scale4=True, lean=3),
    Config("loop", 8, 2, lean=3),
    Config("prefetch", 8, 8, lean=3),
    Config("persistent", 8, 2, scale4=True, lean=3),
    Config("pipelined", 8, 1, stages=3, lean=3),
    Config("loop", 4, 4, lean=2),
    Config("prefetch", 8, 4, lean=2),
    Config("persistent", 8, 2, lean=2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["w13", "w2"])
def test_gpu_kernel_matches_cpu_ref_at_v4_flash_shapes(which: str, seed: int) -> None:
    """V4-Flash's routed experts (hidden 4096, moe_intermediate_size 2048, transformers' default config):
    gate/up [2048, 4096] or down [4096, 2048]; GPU bytes and counts equal the CPU reference's on
    adversarial blocks (every span, E < 6, zero rows, code 8) for the launcher's default, every launch
    kind of launch the benchmark times, and the permute in integer operations; then on 32 experts of
    realistic scales (12 binades, one block in 64 lossy) against the reference run on the GPU."""
    from transformers import DeepseekV4Config

    cfg = DeepseekV4Config()
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    n, k = (i, h) if which == "w13" else (h, i)
    packed, scale = adversarial_fp4((4, n, k), seed=seed)
    want = fp4_cast_ref(packed, scale)
    pc, sc = packed.cuda(), scale.cuda()
    for asm, config in [(None, DEFAULT_CONFIG), (False, DEFAULT_CONFIG)] + [(True, c) for c in GPU_CONFIGS]:
        got = fp4_cast(pc, sc, _asm=asm, _config=config)
        what = f"asm={asm} {config}"
        assert same_bytes(got[0], want[0]), what
        assert same_bytes(got[1], want[1]) and torch.equal(got[2].cpu(), want[2]), what

    gen = torch.Generator().manual_seed(seed)
    packed, scale = fp4((32, n, k), 12, gen)
    scale.view(torch.uint8)[::64, 0, 0] -= 18
    pc, sc = packed.cuda(), scale.cuda()
    got, ref_gpu = fp4_cast(pc, sc), fp4_cast_ref(pc, sc)
    assert same_bytes(got[0], ref_gpu[0]) and same_bytes(got[1], ref_gpu[1])
    assert torch.equal(got[2], ref_gpu[2]) and int(got[2].sum()) > 0
    for e in (0, 31):
        one = fp4_cast_ref(packed[e], scale[e])
        assert same_bytes(got[0][e], one[0]) and torch.equal(got[2][e].cpu(), one[2])


@pytest.mark.gpu
def test_gpu_nan_scale_is_refused_naming_the_row() -> None:
    packed = torch.zeros(2, 256, 128, dtype=torch.int8, device="cuda")
    scale = torch.full((2, 256, 8), 120, dtype=torch.uint8, device="cuda")
    scale[1, 200, 5] = 255
    with pytest.raises(InputError, match=r"expert 1, row 200, columns 160\.\.191"):
        fp4_cast(packed, scale.view(E8M0), name="w")
