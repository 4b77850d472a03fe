"""Gated DeltaNet decode on K-last state held in a pool, updated in place (Triton).

One launch runs ``T ≥ 1`` tokens for ``B`` sequences. Sequence ``b`` reads and writes pool row
``slot_ids[b]``; ``-1`` means "no state yet": it starts from zeros and writes nothing back (pool row 0 is
the zero null slot that engines point such sequences at, FlashInfer/SGLang style). The gates are fused:
the kernel takes the raw ``a, b`` projections and computes ``g = -exp(A_log)·softplus(a + dt_bias)`` and
``β = sigmoid(b)`` itself, as SGLang's ``fused_sigmoid_gating_delta_rule_update`` does. The torch
reference with the same signature is ``kernels/gdn_decode_ref.py``; the maths is in ``moetool/gdn.py``.

Why K-last: a state row ``Sᵀ[v, :]`` is K contiguous elements, so the tile each program owns
(``[BV, K]``) is read and written in coalesced 16-byte vectors and both reductions (``S'ᵀk̂`` and
``Sᵀq̂``) run along the contiguous dimension inside a warp. The tile is loaded once, kept in registers in
float32 across the ``T`` tokens and stored once in the pool's dtype: per call the state costs
``B·HV·V·K·elt`` bytes read plus the same written, which is the whole memory traffic at large B.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moetool.errors import InputError
from moetool.kernels._device import hopper_or_later, interpreting, launch_error
from moetool.kernels._launch import Launcher

try:  # grid dependency control, for programmatic dependent launch (triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: launches without it
    gdc_launch_dependents = gdc_wait = None

_SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus default: above it softplus(x) == x


@triton.jit
def _to_bf16_rtne(x):
    """float32 -> bfloat16, round to nearest even, on the bit pattern: what the GPU's conversion does, and
    exact in Triton's interpreter too, whose own cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _gdn_token(b_h, p_q, p_k, p_v, p_a, p_b, neg_A, b_dt, scale, m_k, m_v, SOFTPLUS_THRESHOLD, EPS):
    """One token on the float32 Sᵀ tile ``b_h [BV, BK]``: returns the new tile and ``o [BV]``."""
    b_q = tl.load(p_q, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
    x = tl.load(p_a).to(tl.float32) + b_dt
    softplus = tl.where(x > SOFTPLUS_THRESHOLD, x, tl.log(1.0 + tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))))
    decay = tl.exp(neg_A * softplus)
    beta = tl.sigmoid(tl.load(p_b).to(tl.float32))

    b_q = b_q * tl.math.rsqrt(tl.sum(b_q * b_q, 0) + EPS) * scale
    b_k = b_k * tl.math.rsqrt(tl.sum(b_k * b_k, 0) + EPS)

    b_h = b_h * decay
    b_d = beta * (b_v - tl.sum(b_h * b_k[None, :], 1))
    b_h = b_h + b_d[:, None] * b_k[None, :]
    b_o = tl.sum(b_h * b_q[None, :], 1)
    return b_h, b_o


@triton.jit
def _store_out(p_o, b_o, m_v, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        tl.store(p_o, _to_bf16_rtne(b_o), mask=m_v)
    else:
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)


