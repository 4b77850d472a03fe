"""FP8 block grouped GEMM for MoE experts (Triton), with DeepGEMM's SM90 contract.

``m_grouped_fp8_gemm_nt_contiguous`` and ``m_grouped_fp8_gemm_nt_masked`` take the same operands as
DeepGEMM's functions of those names: activations ``a_q`` float8_e4m3fn K-major with per-token scales
``a_s`` (1×128 blocks, float32, any strides: row-major or DeepGEMM's MN-major), weights ``b_q [G, N, K]``
float8_e4m3fn K-major (the ``deepgemm`` layout's ``w13_weight``/``w2_weight``) with ``b_s [G,
ceil(N/128), ceil(K/128)]`` float32 (128×128 blocks), and write ``d = a · bᵀ`` per expert in bfloat16.
The torch reference with the same contract is ``kernels/fp8_grouped_gemm_ref.py``.

Arithmetic: each program owns a ``[BLOCK_M, BLOCK_N]`` output tile of one expert and walks K in steps of
128, one scale block: ``acc += dot(a_q tile, b_q tileᵀ) · (a_s[:, k] · b_s[k])``. The FP8 products are
exact and the dot sums 128 of them on the tensor cores; promoting every 128-deep partial sum into a
float32 accumulator is DeepGEMM's fix for the limited accumulation precision of Hopper's FP8 MMA, and it is
what makes the block scales applicable at all. Where BLOCK_N divides 128 a tile's weight scale is one
scalar per K step; a 256-wide tile reads one per column (two distinct values). Either way each element's
rescale is the same float32 product ``a_s · b_s`` and one FMA, so every tile shape gives the same bits.

Layout rules (as DeepGEMM on SM90): in the contiguous layout every expert's rows start at a multiple of
128 and are followed by ``-1`` padding rows, so a tile of ``BLOCK_M ≤ 128`` rows belongs to one expert.
Padding rows (``-1``) come out zero, and a tile with no expert rows writes zeros without reading any
weights. A layout that breaks the contract fails loudly instead of silently wrong: in a tile whose rows
name several experts only the largest id is computed and the other rows come out NaN, and rows with an id
``≥ G`` come out NaN without any weight being read (checking on the host would cost a sync per call).

Launch configurations come from a small table keyed on rows per expert and N (K only sets the loop
length; ``select_config``):
at ≤ 64 rows per expert the GEMM streams weights (each weight byte is used for at most 2·64 FLOPs, far
under Hopper's ≈590 FLOP/byte balance), so tiles are 64 rows tall, all-padding tiles are skipped, and
enough pipeline stages are in flight to saturate HBM; above that it is compute-bound and uses 64×128
TMA-fed tiles, three programs per SM (128×128 tiles on two warpgroups where TMA is unavailable), with a
grouped (L2-friendly) tile order. Activation scales are read MN-major there (``mn_major_scales``).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moetool.errors import InputError
from moetool.kernels._device import hopper_or_later, interpreting, launch_error, require_launchable
from moetool.kernels._launch import Launcher, rebased
from moetool.kernels.fp8_quant_ref import BLOCK as SCALE_BLOCK

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer path only
    TensorDescriptor = None

BLOCK_K = SCALE_BLOCK  # one scale block per K step (1×128 activation blocks, 128×128 weight blocks)
# float32 quiet NaN, built from bits so every backend produces the same value
_NAN_BITS: tl.constexpr = tl.constexpr(0x7FC00000)

_FP8 = torch.float8_e4m3fn


def _cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. (``triton.cdiv`` is a constexpr function, about 2 µs a call
    outside a kernel, and the launcher needs several per call.)"""
    return -(-a // b)


@triton.jit
def _store_tile(
    d_ptr, values, row_ids, keep_id, grp64, offs_m, offs_n, M, N, stride_dg, stride_dm, stride_dn
):
    """Store ``values [BLOCK_M, BLOCK_N]`` for rows whose id is ``keep_id``; padding rows (id < 0) get 0
    and rows of any other id get NaN. Built only where it is stored, so the fill tile is never live
    across the main loop."""
    nan_tile = tl.full(values.shape, _NAN_BITS, tl.int32).to(tl.float32, bitcast=True)
    fill = tl.where(row_ids[:, None] < 0, 0.0, nan_tile)
    out = tl.where((row_ids == keep_id)[:, None], values, fill)
    d_ptrs = (
        d_ptr
        + grp64 * stride_dg
        + offs_m.to(tl.int64)[:, None] * stride_dm
        + offs_n.to(tl.int64)[None, :] * stride_dn
    )
    d_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(d_ptrs, out.to(d_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _step_scale(sa, sb, BLOCK_N: tl.constexpr):
    """The scale of one K step's partial sums, ``a_s[m, k] · b_s[n // 128, k]``, shaped to broadcast over
    the ``[BLOCK_M, BLOCK_N]`` tile: ``[BLOCK_M, 1]`` when the tile lies in one weight-scale block (``sb``
    a scalar), ``[BLOCK_M, BLOCK_N]`` when it spans several (``sb`` one scale per column)."""
    if BLOCK_N > 128:
        return sa[:, None] * sb[None, :]
    else:
        return (sa * sb)[:, None]


@triton.jit
def fp8_grouped_gemm_kernel(
    a_desc,  # TMA descriptor of a as [G?·M, K] with [BLOCK_M, BLOCK_K] boxes (USE_TMA), else None
    b_desc,  # TMA descriptor of b as [G·N, K] with [BLOCK_N, BLOCK_K] boxes (USE_TMA), else None
    a_ptr,  # [G?, M, K] e4m3, K-major (G only for the masked layout)
    a_s_ptr,  # [G?, M, ceil(K/128)] f32, any strides
    b_ptr,  # [G, N, K] e4m3, K-major
    b_s_ptr,  # [G, ceil(N/128), ceil(K/128)] f32, any strides
    d_ptr,  # [G?, M, N] bf16
    layout_ptr,  # contiguous: m_indices [M] int32; masked: masked_m [G] int32
    M,
    N,
    K,
    G,
    stride_ag,
    stride_am,
    stride_ak,
    stride_asg,
    stride_asm,
    stride_ask,
    stride_bg,
    stride_bn,
    stride_bk,
    stride_bsg,
    stride_bsn,
    stride_bsk,
    stride_dg,
    stride_dm,
    stride_dn,
    MASKED: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PIPE_DOT: tl.constexpr = False,
    SCALES_AHEAD: tl.constexpr = False,
):
    tl.static_assert(
        (128 % BLOCK_N == 0) | (BLOCK_N % 128 == 0),
        "BLOCK_N must divide the 128-wide weight scale block or be a multiple of it",
    )
    tl.static_assert(BLOCK_K == 128, "one K step is one 128-deep scale block")

    # Grouped tile order: GROUP_M consecutive M tiles (rows of one expert in the contiguous layout) sweep
    # the N tiles together, so the weight tiles they share stay in L2.
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    grp64 = grp.to(tl.int64)

    if MASKED:
        m_valid = tl.load(layout_ptr + grp)
        row_ids = tl.where(offs_m < m_valid, grp, -1)
    else:
        row_ids = tl.load(layout_ptr + offs_m, mask=offs_m < M, other=-1)
    # Valid tiles hold one expert id and -1s, so the maximum is the tile's expert.
    expert = tl.max(row_ids, axis=0)

    if (expert < 0) | (expert >= G):
        # Nothing to compute (all padding), or an id past G (never dereferenced): zeros / NaN rows.
        empty = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        _store_tile(d_ptr, empty, row_ids, -2, grp64, offs_m, offs_n, M, N, stride_dg, stride_dm, stride_dn)
        return

    # Rows past M and columns past N read row m mod M / column n mod N instead of being masked: the
    # loads stay in bounds and unpredicated, and those results are never stored.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    e64 = expert.to(tl.int64)
    a_ptrs = a_ptr + grp64 * stride_ag + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + e64 * stride_bg + cols[None, :] * stride_bn + offs_k[:, None] * stride_bk
    a_s_ptrs = a_s_ptr + grp64 * stride_asg + rows * stride_asm
    if BLOCK_N > 128:
        # A tile spans BLOCK_N // 128 weight-scale blocks: one scale per column, read per K step (each
        # column's product with the row's scale is the same float32 multiply as the scalar case's).
        b_s_ptrs = b_s_ptr + e64 * stride_bsg + (cols // 128) * stride_bsn
    else:
        b_s_ptrs = b_s_ptr + e64 * stride_bsg + ((pid_n * BLOCK_N) // 128) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        # The copy engine fetches both operand tiles (zero-filled past the last row and past K) into
        # shared memory, no address arithmetic in the loop. Rows of a tile past this group's M (masked
        # layout) or columns past this expert's N read the neighbour's data and are never stored.
        a_row = (grp * M + pid_m * BLOCK_M).to(tl.int32)
        b_row = (expert * N + pid_n * BLOCK_N).to(tl.int32)
        if PIPE_DOT:
            # The MMA of step kb + 1 is issued before step kb's partial sum is rescaled into the
            # accumulator, so the rescale can overlap the tensor cores. The same operations in the same
            # order as below: acc = (((0 + p0·s0) + p1·s1) + ...), bit for bit.
            # The previous step's scales are carried (not their [BLOCK_M, BLOCK_N] product).
            part = tl.dot(a_desc.load([a_row, 0]), b_desc.load([b_row, 0]).T)
            sa = tl.load(a_s_ptrs)
            sb = tl.load(b_s_ptrs)
            for kb in range(1, tl.cdiv(K, BLOCK_K)):
                a = a_desc.load([a_row, kb * BLOCK_K])
                b = b_desc.load([b_row, kb * BLOCK_K]).T
                sa_next = tl.load(a_s_ptrs + kb * stride_ask)
                sb_next = tl.load(b_s_ptrs + kb * stride_bsk)
                part_next = tl.dot(a, b)
                acc += part * _step_scale(sa, sb, BLOCK_N)
                sa = sa_next
                sb = sb_next
                part = part_next
            acc += part * _step_scale(sa, sb, BLOCK_N)
        elif SCALES_AHEAD:
            # Each step's scales are loaded one step ahead (the last step reloads its own), so their
            # latency never waits behind the MMA. Same arithmetic as below.
            k_steps = tl.cdiv(K, BLOCK_K)
            sa = tl.load(a_s_ptrs)
            sb = tl.load(b_s_ptrs)
            for kb in range(0, k_steps):
                a = a_desc.load([a_row, kb * BLOCK_K])
                b = b_desc.load([b_row, kb * BLOCK_K]).T
                k_next = tl.minimum(kb + 1, k_steps - 1)
                sa_next = tl.load(a_s_ptrs + k_next * stride_ask)
                sb_next = tl.load(b_s_ptrs + k_next * stride_bsk)
                acc += tl.dot(a, b) * _step_scale(sa, sb, BLOCK_N)
                sa = sa_next
                sb = sb_next
        else:
            for kb in range(0, tl.cdiv(K, BLOCK_K)):
                a = a_desc.load([a_row, kb * BLOCK_K])
                b = b_desc.load([b_row, kb * BLOCK_K]).T
                sa = tl.load(a_s_ptrs + kb * stride_ask)
                sb = tl.load(b_s_ptrs + kb * stride_bsk)
                acc += tl.dot(a, b) * _step_scale(sa, sb, BLOCK_N)
    else:
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            sa = tl.load(a_s_ptrs + kb * stride_ask)
            sb = tl.load(b_s_ptrs + kb * stride_bsk)
            acc += tl.dot(a, b) * _step_scale(sa, sb, BLOCK_N)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

    _store_tile(d_ptr, acc, row_ids, expert, grp64, offs_m, offs_n, M, N, stride_dg, stride_dm, stride_dn)


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration. ``block_m`` is a power of two in [16, 128] (so a tile stays inside one
    expert's 128-aligned segment); ``block_n`` a power of two in [16, 256] (up to 128 a tile lies in one
    weight-scale block column and takes one weight scale per K step, at 256 it takes one per column);
    ``group_m`` M tiles share their weight tiles through L2; ``num_warps``/``num_stages`` as in Triton;
    ``tma`` loads the operand tiles through TMA tensor descriptors (Hopper's copy engine; contiguous
    operands, K a multiple of 16, 16-byte aligned); ``mn_major`` makes row-major activation scales
    MN-major before the launch (``mn_major_scales``: one small transposing copy, worth it where the GEMM is
    compute-bound); ``pipe_dot`` (TMA only) issues each K step's MMA before the previous step's partial
    sum is rescaled, ``scales_ahead`` (TMA only) loads each step's scales one step early, both the same
    arithmetic in the same order. Every configuration gives the same bits."""

    block_m: int
    block_n: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool = False
    mn_major: bool = False
    pipe_dot: bool = False
    scales_ahead: bool = False

    def check(self) -> None:
        for name, v, top in (("block_m", self.block_m, 128), ("block_n", self.block_n, 256)):
            if v < 16 or v > top or v & (v - 1):
                raise InputError(f"GemmConfig.{name}={v}: must be a power of two in [16, {top}]")
        if self.group_m < 1 or self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise InputError(f"GemmConfig {self}: group_m ≥ 1, num_warps a power of two ≤ 16, stages ≥ 1")
        if (self.pipe_dot or self.scales_ahead) and not self.tma:
            raise InputError(f"GemmConfig {self}: pipe_dot and scales_ahead need tma=True (TMA loop only)")
        if self.pipe_dot and self.scales_ahead:
            raise InputError(f"GemmConfig {self}: pipe_dot already loads scales a step ahead; pick one")


# Rows per expert at or below which the GEMM is bound by reading weights (see module docstring).
_STREAMING_ROWS = 64
# Weight-streaming tiles: 64 rows fill one warpgroup's MMA (m64); 4 stages of (64 + 128)×128 bytes =
# 96 KiB let two programs share an SM, keeping 8 weight tiles (128 KiB) in flight per SM.
_STREAMING = GemmConfig(block_m=64, block_n=128, group_m=1, num_warps=4, num_stages=4)
# The same tiles fed by TMA where it is available. On an H100, DeepSeek-V3 experts at 8 × 64 rows: w2 52.9
# µs and w13 93-94 µs with either activation-scale layout, against 53.4 / 97.2 µs (row-major scales) and
# 56.5 / 99.7 µs (MN-major) with the pointer loads above. So scales are read as given here: making
# row-major ones MN-major would add a copy to a 50 µs call and gain nothing.
_STREAMING_TMA = GemmConfig(block_m=64, block_n=128, group_m=1, num_warps=4, num_stages=4, tma=True)
# Twice the programs for small grids; 5 stages of 16 KiB keep as many weight bytes in flight per program.
_STREAMING_NARROW = GemmConfig(block_m=64, block_n=64, group_m=1, num_warps=4, num_stages=5)
# Compute-bound tiles: 128×128 on two warpgroups (64 accumulator + 64 partial-sum registers per thread),
# 4 stages × 32 KiB of operands, GROUP_M=8 for weight reuse in L2.
_COMPUTE = GemmConfig(block_m=128, block_n=128, group_m=8, num_warps=8, num_stages=4)
# The same regime where TMA is available: 64×128 tiles on one warpgroup fed by the copy engine, three
# programs per SM (3 stages × 24 KiB of operands and 160-164 registers per thread each), so one program's
# per-block rescale overlaps the others' MMAs; GROUP_M=32 keeps an expert's weight tiles in L2 across its
# row tiles. On an H200 this ran 2-12% faster than _COMPUTE on every DeepSeek-V3 expert shape at 512-4096
# rows per expert, and 3 stages (three programs per SM) beat 4 (two) by 0-12%, most on w2 (K = 2048).
_COMPUTE_TMA = GemmConfig(
    block_m=64, block_n=128, group_m=32, num_warps=4, num_stages=3, tma=True, mn_major=True
)
# Depth at or below which the compute regime takes _COMPUTE_TMA_SHORT_K instead (DeepSeek-V3's w2 has K =
# 2048, its w13 7168): with few K steps per tile the prologue and epilogue weigh more, so the best tiles
# may differ. The same configuration until measured otherwise (scripts/tune_grouped_gemm.py).
_SHORT_K = 2048
_COMPUTE_TMA_SHORT_K = _COMPUTE_TMA


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=512)
def select_config(
    rows_per_expert: int, n: int, k: int, m_tiles: int, sm_count: int, tma: bool = False
) -> GemmConfig:
    """Launch configuration for ``rows_per_expert`` expected rows per expert, output width ``n``, depth
    ``k``, ``m_tiles`` expected 64-row tiles holding real rows (over all experts), ``sm_count`` SMs and
    whether the operands can go through TMA (``tma``).

    Streaming regime (≤ 64 rows): 64×128 tiles (TMA-fed where available); 64×64 when 128-wide tiles would
    leave SMs without a program (few experts times a narrow N). Narrower tiles are not the default
    because every N tile re-reads the expert's activation rows from L2: at 64×64 that is as many bytes as
    the weights. Compute regime: TMA-fed tiles where TMA is available (``_COMPUTE_TMA``, or
    ``_COMPUTE_TMA_SHORT_K`` at K ≤ ``_SHORT_K``), else 128×128; grouped order.
    """
    if rows_per_expert <= _STREAMING_ROWS:
        if m_tiles * _cdiv(n, _STREAMING.block_n) < sm_count:
            return _STREAMING_NARROW
        return _STREAMING_TMA if tma else _STREAMING
    if not tma:
        return _COMPUTE
    return _COMPUTE_TMA_SHORT_K if k <= _SHORT_K else _COMPUTE_TMA


def _check_common(
    fn: str, a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor
) -> None:
    if a_q.dtype != _FP8 or b_q.dtype != _FP8:
        raise launch_error(
            fn, f"operands must be float8_e4m3fn, got {a_q.dtype} and {b_q.dtype}", tensor="a_q/b_q"
        )
    if a_s.dtype != torch.float32 or b_s.dtype != torch.float32:
        raise launch_error(
            fn, f"scales must be float32 (SM90 format), got {a_s.dtype} and {b_s.dtype}", tensor="a_s/b_s"
        )
    if b_q.dim() != 3:
        raise launch_error(fn, f"weights must be [G, N, K], got {list(b_q.shape)}", tensor="b_q")
    k = a_q.shape[-1]
    g, n, kb = b_q.shape
    if kb != k:
        raise launch_error(fn, f"weights have K={kb}, activations K={k}", tensor="b_q")
    if a_q.stride(-1) != 1 and k > 1:
        raise launch_error(
            fn, f"activations must be K-major (stride(-1) == 1), got strides {a_q.stride()}", tensor="a_q"
        )
    if b_q.stride(-1) != 1 and k > 1:
        raise launch_error(
            fn, f"weights must be K-major (stride(-1) == 1), got strides {b_q.stride()}", tensor="b_q"
        )
    want_as = (*a_q.shape[:-1], _cdiv(k, SCALE_BLOCK))
    if tuple(a_s.shape) != want_as:
        raise launch_error(
            fn,
            f"activation scales must be {list(want_as)} (1×128 blocks), got {list(a_s.shape)}",
            tensor="a_s",
        )
    want_bs = (g, _cdiv(n, SCALE_BLOCK), _cdiv(k, SCALE_BLOCK))
    if tuple(b_s.shape) != want_bs:
        raise launch_error(
            fn, f"weight scales must be {list(want_bs)} (128×128 blocks), got {list(b_s.shape)}", tensor="b_s"
        )
    devices = {t.device for t in (a_q, a_s, b_q, b_s)}
    if len(devices) != 1:
        raise launch_error(
            fn, f"tensors on different devices: {sorted(map(str, devices))}", tensor="a_q/a_s/b_q/b_s"
        )
    require_launchable(
        a_q, fn, tensor="a_q", reference="moetool.kernels.fp8_grouped_gemm_ref.grouped_gemm_ref"
    )


def _check_out(fn: str, out: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if out.dtype != torch.bfloat16 or tuple(out.shape) != shape or out.device != device:
        raise launch_error(
            fn, f"must be bfloat16 {list(shape)} on {device}, got {out.dtype} {list(out.shape)}", tensor="out"
        )


def _tma_layout_ok(a_q: torch.Tensor, b_q: torch.Tensor) -> bool:
    """Whether the operands can be described to TMA: contiguous, 16-byte aligned, K a multiple of 16."""
    k = b_q.shape[-1]
    return (
        TensorDescriptor is not None
        and a_q.is_contiguous()
        and b_q.is_contiguous()
        and k % 16 == 0
        and a_q.data_ptr() % 16 == 0
        and b_q.data_ptr() % 16 == 0
    )


def _device_config(
    rows: int, n: int, k: int, m_tiles: int, a_q: torch.Tensor, b_q: torch.Tensor
) -> GemmConfig:
    device = a_q.device
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        sms = _sm_count(index)
        tma = hopper_or_later(index) and _tma_layout_ok(a_q, b_q)
    else:
        sms, tma = 1, False
    return select_config(max(1, rows), n, k, max(1, m_tiles), sms, tma)


def contiguous_config(a_q: torch.Tensor, b_q: torch.Tensor, expected_m: int | None = None) -> GemmConfig:
    """The configuration ``m_grouped_fp8_gemm_nt_contiguous`` picks for ``a_q [M, K]``, ``b_q [G, N, K]``.

    Rows per expert default to ``M // G``. In the streaming regime each non-empty expert holds one
    64-row tile of real rows in its 128-row segment, so the segments count the tiles with work.
    """
    m = a_q.shape[0]
    g, n, k = b_q.shape
    rows = expected_m if expected_m is not None else m // max(1, g)
    return _device_config(rows, n, k, _cdiv(m, SCALE_BLOCK), a_q, b_q)


def masked_config(a_q: torch.Tensor, b_q: torch.Tensor, expected_m: int | None = None) -> GemmConfig:
    """The configuration ``m_grouped_fp8_gemm_nt_masked`` picks for ``a_q [G, M_max, K]``, ``b_q [G, N,
    K]``; rows per expert default to ``M_max``."""
    g, m_max, _ = a_q.shape
    _, n, k = b_q.shape
    rows = min(expected_m, m_max) if expected_m is not None else m_max
    m_tiles = g * _cdiv(max(1, rows), _STREAMING.block_m)
    return _device_config(rows, n, k, m_tiles, a_q, b_q)


def mn_major_scales(a_s: torch.Tensor) -> torch.Tensor:
    """``a_s`` (``[..., M, ceil(K/128)]``) with the M dimension contiguous, as DeepGEMM and cuBLAS take
    activation scales; a no-op when it already is.

    Each K step of a tile reads one scale per row: MN-major that is one contiguous run of BLOCK_M floats,
    row-major it is BLOCK_M scattered words (one 32-byte sector each). On an H200 the compute regime ran
    4-8% faster on DeepSeek-V3's w13 (K = 7168) with MN-major scales, so configurations with ``mn_major``
    (the compute regime's) transpose row-major ones first (one small copy, ``M·K/128`` floats).
    Producers that can, write them MN-major to begin with (``token_quant(..., mn_major=True)``)."""
    if _mn_major(a_s):
        return a_s
    return a_s.transpose(-1, -2).contiguous().transpose(-1, -2)


def _mn_major(a_s: torch.Tensor) -> bool:
    return a_s.shape[-2] <= 1 or a_s.stride(-2) == 1


def contiguous_grid(m: int, n: int, cfg: GemmConfig) -> tuple[int, int]:
    """Programs of ``m_grouped_fp8_gemm_nt_contiguous`` for ``M`` rows, output width ``n``."""
    return (_cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n), 1)


def masked_grid(g: int, m_max: int, n: int, cfg: GemmConfig) -> tuple[int, int]:
    """Programs of ``m_grouped_fp8_gemm_nt_masked`` for ``G`` groups of ``M_max`` rows, width ``n``."""
    return (_cdiv(m_max, cfg.block_m) * _cdiv(n, cfg.block_n), g)


# Launches of fp8_grouped_gemm_kernel: through Triton's dispatch once per specialization, then directly.
_GEMM = Launcher(fp8_grouped_gemm_kernel)
_PLAN_IDS = itertools.count()
_PLANS: dict = {}
_MAX_PLANS = 512


class _Plan:
    """Everything about a call that follows from its plan key (``_plan_key``): the checks passed, the
    configuration, grid, integer and constexpr arguments, TMA descriptors, and whether row-major activation
    scales are made MN-major first. ``skip``: 1 nothing to compute (return ``out``), 2 K = 0 (zeros)."""

    __slots__ = (
        "a_desc",
        "b_desc",
        "copy_scales",
        "device",
        "grid",
        "id",
        "options",
        "out_shape",
        "skip",
        "tail",
    )

    def __init__(self, skip: int, out_shape: tuple[int, ...], device: torch.device) -> None:
        self.id = next(_PLAN_IDS)  # never reused: a launch key built on it names one specialization
        self.skip = skip
        self.out_shape = out_shape
        self.device = device
        self.grid: tuple[int, int, int] = (0, 0, 0)
        self.tail: tuple = ()
        self.options: dict = {}
        self.copy_scales = False
        self.a_desc = None
        self.b_desc = None


def _plan_key(
    masked: bool,
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    layout: torch.Tensor,
    out: torch.Tensor | None,
    expected_m: int | None,
    config: GemmConfig | None,
) -> tuple:
    """What a call's checks, configuration and launch depend on: every tensor's shape, strides, dtype,
    device and 16-byte alignment (TMA needs it, and Triton specializes pointers on it), the options, and
    for CPU tensors whether Triton's interpreter is on (they are refused without it)."""
    return (
        a_q.is_cuda or interpreting(),
        masked,
        expected_m,
        config,
        a_q.shape, a_q.stride(), a_q.dtype, a_q.device, a_q.data_ptr() & 15,
        a_s.shape, a_s.stride(), a_s.dtype, a_s.device, a_s.data_ptr() & 15,
        b_q.shape, b_q.stride(), b_q.dtype, b_q.device, b_q.data_ptr() & 15,
        b_s.shape, b_s.stride(), b_s.dtype, b_s.device, b_s.data_ptr() & 15,
        layout.shape, layout.stride(), layout.dtype, layout.device, layout.data_ptr() & 15,
        None if out is None else (out.shape, out.stride(), out.dtype, out.device, out.data_ptr() & 15),
    )  # fmt: skip


def _make_plan(
    fn: str,
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    layout: torch.Tensor,
    out: torch.Tensor | None,
    expected_m: int | None,
    config: GemmConfig | None,
    masked: bool,
) -> _Plan:
    """The checks of a call (``InputError`` on the first that fails) and its plan."""
    if masked:
        if a_q.dim() != 3:
            raise launch_error(fn, f"activations must be [G, M_max, K], got {list(a_q.shape)}", tensor="a_q")
        _check_common(fn, a_q, a_s, b_q, b_s)
        g_a, m, k = a_q.shape
        g, n, _ = b_q.shape
        if g_a != g:
            raise launch_error(fn, f"{g_a} groups of activations for {g} experts", tensor="a_q")
        if layout.shape != (g,) or layout.dtype != torch.int32 or not layout.is_contiguous():
            raise launch_error(
                fn,
                f"must be contiguous int32 [G={g}], got {layout.dtype} {list(layout.shape)}",
                tensor="masked_m",
            )
        if layout.device != a_q.device:
            raise launch_error(fn, f"on {layout.device}, activations on {a_q.device}", tensor="masked_m")
        out_shape = (g, m, n)
        empty = g == 0 or m == 0 or n == 0
    else:
        if a_q.dim() != 2:
            raise launch_error(fn, f"activations must be [M, K], got {list(a_q.shape)}", tensor="a_q")
        _check_common(fn, a_q, a_s, b_q, b_s)
        m, k = a_q.shape
        g, n, _ = b_q.shape
        if layout.shape != (m,) or layout.dtype != torch.int32 or not layout.is_contiguous():
            raise launch_error(
                fn,
                f"must be contiguous int32 [M={m}], got {layout.dtype} {list(layout.shape)}",
                tensor="m_indices",
            )
        if layout.device != a_q.device:
            raise launch_error(fn, f"on {layout.device}, activations on {a_q.device}", tensor="m_indices")
        out_shape = (m, n)
        empty = m == 0 or n == 0
    if out is not None:
        _check_out(fn, out, out_shape, a_q.device)
    if empty or k == 0:
        return _Plan(1 if empty else 2, out_shape, a_q.device)
    if config is not None:
        config.check()
    cfg = config or (masked_config if masked else contiguous_config)(a_q, b_q, expected_m)
    plan = _Plan(0, out_shape, a_q.device)
    plan.grid = (*(masked_grid(g, m, n, cfg) if masked else contiguous_grid(m, n, cfg)), 1)
    plan.copy_scales = cfg.mn_major and not _mn_major(a_s)
    # Strides of the scales the kernel reads (those of mn_major_scales' copy, worked out on shapes alone)
    # and of the output (contiguous when allocated here).
    s_strides = a_s.stride()
    if plan.copy_scales:
        s_strides = mn_major_scales(torch.empty_strided(a_s.shape, s_strides, device="meta")).stride()
    d_strides = out.stride() if out is not None else torch.empty(out_shape, device="meta").stride()
    if cfg.tma:
        if not _tma_layout_ok(a_q, b_q):
            raise InputError(
                f"GemmConfig {cfg}: TMA needs contiguous 16-byte aligned operands with K % 16 == 0",
                tensor="a_q/b_q",
            )
        # Built (and checked) once; each call puts its own tensors under them (``rebased``). Without a
        # base they keep no tensor alive.
        plan.a_desc = TensorDescriptor(a_q, [a_q.numel() // k, k], [k, 1], [cfg.block_m, BLOCK_K])
        plan.b_desc = TensorDescriptor(b_q, [g * n, k], [k, 1], [cfg.block_n, BLOCK_K])
        plan.a_desc.base = plan.b_desc.base = None
    # The contiguous layout has no group dimension on A/D: stride 0 makes program_id(1) == 0 harmless.
    sa = a_q.stride() if masked else (0, *a_q.stride())
    ss = s_strides if masked else (0, *s_strides)
    sd = d_strides if masked else (0, *d_strides)
    plan.tail = (
        m, n, k, g, *sa, *ss, *b_q.stride(), *b_s.stride(), *sd,
        masked, k % BLOCK_K == 0, cfg.tma, cfg.block_m, cfg.block_n, BLOCK_K, cfg.group_m, cfg.pipe_dot,
        cfg.scales_ahead,
    )  # fmt: skip
    plan.options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return plan


def _plan(
    fn: str,
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    layout: torch.Tensor,
    out: torch.Tensor | None,
    expected_m: int | None,
    config: GemmConfig | None,
    masked: bool,
) -> _Plan:
    """The plan of a call: looked up by its key, made (and checked) the first time."""
    key = _plan_key(masked, a_q, a_s, b_q, b_s, layout, out, expected_m, config)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_plan(fn, a_q, a_s, b_q, b_s, layout, out, expected_m, config, masked)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _launch_parts(
    plan: _Plan,
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    layout: torch.Tensor,
    out: torch.Tensor,
) -> tuple[tuple[int, int, int], tuple, tuple, dict]:
    """``(grid, args, key, options)`` of the launch for a planned call writing ``out``: what ``_GEMM``
    takes (the launch key is the plan's id and the alignment of the tensors made per call)."""
    out_align = out.data_ptr() & 15
    s_align = -1
    if plan.copy_scales:
        a_s = mn_major_scales(a_s)
        s_align = a_s.data_ptr() & 15
    a_desc = b_desc = None
    if plan.a_desc is not None:
        a_desc = rebased(plan.a_desc, a_q)
        b_desc = rebased(plan.b_desc, b_q)
    args = (a_desc, b_desc, a_q, a_s, b_q, b_s, out, layout, *plan.tail)
    return plan.grid, args, (plan.id, out_align, s_align), plan.options


def _launch_args(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    layout: torch.Tensor,
    out: torch.Tensor,
    *,
    masked: bool,
    expected_m: int | None = None,
    config: GemmConfig | None = None,
) -> tuple[tuple[int, int, int], tuple, tuple, dict]:
    """``(grid, args, key, options)`` of the launch ``m_grouped_fp8_gemm_nt_masked`` / ``_contiguous``
    makes for these arguments (``out`` given): ``fp8_grouped_gemm_kernel[grid](*args, **options)`` is
    that launch through Triton's dispatch, ``_GEMM(grid, args, key, options)`` the one the call makes.
    (``scripts/bench_grouped_gemm.py`` times them apart.)"""
    fn = "m_grouped_fp8_gemm_nt_masked" if masked else "m_grouped_fp8_gemm_nt_contiguous"
    plan = _plan(fn, a_q, a_s, b_q, b_s, layout, out, expected_m, config, masked)
    if plan.skip:
        raise launch_error(fn, "nothing to launch for these shapes", tensor="a_q/b_q")
    return _launch_parts(plan, a_q, a_s, b_q, b_s, layout, out)


def _call(
    fn: str,
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    layout: torch.Tensor,
    out: torch.Tensor | None,
    expected_m: int | None,
    config: GemmConfig | None,
    masked: bool,
) -> torch.Tensor:
    plan = _plan(fn, a_q, a_s, b_q, b_s, layout, out, expected_m, config, masked)
    if out is None:
        out = torch.empty(plan.out_shape, dtype=torch.bfloat16, device=plan.device)
    if plan.skip:
        return out if plan.skip == 1 else out.zero_()
    _GEMM(*_launch_parts(plan, a_q, a_s, b_q, b_s, layout, out))
    return out


def m_grouped_fp8_gemm_nt_contiguous(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    m_indices: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    expected_m: int | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Grouped GEMM over the contiguous layout: ``d[m] = a[m] · b[m_indices[m]]ᵀ``, bfloat16 ``[M, N]``.

    a_q: ``[M, K]`` float8_e4m3fn, K-major. a_s: ``[M, ceil(K/128)]`` float32, any strides.
    b_q: ``[G, N, K]`` float8_e4m3fn, K-major. b_s: ``[G, ceil(N/128), ceil(K/128)]`` float32.
    m_indices: ``[M]`` int32, contiguous: each expert's rows start at a multiple of 128
    (``contiguous_layout`` builds this), ``-1`` on padding rows, which come out zero. Rows that break the
    alignment (a second expert inside one tile) or name an expert ``≥ G`` come out NaN.
    out: optional bfloat16 ``[M, N]`` to write into (any strides). Any N and K (K need not be a multiple
    of 128), empty experts and M = 0 are allowed.

    expected_m: rows per expert the caller expects (the layout's token counts; default ``M // G``, an
    overestimate when experts are padded), used only to pick the launch configuration. config: explicit
    configuration (tuning). The call never syncs with the device. Its host cost: the checks, configuration
    and launch arguments are worked out once per combination of shapes, strides, dtypes, devices and
    alignments (``_plan``), and the launch goes through Triton's dispatch only the first time
    (``kernels/_launch.py``).
    """
    return _call(
        "m_grouped_fp8_gemm_nt_contiguous", a_q, a_s, b_q, b_s, m_indices, out, expected_m, config, False
    )


def m_grouped_fp8_gemm_nt_masked(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    expected_m: int | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Grouped GEMM over the masked layout: ``d[g, :masked_m[g]] = a[g, :masked_m[g]] · b[g]ᵀ``, the
    other rows zero; bfloat16 ``[G, M_max, N]``.

    a_q: ``[G, M_max, K]`` float8_e4m3fn, K-major. a_s: ``[G, M_max, ceil(K/128)]`` float32, any strides.
    b_q: ``[G, N, K]`` float8_e4m3fn, K-major. b_s: ``[G, ceil(N/128), ceil(K/128)]`` float32.
    masked_m: ``[G]`` int32, contiguous, valid rows per group (values above M_max act as M_max).
    out: optional bfloat16 ``[G, M_max, N]`` (any strides). expected_m: typical ``masked_m`` (default
    M_max), used only to pick the configuration, as DeepGEMM's argument of that name. config: explicit
    configuration. The call never syncs with the device; host cost as the contiguous call's.
    """
    return _call("m_grouped_fp8_gemm_nt_masked", a_q, a_s, b_q, b_s, masked_m, out, expected_m, config, True)
