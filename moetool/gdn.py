"""Gated DeltaNet (Qwen3-Next linear attention) decode step: the torch reference (docs/contract.md §8).

Per value head ``hv`` with key head ``h = hv // (HV / H)`` and one token::

    q̂, k̂ = l2norm(q), l2norm(k)                 x * rsqrt(sum(x²) + 1e-6), as fla and transformers
    g = -exp(A_log) · softplus(a + dt_bias)     log-space decay, one scalar per (token, value head)
    β = sigmoid(b)
    S' = exp(g) · S                              S: [K, V] in k-first form
    δ = β · (v - S'ᵀ k̂)                          [V]
    S = S' + k̂ δᵀ
    o = Sᵀ (q̂ · scale)                           scale = 1/√K unless given

(flash-linear-attention ``fla/ops/gated_delta_rule/fused_recurrent.py``; transformers
``models/qwen3_next/modeling_qwen3_next.py``, ``torch_recurrent_gated_delta_rule``.)

State layouts: ``k-first`` holds ``S`` as ``[N, HV, K, V]`` (transformers, fla default); ``k-last`` holds
``Sᵀ`` as ``[N, HV, V, K]`` (FlashInfer, SGLang, vLLM, fla ``state_v_first=True``).

Precision: everything is computed in float32. A state of lower precision (bf16) is widened on entry,
held in float32 across the ``T`` tokens of one call and rounded to its own dtype once when stored, which
is what fla's fused recurrent kernel and the engines' decode kernels do (the state lives in registers
for the whole launch). A decode engine calls once per token, so its bf16 state is rounded after every
token; ``round_each_step=True`` reproduces a sequence of such calls in one. (fla itself returns the final
state in float32 whatever the initial state's dtype; cast it to compare.)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from moetool.errors import InputError

Layout = Literal["k-first", "k-last"]
LAYOUTS: tuple[Layout, ...] = ("k-first", "k-last")

L2NORM_EPS = 1e-6
"""Added to ``sum(x²)`` before the reciprocal square root (fla, transformers, SGLang all use 1e-6)."""

STATE_DTYPES = (torch.float32, torch.bfloat16)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error ``‖actual − expected‖₂ / ‖expected‖₂`` in float64 (0 when both are zero;
    ``inf`` when only ``expected`` is zero; NaN anywhere gives NaN, which fails every ``<=`` bound)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x * rsqrt(sum(x², -1) + eps)`` over the last dim, in x's dtype (transformers' ``l2norm``;
    fla's kernels compute ``x / sqrt(sum(x²) + eps)``, the same up to the last bit)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gdn_gates(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay and write strength from the raw projections.

    a, b: ``[..., HV]`` any float dtype (``in_proj_ba`` outputs); A_log, dt_bias: ``[HV]`` (float32 in
    Qwen3-Next checkpoints). Returns ``g = -exp(A_log)·softplus(a + dt_bias)`` (log-space decay, ≤ 0) and
    ``beta = sigmoid(b)``, both float32 of a's shape. softplus is torch's (threshold 20, as fla's kernel).
    """
    g = -torch.exp(A_log.float()) * F.softplus(a.float() + dt_bias.float())
    beta = torch.sigmoid(b.float())
    return g, beta


def state_shape(layout: Layout, n: int, hv: int, k: int, v: int) -> tuple[int, int, int, int]:
    """The recurrent-state shape of ``n`` sequences: ``[n, hv, k, v]`` k-first, ``[n, hv, v, k]`` k-last."""
    if layout == "k-first":
        return (n, hv, k, v)
    if layout == "k-last":
        return (n, hv, v, k)
    raise InputError(f"unknown state layout {layout!r}", fix=f"use one of {', '.join(LAYOUTS)}")


