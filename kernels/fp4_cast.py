"""DeepSeek's FP4 → FP8 cast in Triton, byte-identical to :func:`moetool.kernels.fp4_cast_ref.fp4_cast_ref`
(its docstring is the specification).

A 128x128 block is read as ``[128 rows, 32 halves]``, each 16-bit half of the packed codes holding 4
codes under one FP4 scale and becoming one 32-bit word of 4 FP8 bytes, so loads, arithmetic and stores keep one layout (no shuffle
through shared memory). An element's FP8 byte depends only on its code and the distance ``d = E - b``
of its scale (``fp4_cast_ref``), and a nonzero negative code's byte is its magnitude's with bit 7 set: so
a word is one byte permute (PTX ``prmt``) of the 8-byte table of the 8 magnitudes at its ``d``
(:func:`~moetool.kernels.fp4_cast_ref.cast_octets`: the recipe's float32 multiply and e4m3 conversion
evaluated once per ``d``), selected by the codes' magnitude bits, and one more permute for the signs.
No value goes through a float conversion on the device. In Triton's interpreter the permute runs as the
same byte selection written in integer operations (``ASM=False``, which also runs on CUDA).

Launches (:class:`Config`): a program per (expert, row block, ``blocks`` consecutive column blocks),
casting them in turn or issuing the next block's loads before this block's stores; or a persistent grid
of ``blocks`` programs a multiprocessor walking the blocks, prefetching one ahead or left to Triton's
software pipeliner. Each gives the same bytes; ``DEFAULT_CONFIG`` is the fastest measured
(``scripts/bench_fp4_cast.py``, ``docs/benchmarks.md``).

The changed-element count is 0 without looking at the values when the block's scales span at most 14
binades and its largest byte is at least 6 (``docs/formats.md``); any other block sums the reference's
per-byte counts (``cast_tables``) over its packed bytes.

A NaN FP4 scale (E8M0 byte 255) makes its block's FP8 scale byte 255; the launcher looks for it after
the launch and raises the reference's :class:`moetool.errors.InputError` naming the row.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moetool.kernels._device import interpreting, require, require_launchable
from moetool.kernels.fp4_cast_ref import (
    CAST_TABLE_D,
    E8M0_NAN,
    FP8_BLOCK,
    MAX_OFFSET_BITS,
    cast_octets,
    cast_tables,
    check_fp4_scales,
    check_fp4_shapes,
    e8m0_bytes,
)

_MAX_OFFSET_BITS = tl.constexpr(MAX_OFFSET_BITS)
_TABLE_D = tl.constexpr(CAST_TABLE_D)
# A block whose FP4 scale bytes span at most this many binades, with a largest byte >= 6, is cast
# exactly (docs/formats.md; the reference's tables first lose at d = 15).
_LOSSLESS_SPAN = tl.constexpr(14)


@triton.jit
def _prmt(a, b, sel, ASM: tl.constexpr):
    """PTX ``prmt.b32`` (generic mode) on uint32: byte ``i`` of the result is byte ``sel[4i+2:4i]`` of
    the 8 bytes ``{b, a}`` (a's bytes 0..3, b's 4..7), or that byte's bit 7 spread over all 8 bits when
    ``sel`` bit ``4i+3`` is set. ``ASM``: the instruction; else the same in integer operations."""
    if ASM:
        return tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, $3;",
            "=r,r,r,r",
            [a, b, sel],
            dtype=tl.uint32,
            is_pure=True,
            pack=1,
        )
    else:
        out = sel * 0
        for i in tl.static_range(4):
            nib = (sel >> (4 * i)) & 15
            src = tl.where((nib & 4) == 0, a, b)
            byte = (src >> ((nib & 3) * 8)) & 255
            byte = tl.where((nib & 8) != 0, (byte >> 7) * 255, byte)
            out = out | (byte << (8 * i))
        return out


@triton.jit
def _cast_word(codes, t_lo, t_hi, ASM: tl.constexpr, LEAN: tl.constexpr):
    """The 4 FP8 bytes of the 4 e2m1 codes in the low 16 bits of ``codes`` (uint32, the code of output
    byte ``i`` in bits ``4i..4i+3``), from the 8-byte magnitude table ``{t_hi, t_lo}``."""
    mag = _prmt(t_lo, t_hi, codes & 0x7777, ASM)
    # with the sign bit as the selector's bit 3, a nonzero magnitude (bit 7 of the 0x80 table) spreads to
    # 0xFF when negative and stays 0x80 when positive; a zero magnitude gives 0 either way
    sg = _prmt(
        tl.full(codes.shape, 0x80808000, tl.uint32), tl.full(codes.shape, 0x80808080, tl.uint32), codes, ASM
    )
    if LEAN:
        # bit 6 is set only in the 0xFF bytes: shifted to bit 7, the sign of a nonzero negative code
        return mag | ((sg << 1) & 0x80808080)
    else:
        return mag | (sg & (sg << 1) & 0x80808080)


@triton.jit
def _ld_u8(ptr, DIRECT: tl.constexpr):
    """The bytes at ``ptr`` (uint8 pointers) as int32. ``DIRECT``: one PTX load each, which Triton gives
    the layout of its operands instead of one of its own (Triton 3.6 gives a gather whose addresses are
    not contiguous a layout of its own and then moves the block's arithmetic into it, converting the
    packed codes and the output words through shared memory)."""
    if DIRECT:
        return tl.inline_asm_elementwise(
            "ld.global.nc.u8 $0, [$1];", "=r,l", [ptr], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        return tl.load(ptr).to(tl.int32)


@triton.jit
def _ld_pair(ptr, DIRECT: tl.constexpr):
    """The two int32 words at ``ptr`` and ``ptr + 1`` (8-byte aligned) as uint32; ``DIRECT`` as
    ``_ld_u8``."""
    if DIRECT:
        lo, hi = tl.inline_asm_elementwise(
            "ld.global.nc.v2.u32 {$0, $1}, [$2];",
            "=r,=r,l",
            [ptr],
            dtype=(tl.uint32, tl.uint32),
            is_pure=True,
            pack=1,
        )
        return lo, hi
    else:
        return tl.load(ptr).to(tl.uint32, bitcast=True), tl.load(ptr + 1).to(tl.uint32, bitcast=True)


@triton.jit
def _max_min(a_max, a_min, b_max, b_min):
    return tl.maximum(a_max, b_max), tl.minimum(a_min, b_min)


@triton.jit
def _load_block(p_ptr, sc_ptr, rows, k, kb, SCALE4: tl.constexpr, DIRECT: tl.constexpr = False):
    """Column block ``kb`` of the 128 ``rows``: its 16-bit halves of packed codes (4 codes each)
    ``[128, 32]``, the FP4 scale byte of each half (8 halves per scale), and the scale bytes whose max
    and min the block's FP8 scale and count need (``[128, 4]`` when ``SCALE4``, else the same
    ``[128, 32]``)."""
    halves = tl.arange(0, 32)[None, :]
    # the index is written so that a thread reads 4 consecutive halves (8 bytes), the 4 words it writes
    # (16 bytes): with 8 halves per load Triton converts the layout through shared memory
    x = tl.load(p_ptr + rows * (k // 4) + kb * 32 + (halves // 4) * 4 + halves % 4)
    sb = _ld_u8(sc_ptr + rows * (k // 32) + kb * 4 + halves // 8, DIRECT)
    if SCALE4:
        s4 = tl.load(sc_ptr + rows * (k // 32) + kb * 4 + tl.arange(0, 4)[None, :])
    else:
        s4 = sb
    return x, sb, s4


@triton.jit
def _cast_block(
    x,
    sb,
    s4,
    blk,
    rows,
    k,
    kb,
    p8_ptr,
    sc_ptr,
    q_ptr,
    s_ptr,
    c_ptr,
    oct_ptr,
    cnt_ptr,
    nz_ptr,
    ASM: tl.constexpr,
    SCALE4: tl.constexpr,
    LEAN: tl.constexpr,
):
    """Cast column block ``kb`` of ``rows`` (``_load_block``'s tensors) into ``q``; its FP8 scale byte
    and changed-element count into ``s[blk]`` and ``c[blk]``."""
    if SCALE4:
        s4 = s4.to(tl.int32)
        row_max, row_min = tl.reduce((s4, s4), 1, _max_min)  # max and min in one pass
        e_max, b_min = tl.reduce((row_max, row_min), 0, _max_min)
    elif LEAN:
        e_max = tl.max(sb.to(tl.int32))  # over the whole block at once: within threads, warps, then across
        b_min = tl.min(sb.to(tl.int32))
    else:
        e_max = tl.max(tl.max(sb.to(tl.int32), 1), 0)
        b_min = tl.min(tl.min(sb.to(tl.int32), 1), 0)
    s_byte = tl.where(e_max == 255, 255, tl.maximum(e_max - _MAX_OFFSET_BITS, 0))
    tl.store(s_ptr + blk, s_byte.to(tl.uint8))

    d = tl.minimum(e_max - sb.to(tl.int32), _TABLE_D)
    t_lo, t_hi = _ld_pair(oct_ptr + 2 * d, ASM and LEAN >= 2)
    # half h of a row holds the codes of columns 4h .. 4h+3: output word h
    out = _cast_word(x.to(tl.uint32), t_lo, t_hi, ASM, LEAN)
    tl.store(q_ptr + rows * (k // 4) + kb * 32 + tl.arange(0, 32)[None, :], out.to(tl.int32, bitcast=True))

    changed = e_max * 0
    if (e_max - b_min > _LOSSLESS_SPAN) | (e_max < _MAX_OFFSET_BITS):
        cols = tl.arange(0, 64)[None, :]
        byte = tl.load(p8_ptr + rows * (k // 2) + kb * 64 + cols).to(tl.int32)
        db = tl.minimum(
            e_max - tl.load(sc_ptr + rows * (k // 32) + kb * 4 + cols // 16).to(tl.int32), _TABLE_D
        )
        if e_max < _MAX_OFFSET_BITS:
            # no E8M0 byte for the FP8 scale 2**(E-133): every nonzero value changes
            lost = tl.load(nz_ptr + byte)
        else:
            lost = tl.load(cnt_ptr + db * 256 + byte)
        changed = tl.sum(tl.sum(lost.to(tl.int32), 1), 0)
    tl.store(c_ptr + blk, changed)


@triton.jit
def _row_block(p_ptr, p8_ptr, sc_ptr, q_ptr, rb, k, LEAN: tl.constexpr):
    """The pointers and row indices that address 128-row block ``rb`` (counted over all experts): with
    ``LEAN`` the pointers moved to its first row and int32 rows 0..127 (32-bit offset arithmetic), else
    the pointers as given and its int64 rows."""
    if LEAN:
        row0 = rb.to(tl.int64) * 128
        rows = tl.arange(0, 128)[:, None]
        return (
            p_ptr + row0 * (k // 4),
            p8_ptr + row0 * (k // 2),
            sc_ptr + row0 * (k // 32),
            q_ptr + row0 * (k // 4),
            rows,
        )
    else:
        return p_ptr, p8_ptr, sc_ptr, q_ptr, (rb.to(tl.int64) * 128 + tl.arange(0, 128))[:, None]


@triton.jit
def fp4_cast_kernel(
    p_ptr,
    p8_ptr,
    sc_ptr,
    q_ptr,
    s_ptr,
    c_ptr,
    oct_ptr,
    cnt_ptr,
    nz_ptr,
    num_nb,
    num_kb,
    num_kp,
    ASM: tl.constexpr,
    BLOCKS_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    SCALE4: tl.constexpr,
    LEAN: tl.constexpr,
    KB: tl.constexpr,
):
    """p: [E, N, K/4] uint16 halves of packed codes (p8: the same bytes as uint8 [E, N, K/2]); sc: [E, N,
    K/32] uint8 E8M0; q: [E, N, K/4] int32 words of e4m3 bytes; s: [E, N/128, K/128] uint8 E8M0; c:
    [E, N/128, K/128] int32 changed elements; oct: cast_octets [D+1, 2] int32; cnt: cast_tables' counts
    [(D+1) * 256] uint8; nz: its nonzero [256] uint8. Contiguous, N and K multiples of 128.

    One program per (expert, row block, ``BLOCKS_K`` consecutive column blocks): ``num_kp`` =
    ceil(num_kb / BLOCKS_K) programs per row block. ``PREFETCH`` (``BLOCKS_K`` divides ``num_kb``): the
    loads of the next block are issued before the stores of this one, which the compiler cannot do itself
    (``q`` may alias the inputs as far as it knows). ``KB`` > 0: ``num_kb`` as a compile-time constant
    (offsets become immediates)."""
    if KB > 0:
        num_kb = KB
        num_kp = (KB + BLOCKS_K - 1) // BLOCKS_K
    pid = tl.program_id(0)
    kp = pid % num_kp
    rb = pid // num_kp
    k = num_kb * 128
    pp, p8p, scp, qp, rows = _row_block(p_ptr, p8_ptr, sc_ptr, q_ptr, rb, k, LEAN)
    blk0 = rb.to(tl.int64) * num_kb
    if PREFETCH:
        x, sb, s4 = _load_block(pp, scp, rows, k, kp * BLOCKS_K, SCALE4, ASM and LEAN == 2)
        for j in tl.static_range(BLOCKS_K):
            kb = kp * BLOCKS_K + j
            if j + 1 < BLOCKS_K:
                x_next, sb_next, s4_next = _load_block(pp, scp, rows, k, kb + 1, SCALE4, ASM and LEAN == 2)
            _cast_block(
                x,
                sb,
                s4,
                blk0 + kb,
                rows,
                k,
                kb,
                p8p,
                scp,
                qp,
                s_ptr,
                c_ptr,
                oct_ptr,
                cnt_ptr,
                nz_ptr,
                ASM,
                SCALE4,
                LEAN,
            )
            if j + 1 < BLOCKS_K:
                x, sb, s4 = x_next, sb_next, s4_next
    else:
        for j in tl.static_range(BLOCKS_K):
            kb = kp * BLOCKS_K + j
            if kb < num_kb:
                x, sb, s4 = _load_block(pp, scp, rows, k, kb, SCALE4, ASM and LEAN == 2)
                _cast_block(
                    x,
                    sb,
                    s4,
                    blk0 + kb,
                    rows,
                    k,
                    kb,
                    p8p,
                    scp,
                    qp,
                    s_ptr,
                    c_ptr,
                    oct_ptr,
                    cnt_ptr,
                    nz_ptr,
                    ASM,
                    SCALE4,
                    LEAN,
                )


@triton.jit
def fp4_cast_persistent_kernel(
    p_ptr,
    p8_ptr,
    sc_ptr,
    q_ptr,
    s_ptr,
    c_ptr,
    oct_ptr,
    cnt_ptr,
    nz_ptr,
    num_nb,
    num_kb,
    num_blocks,
    ASM: tl.constexpr,
    SCALE4: tl.constexpr,
    LEAN: tl.constexpr,
    KB: tl.constexpr,
    PREFETCH: tl.constexpr,
    STAGES: tl.constexpr,
):
    """``fp4_cast_kernel``'s arguments and cast on a grid of ``P`` programs, fewer than the
    ``num_blocks`` 128x128 blocks: program ``i`` casts blocks ``i, i + P, ...`` (block ``t`` = (expert,
    row block, column block) in row-major order). ``PREFETCH``: block ``t + P``'s loads are issued before
    block ``t``'s stores; else the loop is left to Triton's pipeliner with ``STAGES``. ``KB`` > 0:
    ``num_kb`` as a compile-time constant."""
    if KB > 0:
        num_kb = KB
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    k = num_kb * 128
    if PREFETCH:
        pp, p8p, scp, qp, rows = _row_block(p_ptr, p8_ptr, sc_ptr, q_ptr, pid // num_kb, k, LEAN)
        x, sb, s4 = _load_block(pp, scp, rows, k, pid % num_kb, SCALE4, ASM and LEAN == 2)
        for t in tl.range(pid, num_blocks, nprog, num_stages=1):
            kb = t % num_kb
            pp, p8p, scp, qp, rows = _row_block(p_ptr, p8_ptr, sc_ptr, q_ptr, t // num_kb, k, LEAN)
            # the last block's loads again rather than a mask on every load
            t_next = tl.minimum(t + nprog, num_blocks - 1)
            pn, _, scn, _, rows_next = _row_block(p_ptr, p8_ptr, sc_ptr, q_ptr, t_next // num_kb, k, LEAN)
            x_next, sb_next, s4_next = _load_block(
                pn, scn, rows_next, k, t_next % num_kb, SCALE4, ASM and LEAN == 2
            )
            _cast_block(
                x,
                sb,
                s4,
                t,
                rows,
                k,
                kb,
                p8p,
                scp,
                qp,
                s_ptr,
                c_ptr,
                oct_ptr,
                cnt_ptr,
                nz_ptr,
                ASM,
                SCALE4,
                LEAN,
            )
            x, sb, s4 = x_next, sb_next, s4_next
    else:
        for t in tl.range(pid, num_blocks, nprog, num_stages=STAGES):
            kb = t % num_kb
            pp, p8p, scp, qp, rows = _row_block(p_ptr, p8_ptr, sc_ptr, q_ptr, t // num_kb, k, LEAN)
            x, sb, s4 = _load_block(pp, scp, rows, k, kb, SCALE4, ASM and LEAN == 2)
            _cast_block(
                x,
                sb,
                s4,
                t,
                rows,
                k,
                kb,
                p8p,
                scp,
                qp,
                s_ptr,
                c_ptr,
                oct_ptr,
                cnt_ptr,
                nz_ptr,
                ASM,
                SCALE4,
                LEAN,
            )


class Config(NamedTuple):
    """One launch of the cast. ``variant``: ``"loop"`` (``fp4_cast_kernel``, ``blocks`` column blocks per
    program), ``"prefetch"`` (the same with the next block's loads first; ``blocks`` is cut to a divisor
    of the column blocks), ``"persistent"`` (``fp4_cast_persistent_kernel`` on ``blocks`` programs per SM,
    prefetching) or ``"pipelined"`` (the same, loads left to Triton's pipeliner with ``stages``).
    ``scale4``: the block's scale max and min from a ``[128, 4]`` load of its scale bytes. ``lean`` 1: 32-bit
    offsets from pointers moved to each row block, the column-block count a compile-time constant (one
    compilation per K), the scale max and min in one reduction over the block each, and one operation fewer
    per word for the signs; 3: the same with the table words read by PTX loads (with ``prmt``), so that
    Triton keeps the block's arithmetic in the layout of its 8-byte loads and 16-byte stores instead of
    moving it into the gather's layout through shared memory; 2: the scale bytes by PTX loads too."""

    variant: str
    num_warps: int
    blocks: int
    scale4: bool = False
    stages: int = 1
    lean: int = 0

    def __str__(self) -> str:
        extra = (
            (" s4" if self.scale4 else "")
            + ("", " lean", " lean+ld", " lean+tld")[self.lean]
            + (f" st={self.stages}" if self.variant == "pipelined" else "")
        )
        return f"{self.variant} w={self.num_warps} b={self.blocks}{extra}"


# The launcher's default: the fastest byte-identical launch scripts/bench_fp4_cast.py timed on an H200
# (docs/benchmarks.md): alone and end to end (--end-to-end), on both of V4-Flash's expert shapes.
DEFAULT_CONFIG = Config("loop", 4, 1, lean=3)


def _launch_fp4_cast(
    packed: torch.Tensor,
    scale: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    changed: torch.Tensor,
    *,
    asm: bool,
    config: Config = DEFAULT_CONFIG,
) -> None:
    """Launch the cast on contiguous uint8 ``packed [E, N, K/2]`` and ``scale [E, N, K/32]`` into
    contiguous ``q`` uint8 ``[E, N, K]``, ``s`` uint8 and ``changed`` int32 ``[E, N/128, K/128]``;
    ``asm``: the hardware byte permute (CUDA) or its integer form (either device)."""
    e, num_nb, num_kb = s.shape
    device = packed.device
    _, counts, nonzero = cast_tables(device)
    args = (
        packed.view(torch.uint16),
        packed,
        scale,
        q.view(torch.int32),
        s,
        changed,
        cast_octets(device),
        counts,
        nonzero,
        num_nb,
        num_kb,
    )
    if config.variant in ("loop", "prefetch"):
        prefetch = config.variant == "prefetch"
        blocks_k = math.gcd(config.blocks, num_kb) if prefetch else config.blocks
        num_kp = -(-num_kb // blocks_k)
        fp4_cast_kernel[(e * num_nb * num_kp,)](
            *args,
            num_kp,
            ASM=asm,
            BLOCKS_K=blocks_k,
            PREFETCH=prefetch,
            SCALE4=config.scale4,
            LEAN=config.lean,
            KB=num_kb if config.lean else 0,
            num_warps=config.num_warps,
        )
    elif config.variant in ("persistent", "pipelined"):
        num_blocks = e * num_nb * num_kb
        # on CPU (the interpreter) a few programs, so that each walks several blocks
        sms = torch.cuda.get_device_properties(device).multi_processor_count if packed.is_cuda else 1
        fp4_cast_persistent_kernel[(min(num_blocks, config.blocks * sms),)](
            *args,
            num_blocks,
            ASM=asm,
            SCALE4=config.scale4,
            LEAN=config.lean,
            KB=num_kb if config.lean else 0,
            PREFETCH=config.variant == "persistent",
            STAGES=config.stages,
            num_warps=config.num_warps,
        )
    else:
        raise ValueError(f"unknown fp4_cast variant {config.variant!r}")


def fp4_cast(
    packed: torch.Tensor,
    scale: torch.Tensor,
    *,
    name: str | None = None,
    _asm: bool | None = None,
    _config: Config = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's FP4 → FP8 cast, byte-identical to ``fp4_cast_ref(packed, scale)``.

    ``packed``: int8/uint8 ``[N, K/2]`` or ``[E, N, K/2]``; ``scale``: float8_e8m0fnu/uint8
    ``[..., N, K/32]``; N and K multiples of 128; on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
    Returns ``q`` float8_e4m3fn ``[..., N, K]``, ``s`` float8_e8m0fnu ``[..., N/128, K/128]`` and
    ``changed`` int32 ``[..., N/128, K/128]``, contiguous. Raises :class:`moetool.errors.InputError`
    naming ``name`` for a shape outside the contract (before the launch) or a NaN scale (after it).
    """
    require_launchable(
        packed, "fp4_cast", tensor="packed", reference="moetool.kernels.fp4_cast_ref.fp4_cast_ref"
    )
    require(
        scale.device == packed.device,
        "fp4_cast",
        f"on {scale.device}, weights on {packed.device}",
        tensor="scale",
    )
    n, k = check_fp4_shapes(packed, scale, name=name)
    lead = tuple(packed.shape[:-2])
    num_nb, num_kb = n // FP8_BLOCK, k // FP8_BLOCK
    q = torch.empty((*lead, n, k), dtype=torch.float8_e4m3fn, device=packed.device)
    s = torch.empty((*lead, num_nb, num_kb), dtype=torch.uint8, device=packed.device)
    changed = torch.empty((*lead, num_nb, num_kb), dtype=torch.int32, device=packed.device)
    if q.numel():
        packed = packed.contiguous()
        if packed.data_ptr() % 16:  # read as 16-bit halves, 16 bytes at a time
            packed = packed.clone()
        asm = (packed.is_cuda and not interpreting()) if _asm is None else _asm
        with torch.cuda.device(packed.device) if packed.is_cuda else nullcontext():
            _launch_fp4_cast(
                packed.view(torch.uint8).view(-1, n, k // 2),
                e8m0_bytes(scale).contiguous().view(-1, n, k // 32),
                q.view(torch.uint8).view(-1, n, k),
                s.view(-1, num_nb, num_kb),
                changed.view(-1, num_nb, num_kb),
                asm=asm,
                config=_config,
            )
        if bool((s == E8M0_NAN).any()):
            check_fp4_scales(scale, name=name)  # raises, naming the row
    return q, s.view(torch.float8_e8m0fnu), changed
