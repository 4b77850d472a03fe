"""The one block-FP8 policy: what ``quantize`` writes and what ``validate`` expects, written once.

The recipe itself (128 × 128 blocks, ``s = max(amax, 1e-4) / 448``, optional UE8M0 rounding, e4m3 round
to nearest even) is :func:`moetool.kernels.fp8_quant_ref.block_quant_ref`; :mod:`moetool.kernels.dispatch`
runs it as the Triton kernel on a GPU and as the torch reference elsewhere, byte for byte the same. This
module says how moetool applies it:

- a float region is quantized (:func:`quantize`);
- an FP8 region keeps its bytes when its scales already are what the request makes — any float32 scales
  for ``--scale-fmt float``, powers of two for ``ue8m0`` — which is lossless; otherwise it is dequantized in
  float32 (``q * s``, never via bf16) and requantized (:func:`expected_fp8`);
- an FP8 source is sound — scales finite and positive, no e4m3 NaN byte — or refused (:func:`check_source`);
- a region of a weight carries the scale blocks that cover it (:func:`scale_span`, :func:`slice_scales`;
  region edges fall on block boundaries);
- DeepGEMM's SM100 layout stores the scales as UE8M0 bytes packed four per int32 (:func:`sm100_pack`,
  :func:`sm100_pack_exponents`, :func:`sm100_unpack`, :func:`sm100_stored_shape`; the layout is
  described in ``fp8_quant_ref``).
"""

from __future__ import annotations

import torch

from moetool.kernels import dispatch
from moetool.kernels.fp8_quant_ref import BLOCK, cdiv, ceil_to_ue8m0, dequant_ref

__all__ = [
    "BLOCK",
    "cdiv",
    "check_source",
    "dequantize",
    "expected_fp8",
    "quantize",
    "scale_span",
    "scales_satisfy",
    "slice_scales",
    "sm100_pack",
    "sm100_pack_exponents",
    "sm100_stored_shape",
    "sm100_unpack",
    "source_is_sound",
]