@triton.jit
def gdn_decode_klast_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    v,  # [B, T, HV, V]
    a,  # [B, T, HV]
    b,  # [B, T, HV]
    A_log,  # [HV] f32
    dt_bias,  # [HV] f32
    pool,  # [P+1, HV, V, K] f32 | bf16, in place
    slot_ids,  # [B] int32
    o,  # [B, T, HV, V]
    T,
    num_slots,
    scale,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    TILES: tl.constexpr,
    NG: tl.constexpr,
    STAGES: tl.constexpr,
    SOFTPLUS_THRESHOLD: tl.constexpr,
    EPS: tl.constexpr,
    STATE_BF16: tl.constexpr,
    OUT_BF16: tl.constexpr,
    FULL_TILE: tl.constexpr,
    SINGLE_TOKEN: tl.constexpr,
    KEEP_IN_L2: tl.constexpr,
    PDL: tl.constexpr,
):
    # One flat grid with the V tiles varying fastest: programs launched together stream one head's
    # contiguous state rows (and B·HV is not bound by the 65535 limit of a second grid dimension). Each
    # program walks TILES consecutive [BV, K] tiles of one head, loads software-pipelined STAGES deep.
    if PDL:
        # Launched with programmatic dependent launch: this grid may start while the previous kernel of
        # the stream still runs, so every program waits for it (it may have written q, k, v, a, b, the
        # pool or slot_ids) before its first access, and lets the next kernel launch once all programs
        # have started, so that launch overlaps this grid's last wave.
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0).to(tl.int64)
    i_g = pid % NG
    i_nh = pid // NG
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)

    o_k = tl.arange(0, BK)
    m_k = o_k < K

    slot = tl.load(slot_ids + i_n).to(tl.int64)
    # An id outside [0, P] touches no memory: -1 is the documented "no state"; anything else is a caller
    # bug that must not corrupt other sequences' states.
    has_state = (slot >= 0) & (slot < num_slots)
    slot = tl.where(has_state, slot, 0)
    # The row limit drops to 0 for a stateless sequence (a comparison, not `m_v & has_state`: Triton's
    # interpreter turns a bool scalar & bool vector into int32).
    v_limit = tl.where(has_state, V, 0)
    p_pool = pool + (slot * HV + i_hv) * (V * K)

    neg_A = -tl.exp(tl.load(A_log + i_hv).to(tl.float32))
    b_dt = tl.load(dt_bias + i_hv).to(tl.float32)
    p_q0 = q + (i_n * T * H + i_h) * K + o_k
    p_k0 = k + (i_n * T * H + i_h) * K + o_k
    p_a0 = a + i_n * T * HV + i_hv
    p_b0 = b + i_n * T * HV + i_hv

    for i_t in tl.range(0, TILES, num_stages=STAGES):
        o_v = (i_g * TILES + i_t) * BV + tl.arange(0, BV)
        m_v = o_v < V
        p_h = p_pool + o_v[:, None] * K + o_k[None, :]
        if FULL_TILE:
            # K == BK and V % BV == 0: no mask, so the loads are 16-byte vectors along K (a mask computed
            # at run time would split them into scalar loads). A stateless sequence reads row 0 (the null
            # slot) and starts from zeros whatever that row holds.
            if KEEP_IN_L2:
                # The tile is written back to the same lines a few hundred cycles later: keeping them
                # in L2 until then saves the store a second trip to memory (2% at B >= 256, fp32).
                b_h = tl.load(p_h, eviction_policy="evict_last").to(tl.float32)
            else:
                b_h = tl.load(p_h).to(tl.float32)
            b_h = tl.where(has_state, b_h, 0.0)
        else:
            m_h = (o_v < v_limit)[:, None] & m_k[None, :]
            b_h = tl.load(p_h, mask=m_h, other=0.0).to(tl.float32)  # [BV, BK] = Sᵀ tile

        p_v = v + (i_n * T * HV + i_hv) * V + o_v
        p_o = o + (i_n * T * HV + i_hv) * V + o_v
        if SINGLE_TOKEN:
            b_h, b_o = _gdn_token(
                b_h, p_q0, p_k0, p_v, p_a0, p_b0, neg_A, b_dt, scale, m_k, m_v, SOFTPLUS_THRESHOLD, EPS
            )
            _store_out(p_o, b_o, m_v, OUT_BF16)
        else:
            p_q = p_q0
            p_k = p_k0
            p_a = p_a0
            p_b = p_b0
            for _ in range(0, T):
                b_h, b_o = _gdn_token(
                    b_h, p_q, p_k, p_v, p_a, p_b, neg_A, b_dt, scale, m_k, m_v, SOFTPLUS_THRESHOLD, EPS
                )
                _store_out(p_o, b_o, m_v, OUT_BF16)
                p_q += H * K
                p_k += H * K
                p_v += HV * V
                p_a += HV
                p_b += HV
                p_o += HV * V

        if STATE_BF16:
            h_out = _to_bf16_rtne(b_h)
        else:
            h_out = b_h.to(p_h.dtype.element_ty)
        if FULL_TILE:
            # A branch on the sequence, not a mask: the stores stay unpredicated 16-byte vectors.
            if has_state:
                tl.store(p_h, h_out)
        else:
            tl.store(p_h, h_out, mask=m_h)


