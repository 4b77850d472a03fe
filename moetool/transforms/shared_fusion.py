"""Shared-expert fusion (docs/contract.md §7): a shared expert of intermediate size S becomes m = S / I routed-expert
slots of ``moe_intermediate_size`` I, optionally repeated R times. Pure functions, no I/O.

SwiGLU is elementwise in the intermediate dimension, so splitting gate/up rows and down columns into
I-wide pieces splits the shared expert into m experts whose outputs sum to the original:
``down(silu(gate x) * up x) = Σ_j down[:, jI:(j+1)I] (silu(gate[jI:(j+1)I] x) * up[jI:(j+1)I] x)``.

Slot order after the E routed experts is replica-major: slot j of replica r is expert ``E + r·m + j``
(``moetool.moe.FusedSlots.slot_id``), so each replica is a contiguous run of m experts.

Every returned tensor is a fresh contiguous tensor that shares no storage with the inputs or with
another returned tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

from moetool.errors import InputError, PlanError, UsageError
from moetool.moe import FUSED_KEY, FusedSlots, MoeLayerWeights
from moetool.transforms.fp8_block import BLOCK

Slot = TypeVar("Slot", bound=tuple)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _check_split(shared_size: int, moe_intermediate_size: int) -> int:
    if moe_intermediate_size <= 0 or shared_size % moe_intermediate_size:
        raise PlanError(
            f"shared expert intermediate size {shared_size} is not a multiple of moe_intermediate_size "
            f"{moe_intermediate_size}, so it cannot be split into expert slots",
            fix="leave shared experts unfused for this model",
        )
    return shared_size // moe_intermediate_size


def split_shared(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, moe_intermediate_size: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split a shared expert into m = S / I expert slots.

    gate, up: ``[S, H]`` (``shared_expert(s).{gate,up}_proj.weight``); down: ``[H, S]``; any dtype.
    Returns m tuples ``(gate [I, H], up [I, H], down [H, I])``, slot j holding gate/up rows
    ``[jI, (j+1)I)`` and down columns ``[jI, (j+1)I)``, bit-identical to those slices.
    Raises ``PlanError`` when S % I != 0.
    """
    if gate.dim() != 2 or up.shape != gate.shape or tuple(down.shape) != (gate.shape[1], gate.shape[0]):
        raise InputError(
            f"shared expert: gate {list(gate.shape)}, up {list(up.shape)}, down "
            f"{list(down.shape)} are not [S, H], [S, H], [H, S]"
        )
    inter = moe_intermediate_size
    m = _check_split(gate.shape[0], inter)
    return [
        (
            _fresh(gate[j * inter : (j + 1) * inter]),
            _fresh(up[j * inter : (j + 1) * inter]),
            _fresh(down[:, j * inter : (j + 1) * inter]),
        )
        for j in range(m)
    ]


