"""Torch reference of ``gdn_decode_klast``: gather the pool rows, run ``moetool.gdn``, scatter back.

Same signature and contract as the Triton kernel (``kernels/gdn_decode.py``), on any device; slower, and
it checks the slot ids on the host (the kernel cannot without a device sync)."""

from __future__ import annotations

import torch

from moetool.errors import InputError
from moetool.gdn import gdn_decode_gated_ref


def gdn_decode_klast_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state_pool: torch.Tensor,
    slot_ids: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T`` GDN decode steps for ``B`` sequences whose K-last states live in a pool, updated in place.

    q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; a, b: ``[B, T, HV]`` raw gate inputs; A_log, dt_bias:
    ``[HV]``; state_pool: ``[P+1, HV, V, K]`` float32 or bfloat16 (slot 0 the zero null slot); slot_ids:
    int32 ``[B]``, distinct, each in ``[0, P]`` or -1 ("no state": start from zeros, write nothing back).
    Returns ``o [B, T, HV, V]`` in q's dtype (written into ``out`` when given). Pool rows not named by a
    non-negative slot id keep their bytes.
    """
    if slot_ids.dim() != 1 or slot_ids.shape[0] != q.shape[0]:
        raise InputError(f"expected [B={q.shape[0]}], got {list(slot_ids.shape)}", tensor="slot_ids")
    if state_pool.dim() != 4:
        raise InputError(f"expected [P+1, HV, V, K], got {list(state_pool.shape)}", tensor="state_pool")
    ids = slot_ids.to(torch.int64)
    num_slots = state_pool.shape[0]
    bad = (ids < -1) | (ids >= num_slots)
    if bool(bad.any()):
        raise InputError(
            f"slot ids {ids[bad].tolist()} outside [-1, {num_slots - 1}]",
            tensor="slot_ids",
        )
    live = ids >= 0
    if int(torch.unique(ids[live]).numel()) != int(live.sum()):
        raise InputError("a slot id appears twice in one batch", tensor="slot_ids")

    state = state_pool.index_select(0, ids.clamp(min=0))
    state[~live] = 0
    o, new_state = gdn_decode_gated_ref(q, k, v, a, b, A_log, dt_bias, state, layout="k-last", scale=scale)
    state_pool.index_copy_(0, ids[live], new_state[live])
    if out is None:
        return o
    out.copy_(o)
    return out