@dataclass(frozen=True)
class LaunchConfig:
    """``block_v`` state rows per tile (``[block_v, BK]``), ``tiles`` consecutive tiles of one head per
    program, ``num_warps`` per program, ``stages`` of software pipelining over the tiles, and whether
    state loads ask L2 to keep their lines until the in-place store (``keep_in_l2``)."""

    block_v: int
    tiles: int
    num_warps: int
    stages: int
    keep_in_l2: bool = False


# Measured on an H200 (scripts/bench_gdn_decode.py --sweep, B = 256/512, HV = 32, K = V = 128): one warp
# per 8-row tile streams float32 state at 95-97% of copy bandwidth, ahead of wider tiles on more warps
# (89-92% at 32 rows on 4 warps, the reduction over K stays inside the warp and 32 one-warp programs fit
# an SM). A bfloat16 tile of 8 rows holds half the bytes, so at large batch each program walks 8 tiles with
# the next tiles' loads in flight (3 stages): 87-89% of copy against 84-86% for one tile per program.
_ONE_TILE = LaunchConfig(block_v=8, tiles=1, num_warps=1, stages=1)
# float32 at large batch: the same tile, its lines kept in L2 between load and in-place store
# (`evict_last`): 96-97% of copy at B = 256/512 against 94-95% without (H200; on an H100 367 against
# 373 µs at B = 256). Below that the hint costs: on an H100 at B = 64 / 128, 95.3 / 185.5 µs with it against
# 91.3 / 182.5 µs without, so smaller batches use the plain tile; at B = 192 it gains again (271.8 against
# 275.1 µs, pool rows in order; 275.0 against 279.0 in random order). On bf16 tiles it measured nothing
# consistent.
_F32_TILE = LaunchConfig(block_v=8, tiles=1, num_warps=1, stages=1, keep_in_l2=True)
_F32_KEEP_HEADS = 6144  # B·HV from which float32 state uses _F32_TILE (B ≥ 192 at HV = 32)
_BF16_STREAM = LaunchConfig(block_v=8, tiles=8, num_warps=1, stages=3)
_BF16_STREAM_HEADS = 2048  # B·HV from which bf16 state uses _BF16_STREAM (B ≥ 64 at HV = 32)


@functools.lru_cache(maxsize=256)
def launch_config(bh: int, k: int, v: int, state_bf16: bool) -> tuple[int, LaunchConfig]:
    """(BK, configuration) for ``bh = B·HV`` heads of ``[V, K]`` state."""
    bk = triton.next_power_of_2(k)
    if state_bf16:
        cfg = _BF16_STREAM if bh >= _BF16_STREAM_HEADS else _ONE_TILE
    else:
        cfg = _F32_TILE if bh >= _F32_KEEP_HEADS else _ONE_TILE
    bv = max(1, min(triton.next_power_of_2(v), cfg.block_v))
    tiles = max(1, min(cfg.tiles, triton.cdiv(v, bv)))
    while triton.cdiv(v, bv) % tiles:
        tiles //= 2
    return bk, LaunchConfig(bv, tiles, cfg.num_warps, cfg.stages, cfg.keep_in_l2)