def _check_decode_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    layout: str,
) -> tuple[int, int, int, int, int, int, int]:
    if q.dim() != 4:
        raise InputError(f"expected [N, T, H, K], got shape {list(q.shape)}", tensor="q")
    n, t, h, dk = q.shape
    if k.shape != q.shape:
        raise InputError(f"shape {list(k.shape)} differs from q's {list(q.shape)}", tensor="k")
    if v.dim() != 4 or v.shape[0] != n or v.shape[1] != t:
        raise InputError(f"expected [N={n}, T={t}, HV, V], got shape {list(v.shape)}", tensor="v")
    hv, dv = v.shape[2], v.shape[3]
    if h == 0 or hv % h != 0:
        raise InputError(
            f"value heads HV={hv} are not a multiple of key heads H={h}",
            tensor="v",
            fix="GVA needs HV % H == 0",
        )
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (n, t, hv):
            raise InputError(f"expected [N, T, HV] = {[n, t, hv]}, got {list(x.shape)}", tensor=name)
    expected = state_shape(layout, n, hv, dk, dv)  # type: ignore[arg-type]
    if tuple(state.shape) != expected:
        raise InputError(
            f"expected {layout} shape {list(expected)}, got {list(state.shape)}",
            tensor="state",
            fix="check the state layout label (k-first [N, HV, K, V], k-last [N, HV, V, K])",
        )
    if state.dtype not in STATE_DTYPES:
        raise InputError(f"dtype {state.dtype} is not float32 or bfloat16", tensor="state")
    return n, t, h, hv, dk, dv, hv // h


def gdn_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    layout: Layout,
    scale: float | None = None,
    round_each_step: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``T`` recurrent GDN steps from ``state``; the specification the kernels are tested against.

    q, k: ``[N, T, H, K]``; v: ``[N, T, HV, V]`` (HV a multiple of H); g (log-space decay), beta:
    ``[N, T, HV]`` (``gdn_gates``); state: ``[N, HV, K, V]`` (k-first) or ``[N, HV, V, K]`` (k-last),
    float32 or bfloat16, not modified. q and k are l2-normalised here; scale defaults to ``K ** -0.5``.

    Returns ``o [N, T, HV, V]`` in q's dtype and the new state, contiguous, in the state's dtype and
    layout. Both layouts run the identical float32 arithmetic on a k-first copy, so they agree exactly.
    ``round_each_step`` rounds the state to its dtype after every token instead of once at the end.
    """
    _n, t, _h, _hv, dk, _dv, group = _check_decode_inputs(q, k, v, g, beta, state, layout)
    if scale is None:
        scale = dk**-0.5
    qf = l2norm(q.float()) * scale
    kf = l2norm(k.float())
    if group > 1:
        qf = qf.repeat_interleave(group, dim=2)
        kf = kf.repeat_interleave(group, dim=2)
    vf = v.float()
    decay = torch.exp(g.float())
    bf = beta.float()

    s = state.transpose(-1, -2) if layout == "k-last" else state
    s = s.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # [N, HV, K, V]
    out = torch.empty(vf.shape, dtype=torch.float32, device=vf.device)
    for i in range(t):
        q_t = qf[:, i].unsqueeze(-2)  # [N, HV, 1, K]
        k_t = kf[:, i]  # [N, HV, K]
        s = s * decay[:, i, :, None, None]
        kv = (k_t.unsqueeze(-2) @ s).squeeze(-2)  # S'ᵀ k̂: [N, HV, V]
        delta = bf[:, i, :, None] * (vf[:, i] - kv)
        s = s + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, i] = (q_t @ s).squeeze(-2)
        if round_each_step and state.dtype != torch.float32:
            s = s.to(state.dtype).float()

    new_state = s.to(state.dtype)
    if layout == "k-last":
        new_state = new_state.transpose(-1, -2)
    return out.to(q.dtype), new_state.contiguous()


def gdn_decode_gated_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    *,
    layout: Layout,
    scale: float | None = None,
    round_each_step: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gdn_decode_ref`` from the raw gate inputs ``a, b [N, T, HV]`` and ``A_log, dt_bias [HV]``
    (``gdn_gates`` first); what the fused kernels compute."""
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    return gdn_decode_ref(
        q, k, v, g, beta, state, layout=layout, scale=scale, round_each_step=round_each_step
    )
