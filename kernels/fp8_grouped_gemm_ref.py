"""FP8 block grouped GEMM for MoE experts: the torch reference (the specification of
``kernels/fp8_grouped_gemm.py``), DeepGEMM's ``calc_diff`` and the contiguous token layout.

Operands follow DeepGEMM's SM90 contract (``m_grouped_fp8_gemm_nt_contiguous`` / ``_masked``):

- activations ``a_q [M, K]`` float8_e4m3fn, K-major, with per-token scales ``a_s [M, ceil(K/128)]``
  float32 (1×128 blocks: ``a[m, k] ≈ a_q[m, k] · a_s[m, k // 128]``);
- weights ``b_q [G, N, K]`` float8_e4m3fn, K-major (the ``w13_weight``/``w2_weight`` tensors of the
  ``deepgemm`` layout), with ``b_s [G, ceil(N/128), ceil(K/128)]`` float32 (128×128 blocks);
- ``d = a · bᵀ`` per expert, ``[M, N]`` (``nt``: neither operand is transposed in memory, both K-major).

The reference dequantizes both operands in float32 (``q · s`` per block, never through bf16) and
multiplies in float32. Its own float32 rounding is far below FP8's, so it stands for the exact product
of the quantized operands; only the final cast to ``out_dtype`` rounds visibly. The fp32 matmul must be
IEEE (TF32 off, torch's default): TF32 would round the dequantized operands to 10 mantissa bits.
"""

from __future__ import annotations

import torch

from moetool.errors import InputError
from moetool.kernels.fp8_quant_ref import BLOCK as SCALE_BLOCK  # 1×128 activation, 128×128 weight blocks
from moetool.kernels.fp8_quant_ref import dequant_ref

_ACT_BLOCK = (1, SCALE_BLOCK)

_FP8 = torch.float8_e4m3fn


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's GEMM distance ``1 − 2⟨x,y⟩ / (|x|² + |y|²)`` computed in float64.

    x, y: same shape, any float dtype and device. 0 for identical tensors, about 1 for unrelated ones
    of similar norm; NaN anywhere makes the result NaN (so a ``< threshold`` check fails). Two all-zero
    tensors give 0.
    """
    if x.shape != y.shape:
        raise InputError(f"calc_diff: shapes differ, {list(x.shape)} vs {list(y.shape)}")
    xd = x.detach().to(torch.float64)
    yd = y.detach().to(torch.float64).to(xd.device)
    denom = (xd * xd + yd * yd).sum()
    if not bool(torch.isnan(denom)) and float(denom) == 0.0:
        return 0.0
    return float(1.0 - 2.0 * (xd * yd).sum() / denom)


def _check_weights(name: str, b_q: torch.Tensor, b_s: torch.Tensor, k: int) -> tuple[int, int]:
    if b_q.dim() != 3 or b_q.dtype != _FP8:
        raise InputError(f"{name}: b_q must be float8_e4m3fn [G, N, K], got {b_q.dtype} {list(b_q.shape)}")
    g, n, kb = b_q.shape
    if kb != k:
        raise InputError(f"{name}: b_q has K={kb}, activations have K={k}")
    want = (g, -(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK))
    if tuple(b_s.shape) != want or b_s.dtype != torch.float32:
        raise InputError(f"{name}: b_s must be float32 {list(want)}, got {b_s.dtype} {list(b_s.shape)}")
    return g, n


def _check_act_scales(name: str, a_q: torch.Tensor, a_s: torch.Tensor) -> None:
    if a_q.dtype != _FP8:
        raise InputError(f"{name}: a_q must be float8_e4m3fn, got {a_q.dtype}")
    want = (*a_q.shape[:-1], -(-a_q.shape[-1] // SCALE_BLOCK))
    if tuple(a_s.shape) != want or a_s.dtype != torch.float32:
        raise InputError(f"{name}: a_s must be float32 {list(want)}, got {a_s.dtype} {list(a_s.shape)}")


def grouped_gemm_ref(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    m_indices: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Contiguous-layout grouped GEMM: row ``m`` of the output is ``a[m] · b[m_indices[m]]ᵀ``.

    a_q: ``[M, K]`` float8_e4m3fn; a_s: ``[M, ceil(K/128)]`` float32 (1×128 blocks).
    b_q: ``[G, N, K]`` float8_e4m3fn, K-major; b_s: ``[G, ceil(N/128), ceil(K/128)]`` float32.
    m_indices: ``[M]`` integer expert id per row; ``-1`` marks a padding row, whose output is zero
    (whatever its activations hold, NaN included). Rows may come in any order here; the Triton kernel
    additionally needs DeepGEMM's alignment (each expert's rows start at a multiple of 128).
    Returns d: ``[M, N]`` in ``out_dtype``.
    """
    if a_q.dim() != 2:
        raise InputError(f"grouped_gemm_ref: a_q must be [M, K], got {list(a_q.shape)}")
    _check_act_scales("grouped_gemm_ref", a_q, a_s)
    m, k = a_q.shape
    g, n = _check_weights("grouped_gemm_ref", b_q, b_s, k)
    if m_indices.shape != (m,):
        raise InputError(f"grouped_gemm_ref: m_indices must be [M={m}], got {list(m_indices.shape)}")
    ids = m_indices.to(device=a_q.device, dtype=torch.int64)
    d = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    experts = torch.unique(ids).tolist()
    bad = [e for e in experts if e < -1 or e >= g]
    if bad:
        raise InputError(f"grouped_gemm_ref: m_indices holds ids {bad[:8]} outside [-1, {g})")
    for e in experts:
        if e < 0:
            continue
        rows = torch.nonzero(ids == e).squeeze(1)
        # Gathered as bytes: index kernels need not cover FP8 dtypes on every device.
        a_rows = a_q.view(torch.uint8)[rows].view(a_q.dtype)
        a = dequant_ref(a_rows, a_s[rows], block=_ACT_BLOCK)
        d[rows] = a @ dequant_ref(b_q[e], b_s[e]).t()
    return d.to(out_dtype)


