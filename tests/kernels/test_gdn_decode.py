"""Triton GDN decode on a K-last pool (kernels/gdn_decode.py) against its torch reference, and on GPU
against flash-linear-attention's fused recurrent kernel."""

from __future__ import annotations

import pytest
import torch

from moetool.errors import InputError
from moetool.gdn import relative_error
from moetool.kernels.gdn_decode import LaunchConfig, gdn_decode_klast, launch_config, pdl_by_default
from moetool.kernels.gdn_decode_ref import gdn_decode_klast_ref
from moetool.tolerances import SSM_REL_ERROR_FP32

# bf16 state: kernel and reference compute the same float32 values up to ~1e-7 of the state's scale
# (summation order differs on a GPU), then both round to bf16 (nearest even). An element can differ
# only where those float32 values straddle a rounding boundary, by one bf16 ulp of its magnitude;
# elements that cancel to near zero get the float32 absolute difference on top. Counting ulps alone
# misjudges those (on an H200 a value of 1e-6 vs -1e-6 measured 195 "ulps" apart).
BF16_ULP = 2.0**-7  # one bf16 ulp is at most 2^-7 of the value
BF16_ABS_OF_MAX = 1e-6
BF16_MAX_FRACTION_DIFFERENT = 0.01
# fla computes gates and l2norm with its own operation order; on an H200 our fp32 outputs and states
# measured 1.1e-5 to 2.4e-5 relative error against fla's (against our reference: < 1e-6).
FLA_REL = 1e-4
# bf16 outputs: the same argument, one ulp is at most 2^-8 relative.
BF16_IO_REL = 2.0**-8


def _bf16_ulp_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in bf16 ulps (ordered bit patterns)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(x) - ordered(y)).abs()


