"""DeepSeek's FP4 → FP8 cast in Triton, byte-identical to :func:`moetool.kernels.fp4_cast_ref.fp4_cast_ref`
(its docstring is the specification).

One program per (expert, 128-row block, ``BLOCKS_K`` consecutive 128-column blocks). The e2m1 codes are
decoded on their bits, never through a table in memory; the per-element power-of-two offset is built on
the float32 exponent bits; the e4m3 rounding is :mod:`moetool.kernels.fp8_quant`'s (hardware
``cvt.rn`` on CUDA, the bit algorithm of torch's conversion in the interpreter). The changed-element
count compares ``q · 2**(s - b)`` with the FP4 value in float32, exact for every pair the cast makes.

A NaN FP4 scale (E8M0 byte 255) makes its block's FP8 scale byte 255; the launcher looks for it after
the launch and raises the reference's :class:`moetool.errors.InputError` naming the row.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from moetool.kernels._device import require, require_launchable
from moetool.kernels.fp4_cast_ref import (
    E8M0_NAN,
    FP8_BLOCK,
    MAX_OFFSET_BITS,
    check_fp4_scales,
    check_fp4_shapes,
    e8m0_bytes,
)
from moetool.kernels.fp8_quant import _to_e4m3_bits

_MAX_OFFSET_BITS = tl.constexpr(MAX_OFFSET_BITS)


@triton.jit
def _pow2(e):
    """float32 ``2 ** e`` for int32 ``e`` in [-126, 127], on the bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_value(code, PLUS_ZERO: tl.constexpr):
    """float32 value of e2m1 ``code`` (int32, 0..15): ±{0, .5, 1, 1.5, 2, 3, 4, 6}; code 8 is +0.0 when
    ``PLUS_ZERO`` (DeepSeek's cast), -0.0 otherwise."""
    exp = (code >> 1) & 3
    man = code & 1
    # exponent 0: 0 or 0.5 (subnormal); else (1 + man / 2) * 2 ** (exp - 1) = float32 bits below
    normal = ((exp + 126) << 23) | (man << 22)
    bits = tl.where(exp == 0, man * (126 << 23), normal)
    if PLUS_ZERO:
        sign = tl.where((code & 7) == 0, 0, (code & 8) << 28)
    else:
        sign = (code & 8) << 28
    return (bits | sign).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_value(bits):
    """float32 value of float8_e4m3fn bits (int32, 0..255, never NaN here)."""
    exp = (bits >> 3) & 15
    man = bits & 7
    mag = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, (8 + man).to(tl.float32) * _pow2(exp - 10))
    return tl.where((bits & 0x80) != 0, -mag, mag)


@triton.jit
def fp4_cast_kernel(
    p_ptr,
    sc_ptr,
    q_ptr,
    s_ptr,
    c_ptr,
    num_nb,
    num_kb,
    num_kp,
    EXACT_CVT: tl.constexpr,
    BLOCKS_K: tl.constexpr,
):
    """p: [E, N, K/2] uint8 codes; sc: [E, N, K/32] uint8 E8M0; q: [E, N, K] uint8 (e4m3 bits);
    s: [E, N/128, K/128] uint8 E8M0; c: [E, N/128, K/128] int32 changed elements. Contiguous, N and K
    multiples of 128; ``num_kp`` = ceil(num_kb / BLOCKS_K) programs per row block."""
    pid = tl.program_id(0)
    kp = pid % num_kp
    rest = pid // num_kp
    nb = rest % num_nb
    e = rest // num_nb
    n = num_nb * 128
    k = num_kb * 128
    rows = (e.to(tl.int64) * n + nb * 128 + tl.arange(0, 128))[:, None]
    for j in tl.static_range(BLOCKS_K):
        kb = kp * BLOCKS_K + j
        if kb < num_kb:
            sb = tl.load(sc_ptr + rows * (k // 32) + kb * 4 + tl.arange(0, 4)[None, :]).to(tl.int32)
            e_max = tl.max(tl.max(sb, 1), 0)
            s_byte = tl.where(e_max == 255, 255, tl.maximum(e_max - _MAX_OFFSET_BITS, 0))
            blk = (e.to(tl.int64) * num_nb + nb) * num_kb + kb
            tl.store(s_ptr + blk, s_byte.to(tl.uint8))

            packed = tl.load(p_ptr + rows * (k // 2) + kb * 64 + tl.arange(0, 64)[None, :]).to(tl.int32)
            codes = tl.reshape(tl.interleave(packed & 15, (packed >> 4) & 15), (128, 4, 32))
            v = _e2m1_value(codes, True)
            # offset 2 ** (b - E + 6), clamped where it would leave float32's normal range (values
            # that small round to a signed zero either way)
            d = tl.maximum(sb - e_max + _MAX_OFFSET_BITS, -126)
            y = v * _pow2(d)[:, :, None]
            qbits = _to_e4m3_bits(y, EXACT_CVT)
            cols = kb * 128 + tl.arange(0, 128)[None, :]
            tl.store(q_ptr + rows * k + cols, tl.reshape(qbits, (128, 128)))

            # exact iff q · 2 ** (s - b) == v; s - b >= -6, and past 40 any nonzero q is far above 6
            back = _e4m3_value(qbits.to(tl.int32)) * _pow2(tl.minimum(s_byte - sb, 40))[:, :, None]
            changed = tl.sum(tl.sum(tl.sum((back != v).to(tl.int32), 2), 1), 0)
            tl.store(c_ptr + blk, changed)


def _launch_fp4_cast(
    packed: torch.Tensor,
    scale: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    changed: torch.Tensor,
    *,
    exact_cvt: bool,
    blocks_k: int = 1,
    num_warps: int = 4,
) -> None:
    """Launch ``fp4_cast_kernel`` on contiguous uint8 ``packed [E, N, K/2]`` and ``scale [E, N, K/32]``
    into contiguous ``q`` uint8 ``[E, N, K]``, ``s`` uint8 and ``changed`` int32 ``[E, N/128, K/128]``."""
    e, num_nb, num_kb = s.shape
    num_kp = -(-num_kb // blocks_k)
    fp4_cast_kernel[(e * num_nb * num_kp,)](
        packed,
        scale,
        q,
        s,
        changed,
        num_nb,
        num_kb,
        num_kp,
        EXACT_CVT=exact_cvt,
        BLOCKS_K=blocks_k,
        num_warps=num_warps,
    )


def fp4_cast(
    packed: torch.Tensor,
    scale: torch.Tensor,
    *,
    name: str | None = None,
    _exact_cvt: bool | None = None,
    _blocks_k: int = 1,
    _num_warps: int = 4,
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
        exact = (not packed.is_cuda) if _exact_cvt is None else _exact_cvt
        with torch.cuda.device(packed.device) if packed.is_cuda else nullcontext():
            _launch_fp4_cast(
                packed.contiguous().view(torch.uint8).view(-1, n, k // 2),
                e8m0_bytes(scale).contiguous().view(-1, n, k // 32),
                q.view(torch.uint8).view(-1, n, k),
                s.view(-1, num_nb, num_kb),
                changed.view(-1, num_nb, num_kb),
                exact_cvt=exact,
                blocks_k=_blocks_k,
                num_warps=_num_warps,
            )
        if bool((s == E8M0_NAN).any()):
            check_fp4_scales(scale, name=name)  # raises, naming the row
    return q, s.view(torch.float8_e8m0fnu), changed