def _ceil_grid(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // BLOCK), -(-cols // BLOCK)


def split_shared_fp8(
    gate_q: torch.Tensor,
    gate_s: torch.Tensor,
    up_q: torch.Tensor,
    up_s: torch.Tensor,
    down_q: torch.Tensor,
    down_s: torch.Tensor,
    moe_intermediate_size: int,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split a block-FP8 shared expert into m = S / I slots without touching a byte.

    gate_q, up_q: ``[S, H]`` float8_e4m3fn (or their uint8 view) with gate_s, up_s ``[ceil(S/128),
    ceil(H/128)]`` float32; down_q ``[H, S]`` with down_s ``[ceil(H/128), ceil(S/128)]``. With I % 128 == 0
    every 128×128 block belongs to one slot, so the slot's bytes and scales are exactly what quantizing
    the BF16 slot would give (fuse-then-quantize equals quantize-then-fuse). Returns m tuples
    ``(gate_q [I, H], gate_s [I/128, ceil(H/128)], up_q, up_s, down_q [H, I], down_s [ceil(H/128), I/128])``.
    Raises ``PlanError`` when S % I != 0 or I % 128 != 0.
    """
    inter = moe_intermediate_size
    if inter <= 0 or inter % BLOCK:
        raise PlanError(
            f"moe_intermediate_size {inter} is not a multiple of {BLOCK}: FP8 blocks of the shared expert "
            f"would straddle two slots",
            fix="fuse the BF16 checkpoint, then quantize",
        )
    size, hidden = gate_q.shape if gate_q.dim() == 2 else (-1, -1)
    if size < 0 or up_q.shape != gate_q.shape or tuple(down_q.shape) != (hidden, size):
        raise InputError(
            f"shared expert: gate {list(gate_q.shape)}, up {list(up_q.shape)}, down "
            f"{list(down_q.shape)} are not [S, H], [S, H], [H, S]"
        )
    for name, s, want in (
        ("gate", gate_s, _ceil_grid(size, hidden)),
        ("up", up_s, _ceil_grid(size, hidden)),
        ("down", down_s, _ceil_grid(hidden, size)),
    ):
        if tuple(s.shape) != want:
            raise InputError(
                f"shared expert {name}_proj.weight_scale_inv is {list(s.shape)}, expected the "
                f"128×128 grid {list(want)}"
            )
    m = _check_split(size, inter)
    blocks = inter // BLOCK
    out = []
    for j in range(m):
        r, b = slice(j * inter, (j + 1) * inter), slice(j * blocks, (j + 1) * blocks)
        out.append(
            (
                _fresh(gate_q[r]),
                _fresh(gate_s[b]),
                _fresh(up_q[r]),
                _fresh(up_s[b]),
                _fresh(down_q[:, r]),
                _fresh(down_s[:, b]),
            )
        )
    return out


def replicate(slots: Sequence[Slot], replicas: int) -> list[Slot]:
    """Repeat m slots R times, replica-major: entry ``r·m + j`` is slot j (expert ``E + r·m + j``).

    Works for BF16 3-tuples and FP8 6-tuples alike. Replica 0 is ``slots`` itself; later replicas are
    clones, so no two entries share storage. Raises ``UsageError`` when R < 1.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise UsageError(f"--replicas must be an integer >= 1, got {replicas!r}")
    out: list[Slot] = list(slots)
    for _ in range(1, replicas):
        out.extend(type(s)(_fresh(t) for t in s) for s in slots)
    return out


def fused_config(
    config: Mapping[str, Any], first_slot: int, num_slots: int, replicas: int, slot_weight: str
) -> dict[str, Any]:
    """A copy of ``config`` with ``"moetool_fused_shared_experts": {"first_slot", "num_slots",
    "replicas", "slot_weight"}`` added last; every other key and value is kept as it was.

    Raises ``PlanError`` when the config already records fused shared experts.
    """
    if FUSED_KEY in config:
        raise PlanError(
            f"config.json already has {FUSED_KEY}: the shared experts are fused",
            fix="use the unfused checkpoint",
        )
    entry = FusedSlots(first_slot=first_slot, num_slots=num_slots, replicas=replicas, slot_weight=slot_weight)
    out = copy.deepcopy(dict(config))
    out[FUSED_KEY] = entry.to_config()
    return out


def fuse_layer(w: MoeLayerWeights, replicas: int, slot_weight: str) -> MoeLayerWeights:
    """In-memory fusion of one layer: the shared expert of ``w`` appended to ``w13``/``w2`` as m·R slots.

    ``w`` must hold E routed experts (``w13 [E, 2I, H]``) and an unfused shared expert; the result holds
    ``w13 [E + m·R, 2I, H]``, ``w2 [E + m·R, H, I]``, no unfused shared expert, the same router, bias
    and shared gate, and ``fused = FusedSlots(E, m, R, slot_weight)``.
    """
    if w.fused is not None or w.shared_w13 is None or w.shared_w2 is None:
        raise PlanError("the layer has no unfused shared expert to fuse")
    num_experts, inter = w.w13.shape[0], w.moe_intermediate_size
    s = w.shared_intermediate_size
    slots = replicate(split_shared(w.shared_w13[:s], w.shared_w13[s:], w.shared_w2, inter), replicas)
    w13 = torch.cat([w.w13, torch.stack([torch.cat([g, u], dim=0) for g, u, _ in slots]).to(w.w13.dtype)])
    w2 = torch.cat([w.w2, torch.stack([d for _, _, d in slots]).to(w.w2.dtype)])
    return MoeLayerWeights(
        router_weight=w.router_weight,
        score_bias=w.score_bias,
        w13=w13,
        w2=w2,
        shared_gate=w.shared_gate,
        fused=FusedSlots(
            first_slot=num_experts,
            num_slots=len(slots) // replicas,
            replicas=replicas,
            slot_weight=slot_weight,
        ),
    )
