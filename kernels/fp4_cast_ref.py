"""FP4 (e2m1, E8M0 scale per 32) experts to block FP8 (e4m3, 128 × 128) by DeepSeek's cast, as a torch
reference: the specification of the Triton kernel in ``fp4_cast.py`` and the CPU path of ``quantize``.

Input, DeepSeek-V4's release format for one routed-expert matrix ``W [N, K]`` (or a stack ``[E, N, K]``):

- ``packed``: int8 (or uint8) ``[..., N, K/2]``, two e2m1 codes per byte, the **low nibble holding the
  even K index**; a code is sign (bit 3), exponent (bits 2..1), mantissa (bit 0) and means
  ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (codes 0..7) and their negatives (codes 8..15);
- ``scale``: E8M0 bytes (``float8_e8m0fnu`` or uint8) ``[..., N, K/32]``, one per row and 32 columns,
  byte ``b`` meaning ``2 ** (b - 127)`` (255 is NaN).

The cast (DeepSeek-V4 ``inference/convert.py``, ``cast_e2m1fn_to_e4m3fn``), per 128 × 128 block, whose
512 FP4 scales (128 rows × 4 groups of 32) have largest byte ``E``:

1. the FP8 scale is ``2 ** (E - 127) / 2**6`` stored as E8M0, i.e. byte ``max(E - 6, 0)``;
2. every value ``v`` under FP4 scale byte ``b`` becomes ``v · 2 ** (b - E + 6)`` in float32, cast to
   e4m3 rounding to nearest even (``|v| ≤ 6`` makes that at most 384 < 448: no clamp is needed);
3. code 8 (e2m1's negative zero) reads as ``+0.0``, as in DeepSeek's value table: it becomes FP8 byte
   ``0x00``. Every other zero keeps its sign.

When the cast is lossless (``docs/formats.md`` proves it): a block is exact — the FP8 value times its
scale equals the FP4 value times its scale for every element — whenever ``E - b ≤ 14`` for all its FP4
scale bytes ``b`` (a span of at most 14 binades). Beyond that an element ``v`` under byte ``b`` stays
exact exactly when ``v = 0`` or ``E - b ≤ 14 + t``, with ``t`` the trailing zero bits of ``2|v|`` (0 for
±0.5, ±1.5; 1 for ±1, ±3; 2 for ±2, ±6; 3 for ±4); otherwise it rounds into e4m3's subnormal grid
(multiples of ``2**-9``) and changes. A block whose largest scale byte is below 6 stores the FP8 scale
``2**-127`` instead of ``2 ** (E - 133)`` (E8M0 has nothing smaller); its nonzero values are not exact.
:func:`fp4_cast_ref` counts changed elements per block by comparing both dequantizations in float64,
where every value of either format is exact.
"""

from __future__ import annotations

import torch

from moetool.errors import InputError
from moetool.kernels.fp8_quant_ref import BLOCK as FP8_BLOCK

FP4_GROUP = 32
GROUPS_PER_BLOCK = FP8_BLOCK // FP4_GROUP
MAX_OFFSET_BITS = 6  # 6.0 · 2**6 = 384 ≤ 448 (e4m3's max); 2**7 would overflow
E8M0_NAN = 0xFF

# e2m1 code -> value: codes 0..7 positive, 8..15 the same magnitudes negative; code 8 is -0.0 here
# (the exact e2m1 value, used when decoding), +0.0 in DeepSeek's cast (CAST_VALUES).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
CAST_VALUES = (0.0, *E2M1_VALUES[1:8], 0.0, *E2M1_VALUES[9:])