def quantize(
    w: torch.Tensor, *, ue8m0: bool, name: str | None = None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 of a float region ``w [N, K]`` or ``[E, N, K]`` on its device: ``q`` float8_e4m3fn of
    ``w``'s shape and ``s`` float32 ``[..., ceil(N/128), ceil(K/128)]``. ``out``: a buffer for ``q``.
    Raises :class:`moetool.errors.InputError` naming ``name`` and the block when ``w`` holds NaN or inf."""
    return dispatch.block_quant(w, ue8m0=ue8m0, name=name, out=out)


def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q * s`` per 128 × 128 block in float32 (never via bf16), ``q``'s shape."""
    return dequant_ref(q, s)


def scales_satisfy(s: torch.Tensor, *, ue8m0: bool) -> bool:
    """Whether float32 scales ``s`` already are what a request for ``ue8m0`` (or float) scales makes."""
    return not ue8m0 or torch.equal(ceil_to_ue8m0(s), s)


def expected_fp8(
    q: torch.Tensor, s: torch.Tensor, *, ue8m0: bool, name: str | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """What block FP8 makes of an FP8 region ``(q, s)``: ``(q, s)`` themselves (scales as float32) when
    its scales satisfy the request, else its float32 dequantization requantized on ``device``."""
    s = s.float()
    if scales_satisfy(s, ue8m0=ue8m0):
        return q, s
    return quantize(dequantize(q.to(device), s.to(device)), ue8m0=ue8m0, name=name)


def check_source(
    q: torch.Tensor,
    s: torch.Tensor,
    *,
    name: str | None,
    origin: tuple[int, int] = (0, 0),
    expert: int | None = None,
) -> None:
    """An FP8 source region is refused as a float one with a NaN is: an ``InputError`` naming ``name``
    and the 128 × 128 block when a scale is NaN, infinite, zero or negative (the block would dequantize
    to NaN, infinity or zeros), or when an FP8 byte is e4m3's NaN (``0x7f``/``0xff``; e4m3fn has no
    infinity). ``q``: the region ``[N, K]`` float8_e4m3fn; ``s``: its scales ``[ceil(N/128),
    ceil(K/128)]`` (float32 or E8M0); ``origin``: where the region starts in the tensor (block edges),
    so that blocks are numbered in the whole tensor (within ``expert`` for a stacked one)."""
    from moetool.errors import InputError

    r0, c0 = origin
    where = f"expert {expert}, " if expert is not None else ""
    fix = "the source checkpoint is corrupt: re-download it or repair this tensor"
    sf = s.float()
    bad, nan = _defects(q, sf)
    if bool(bad.any()):
        rb, cb = (int(i) for i in bad.nonzero()[0])
        raise InputError(
            f"scale of {where}{_block(q, r0 // BLOCK + rb, c0 // BLOCK + cb, r0, c0)} is "
            + _scale_defect(float(sf[rb, cb])),
            tensor=name,
            fix=fix,
        )
    if bool(nan.any()):
        r, c = (int(i) for i in nan.nonzero()[0])
        raise InputError(
            f"FP8 NaN byte (e4m3 0x7f/0xff) at {where}row {r0 + r}, column {c0 + c}, in "
            f"{_block(q, (r0 + r) // BLOCK, (c0 + c) // BLOCK, r0, c0)}",
            tensor=name,
            fix=fix,
        )


def _defects(q: torch.Tensor, sf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`check_source` refuses, as masks: scales not finite and positive, e4m3 NaN bytes."""
    return ~(torch.isfinite(sf) & (sf > 0)), (q.view(torch.uint8) & 0x7F) == 0x7F


def source_is_sound(q: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether :func:`check_source` accepts FP8 ``q`` with scales ``s`` (any leading dimensions, e.g.
    stacked experts): one test for all of it, where the caller needs no block named."""
    bad, nan = _defects(q, s.float())
    return not bool(bad.any()) and not bool(nan.any())


def _scale_defect(v: float) -> str:
    if v != v:
        return "NaN"
    if abs(v) == float("inf"):
        return "infinite"
    return "zero" if v == 0 else f"negative ({v:g})"


def _block(q: torch.Tensor, rb: int, cb: int, r0: int, c0: int) -> str:
    """``block (row block rb, column block cb) = rows .., columns ..`` of a region starting at (r0, c0)."""
    n, k = r0 + q.shape[-2], c0 + q.shape[-1]
    return (
        f"block (row block {rb}, column block {cb}) = rows {rb * BLOCK}..{min(n, (rb + 1) * BLOCK) - 1}, "
        f"columns {cb * BLOCK}..{min(k, (cb + 1) * BLOCK) - 1}"
    )


def scale_span(span: tuple[int, int] | None) -> tuple[int, int] | None:
    """The scale blocks ``[b0, b1)`` covering elements ``[i0, i1)`` of a weight's rows or columns."""
    if not span:
        return None
    return span[0] // BLOCK, cdiv(span[1], BLOCK)


def slice_scales(
    s: torch.Tensor, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
) -> torch.Tensor:
    """The scales ``[R, C]`` of a weight cut to the blocks that cover its ``rows`` and ``cols``."""
    r, c = scale_span(rows), scale_span(cols)
    if r:
        s = s[r[0] : r[1]]
    if c:
        s = s[:, c[0] : c[1]]
    return s


def sm100_pack(s: torch.Tensor, rows: int) -> torch.Tensor:
    """Power-of-two float32 scales ``[..., ceil(rows/128), SK]`` of a ``rows``-row weight as DeepGEMM's
    SM100 kernels read them, in the contiguous int32 layout a checkpoint stores."""
    from moetool.kernels.fp8_quant_ref import pack_sm100_scales_ref, sm100_scales_to_storage

    return sm100_scales_to_storage(pack_sm100_scales_ref(s, rows))


def sm100_pack_exponents(exponents: torch.Tensor, rows: int) -> torch.Tensor:
    """:func:`sm100_pack` from E8M0 scale bytes (uint8 ``[..., ceil(rows/128), SK]``, ``2 ** (byte -
    127)``) rather than float32 scales."""
    from moetool.kernels.fp8_quant_ref import pack_sm100_exponents_ref, sm100_scales_to_storage

    return sm100_scales_to_storage(pack_sm100_exponents_ref(exponents, rows))


def sm100_unpack(stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Stored SM100 scales of a ``rows × cols`` weight back to float32 ``[..., ceil(rows/128),
    ceil(cols/128)]`` (refused loudly when they are not a packing of such scales)."""
    from moetool.kernels.fp8_quant_ref import sm100_scales_from_storage, unpack_sm100_scales_ref

    return unpack_sm100_scales_ref(sm100_scales_from_storage(stored, rows), rows, cols)


def sm100_stored_shape(rows: int, cols: int) -> tuple[int, ...]:
    """The stored shape of one ``rows × cols`` weight's SM100 scales."""
    return tuple(sm100_pack(torch.ones(cdiv(rows, BLOCK), cdiv(cols, BLOCK)), rows).shape)