def _make(B, T, H, HV, K, V, num_slots, io_dtype, state_dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    a = 3.0 * torch.randn(B, T, HV, generator=gen)
    b = 2.0 * torch.randn(B, T, HV, generator=gen)
    # adversarial: softplus above its threshold, a vanishing decay input, an all-zero query
    a[0, 0, 0] = 30.0
    a[-1, -1, -1] = -40.0
    q[-1, 0, 0] = 0.0
    A_log = 0.5 * torch.randn(HV, generator=gen)
    dt_bias = 0.5 * torch.randn(HV, generator=gen)
    pool = torch.randn(num_slots, HV, V, K, generator=gen)
    pool[0] = 0.0
    to = {"device": device}
    return (
        q.to(io_dtype).to(**to),
        k.to(io_dtype).to(**to),
        v.to(io_dtype).to(**to),
        a.to(io_dtype).to(**to),
        b.to(io_dtype).to(**to),
        A_log.to(**to),
        dt_bias.to(**to),
        pool.to(state_dtype).to(**to),
    )


def _check_state(got: torch.Tensor, expected: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        assert relative_error(got, expected) <= SSM_REL_ERROR_FP32
    else:
        g, e = got.float(), expected.float()
        bound = BF16_ULP * e.abs() + BF16_ABS_OF_MAX * float(e.abs().max())
        assert bool(((g - e).abs() <= bound).all())
        dist = _bf16_ulp_distance(got, expected)
        assert float((dist > 0).float().mean()) <= BF16_MAX_FRACTION_DIFFERENT


def _check_out(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert not bool(torch.isnan(got).any())
    bound = SSM_REL_ERROR_FP32 if got.dtype == torch.float32 else BF16_IO_REL
    assert relative_error(got, expected) <= bound


CASES = [
    # (K, V, T, state dtype, io dtype)
    (16, 16, 1, torch.float32, torch.float32),
    (16, 16, 3, torch.float32, torch.float32),
    (32, 32, 1, torch.bfloat16, torch.float32),
    (32, 32, 3, torch.bfloat16, torch.float32),
    (32, 16, 3, torch.float32, torch.float32),  # K != V: a transposed index cannot hide
    (24, 20, 2, torch.float32, torch.float32),  # neither a power of two: masks on K and V
    (16, 16, 2, torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize(("K", "V", "T", "state_dtype", "io_dtype"), CASES)
def test_kernel_matches_reference(K, V, T, state_dtype, io_dtype):
    B, H, HV, num_slots = 3, 2, 4, 7
    q, k, v, a, b, A_log, dt_bias, pool = _make(
        B, T, H, HV, K, V, num_slots, io_dtype, state_dtype, "cpu", K * 100 + T
    )
    slot_ids = torch.tensor([5, -1, 2], dtype=torch.int32)  # out of order, with a stateless sequence
    pool_ref, pool_tri, before = pool.clone(), pool.clone(), pool.clone()

    out = torch.full((B, T, HV, V), float("nan"), dtype=io_dtype)
    o_tri = gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool_tri, slot_ids, out=out)
    o_ref = gdn_decode_klast_ref(q, k, v, a, b, A_log, dt_bias, pool_ref, slot_ids)

    assert o_tri.data_ptr() == out.data_ptr()
    _check_out(o_tri, o_ref)
    _check_state(pool_tri[[5, 2]], pool_ref[[5, 2]])
    untouched = [0, 1, 3, 4, 6]
    assert torch.equal(pool_tri[untouched].view(torch.uint8), before[untouched].view(torch.uint8))
    assert not torch.equal(pool_tri[5], before[5])  # the live rows did move


@pytest.mark.parametrize(("T", "state_dtype"), [(1, torch.bfloat16), (2, torch.float32), (1, torch.float32)])
def test_programs_walking_several_tiles_match_reference(T, state_dtype):
    # The large-batch bf16 configuration (several tiles per program, pipelined) on tiny shapes: 8 V tiles
    # of 4 rows in groups of 2 and 4, a stateless sequence among them.
    B, H, HV, K, V, num_slots = 3, 1, 2, 16, 32, 6
    q, k, v, a, b, A_log, dt_bias, pool = _make(
        B, T, H, HV, K, V, num_slots, torch.bfloat16, state_dtype, "cpu", 500 + T
    )
    slot_ids = torch.tensor([4, -1, 1], dtype=torch.int32)
    pool_ref = pool.clone()
    o_ref = gdn_decode_klast_ref(q, k, v, a, b, A_log, dt_bias, pool_ref, slot_ids)
    for tiles in (2, 4):
        pool_tri = pool.clone()
        cfg = LaunchConfig(block_v=4, tiles=tiles, num_warps=1, stages=2)
        o_tri = gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool_tri, slot_ids, config=cfg)
        _check_out(o_tri, o_ref)
        _check_state(pool_tri[[4, 1]], pool_ref[[4, 1]])
        untouched = [0, 2, 3, 5]
        assert torch.equal(pool_tri[untouched].view(torch.uint8), pool[untouched].view(torch.uint8))
    with pytest.raises(InputError, match="tiles per program"):
        gdn_decode_klast(
            q, k, v, a, b, A_log, dt_bias, pool.clone(), slot_ids, config=LaunchConfig(4, 3, 1, 2)
        )


def test_launch_config_tiles_divide_the_v_tiles():
    for bh in (1, 64, 2048, 16384):
        for K, V in ((128, 128), (64, 96), (128, 8), (32, 40)):
            for bf16 in (False, True):
                bk, cfg = launch_config(bh, K, V, bf16)
                assert bk >= K and bk & (bk - 1) == 0
                assert -(-V // cfg.block_v) % cfg.tiles == 0
    assert launch_config(64 * 32, 128, 128, True)[1].tiles > 1  # large-batch bf16 streams tiles
    assert launch_config(64 * 32, 128, 128, False)[1].tiles == 1
    # float32 keeps its tiles in L2 between load and store only at large batch (B >= 192 at HV = 32)
    assert launch_config(192 * 32, 128, 128, False)[1].keep_in_l2
    assert not launch_config(128 * 32, 128, 128, False)[1].keep_in_l2
    assert not launch_config(256 * 32, 128, 128, True)[1].keep_in_l2


def test_out_of_range_slot_touches_nothing_and_starts_from_zero():
    B, T, H, HV, K, V, num_slots = 2, 2, 1, 2, 16, 16, 3
    q, k, v, a, b, A_log, dt_bias, pool = _make(
        B, T, H, HV, K, V, num_slots, torch.float32, torch.float32, "cpu", 77
    )
    before = pool.clone()
    o_tri = gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool, torch.tensor([3, 7], dtype=torch.int32))
    assert torch.equal(pool.view(torch.uint8), before.view(torch.uint8))
    ref_pool = before.clone()
    o_ref = gdn_decode_klast_ref(
        q, k, v, a, b, A_log, dt_bias, ref_pool, torch.tensor([-1, -1], dtype=torch.int32)
    )
    _check_out(o_tri, o_ref)


def test_reference_refuses_bad_slot_ids():
    B, T, H, HV, K, V, num_slots = 2, 1, 1, 2, 8, 8, 3
    args = _make(B, T, H, HV, K, V, num_slots, torch.float32, torch.float32, "cpu", 1)
    with pytest.raises(InputError, match="slot_ids"):
        gdn_decode_klast_ref(*args, torch.tensor([1, 3], dtype=torch.int32))
    with pytest.raises(InputError, match="twice"):
        gdn_decode_klast_ref(*args, torch.tensor([2, 2], dtype=torch.int32))


def test_launcher_refuses_bad_arguments():
    B, T, H, HV, K, V, num_slots = 2, 1, 1, 2, 16, 8, 3
    q, k, v, a, b, A_log, dt_bias, pool = _make(
        B, T, H, HV, K, V, num_slots, torch.float32, torch.float32, "cpu", 2
    )
    ids = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(InputError, match=r"tensor state_pool.*transposed"):
        gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool.transpose(-1, -2).contiguous(), ids)
    with pytest.raises(InputError, match=r"tensor slot_ids.*int32"):
        gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool, ids.long())
    with pytest.raises(InputError, match=r"tensor q.*contiguous"):
        gdn_decode_klast(torch.cat([q, q], dim=-1)[..., :K], k, v, a, b, A_log, dt_bias, pool, ids)
    with pytest.raises(InputError, match=r"tensor A_log.*float32"):
        gdn_decode_klast(q, k, v, a, b, A_log.bfloat16(), dt_bias, pool, ids)
    with pytest.raises(InputError, match="tensor out"):
        gdn_decode_klast(
            q, k, v, a, b, A_log, dt_bias, pool, ids, out=torch.empty(B, T, HV, V, dtype=torch.bfloat16)
        )


# GPU: real Qwen3-Next dimensions (H=16 key heads, HV=32 value heads, K=V=128).


def _gpu_case(B, T, io_dtype, state_dtype, seed):
    H, HV, K, V = 16, 32, 128, 128
    num_slots = B + 5
    q, k, v, a, b, A_log, dt_bias, pool = _make(
        B, T, H, HV, K, V, num_slots, io_dtype, state_dtype, "cuda", seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    slot_ids = (torch.randperm(num_slots - 1, generator=gen)[:B] + 1).to(torch.int32)
    slot_ids[B // 2] = -1
    return q, k, v, a, b, A_log, dt_bias, pool, slot_ids.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("io_dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_matches_reference(T, state_dtype, io_dtype):
    B = 67
    q, k, v, a, b, A_log, dt_bias, pool, slot_ids = _gpu_case(B, T, io_dtype, state_dtype, 31 + T)
    pool_tri, before = pool.clone(), pool.clone()
    out = torch.full(tuple(v.shape), float("nan"), dtype=io_dtype, device="cuda")
    o_tri = gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool_tri, slot_ids, out=out)
    torch.cuda.synchronize()

    cpu = [x.cpu() for x in (q, k, v, a, b, A_log, dt_bias)]
    pool_ref = before.cpu()
    o_ref = gdn_decode_klast_ref(*cpu, pool_ref, slot_ids.cpu())

    _check_out(o_tri.cpu(), o_ref)
    live = slot_ids[slot_ids >= 0].long().cpu()
    _check_state(pool_tri.cpu()[live], pool_ref[live])
    mask = torch.ones(pool.shape[0], dtype=torch.bool)
    mask[live] = False
    assert torch.equal(pool_tri.cpu()[mask].view(torch.uint8), before.cpu()[mask].view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2])
def test_gpu_l2_hint_changes_no_byte(T):
    # The large-batch float32 configuration asks L2 to keep each tile's lines until the in-place store:
    # a cache hint, so outputs and pool are the same bytes as without it.
    B = 67
    q, k, v, a, b, A_log, dt_bias, pool, slot_ids = _gpu_case(B, T, torch.bfloat16, torch.float32, 7 + T)
    results = []
    for keep in (True, False):
        pool_tri = pool.clone()
        cfg = LaunchConfig(block_v=8, tiles=1, num_warps=1, stages=1, keep_in_l2=keep)
        o = gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool_tri, slot_ids, config=cfg)
        results.append((o, pool_tri))
    torch.cuda.synchronize()
    assert torch.equal(results[0][0].view(torch.int16), results[1][0].view(torch.int16))
    assert torch.equal(results[0][1].view(torch.int32), results[1][1].view(torch.int32))
    assert not torch.equal(results[0][1], pool)  # the live rows did move


def test_dependent_launch_only_on_a_gpu_that_has_it():
    # Triton's interpreter and CPU tensors launch plainly (the grid-dependency instructions exist on
    # sm_90 and later only).
    assert pdl_by_default(1 << 20, torch.device("cpu")) is False


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_gpu_dependent_launches_chain_like_plain_ones(state_dtype):
    # With programmatic dependent launch (Hopper's default from B·HV = 2048) a step may start while the
    # previous one finishes, and must wait for it before reading the pool it writes: 24 chained steps on
    # one pool, each feeding the next, give the bytes of 24 plain launches, outputs included.
    cuda = torch.device("cuda")
    assert pdl_by_default(2048, cuda) == (torch.cuda.get_device_capability() >= (9, 0))
    assert not pdl_by_default(32, cuda)  # a host-bound launch keeps the lean path
    B = 96
    q, k, v, a, b, A_log, dt_bias, pool, slot_ids = _gpu_case(B, 1, torch.bfloat16, state_dtype, 31)
    results = []
    for pdl in (True, False):
        pool_tri, outs = pool.clone(), []
        for step in range(24):
            qs = q.roll(step, 0)  # a fresh input each step, written by the kernel launched just before
            outs.append(gdn_decode_klast(qs, k, v, a, b, A_log, dt_bias, pool_tri, slot_ids, pdl=pdl))
        results.append((torch.stack(outs), pool_tri))
    torch.cuda.synchronize()
    assert torch.equal(results[0][0].view(torch.int16), results[1][0].view(torch.int16))
    assert torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][1], pool)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_matches_fla(T, state_dtype):
    pytest.importorskip("fla", reason="flash-linear-attention (fla-core) is not installed")
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    B = 64
    q, k, v, a, b, A_log, dt_bias, pool, slot_ids = _gpu_case(B, T, torch.bfloat16, state_dtype, 90 + T)
    ids = slot_ids.long()
    h0 = pool[ids.clamp(min=0)].transpose(-1, -2).contiguous()  # k-first [B, HV, K, V]
    h0[ids < 0] = 0
    o_fla, ht = fused_recurrent_gated_delta_rule(
        q=q,
        k=k,
        v=v,
        g=a,
        beta=b,
        scale=q.shape[-1] ** -0.5,
        initial_state=h0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=True,
    )
    o_tri = gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool, slot_ids)
    torch.cuda.synchronize()

    assert relative_error(o_tri.float(), o_fla.float()) <= FLA_REL
    live = ids >= 0
    ours = pool[ids[live]].transpose(-1, -2)  # k-first view for comparison
    theirs = ht[live]  # fla keeps its final state in float32 whatever h0's dtype
    if state_dtype == torch.float32:
        assert relative_error(ours, theirs) <= FLA_REL
    else:
        _check_state(ours.contiguous(), theirs.to(torch.bfloat16).contiguous())