def _table(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def unpack_e2m1(packed: torch.Tensor, *, table: tuple[float, ...] = E2M1_VALUES) -> torch.Tensor:
    """Two e2m1 codes per byte to float32 values: ``[..., K/2]`` int8/uint8 → ``[..., K]``, element
    ``2j`` from the low nibble of byte ``j`` and ``2j + 1`` from its high nibble."""
    if packed.dtype not in (torch.int8, torch.uint8):
        raise InputError(f"FP4 weights are packed int8 bytes, got {packed.dtype}")
    u8 = packed.contiguous().view(torch.uint8)
    lut = _table(table, packed.device)
    low = lut[(u8 & 0xF).long()]
    high = lut[(u8 >> 4).long()]
    return torch.stack([low, high], dim=-1).flatten(-2)


def e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    """The uint8 code of E8M0 scales given as ``float8_e8m0fnu`` or uint8 (same shape, a view)."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8)
    if scale.dtype == torch.uint8:
        return scale
    raise InputError(f"E8M0 scales are float8_e8m0fnu (F8_E8M0) bytes, got {scale.dtype}")


def pow2_f32(e: torch.Tensor) -> torch.Tensor:
    """float32 ``2 ** e`` for integer ``e`` in [-126, 127], built on the bits (exact on every device)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def e8m0_to_float(scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``2 ** (b - 127)`` for each E8M0 byte ``b`` (NaN for 255), exactly, as float32 or float64 (byte 0
    is the float32 subnormal ``2**-127``), built on the bits."""
    b = e8m0_bytes(scale).to(torch.int64)
    if dtype == torch.float64:
        out = ((b + (1023 - 127)) << 52).view(torch.float64)
    elif dtype == torch.float32:
        bits = torch.where(b == 0, torch.full_like(b, 1 << 22), b << 23)
        out = bits.to(torch.int32).view(torch.float32)
    else:
        raise InputError(f"E8M0 scales decode to float32 or float64, not {dtype}")
    return out.masked_fill(b == E8M0_NAN, float("nan"))


def dequant_fp4_ref(
    packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The exact values of FP4 weights: ``[..., N, K/2]`` codes and ``[..., N, K/32]`` E8M0 scales →
    ``dtype`` ``[..., N, K]`` (float32 holds every product except ``6 · 2**127``, which overflows; float64
    holds all)."""
    values = unpack_e2m1(packed).to(dtype)
    s = e8m0_to_float(scale, dtype)
    if tuple(s.shape) != (*values.shape[:-1], values.shape[-1] // FP4_GROUP) or values.shape[-1] % FP4_GROUP:
        raise InputError(
            f"FP4 scales {list(scale.shape)} do not give one per {FP4_GROUP} columns of "
            f"{list(values.shape)} values"
        )
    return (values.unflatten(-1, (-1, FP4_GROUP)) * s[..., None]).flatten(-2)


def dequant_fp8_e8m0_ref(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q · s`` per 128 × 128 block for ``q`` float8_e4m3fn ``[..., N, K]`` and E8M0 scales
    ``[..., N/128, K/128]`` (N and K multiples of 128), in ``dtype``."""
    n, k = q.shape[-2:]
    s = e8m0_to_float(scale, dtype)
    out = q.to(dtype).unflatten(-1, (k // FP8_BLOCK, FP8_BLOCK)).unflatten(-3, (n // FP8_BLOCK, FP8_BLOCK))
    return (out * s[..., :, None, :, None]).flatten(-4, -3).flatten(-2)


def check_fp4_shapes(
    packed: torch.Tensor, scale: torch.Tensor, *, name: str | None = None
) -> tuple[int, int]:
    """``(N, K)`` of FP4 weights that the cast takes, else :class:`InputError` naming ``name``: int8/uint8
    ``[..., N, K/2]`` with N and K multiples of 128 and E8M0 scales ``[..., N, K/32]`` (dtypes and shapes
    only; :func:`check_fp4_scales` looks at the scale values)."""
    if packed.dtype not in (torch.int8, torch.uint8) or packed.dim() not in (2, 3):
        raise InputError(
            f"FP4 weights must be int8 [N, K/2] or [E, N, K/2], got {packed.dtype} {list(packed.shape)}",
            tensor=name,
        )
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise InputError(
            f"FP4 scales must be E8M0 (F8_E8M0), got {scale.dtype}",
            tensor=name,
            fix="only DeepSeek-V4's FP4 format (e2m1 values, one E8M0 scale per 32) can be cast",
        )
    n, k = packed.shape[-2], 2 * packed.shape[-1]
    if n % FP8_BLOCK or k % FP8_BLOCK:
        raise InputError(
            f"FP4 weight {n}x{k} (K = 2 x {k // 2} bytes) is not a multiple of {FP8_BLOCK} in both "
            "dimensions, so it has no 128x128 FP8 blocks",
            tensor=name,
            fix="only FP4 experts with N and K divisible by 128 can be cast",
        )
    if tuple(scale.shape) != (*packed.shape[:-1], k // FP4_GROUP):
        raise InputError(
            f"FP4 scale grid {list(scale.shape)} does not match {list(packed.shape)} packed weights "
            f"(expected {[*packed.shape[:-1], k // FP4_GROUP]}: one per row and {FP4_GROUP} columns)",
            tensor=name,
        )
    return n, k


def check_fp4_scales(scale: torch.Tensor, *, name: str | None = None) -> None:
    """Raise :class:`InputError` naming ``name``, the row and the columns of the first NaN E8M0 scale
    (byte 255) in ``scale`` ``[..., N, K/32]``."""
    bad = e8m0_bytes(scale) == E8M0_NAN
    if bool(bad.any()):
        *lead, row, group = (int(i) for i in bad.nonzero()[0])
        where = f"expert {lead[0]}, " if lead else ""
        raise InputError(
            f"FP4 scale is NaN (E8M0 byte 255) at {where}row {row}, columns "
            f"{group * FP4_GROUP}..{group * FP4_GROUP + FP4_GROUP - 1}",
            tensor=name,
            fix="the source checkpoint is corrupt: re-download it",
        )


def fp4_cast_ref(
    packed: torch.Tensor, scale: torch.Tensor, *, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's FP4 → FP8 cast of ``packed`` ``[..., N, K/2]`` with E8M0 ``scale`` ``[..., N, K/32]``
    (module docstring), on any device.

    Returns ``q`` float8_e4m3fn ``[..., N, K]``, ``s`` float8_e8m0fnu ``[..., N/128, K/128]`` (FP8 scales,
    powers of two) and ``changed`` int32 ``[..., N/128, K/128]``: per block, the elements whose value
    ``q · s`` differs from the FP4 value (0 everywhere when the cast is lossless). All contiguous.
    Raises :class:`InputError` naming ``name`` for inputs outside the contract (:func:`check_fp4_shapes`,
    :func:`check_fp4_scales`).

    An element's FP8 byte depends only on its e2m1 code and ``d = E - b``, so the float32 multiply and
    e4m3 cast of the recipe run once per (input byte, d) in :func:`cast_tables`, and the bytes are
    looked up; past ``d = 20`` every value rounds to a signed zero.
    """
    n, k = check_fp4_shapes(packed, scale, name=name)
    check_fp4_scales(scale, name=name)
    lead = tuple(packed.shape[:-2])
    nb, kb = n // FP8_BLOCK, k // FP8_BLOCK
    device = packed.device
    pairs, counts, nonzero = cast_tables(device)
    first_lossy = _first_lossy_d(device)
    u8 = packed.contiguous().view(torch.uint8).reshape(-1, n, k // 2)
    b = e8m0_bytes(scale).contiguous().reshape(-1, n, k // FP4_GROUP).to(torch.int32)
    num = u8.shape[0]
    e_max = b.view(num, nb, FP8_BLOCK, kb, GROUPS_PER_BLOCK).amax(dim=(2, 4))  # [num, nb, kb]
    s_byte = (e_max - MAX_OFFSET_BITS).clamp_min(0)
    q = torch.empty((num, n, k), dtype=torch.float8_e4m3fn, device=device)
    changed = torch.empty((num, nb, kb), dtype=torch.int32, device=device)
    qp = q.view(torch.uint8).view(torch.int16).view(num, n, k // FP4_GROUP, FP4_GROUP // 2)
    for r0 in range(0, n, FP8_BLOCK):  # one row block at a time: its indices stay in cache
        rb = r0 // FP8_BLOCK
        top = e_max[:, rb].repeat_interleave(GROUPS_PER_BLOCK, dim=-1)[:, None, :]  # [num, 1, K/32]
        d = (top - b[:, r0 : r0 + FP8_BLOCK]).clamp_max(CAST_TABLE_D)  # [num, 128, K/32]
        idx = (d * 256)[..., None] + u8[:, r0 : r0 + FP8_BLOCK].view(num, FP8_BLOCK, -1, FP4_GROUP // 2)
        qp[:, r0 : r0 + FP8_BLOCK] = pairs[idx]
        low = (e_max[:, rb] < MAX_OFFSET_BITS)[:, None, :, None]
        if not bool(low.any()) and not bool((d >= first_lossy).any()):
            changed[:, rb] = 0  # the table changes nothing this close to the block's largest scale
            continue
        lost = counts[idx].view(num, FP8_BLOCK, kb, -1)
        if bool(low.any()):
            # E < 6: byte 0 stands for 2**-127, not the 2**(E-133) the values were scaled for
            lost = torch.where(low, nonzero[u8[:, r0 : r0 + FP8_BLOCK].long()].view_as(lost), lost)
        changed[:, rb] = lost.sum(dim=(1, 3), dtype=torch.int32)
    s = s_byte.to(torch.uint8).view(torch.float8_e8m0fnu)
    return q.view(*lead, n, k), s.view(*lead, nb, kb).contiguous(), changed.view(*lead, nb, kb)


CAST_TABLE_D = 21  # d >= 20 leaves |v| * 2**(6 - d) <= 384 * 2**-20 < 2**-10: a signed zero in e4m3
_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def cast_tables(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recipe evaluated once per input byte (two e2m1 codes) and distance ``d = E - b`` in
    ``0 .. CAST_TABLE_D``, flat index ``d * 256 + byte``:

    - ``pairs`` int16 ``[(D+1) * 256]``: the two FP8 bytes, even element in the low byte (little-endian
      memory order: element 2j, then 2j + 1), of ``CAST_VALUES[code] * 2**(6 - d)`` cast to e4m3;
    - ``counts`` uint8 ``[(D+1) * 256]``: how many of the two differ from the exact e2m1 value once
      scaled back (``q * 2**(d - 6)`` against ``E2M1_VALUES[code]``, in float64);
    - ``nonzero`` uint8 ``[256]``: how many of the two codes are not ±0.
    """
    key = str(device)
    if key not in _TABLES:
        byte = torch.arange(256)
        codes = torch.stack([byte & 0xF, byte >> 4], dim=-1)  # [256, 2]: even element, odd element
        d = torch.arange(CAST_TABLE_D + 1)
        y = torch.tensor(CAST_VALUES)[codes][None] * pow2_f32(MAX_OFFSET_BITS - d)[:, None, None]
        q = y.to(torch.float8_e4m3fn)  # [D+1, 256, 2]
        pairs = q.view(torch.uint8).contiguous().view(torch.int16).reshape(-1)
        back = q.double() * (2.0 ** (d - MAX_OFFSET_BITS)).double()[:, None, None]
        counts = (back != torch.tensor(E2M1_VALUES, dtype=torch.float64)[codes][None]).sum(-1)
        nonzero = ((codes & 7) != 0).sum(-1)
        _TABLES[key] = (
            pairs.to(device),
            counts.to(torch.uint8).reshape(-1).to(device),
            nonzero.to(torch.uint8).to(device),
        )
    return _TABLES[key]


def cast_octets(device: torch.device | str = "cpu") -> torch.Tensor:
    """The recipe's FP8 byte of each positive e2m1 magnitude per distance ``d = E - b`` in
    ``0 .. CAST_TABLE_D``: int32 ``[D+1, 2]``, row ``d`` holding the bytes of
    ``CAST_VALUES[m] * 2**(6 - d)`` cast to e4m3 for ``m = 0..7``, ``m`` in byte ``m % 4`` (little-endian)
    of word ``m // 4``. A code's FP8 byte is its magnitude's byte with bit 7 set for a nonzero negative
    code (``cast_tables``' pairs equal this: e4m3 rounds symmetrically, code 8 is +0.0, and a negative
    value that rounds to zero keeps its sign)."""
    key = str(device)
    if key not in _OCTETS:
        d = torch.arange(CAST_TABLE_D + 1)
        y = torch.tensor(CAST_VALUES[:8])[None] * pow2_f32(MAX_OFFSET_BITS - d)[:, None]
        octets = y.to(torch.float8_e4m3fn).view(torch.uint8).contiguous().view(torch.int32)
        _OCTETS[key] = octets.to(device)
    return _OCTETS[key]


_OCTETS: dict[str, torch.Tensor] = {}


def _first_lossy_d(device: torch.device | str) -> int:
    """The smallest distance ``d`` at which ``cast_tables``' counts are not all zero (15: the proof in
    docs/formats.md, here read off the table itself)."""
    key = str(device)
    if key not in _FIRST_LOSSY:
        counts = cast_tables(device)[1].view(CAST_TABLE_D + 1, 256)
        _FIRST_LOSSY[key] = int(counts.any(dim=1).nonzero()[0, 0])
    return _FIRST_LOSSY[key]


_FIRST_LOSSY: dict[str, int] = {}
