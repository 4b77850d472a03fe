"""Pure transforms of SSM state tensors (``moetool.ssm`` names and ``StateMeta``); no I/O.

Each function takes ``(tensors, meta)`` and returns a new ``(tensors, meta)``; inputs are never modified
and untouched tensors are passed through as they are. ``convert_state`` chains them in the order
``moetool convert-ssm`` applies: unpool → layout → dtype → conv trim → conv layout → pool.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from moetool.errors import InputError, UsageError
from moetool.gdn import LAYOUTS, Layout
from moetool.ssm import (
    CONV_LAYOUTS,
    ConvLayout,
    StateMeta,
    check_state_tensors,
    conv_state_name,
    parse_state_name,
    recurrent_state_name,
    slot_ids_name,
    state_layers,
)

StateDtype = Literal["keep", "float32", "bfloat16"]
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

Tensors = dict[str, torch.Tensor]


def _kind(name: str) -> str | None:
    parsed = parse_state_name(name)
    return parsed[1] if parsed else None


def convert_layout(
    tensors: Mapping[str, torch.Tensor], meta: StateMeta, to: Layout
) -> tuple[Tensors, StateMeta]:
    """Recurrent states to layout ``to``: an exact transpose of the last two dims, made contiguous
    (``[N, HV, K, V]`` k-first ↔ ``[N, HV, V, K]`` k-last). Same layout: returned unchanged. A pooled
    state is k-last by definition: ``from_pool`` it before asking for k-first."""
    if to not in LAYOUTS:
        raise UsageError(f"unknown state layout {to!r}", fix=f"use one of {', '.join(LAYOUTS)}")
    if to == meta.layout:
        return dict(tensors), meta
    if meta.pooled:
        raise UsageError("a pooled state is k-last", fix="unpool it (from_pool) before converting to k-first")
    out = {
        name: t.transpose(-1, -2).contiguous() if _kind(name) == "recurrent_state" else t
        for name, t in tensors.items()
    }
    return out, meta.replace(layout=to)


def convert_conv_layout(
    tensors: Mapping[str, torch.Tensor], meta: StateMeta, to: ConvLayout
) -> tuple[Tensors, StateMeta]:
    """conv_states to orientation ``to``: an exact transpose of the last two dims, made contiguous
    (``[N, conv_dim, W]`` dim-first ↔ ``[N, W, conv_dim]`` dim-last, pools alike). vLLM 0.33 keeps its
    conv state ``(state_len, dim)`` per sequence unless ``VLLM_SSM_CONV_STATE_LAYOUT=DS``: dim-last.
    Same orientation: returned unchanged. The label changes with the tensors, also for a file without
    conv_state (it says how one would be stored)."""
    if to not in CONV_LAYOUTS:
        raise UsageError(f"unknown conv layout {to!r}", fix=f"use one of {', '.join(CONV_LAYOUTS)}")
    if to == meta.conv_layout:
        return dict(tensors), meta
    out = {
        name: t.transpose(-1, -2).contiguous() if _kind(name) == "conv_state" else t
        for name, t in tensors.items()
    }
    return out, meta.replace(conv_layout=to)


def convert_dtype(
    tensors: Mapping[str, torch.Tensor], meta: StateMeta, dtype: StateDtype | torch.dtype
) -> tuple[Tensors, StateMeta]:
    """Recurrent states to ``dtype`` (``keep``, ``float32`` or ``bfloat16``; round to nearest even).

    bfloat16 → float32 is exact; float32 → bfloat16 rounds and happens only when asked for by name.
    conv_state keeps its dtype (engines keep it in the model's activation dtype whatever the SSM
    state's), slot ids stay int32.
    """
    if dtype == "keep":
        return dict(tensors), meta
    target = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype  # type: ignore[arg-type]
    if target not in _DTYPES.values():
        raise UsageError(f"state dtype {dtype!r} is not keep, float32 or bfloat16")
    out = {
        name: t.to(target) if _kind(name) == "recurrent_state" else t  # type: ignore[arg-type]
        for name, t in tensors.items()
    }
    return out, meta


def to_pool(tensors: Mapping[str, torch.Tensor], meta: StateMeta) -> tuple[Tensors, StateMeta]:
    """Pack every layer's ``[N, HV, V, K]`` k-last state into a pool ``[N+1, HV, V, K]`` whose row 0 is
    the zero null slot and whose row ``n+1`` is sequence ``n``; adds ``slot_ids = 1..N`` (int32 ``[N]``)
    per layer. conv_state, when present, is pooled the same way (``[N+1, conv_dim, W]``, same slots).
    The result is what a pool-indexed decode kernel reads with zero copies."""
    if meta.pooled:
        return dict(tensors), meta
    if meta.layout != "k-last":
        raise UsageError(
            "pooling needs the k-last layout", fix="convert with --to k-last first (or with --pool)"
        )
    out: Tensors = {}
    for name, t in tensors.items():
        if _kind(name) in ("recurrent_state", "conv_state"):
            pool = t.new_zeros((t.shape[0] + 1, *t.shape[1:]))
            pool[1:] = t
            out[name] = pool
        else:
            out[name] = t
    for layer in state_layers(tensors):
        n = tensors[recurrent_state_name(layer)].shape[0]
        out[slot_ids_name(layer)] = torch.arange(1, n + 1, dtype=torch.int32)
    return out, meta.replace(pooled=True)


def from_pool(tensors: Mapping[str, torch.Tensor], meta: StateMeta) -> tuple[Tensors, StateMeta]:
    """Gather each layer's pool rows ``slot_ids`` back into a dense ``[N, HV, V, K]`` k-last state (and
    conv_state ``[N, conv_dim, W]``); a slot id of -1 yields a zero state. Drops the slot ids."""
    if not meta.pooled:
        return dict(tensors), meta
    out: Tensors = {
        name: t
        for name, t in tensors.items()
        if _kind(name) not in ("recurrent_state", "conv_state", "slot_ids")
    }
    for layer in state_layers(tensors):
        ids_name = slot_ids_name(layer)
        if ids_name not in tensors:
            raise InputError("is missing from a pooled state", tensor=ids_name)
        ids = tensors[ids_name].to(torch.int64)
        for name in (recurrent_state_name(layer), conv_state_name(layer)):
            if name not in tensors:
                continue
            pool = tensors[name]
            if bool(((ids < -1) | (ids >= pool.shape[0])).any()):
                raise InputError(f"slot ids outside [-1, {pool.shape[0] - 1}]", tensor=ids_name)
            dense = pool.index_select(0, ids.clamp(min=0))
            dense[ids < 0] = 0
            out[name] = dense
    return out, meta.replace(pooled=False)


def trim_conv_state(
    tensors: Mapping[str, torch.Tensor], meta: StateMeta, kernel_size: int
) -> tuple[Tensors, StateMeta]:
    """Keep the last ``kernel_size − 1`` columns of every conv_state, as the engines store it.

    conv_state is ``[N, conv_dim, W]`` (dim-first; dim-last ``[N, W, conv_dim]``): channels (q, k, v of
    the short causal convolution) by the last ``W`` inputs, oldest first. transformers' Qwen3-Next cache keeps ``W = kernel_size`` columns (its
    ``causal_conv1d_update`` concatenates the new token and keeps the last ``state_len`` columns);
    vLLM/SGLang and the causal-conv1d kernels keep ``W = kernel_size − 1``, since the oldest of
    ``kernel_size`` columns never enters the next output. A conv_state with fewer columns is refused.
    """
    if kernel_size < 2:
        raise UsageError(f"conv kernel size {kernel_size} must be at least 2")
    keep = kernel_size - 1
    axis = -1 if meta.conv_layout == "dim-first" else -2  # the W axis
    out: Tensors = {}
    for name, t in tensors.items():
        if _kind(name) == "conv_state":
            if t.shape[axis] < keep:
                raise InputError(
                    f"has {t.shape[axis]} columns, fewer than kernel_size − 1 = {keep}",
                    tensor=name,
                    fix="check linear_conv_kernel_dim",
                )
            out[name] = t.narrow(axis, t.shape[axis] - keep, keep).contiguous()
        else:
            out[name] = t
    return out, meta


def convert_state(
    tensors: Mapping[str, torch.Tensor],
    meta: StateMeta,
    *,
    layout: Layout | None = None,
    dtype: StateDtype = "keep",
    pool: bool = False,
    conv_kernel_size: int | None = None,
    conv_layout: ConvLayout | None = None,
) -> tuple[Tensors, StateMeta]:
    """Everything ``moetool convert-ssm`` does between reading and writing, in order.

    layout None keeps the current one (k-last when ``pool``), conv_layout None the current conv_state
    orientation; a pooled input is unpooled first unless
    the result is pooled k-last again. ``pool`` with ``layout='k-first'`` is refused. The result is
    checked (``check_state_tensors``) before it is returned.
    """
    target = layout or ("k-last" if pool else meta.layout)
    if pool and target != "k-last":
        raise UsageError("--pool writes k-last pools", fix="drop --to k-first or drop --pool")
    out: Mapping[str, torch.Tensor] = tensors
    if meta.pooled and not (pool and target == "k-last"):
        out, meta = from_pool(out, meta)
    out, meta = convert_layout(out, meta, target)
    out, meta = convert_dtype(out, meta, dtype)
    if conv_kernel_size is not None:
        out, meta = trim_conv_state(out, meta, conv_kernel_size)
    if conv_layout is not None:
        out, meta = convert_conv_layout(out, meta, conv_layout)
    if pool:
        out, meta = to_pool(out, meta)
    result = dict(out)
    check_state_tensors(result, meta)
    return result, meta
