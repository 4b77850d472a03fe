"""Loading a ``--layout deepgemm`` checkpoint back, for Python consumers.

    from moetool.layout import load_experts, unpack_to_hf
    w = load_experts("./dsv3-fp8", layer=3)       # stacked tensors, ready for DeepGEMM
    w.w13.shape, w.w13_scale.shape                 # [E, 2I, H] e4m3, [E, 2I/128, ceil(H/128)] f32
    per_expert = unpack_to_hf("./dsv3-fp8", layer=3)   # {hf name: tensor}, as --layout hf stores it

``w13`` rows ``[0, I)`` of expert e are gate_proj, rows ``[I, 2I)`` up_proj; ``w2`` is down_proj. With
``--scale-layout sm100`` the scales are stored as int32 UE8M0 words (see ``moetool.kernels.fp8_quant_ref``);
``load_experts(..., unpack_scales=True)`` returns them as float32 block grids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moetool.errors import InputError
from moetool.io.checkpoint import Checkpoint
from moetool.model import analyze
from moetool.transforms.fp8_block import BLOCK, sm100_unpack


@dataclass(frozen=True)
class StackedExperts:
    """One MoE layer in DeepGEMM's layout (the RHS of ``m_grouped_fp8_gemm_nt_contiguous``).

    w13: [E, 2I, H] float8_e4m3fn, K-major (``stride(0) == 2I·H``); w13_scale: [E, 2I/128, ceil(H/128)] f32
    w2: [E, H, I] float8_e4m3fn; w2_scale: [E, ceil(H/128), I/128] f32
    With SM100 scales (not unpacked): int32 [E, MN, ceil(ceil(K/128)/4)], MN-major with TMA-aligned
    strides, as DeepGEMM's SM100 kernels take them (a view of the stored buffer).
    """

    layer: int
    prefix: str
    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    scale_layout: str  # "sm90" | "sm100"

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]


def load_experts(path: str | os.PathLike[str], layer: int, *, unpack_scales: bool = False) -> StackedExperts:
    with Checkpoint(path) as ckpt:
        view = analyze(ckpt)
        store = view.stores.get(layer)
        if store is None or store.kind != "deepgemm":
            raise InputError(
                f"layer {layer} is not stored in the deepgemm layout",
                file=str(path),
                fix=f"MoE layers: {sorted(view.stores)}; layout: {view.layout}",
            )
        t = {k: ckpt.read(v) for k, v in store.stacked.items()}
    packed = t["w13_weight_scale_inv"].dtype == torch.int32
    if packed:
        _, n13, h = t["w13_weight"].shape
        _, n2, i = t["w2_weight"].shape
        stored13, stored2 = t["w13_weight_scale_inv"], t["w2_weight_scale_inv"]
        if unpack_scales:
            s13, s2 = sm100_unpack(stored13, n13, h), sm100_unpack(stored2, n2, i)
            packed = False
        else:
            from moetool.kernels.fp8_quant_ref import sm100_scales_from_storage

            # DeepGEMM's view of the stored [E, PK, align(MN, 4)] words: [E, MN, PK], MN-major
            s13, s2 = sm100_scales_from_storage(stored13, n13), sm100_scales_from_storage(stored2, n2)
        t["w13_weight_scale_inv"], t["w2_weight_scale_inv"] = s13, s2
    return StackedExperts(
        layer,
        store.prefix,
        t["w13_weight"],
        t["w13_weight_scale_inv"],
        t["w2_weight"],
        t["w2_weight_scale_inv"],
        "sm100" if packed else "sm90",
    )


def unpack_to_hf(path: str | os.PathLike[str], layer: int) -> dict[str, torch.Tensor]:
    """The layer's experts as ``--layout hf`` names them: per expert gate/up/down ``weight`` and
    ``weight_scale_inv`` (byte-equal to what ``quantize --layout hf`` writes)."""
    w = load_experts(path, layer, unpack_scales=True)
    with Checkpoint(path) as ckpt:
        proj = analyze(ckpt).arch.proj_names
    inter = w.w13.shape[1] // 2
    si = inter // BLOCK
    out: dict[str, torch.Tensor] = {}
    for e in range(w.num_experts):
        base = f"{w.prefix}.{e}"
        for name, q, s in (
            (proj["gate"], w.w13[e, :inter], w.w13_scale[e, :si]),
            (proj["up"], w.w13[e, inter:], w.w13_scale[e, si:]),
            (proj["down"], w.w2[e], w.w2_scale[e]),
        ):
            out[f"{base}.{name}.weight"] = q.contiguous()
            out[f"{base}.{name}.weight_scale_inv"] = s.contiguous()
    return out
