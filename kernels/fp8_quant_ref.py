"""Block-FP8 quantization (docs/contract.md §6) as a torch reference: the specification of the Triton kernels in
``fp8_quant.py`` and the CPU path of ``moetool quantize``.

Recipe, for ``w [N, K]`` (or each expert of ``w [E, N, K]``) and ``bn × bk`` blocks (128 × 128 for
weights, 1 × 128 for DeepGEMM's per-token activations):

1. ``Wf = w.float()``, zero-padded to multiples of the block;
2. ``amax`` per block of ``|Wf|``, then ``amax = max(amax, 1e-4)``;
3. ``s = amax / 448.0`` in float32 (a true IEEE division, on every device), optionally rounded up to a
   power of two on its bits (UE8M0, :func:`ceil_to_ue8m0`);
4. ``q = clamp(Wf * (1.0 / s), -448, 448).to(float8_e4m3fn)``, padding cropped.

``q`` is ``float8_e4m3fn`` of ``w``'s shape; ``s`` (``weight_scale_inv``) is float32
``[..., ceil(N/bn), ceil(K/bk)]``, row-major. Dequantization is ``q.float() * s`` per block.

SM100 scale layout (``--scale-layout sm100``), as DeepGEMM's ``transform_sf_into_required_layout``
builds it for SM100 from 128 × 128 float32 scales of a weight with ``MN`` rows and ``K`` columns:

- each row of the weight gets its block's scale (granularity broadcast from 128 rows to 1);
- each scale becomes its UE8M0 byte, the float32 exponent field ``bits >> 23`` (the scale must be an
  exact power of two: sign and mantissa zero), so ``2 ** (byte - 127)`` gives it back;
- bytes are packed 4 per int32 along K, little-endian: byte ``j`` (bits ``8j .. 8j+7``) of packed
  column ``p`` holds K block ``4p + j``; missing K blocks past ``ceil(K/128)`` are zero bytes;
- the result is int32 of logical shape ``[..., MN, PK]`` with ``PK = ceil(ceil(K/128) / 4)``, MN-major
  and TMA-aligned: strides ``(..., PK * MN4, 1, MN4)`` with ``MN4 = align(MN, 4)`` (16 bytes).

The memory behind that view is one contiguous int32 buffer ``[..., PK, MN4]`` whose rows ``MN .. MN4``
are zero. That buffer is what a checkpoint stores (shape ``[..., PK, MN4]``, dtype I32, row-major);
:func:`sm100_scales_to_storage` returns it and :func:`sm100_scales_from_storage` (equivalently
``stored.mT[..., :MN, :]``, a view without a copy) gives back the tensor DeepGEMM takes. On a
little-endian host ``stored.view(torch.uint8)`` is ``[..., PK, 4 * MN4]`` exponent bytes.
"""

from __future__ import annotations

import math

import torch

from moetool.errors import InputError

FP8_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-4
SM100_TMA_ALIGN = 4  # int32 elements in the 16 bytes TMA needs between MN-major columns

# Elements per chunk of block-rows: small enough that the chunk and its float32 and integer working
# copies stay in L2/L3, large enough that per-op dispatch overhead is a few percent.
_CHUNK_ELEMS = 1 << 20
_CHUNK_ELEMS_DEVICE = 1 << 26  # on accelerators: bounds the float32 working copy, few launches

# Float dtypes whose |x| bit pattern orders like |x| when read as a signed integer of the same width,
# and the mask that clears the sign bit. NaN patterns sort above +inf, so a block amax taken on these
# integers is NaN or inf exactly when the block holds a non-finite value.
_ABS_BITS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ceil_to_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """Round float32 scales up to a power of two on their bits (docs/contract.md §6, UE8M0 scales).

    ``s``: any shape, any device, float32 (other float dtypes are converted first). The exponent field
    of ``|s|`` is incremented when the mantissa is non-zero, clamped to ``[1, 254]`` and the mantissa
    zeroed: exact powers of two stay, anything else goes to the next power of two, zero and subnormals
    become ``2**-126``. Returns float32 of ``s``'s shape.
    """
    bits = s.float().abs().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp.clamp(1, 254) << 23).view(torch.float32)


