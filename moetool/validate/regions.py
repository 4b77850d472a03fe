"""What each converted expert is made of and how a check cuts it from a read step: the original
sources of a converted expert (:func:`expected_sources`: a routed expert, or a fused slot's slice of
the shared expert), its stored regions (gate, up, down), how a report names them, a region cut from a
whole tensor read into a step (:func:`slice_field`), and experts stacked in a step (:class:`Stack`).
``reads.py`` lays the steps out; the checks read them through these."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moetool.errors import InputError, InternalError
from moetool.model import CheckpointView, e8m0_scale_name, find_scale, scale_name
from moetool.plan import Src
from moetool.transforms import fp8_block

if TYPE_CHECKING:
    from moetool.validate.protocol import Tensors


def expected_sources(
    orig: CheckpointView, conv: CheckpointView, layer: int, e: int
) -> tuple[tuple[Src, ...], Src]:
    """Original sources of converted expert ``e``: routed expert e, or a fused shared-expert slice."""
    inter, n_routed = orig.info.moe_intermediate_size, orig.info.num_experts
    if e < n_routed:
        store = orig.stores[layer]
        return store.gate_up(e, inter), store.down(e)
    sh = orig.shared.get(layer)
    if sh is None or not conv.fused:
        raise InputError(
            f"expert {e} exists in the converted layer {layer} but not in the original",
            tensor=conv.stores[layer].prefix,
        )
    j = (e - n_routed) % int(conv.fused["num_slots"])
    rows = (j * inter, (j + 1) * inter)
    return (Src(sh.gate, rows=rows), Src(sh.up, rows=rows)), Src(sh.down, cols=rows)


def stored_regions(conv: CheckpointView, layer: int, e: int) -> list[Src]:
    """Converted expert ``e``'s regions: gate, up, down."""
    store = conv.stores[layer]
    gu, d = store.gate_up(e, conv.info.moe_intermediate_size), store.down(e)
    return [*gu, d]


def region_name(src: Src, *, scale: bool = False, tensors: object = None) -> str:
    """How a report names a converted region: the tensor (its block scales with ``scale``: the
    ``weight_scale_inv``, or the ``.scale`` that ``tensors`` holds), with the expert index and row range
    of a stacked tensor."""
    name = src.name
    if scale:
        name = (find_scale(tensors, src.name) if tensors is not None else None) or scale_name(src.name)
    if src.expert is None:
        return name
    rows = f", rows {src.rows[0]}:{src.rows[1]}" if src.rows else ""
    span = fp8_block.scale_span(src.rows)
    if scale and span:
        rows = f", scale rows {span[0]}:{span[1]}"
    return f"{name}[{src.expert}{rows}]"


def slice_field(b: Tensors, side: str, src: Src, root: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``src`` cut from the whole tensor read into field ``{side}:{name}`` (and its scale blocks), exactly
    as ``read_source`` reads it from the checkpoint at ``root``."""
    t = b[f"{side}:{src.name}"]
    s = None
    if t.dtype == torch.float8_e4m3fn:
        s = b.get(f"{side}:{scale_name(src.name)}")
        if s is None:
            s = b.get(f"{side}:{e8m0_scale_name(src.name)}")
        if s is None:
            raise InputError(
                "FP8 tensor without its block scales (weight_scale_inv or scale)",
                file=str(root),
                tensor=src.name,
            )
    if src.expert is not None:
        t = t[src.expert]
        s = None if s is None else s[src.expert]
    if src.rows:
        t = t[src.rows[0] : src.rows[1]]
    if src.cols:
        t = t[:, src.cols[0] : src.cols[1]]
    return t, None if s is None else fp8_block.slice_scales(s, src.rows, src.cols)


class Stack:
    """Experts stacked in a batch: ``{p}w13`` ``[n, R, H]`` (row ranges ``parts`` hold the gate/up
    sources of ``w13[k]``, in order), ``{p}w2`` ``[n, H, I]``, and for FP8 their scales ``{p}s13`` (rows
    ``sparts`` per source) and ``{p}s2``; ``whole_scales``: ``s13[k]``/``s2[k]`` are an expert's whole
    scale tensors (SM100 int32 layout), not split by source. Expert ``experts[k]`` is at index k.
    With ``int4_group`` the stacks hold compressed-tensors INT4 experts: ``w13``/``w2`` their packed
    int32 words (``[n, R, H/8]``), ``s13``/``s2`` their group scales, one row per weight row. ``fp4``:
    the experts are DeepSeek-V4's FP4 (int8 ``[.., N, K/2]`` with E8M0 scales ``[.., N, K/32]``, one per
    row), read with their scales like FP8."""

    def __init__(
        self,
        prefix: str,
        experts: list[int],
        parts: list[tuple[int, int]],
        sparts: list[tuple[int, int]] | None,
        fp8: bool,
        whole_scales: bool,
        int4_group: int = 0,
        fp4: bool = False,
    ) -> None:
        self.prefix, self.experts, self.parts, self.sparts = prefix, experts, parts, sparts
        self.fp8, self.whole_scales, self.int4_group, self.fp4 = fp8, whole_scales, int4_group, fp4
        self.pos = {e: k for k, e in enumerate(experts)}

    def int4_values(self, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Exact float32 values of stacked INT4 rows ``packed [..., K/8]`` with scales ``[..., K/g]``."""
        from moetool.transforms import int4

        k = scale.shape[-1] * self.int4_group
        flat = int4.dequantize(
            packed.reshape(-1, packed.shape[-1]), scale.reshape(-1, scale.shape[-1]), k, self.int4_group
        )
        return flat.reshape(*packed.shape[:-1], k)

    def region(self, b: Tensors, e: int, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Source ``j`` of expert ``e`` (gate/up sources, then down) with its scale blocks, as
        ``read_source`` returns it."""
        k, p = self.pos[e], self.prefix
        if self.int4_group:
            if j < len(self.parts):
                r0, r1 = self.parts[j]
                return self.int4_values(b[p + "w13"][k, r0:r1], b[p + "s13"][k, r0:r1]), None
            return self.int4_values(b[p + "w2"][k], b[p + "s2"][k]), None
        if j < len(self.parts):
            r0, r1 = self.parts[j]
            t = b[p + "w13"][k, r0:r1]
            if not (self.fp8 or self.fp4):
                return t, None
            if self.sparts is None:
                raise InternalError("whole-expert scales have no per-source rows", tensor=p)
            s0, s1 = self.sparts[j]
            return t, b[p + "s13"][k, s0:s1]
        return b[p + "w2"][k], b[p + "s2"][k] if self.fp8 or self.fp4 else None

    def select(self, t: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """Rows of stacked ``t`` for ``experts``, in that order (``t`` itself when that is all of them)."""
        if experts == self.experts:
            return t
        idx = torch.tensor([self.pos[e] for e in experts], device=t.device)
        if t.element_size() == 1:  # gathered as bytes: index kernels need not cover FP8 on every device
            return t.view(torch.uint8)[idx].view(t.dtype)
        return t[idx]