# B·HV from which a launch uses programmatic dependent launch by default (B ≥ 64 at HV = 32). Below it a
# step is bound by the host's launch cost, which the option raises: on an H200 at B = 1, 33.8 µs per call
# with it against 30.1 µs without; from B = 64 it saves 0.3-1.5% of a step (fp32 B = 128: 136.1 against
# 138.0 µs).
_PDL_HEADS = 2048


def pdl_by_default(bh: int, device: torch.device) -> bool:
    """Whether a launch of ``bh = B·HV`` heads on ``device`` uses programmatic dependent launch unless
    told otherwise."""
    return bh >= _PDL_HEADS and _pdl_default(device)


def _pdl_default(device: torch.device) -> bool:
    """Programmatic dependent launch where the card has it (compute capability 9.0 and later) and Triton
    exposes it; never in Triton's interpreter."""
    if device.type != "cuda" or gdc_wait is None or interpreting():
        return False
    return hopper_or_later(device.index if device.index is not None else torch.cuda.current_device())


_BF16 = torch.bfloat16
_F32 = torch.float32
_I32 = torch.int32
_FLOATS = frozenset((_BF16, _F32))


def _diagnose(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, out) -> InputError:
    """The precise complaint once the fast checks in ``gdn_decode_klast`` found something wrong."""
    for name, x, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("state_pool", state_pool, 4)):
        if x.dim() != nd:
            return launch_error(
                "gdn_decode_klast", f"expected {nd}-D, got shape {list(x.shape)}", tensor=name
            )
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    expected = {
        "k": [B, T, H, K],
        "v": [B, T, HV, V],
        "a": [B, T, HV],
        "b": [B, T, HV],
        "A_log": [HV],
        "dt_bias": [HV],
        "state_pool": [state_pool.shape[0], HV, V, K],
        "slot_ids": [B],
    }
    tensors = {
        "k": k,
        "v": v,
        "a": a,
        "b": b,
        "A_log": A_log,
        "dt_bias": dt_bias,
        "state_pool": state_pool,
        "slot_ids": slot_ids,
    }
    for name, shape in expected.items():
        if list(tensors[name].shape) != shape:
            fix = "a k-first state must be transposed to [P+1, HV, V, K]" if name == "state_pool" else None
            return launch_error(
                "gdn_decode_klast",
                f"expected shape {shape}, got {list(tensors[name].shape)}",
                tensor=name,
                fix=fix,
            )
    if HV % H != 0:
        return launch_error("gdn_decode_klast", f"HV={HV} is not a multiple of H={H}", tensor="v")
    allowed = {
        "q": _FLOATS,
        "k": _FLOATS,
        "v": _FLOATS,
        "a": _FLOATS,
        "b": _FLOATS,
        "A_log": {_F32},
        "dt_bias": {_F32},
        "state_pool": _FLOATS,
        "slot_ids": {_I32},
    }
    tensors.update(q=q)
    for name, dtypes in allowed.items():
        if tensors[name].dtype not in dtypes:
            want = " or ".join(sorted(str(d) for d in dtypes))
            return launch_error("gdn_decode_klast", f"dtype {tensors[name].dtype}, need {want}", tensor=name)
    for name, x in tensors.items():
        if not x.is_contiguous():
            return launch_error(
                "gdn_decode_klast", "must be contiguous", tensor=name, fix="call .contiguous()"
            )
    if out is not None:
        return launch_error(
            "gdn_decode_klast",
            f"expected contiguous {q.dtype} {[B, T, HV, V]}, got {out.dtype} {list(out.shape)}",
            tensor="out",
        )
    return launch_error("gdn_decode_klast", "inconsistent arguments")