def _block_slices(shape: tuple[int, ...], index: tuple[int, ...], block: tuple[int, int]) -> tuple:
    """Index of the elements of block ``index`` (``(e, rb, cb)`` or ``(rb, cb)``) in a tensor of
    ``shape``."""
    bn, bk = block
    *lead, rb, cb = index
    n, k = shape[-2:]
    return (*lead, slice(rb * bn, min(n, (rb + 1) * bn)), slice(cb * bk, min(k, (cb + 1) * bk)))


def check_finite_scales(
    w: torch.Tensor, s: torch.Tensor, *, name: str | None, block: tuple[int, int]
) -> None:
    """Raise :class:`InputError` naming the first block (in ``[E, row block, column block]`` order) whose
    scale in ``s`` is not finite, which is exactly a block of ``w`` holding a NaN or an infinity.

    ``w``: ``[N, K]`` or ``[E, N, K]``; ``s``: float32 ``[..., ceil(N/bn), ceil(K/bk)]`` on w's device.
    Costs one reduction (and a device sync on CUDA) when everything is finite.
    """
    bad = ~torch.isfinite(s)
    if not bool(bad.any()):
        return
    flat = int(bad.flatten().nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), s.shape))
    region = w[_block_slices(tuple(w.shape), index, block)]
    kind = "NaN" if bool(torch.isnan(region).any()) else "an infinity"
    bn, bk = block
    *lead, rb, cb = index
    rows = f"rows {rb * bn}..{min(w.shape[-2], (rb + 1) * bn) - 1}"
    cols = f"columns {cb * bk}..{min(w.shape[-1], (cb + 1) * bk) - 1}"
    where = f"expert {lead[0]}, " if lead else ""
    raise InputError(
        f"{kind} in {where}block (row block {rb}, column block {cb}) = {rows}, {cols}; "
        "block FP8 needs finite weights",
        tensor=name,
        fix="the source checkpoint is corrupt: re-download it or repair this tensor",
    )


