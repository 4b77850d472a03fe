"""The transform of ``quantize``'s jobs, region by region: what a ``quant`` job makes of float and FP8
regions (:class:`Quantizer`, by the one FP8 policy of ``fp8_block.py``), what an ``fp4_cast`` job makes of
DeepSeek's FP4 experts (:func:`fp4_cast_region`, lossy blocks counted or refused), the scales a job
writes (:func:`job_scales`: SM100-packed, E8M0 or float32), and a result in its output tensor's stored
dtype (:func:`as_stored`). No file I/O: the pipeline reads the regions and writes what comes back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moetool.errors import InputError, InternalError
from moetool.io.safetensors_format import DTYPES
from moetool.kernels import dispatch
from moetool.transforms import fp8_block


class Quantizer:
    """The FP8 policy (``fp8_block.py``) and DeepSeek's FP4 cast applied on one device (the kernels on a
    GPU, the torch references elsewhere: the same bytes); results come back on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def quant(
        self,
        w: torch.Tensor,
        *,
        ue8m0: bool,
        name: str,
        take: Callable[[torch.Size, torch.dtype], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, s)`` of a float region ``w``; ``take(shape, dtype)`` (a CPU quantizer's) gives the buffer
        for ``q``."""
        out = take(w.shape, torch.float8_e4m3fn) if take is not None else None
        q, s = fp8_block.quantize(w.to(self.device, non_blocking=True), ue8m0=ue8m0, name=name, out=out)
        return q.cpu(), s.cpu()

    def from_fp8(
        self, q: torch.Tensor, s: torch.Tensor, *, ue8m0: bool, name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the policy makes of an FP8 region (float32 or E8M0 scales): its bytes, or its
        requantization (``fp8_block.expected_fp8``)."""
        q, s = fp8_block.expected_fp8(q, s, ue8m0=ue8m0, name=name, device=self.device)
        return q.cpu(), s.cpu()

    def fp4_cast(
        self, packed: torch.Tensor, scale: torch.Tensor, *, name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DeepSeek's FP4 → FP8 cast (:func:`moetool.kernels.fp4_cast_ref.fp4_cast_ref`): ``(q, s E8M0,
        changed per block)``."""
        dev = self.device
        q, s, changed = dispatch.fp4_cast(
            packed.to(dev, non_blocking=True), scale.to(dev, non_blocking=True), name=name
        )
        return q.cpu(), s.cpu(), changed.cpu()

    def region(
        self,
        t: torch.Tensor,
        s: torch.Tensor | None,
        *,
        ue8m0: bool,
        name: str,
        take: Callable[[torch.Size, torch.dtype], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a ``quant`` job makes of one source region: ``(t, None)`` a float region, quantized;
        ``(q, s)`` an FP8 region, kept or requantized."""
        if s is None:
            return self.quant(t, ue8m0=ue8m0, name=name, take=take)
        return self.from_fp8(t, s, ue8m0=ue8m0, name=name)


def fp4_cast_region(
    quantizer: Quantizer,
    packed: torch.Tensor,
    scale: torch.Tensor,
    *,
    name: str,
    file: str,
    lossless: bool,
    lossy: list[dict[str, Any]] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP4 source region (I8 weight and its E8M0 ``.scale``) cast to FP8: ``(q, s E8M0)``. A block
    whose values the cast changes is refused when ``lossless``, else recorded in ``lossy``."""
    q, s, changed = quantizer.fp4_cast(packed, scale, name=name)
    hit = changed.nonzero()
    if len(hit):
        rb, cb = (int(i) for i in hit[0])
        if lossless:
            raise InputError(
                f"the cast to FP8 changes {int(changed[rb, cb])} values of 128x128 block (row block "
                f"{rb}, column block {cb}); {int((changed > 0).sum())} blocks of this weight are lossy",
                file=file,
                tensor=name,
                fix="its FP4 scales span more binades than e4m3 holds; drop --require-lossless to "
                "accept the rounding (it is counted in moetool.json)",
            )
        if lossy is not None:
            lossy.extend(
                {"tensor": name, "block": [int(r), int(c)], "changed": int(changed[r, c])}
                for r, c in hit.tolist()
            )
    return q, s


def job_scales(
    qs: list[torch.Tensor], ss: list[torch.Tensor], *, scale_layout: str, scale_dtype: str | None = None
) -> list[torch.Tensor]:
    """The scale pieces a job writes for its regions' ``(qs, ss)``: one SM100-packed tensor for the rows
    of every region (from float32 scales, or from E8M0 ones), else the regions' scales, E8M0 ones as
    float32 when the job stores ``F32``."""
    if scale_layout == "sm100":
        s = ss[0] if len(ss) == 1 else torch.cat(ss)
        rows = sum(q.shape[0] for q in qs)
        if s.dtype == torch.float8_e8m0fnu:
            return [fp8_block.sm100_pack_exponents(s.view(torch.uint8), rows)]
        return [fp8_block.sm100_pack(s, rows)]
    if scale_dtype == "F32" and ss and ss[0].dtype == torch.float8_e8m0fnu:
        from moetool.kernels.fp4_cast_ref import e8m0_to_float

        return [e8m0_to_float(s) for s in ss]
    return ss


def as_stored(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t`` in the output tensor's safetensors ``dtype``, where scales change convention: E8M0 scales
    become float32 exactly (DeepSeek-V4's shared expert in a stacked layout); float32 scales become E8M0
    when every one is a power of two E8M0 holds. Nothing else converts."""
    want = DTYPES[dtype]
    if t.dtype == want:
        return t
    if t.dtype == torch.float8_e8m0fnu and want == torch.float32:
        return t.float()
    if t.dtype == torch.float32 and want == torch.float8_e8m0fnu:
        e8 = t.to(torch.float8_e8m0fnu)
        if torch.equal(e8.float(), t):
            return e8
        raise InputError(
            "float32 block scales that are not all powers of two cannot join E8M0-scaled experts",
            fix="quantize with --scale-fmt ue8m0 first",
        )
    raise InternalError(f"a {t.dtype} result for a {dtype} tensor")