def _check(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, out) -> None:
    """The launcher's argument check: plain attribute reads, the detailed message built only on failure
    (``_diagnose``)."""
    qs = q.shape
    vs = v.shape
    ps = state_pool.shape
    if len(qs) != 4 or len(vs) != 4 or len(ps) != 4:
        raise _diagnose(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, None)
    B, T, H, K = qs
    HV = vs[2]
    V = vs[3]
    bth = (B, T, HV)
    hv1 = (HV,)
    if (
        k.shape != qs
        or vs[0] != B
        or vs[1] != T
        or HV % H
        or a.shape != bth
        or b.shape != bth
        or A_log.shape != hv1
        or dt_bias.shape != hv1
        or ps[1] != HV
        or ps[2] != V
        or ps[3] != K
        or slot_ids.shape != (B,)
        or q.dtype not in _FLOATS
        or k.dtype not in _FLOATS
        or v.dtype not in _FLOATS
        or a.dtype not in _FLOATS
        or b.dtype not in _FLOATS
        or A_log.dtype is not _F32
        or dt_bias.dtype is not _F32
        or state_pool.dtype not in _FLOATS
        or slot_ids.dtype is not _I32
        or not q.is_contiguous()
        or not k.is_contiguous()
        or not v.is_contiguous()
        or not a.is_contiguous()
        or not b.is_contiguous()
        or not A_log.is_contiguous()
        or not dt_bias.is_contiguous()
        or not state_pool.is_contiguous()
        or not slot_ids.is_contiguous()
    ):
        raise _diagnose(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, None)
    if out is not None and (
        out.shape != (B, T, HV, V) or out.dtype is not q.dtype or not out.is_contiguous()
    ):
        raise _diagnose(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, out)


# Launches of gdn_decode_klast_kernel: through Triton's dispatch once per specialization, then directly.
_GDN = Launcher(gdn_decode_klast_kernel)
_PLAN_IDS = itertools.count()
_PLANS: dict = {}
_MAX_PLANS = 512


class _Plan:
    """What follows from a call's plan key (``_plan_key``): the check passed, the output's shape, the
    grid, the scalar and constexpr arguments and the launch options. ``skip``: B = 0 or T = 0."""

    __slots__ = ("grid", "id", "options", "out_shape", "skip", "tail")

    def __init__(self, skip: bool, out_shape: tuple[int, ...]) -> None:
        self.id = next(_PLAN_IDS)  # never reused: a launch key built on it names one specialization
        self.skip = skip
        self.out_shape = out_shape
        self.grid: tuple[int, int, int] = (0, 1, 1)
        self.tail: tuple = ()
        self.options: dict = {}


def _plan_key(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, out, scale, config, pdl) -> tuple:
    """What a call's check, configuration and launch depend on: every tensor's shape, dtype, contiguity
    and 16-byte alignment (Triton specializes pointers on it), the pool's device, and the options."""
    return (
        q.shape, q.dtype, q.is_contiguous(), q.data_ptr() & 15,
        k.shape, k.dtype, k.is_contiguous(), k.data_ptr() & 15,
        v.shape, v.dtype, v.is_contiguous(), v.data_ptr() & 15,
        a.shape, a.dtype, a.is_contiguous(), a.data_ptr() & 15,
        b.shape, b.dtype, b.is_contiguous(), b.data_ptr() & 15,
        A_log.shape, A_log.dtype, A_log.is_contiguous(), A_log.data_ptr() & 15,
        dt_bias.shape, dt_bias.dtype, dt_bias.is_contiguous(), dt_bias.data_ptr() & 15,
        state_pool.shape, state_pool.dtype, state_pool.is_contiguous(), state_pool.data_ptr() & 15,
        slot_ids.shape, slot_ids.dtype, slot_ids.is_contiguous(), slot_ids.data_ptr() & 15,
        state_pool.device,
        None if out is None else (out.shape, out.dtype, out.is_contiguous(), out.data_ptr() & 15),
        scale,
        config,
        pdl,
    )  # fmt: skip