def _quant_rows(
    x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, *, ue8m0: bool, block: tuple[int, int]
) -> None:
    """Quantize ``x [R, K]`` (contiguous) into ``q [R, K]`` float8_e4m3fn and write the pre-UE8M0
    float32 scales (NaN/inf kept) into ``s [ceil(R/bn), ceil(K/bk)]``; ``q`` uses the UE8M0-rounded
    scale when ``ue8m0``. Processes chunks of whole block-rows so the working set stays in cache."""
    bn, bk = block
    n, k = x.shape
    nbf = k // bk  # full column blocks
    k_main = nbf * bk
    tail = k - k_main
    int_dtype, mask = _ABS_BITS.get(x.dtype, _ABS_BITS[torch.float32])
    float_dtype = x.dtype if x.dtype in _ABS_BITS else torch.float32
    # A tensor divisor on x's device, never a Python float: CUDA computes `tensor / python_scalar` as a
    # multiply by the rounded reciprocal, which differs from IEEE division for about half of all inputs.
    div448 = torch.full((), FP8_MAX, dtype=torch.float32, device=x.device)

    chunk_elems = _CHUNK_ELEMS if x.device.type == "cpu" else _CHUNK_ELEMS_DEVICE
    blocks_per_chunk = max(1, chunk_elems // (bn * k))
    chunk_rows = min(n, blocks_per_chunk * bn)
    buf_i = torch.empty(chunk_rows * k, dtype=int_dtype, device=x.device)
    buf_f = torch.empty(chunk_rows * k, dtype=torch.float32, device=x.device)

    n_full = (n // bn) * bn
    bounds = [(r0, min(n_full, r0 + chunk_rows)) for r0 in range(0, n_full, chunk_rows)]
    if n_full < n:
        bounds.append((n_full, n))
    for r0, r1 in bounds:
        rows = r1 - r0
        per_block = min(bn, rows)  # a ragged last row block is a chunk of its own
        nr = rows // per_block
        xc = x[r0:r1]
        if xc.dtype != float_dtype:
            xc = xc.float()

        absbits = buf_i[: rows * k].view(rows, k)
        torch.bitwise_and(xc.view(int_dtype), mask, out=absbits)
        colmax = absbits.view(nr, per_block, k).amax(1) if per_block > 1 else absbits
        amax_bits = torch.empty(nr, nbf + (tail > 0), dtype=int_dtype, device=x.device)
        if nbf:
            amax_bits[:, :nbf] = colmax[:, :k_main].reshape(nr, nbf, bk).amax(2)
        if tail:
            amax_bits[:, nbf] = colmax[:, k_main:].amax(1)
        scale = amax_bits.view(float_dtype).float().clamp_min_(AMAX_FLOOR).div_(div448)
        s[r0 // bn : r0 // bn + nr] = scale
        inv = torch.reciprocal(ceil_to_ue8m0(scale) if ue8m0 else scale)

        # No clamp to ±448 before the cast: |Wf| <= amax makes |Wf * (1/s)| <= 448 * (1 + 2**-21),
        # which rounds to 448 exactly as the clamped value does, so the bytes are the recipe's.
        y = buf_f[: rows * k].view(rows, k)
        y.copy_(xc)
        if nbf:
            y[:, :k_main].view(nr, per_block, nbf, bk).mul_(inv[:, None, :nbf, None])
        if tail:
            y[:, k_main:].view(nr, per_block, tail).mul_(inv[:, None, nbf:])
        q[r0:r1].copy_(y)


def block_quant_ref(
    w: torch.Tensor,
    *,
    ue8m0: bool = False,
    block: tuple[int, int] = (BLOCK, BLOCK),
    name: str | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to block FP8 by the recipe of docs/contract.md §6, byte for byte.

    ``w``: ``[N, K]`` or ``[E, N, K]`` (experts quantized independently), any float dtype, any device,
    any N and K. ``block=(bn, bk)``: ``(128, 128)`` for weights, ``(1, 128)`` for DeepGEMM's per-token
    activation recipe. Returns ``q`` float8_e4m3fn of ``w``'s shape (contiguous) and ``s`` float32
    ``[..., ceil(N/bn), ceil(K/bk)]`` (contiguous), power-of-two when ``ue8m0``. ``out``: a contiguous
    float8_e4m3fn tensor of ``w``'s shape on ``w``'s device to fill and return as ``q`` (a reused buffer).

    Raises :class:`InputError` naming ``name``, the expert and the block when ``w`` holds NaN or inf.
    """
    if not w.is_floating_point():
        raise InputError(f"block FP8 needs a float tensor, got {w.dtype}", tensor=name)
    if w.dim() not in (2, 3):
        raise InputError(f"block FP8 takes [N, K] or [E, N, K], got shape {list(w.shape)}", tensor=name)
    bn, bk = block
    n, k = w.shape[-2:]
    lead = tuple(w.shape[:-2])
    if out is None:
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    elif (
        out.dtype != torch.float8_e4m3fn
        or out.shape != w.shape
        or out.device != w.device
        or not out.is_contiguous()
    ):
        raise InputError(
            f"out must be contiguous float8_e4m3fn {list(w.shape)} on {w.device}, "
            f"got {out.dtype} {list(out.shape)} on {out.device}",
            tensor=name,
        )
    else:
        q = out
    s = torch.empty((*lead, cdiv(n, bn), cdiv(k, bk)), dtype=torch.float32, device=w.device)
    if w.numel() == 0:
        return q, s
    w = w.contiguous()
    if w.dim() == 2:
        _quant_rows(w, q, s, ue8m0=ue8m0, block=block)
    elif n % bn == 0:
        # Experts whose row blocks never straddle two experts quantize as one tall matrix.
        e = w.shape[0]
        _quant_rows(w.view(e * n, k), q.view(e * n, k), s.view(-1, s.shape[-1]), ue8m0=ue8m0, block=block)
    else:
        for e in range(w.shape[0]):
            _quant_rows(w[e], q[e], s[e], ue8m0=ue8m0, block=block)
    check_finite_scales(w, s, name=name, block=block)
    if ue8m0:
        s = ceil_to_ue8m0(s)
    return q, s


def dequant_ref(
    q: torch.Tensor,
    s: torch.Tensor,
    *,
    block: tuple[int, int] = (BLOCK, BLOCK),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``q.float() * s`` per block, computed in float32 (never via bf16), cropped to ``q``'s shape.

    ``q``: ``[..., N, K]`` float8_e4m3fn (or any float dtype); ``s``: float32
    ``[..., ceil(N/bn), ceil(K/bk)]``. Returns ``dtype`` of ``q``'s shape.
    """
    bn, bk = block
    n, k = q.shape[-2:]
    if tuple(s.shape[-2:]) != (cdiv(n, bn), cdiv(k, bk)) or s.shape[:-2] != q.shape[:-2]:
        raise InputError(f"scales {list(s.shape)} do not match {list(q.shape)} in {bn}x{bk} blocks")
    sf = s.float()
    if n % bn == 0 and k % bk == 0:
        out = q.float().view(*q.shape[:-2], n // bn, bn, k // bk, bk)
        out.mul_(sf[..., :, None, :, None])
        out = out.view(q.shape)
    else:
        expanded = sf.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
        out = q.float().mul_(expanded)
    return out if dtype == torch.float32 else out.to(dtype)


def _check_pow2(s: torch.Tensor) -> None:
    if s.dtype != torch.float32:
        raise InputError(f"SM100 scale packing takes float32 scales, got {s.dtype}")
    bits = s.view(torch.int32)
    exp = (bits >> 23) & 0xFF
    bad = ((bits & ~0x7F800000) != 0) | (exp == 0) | (exp == 0xFF)
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0, 0])
        value = float(s.flatten()[first])
        raise InputError(
            f"SM100 scales must be exact powers of two in [2**-126, 2**127]; scale #{first} is {value!r}",
            fix="quantize with --scale-fmt ue8m0",
        )


def pack_sm100_scales_ref(s: torch.Tensor, mn: int) -> torch.Tensor:
    """Pack 128 × 128 float32 power-of-two scales into DeepGEMM's SM100 layout (module docstring).

    ``s``: float32 ``[..., ceil(mn/128), SK]`` (``SK = ceil(K/128)``), every value an exact power of two
    (as :func:`ceil_to_ue8m0` makes them) else :class:`InputError`. Returns int32 ``[..., mn, PK]``,
    ``PK = ceil(SK/4)``, strides ``(..., PK * MN4, 1, MN4)`` with ``MN4 = align(mn, 4)``: a view of a
    zero-padded contiguous ``[..., PK, MN4]`` buffer (:func:`sm100_scales_to_storage`).
    """
    if s.dim() < 2 or s.shape[-2] != cdiv(mn, BLOCK):
        raise InputError(f"scales {list(s.shape)} do not cover {mn} rows in blocks of {BLOCK}")
    _check_pow2(s)
    return pack_sm100_exponents_ref((s.view(torch.int32) >> 23).to(torch.uint8), mn)


def pack_sm100_exponents_ref(exps: torch.Tensor, mn: int) -> torch.Tensor:
    """:func:`pack_sm100_scales_ref` from the UE8M0 bytes themselves: uint8 ``[..., ceil(mn/128), SK]``
    exponents (``2 ** (byte - 127)``, as E8M0 scales store them; byte 0 is ``2**-127``)."""
    if exps.dtype != torch.uint8 or exps.dim() < 2 or exps.shape[-2] != cdiv(mn, BLOCK):
        raise InputError(
            f"UE8M0 bytes {exps.dtype} {list(exps.shape)} do not cover {mn} rows in blocks of {BLOCK}"
        )
    lead = tuple(exps.shape[:-2])
    sk = exps.shape[-1]
    pk = cdiv(sk, 4)
    mn4 = cdiv(mn, SM100_TMA_ALIGN) * SM100_TMA_ALIGN
    g = math.prod(lead)
    per_row = exps.reshape(g, -1, sk).index_select(
        1, torch.arange(mn, device=exps.device) // BLOCK
    )  # [G, mn, SK]
    padded = torch.zeros(g, mn4, pk * 4, dtype=torch.uint8, device=exps.device)
    padded[:, :mn, :sk] = per_row
    words = padded.view(torch.int32)  # [G, MN4, PK]: byte j of word p is K block 4p + j (little-endian)
    storage = words.transpose(1, 2).contiguous()  # [G, PK, MN4], MN contiguous
    return sm100_scales_from_storage(storage.view(*lead, pk, mn4), mn)


def sm100_scales_to_storage(packed: torch.Tensor) -> torch.Tensor:
    """The contiguous int32 ``[..., PK, MN4]`` buffer behind an SM100 scale tensor ``[..., MN, PK]``
    (what a checkpoint stores). A view when ``packed`` came from :func:`pack_sm100_scales_ref`; other
    tensors are copied into that layout with zero rows ``MN .. MN4``."""
    mn, pk = packed.shape[-2:]
    mn4 = cdiv(mn, SM100_TMA_ALIGN) * SM100_TMA_ALIGN
    lead = tuple(packed.shape[:-2])
    shape = (*lead, pk, mn4)
    strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    expected = (*strides[:-2], 1, mn4)
    if (
        packed.dtype == torch.int32
        and tuple(packed.stride()) == expected
        and packed.storage_offset() == 0
        and packed.untyped_storage().nbytes() >= 4 * math.prod(shape)
    ):
        return torch.as_strided(packed, shape, strides)
    out = torch.zeros(shape, dtype=torch.int32, device=packed.device)
    out[..., :mn] = packed.to(torch.int32).mT
    return out


def sm100_scales_from_storage(stored: torch.Tensor, mn: int) -> torch.Tensor:
    """DeepGEMM's SM100 scale tensor int32 ``[..., mn, PK]`` (MN-major, TMA-aligned strides) as a view of
    the stored contiguous ``[..., PK, align(mn, 4)]`` buffer."""
    mn4 = cdiv(mn, SM100_TMA_ALIGN) * SM100_TMA_ALIGN
    if stored.dtype != torch.int32 or stored.dim() < 2 or stored.shape[-1] != mn4:
        raise InputError(
            f"SM100 scales must be int32 [..., PK, {mn4}] for {mn} rows, "
            f"got {stored.dtype} {list(stored.shape)}"
        )
    return stored.mT[..., :mn, :]


def unpack_sm100_scales_ref(packed: torch.Tensor, mn: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_sm100_scales_ref`: int32 ``[..., mn, ceil(ceil(k/128)/4)]`` (any strides)
    back to float32 ``[..., ceil(mn/128), ceil(k/128)]``.

    Raises :class:`InputError` when the shape does not fit ``mn × k``, when rows of one 128-row block
    disagree, when padding bytes are not zero or when a byte is not a normal exponent (1..254).
    """
    sk = cdiv(k, BLOCK)
    pk = cdiv(sk, 4)
    if packed.dtype != torch.int32 or packed.dim() < 2 or tuple(packed.shape[-2:]) != (mn, pk):
        raise InputError(
            f"SM100 scales for a {mn}x{k} weight are int32 [..., {mn}, {pk}], "
            f"got {packed.dtype} {list(packed.shape)}"
        )
    lead = tuple(packed.shape[:-2])
    # A fresh row-major copy: `.contiguous()` keeps the MN-major stride of a size-1 K dimension, and a
    # byte view needs stride 1 there.
    rowmajor = torch.empty(packed.shape, dtype=torch.int32, device=packed.device).copy_(packed)
    exps = rowmajor.view(torch.uint8).view(*lead, mn, pk * 4)
    if bool((exps[..., sk:] != 0).any()):
        raise InputError("SM100 scales: padding bytes past the last K block are not zero")
    exps = exps[..., :sk].to(torch.int32)
    heads = exps[..., ::BLOCK, :]  # first row of each 128-row block
    if not torch.equal(heads.repeat_interleave(BLOCK, dim=-2)[..., :mn, :], exps):
        raise InputError("SM100 scales: rows of one 128-row block carry different scales")
    if bool(((heads == 0) | (heads == 0xFF)).any()):
        raise InputError("SM100 scales: exponent byte 0 or 255 is not a finite power of two")
    return (heads << 23).view(torch.float32).contiguous()