def masked_grouped_gemm_ref(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Masked-layout grouped GEMM: ``d[g, :masked_m[g]] = a[g, :masked_m[g]] · b[g]ᵀ``, other rows zero.

    a_q: ``[G, M_max, K]`` float8_e4m3fn; a_s: ``[G, M_max, ceil(K/128)]`` float32.
    b_q: ``[G, N, K]`` float8_e4m3fn, K-major; b_s: ``[G, ceil(N/128), ceil(K/128)]`` float32.
    masked_m: ``[G]`` integer count of valid rows per group, each in ``[0, M_max]``.
    Returns d: ``[G, M_max, N]`` in ``out_dtype``.
    """
    if a_q.dim() != 3:
        raise InputError(f"masked_grouped_gemm_ref: a_q must be [G, M_max, K], got {list(a_q.shape)}")
    _check_act_scales("masked_grouped_gemm_ref", a_q, a_s)
    g_a, m_max, k = a_q.shape
    g, n = _check_weights("masked_grouped_gemm_ref", b_q, b_s, k)
    if g_a != g or masked_m.shape != (g,):
        raise InputError(
            f"masked_grouped_gemm_ref: need a_q [G={g}, M_max, K] and masked_m [G], got "
            f"{list(a_q.shape)} and {list(masked_m.shape)}"
        )
    counts = masked_m.tolist()
    if any(c < 0 or c > m_max for c in counts):
        raise InputError(f"masked_grouped_gemm_ref: masked_m {counts[:8]}... must lie in [0, {m_max}]")
    d = torch.zeros(g, m_max, n, dtype=torch.float32, device=a_q.device)
    for e, c in enumerate(counts):
        if c == 0:
            continue
        a = dequant_ref(a_q[e, :c], a_s[e, :c], block=_ACT_BLOCK)
        d[e, :c] = a @ dequant_ref(b_q[e], b_s[e]).t()
    return d.to(out_dtype)


def contiguous_layout(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, align: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort token rows by expert into DeepGEMM's contiguous layout.

    x: ``[T, K]`` any dtype (activations, their FP8 bytes, or their ``[T, ceil(K/128)]`` scales: the
    placement depends only on ``expert_ids``, so calling this on ``a_q`` and on ``a_s`` with the same ids
    puts matching rows in matching places). expert_ids: ``[T]`` integer, each in ``[0, num_experts)``.
    Experts occupy consecutive segments in id order, tokens keep their order within a segment, and each
    segment is padded with zero rows to a multiple of ``align`` (an expert with no tokens takes no rows).

    Returns ``(a, m_indices, row_of_token)``: a ``[M_sum, K]`` (x's dtype, padding rows zero),
    m_indices ``[M_sum]`` int32 (expert id, ``-1`` on padding rows), row_of_token ``[T]`` int64 with
    ``a[row_of_token[t]] == x[t]``, so ``d[row_of_token]`` gathers results back in token order.
    """
    if x.dim() != 2 or expert_ids.dim() != 1 or expert_ids.shape[0] != x.shape[0]:
        raise InputError(
            f"contiguous_layout: need x [T, K] and expert_ids [T], got {list(x.shape)} and "
            f"{list(expert_ids.shape)}"
        )
    if align < 1:
        raise InputError(f"contiguous_layout: align must be positive, got {align}")
    device = x.device
    ids = expert_ids.to(device=device, dtype=torch.int64)
    t = ids.shape[0]
    if t and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise InputError(
            f"contiguous_layout: expert ids span [{int(ids.min())}, {int(ids.max())}], "
            f"outside [0, {num_experts})"
        )
    counts = torch.bincount(ids, minlength=num_experts)
    padded = (counts + align - 1) // align * align
    seg_start = torch.cumsum(padded, 0) - padded
    m_sum = int(padded.sum())

    order = torch.sort(ids, stable=True).indices
    sorted_ids = ids[order]
    first_in_sorted = torch.cumsum(counts, 0) - counts
    rank = torch.arange(t, device=device) - first_in_sorted[sorted_ids]
    row_of_token = torch.empty(t, dtype=torch.int64, device=device)
    row_of_token[order] = seg_start[sorted_ids] + rank

    a = torch.zeros((m_sum, *x.shape[1:]), dtype=x.dtype, device=device)
    if x.element_size() == 1 and x.is_floating_point():
        # index_put has no FP8 kernels; the placement is a byte copy anyway.
        a.view(torch.uint8)[row_of_token] = x.view(torch.uint8)
    else:
        a[row_of_token] = x
    m_indices = torch.full((m_sum,), -1, dtype=torch.int32, device=device)
    m_indices[row_of_token] = ids.to(torch.int32)
    return a, m_indices, row_of_token