def _make_plan(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, out, scale, config, pdl) -> _Plan:
    """The check of a call (``InputError`` if it fails) and its plan."""
    _check(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, out)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    plan = _Plan(B == 0 or T == 0, (B, T, HV, V))
    if plan.skip:
        return plan
    state_bf16 = state_pool.dtype is _BF16
    bk, cfg = launch_config(B * HV, K, V, state_bf16)
    if config is not None:
        cfg = config
    nv = -(-V // cfg.block_v)
    if nv % cfg.tiles:
        raise launch_error("gdn_decode_klast", f"{cfg.tiles} tiles per program do not divide {nv} V tiles")
    ng = nv // cfg.tiles
    if pdl is None:
        pdl = pdl_by_default(B * HV, state_pool.device)
    plan.grid = (ng * B * HV, 1, 1)
    plan.tail = (
        T,
        state_pool.shape[0],
        K**-0.5 if scale is None else float(scale),  # one type, whatever number the caller gave
        H,
        HV,
        K,
        V,
        bk,  # BK
        cfg.block_v,  # BV
        cfg.tiles,  # TILES
        ng,  # NG
        cfg.stages,  # STAGES
        _SOFTPLUS_THRESHOLD,
        1e-6,  # EPS
        state_bf16,  # STATE_BF16
        q.dtype is _BF16,  # OUT_BF16
        bk == K and V % cfg.block_v == 0,  # FULL_TILE
        T == 1,  # SINGLE_TOKEN
        cfg.keep_in_l2,  # KEEP_IN_L2
        pdl,  # PDL
    )
    plan.options = {"num_warps": cfg.num_warps, **({"launch_pdl": True} if pdl else {})}
    return plan


def gdn_decode_klast(
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
    config: LaunchConfig | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """``T`` GDN decode steps for ``B`` sequences on a K-last state pool, updated in place.

    q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` (HV a multiple of H; value head ``hv`` uses key head
    ``hv // (HV/H)``); a, b: ``[B, T, HV]`` raw gate inputs; q/k/v/a/b bfloat16 or float32, contiguous.
    A_log, dt_bias: ``[HV]`` float32. state_pool: ``[P+1, HV, V, K]`` float32 or bfloat16, contiguous, row
    0 the zero null slot; rows ``slot_ids[b]`` are read, advanced ``T`` tokens and written back in place.
    slot_ids: ``[B]`` int32, distinct, each in ``[0, P]`` or ``-1`` (start from zeros, write nothing
    back). Ids are not checked on the host (that would sync); an id outside ``[-1, P]`` reads zeros and
    writes nothing. scale defaults to ``K ** -0.5``. Returns ``o [B, T, HV, V]`` in q's dtype, written
    into ``out`` when given (contiguous, that shape and dtype).

    ``config`` overrides the launch configuration (tuning; by default it follows ``B·HV`` and the state
    dtype, ``launch_config``). ``pdl``: programmatic dependent launch (default: on Hopper and later from
    ``B·HV`` = 2048, ``pdl_by_default``; FlashInfer launches its decode kernels so): the launch may begin
    while the previous kernel of the stream finishes, every program waiting for that kernel before it
    touches memory, so back-to-back steps lose less time between kernels; the same bytes either way.

    The launch allocates nothing but ``o`` and never syncs. Its host cost: the check, configuration and
    launch arguments are worked out once per combination of shapes, dtypes, contiguity, alignments and
    options (``_plan_key``), and the launch goes through Triton's dispatch only the first time
    (``kernels/_launch.py``).
    """
    key = _plan_key(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, out, scale, config, pdl)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_plan(q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, out, scale, config, pdl)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    if out is None:
        out = q.new_empty(plan.out_shape)
    if plan.skip:
        return out
    _GDN(
        plan.grid,
        (q, k, v, a, b, A_log, dt_bias, state_pool, slot_ids, out, *plan.tail),
        (plan.id, out.data_ptr() & 15),
        plan.options,
    )
    return out
