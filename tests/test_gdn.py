"""The torch GDN decode reference (moetool.gdn): layouts, hand-derived step, gates, rounding, errors."""

from __future__ import annotations

import math

import pytest
import torch

from moetool.errors import InputError
from moetool.gdn import (
    gdn_decode_gated_ref,
    gdn_decode_ref,
    gdn_gates,
    l2norm,
    relative_error,
)


def _inputs(n, t, h, hv, dk, dv, gen, state_dtype=torch.float32):
    q = torch.randn(n, t, h, dk, generator=gen)
    k = torch.randn(n, t, h, dk, generator=gen)
    v = torch.randn(n, t, hv, dv, generator=gen)
    a = 2.0 * torch.randn(n, t, hv, generator=gen)
    b = 2.0 * torch.randn(n, t, hv, generator=gen)
    A_log = 0.5 * torch.randn(hv, generator=gen)
    dt_bias = 0.5 * torch.randn(hv, generator=gen)
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    state = torch.randn(n, hv, dk, dv, generator=gen).to(state_dtype)  # k-first
    return q, k, v, g, beta, state


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_k_first_and_k_last_agree(t, state_dtype):
    gen = torch.Generator().manual_seed(11 + t)
    n, h, hv, dk, dv = 3, 2, 6, 12, 20  # GVA: 3 value heads per key head; K != V
    q, k, v, g, beta, s_first = _inputs(n, t, h, hv, dk, dv, gen, state_dtype)
    s_last = s_first.transpose(-1, -2).contiguous()

    o_first, new_first = gdn_decode_ref(q, k, v, g, beta, s_first, layout="k-first")
    o_last, new_last = gdn_decode_ref(q, k, v, g, beta, s_last, layout="k-last")

    # Both layouts run the same float32 arithmetic on the same k-first copy; only a wrong transpose
    # (or a layout-dependent summation order) could tell them apart.
    bound = 1e-6
    assert new_first.shape == (n, hv, dk, dv) and new_last.shape == (n, hv, dv, dk)
    assert new_first.dtype == state_dtype and new_last.dtype == state_dtype
    assert new_last.is_contiguous() and new_first.is_contiguous()
    assert relative_error(o_last, o_first) <= bound
    assert relative_error(new_last.transpose(-1, -2), new_first) <= bound
    # the step did something: the state moved and the output is not trivial
    assert relative_error(new_first, s_first) > 1e-2
    assert o_first.abs().sum() > 0


def test_hand_derived_single_step():
    """N=1, T=1, H=1, HV=2 (both value heads read key head 0), K=2, V=3, computed with scalars."""
    q_vals = [0.3, -1.2]
    k_vals = [2.0, 0.5]
    v_vals = [[1.0, -2.0, 0.5], [0.25, 0.0, -1.0]]
    a_vals, b_vals = [0.7, -25.0], [0.2, -1.5]
    A_vals, dt_vals = [0.1, -0.4], [-0.3, 0.6]
    s_vals = [[[0.5, -0.1, 0.2], [0.0, 1.5, -0.7]], [[-1.0, 0.3, 0.8], [0.4, 0.4, -0.2]]]  # [HV][K][V]
    K = 2

    def norm(x):
        inv = 1.0 / math.sqrt(sum(e * e for e in x) + 1e-6)
        return [e * inv for e in x]

    qn = [e / math.sqrt(K) for e in norm(q_vals)]
    kn = norm(k_vals)
    exp_o, exp_s = [], []
    for hv in range(2):
        x = a_vals[hv] + dt_vals[hv]
        softplus = x if x > 20 else math.log1p(math.exp(x))
        g = -math.exp(A_vals[hv]) * softplus
        beta = 1.0 / (1.0 + math.exp(-b_vals[hv]))
        s = [[math.exp(g) * s_vals[hv][i][j] for j in range(3)] for i in range(K)]
        delta = [beta * (v_vals[hv][j] - sum(s[i][j] * kn[i] for i in range(K))) for j in range(3)]
        s = [[s[i][j] + kn[i] * delta[j] for j in range(3)] for i in range(K)]
        exp_o.append([sum(s[i][j] * qn[i] for i in range(K)) for j in range(3)])
        exp_s.append(s)

    q = torch.tensor(q_vals).view(1, 1, 1, K)
    k = torch.tensor(k_vals).view(1, 1, 1, K)
    v = torch.tensor(v_vals).view(1, 1, 2, 3)
    a = torch.tensor(a_vals).view(1, 1, 2)
    b = torch.tensor(b_vals).view(1, 1, 2)
    state = torch.tensor(s_vals).view(1, 2, K, 3)
    o, new = gdn_decode_gated_ref(
        q, k, v, a, b, torch.tensor(A_vals), torch.tensor(dt_vals), state, layout="k-first"
    )
    torch.testing.assert_close(
        o.double(), torch.tensor(exp_o, dtype=torch.float64).view(1, 1, 2, 3), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(
        new.double(), torch.tensor(exp_s, dtype=torch.float64).view(1, 2, K, 3), rtol=1e-6, atol=1e-6
    )


def test_gates_formula_and_softplus_threshold():
    a = torch.tensor([[-40.0, -3.0, 0.0, 19.5, 25.0, 80.0]])
    b = torch.tensor([[-50.0, -1.0, 0.0, 1.0, 50.0, 3.0]])
    A_log = torch.tensor([0.3, -0.2, 1.0, 0.0, -1.0, 0.5])
    dt_bias = torch.tensor([0.1, 0.2, -0.3, 0.4, 0.0, -0.5])
    g, beta = gdn_gates(a.bfloat16(), b, A_log, dt_bias)
    assert g.dtype == torch.float32 and beta.dtype == torch.float32
    for i in range(6):
        x = float(a.bfloat16()[0, i].float() + dt_bias[i])  # the float32 sum the gate sees
        softplus = x if x > 20 else math.log1p(math.exp(x))
        assert math.isclose(
            float(g[0, i]), -math.exp(float(A_log[i])) * softplus, rel_tol=1e-6, abs_tol=1e-30
        )
        assert math.isclose(
            float(beta[0, i]), 1.0 / (1.0 + math.exp(-float(b[0, i]))), rel_tol=1e-6, abs_tol=1e-30
        )
    assert bool((g <= 0).all())


def test_l2norm_matches_formula_and_zero_vector_stays_finite():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    x[2] = 0.0
    y = l2norm(x)
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=0)
    assert bool(torch.isfinite(y).all()) and bool((y[2] == 0).all())


def test_mislabelled_state_gives_large_error():
    """K = V: a k-first state passed as k-last has a valid shape; only the numbers betray it."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, beta, s_first = _inputs(2, 3, 2, 4, 8, 8, gen)
    o_ok, new_ok = gdn_decode_ref(q, k, v, g, beta, s_first, layout="k-first")
    o_bad, new_bad = gdn_decode_ref(q, k, v, g, beta, s_first, layout="k-last")
    assert relative_error(o_bad, o_ok) > 0.1
    assert relative_error(new_bad.transpose(-1, -2), new_ok) > 0.1


def test_bf16_state_rounds_once_per_call_unless_asked():
    gen = torch.Generator().manual_seed(9)
    q, k, v, g, beta, state = _inputs(2, 4, 1, 2, 16, 8, gen, torch.bfloat16)
    _, once = gdn_decode_ref(q, k, v, g, beta, state, layout="k-first")
    _, every = gdn_decode_ref(q, k, v, g, beta, state, layout="k-first", round_each_step=True)
    s = state
    for i in range(4):
        sl = slice(i, i + 1)
        _, s = gdn_decode_ref(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], s, layout="k-first")
    assert torch.equal(every, s)  # one call with per-step rounding == T calls of one token
    assert not torch.equal(once, every)  # and it is a different thing from rounding once

    s32 = state.float()
    _, a32 = gdn_decode_ref(q, k, v, g, beta, s32, layout="k-first")
    _, b32 = gdn_decode_ref(q, k, v, g, beta, s32, layout="k-first", round_each_step=True)
    assert torch.equal(a32, b32)  # float32 states are never rounded


def test_scale_argument_is_used():
    gen = torch.Generator().manual_seed(2)
    q, k, v, g, beta, state = _inputs(1, 1, 1, 1, 16, 4, gen)
    o_default, _ = gdn_decode_ref(q, k, v, g, beta, state, layout="k-first")
    o_half, _ = gdn_decode_ref(q, k, v, g, beta, state, layout="k-first", scale=0.5 * 16**-0.5)
    torch.testing.assert_close(o_half, 0.5 * o_default, rtol=1e-6, atol=1e-7)


def test_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(4)
    inputs = _inputs(2, 2, 1, 2, 8, 4, gen)
    copies = [x.clone() for x in inputs]
    gdn_decode_ref(*inputs, layout="k-first")
    assert all(torch.equal(x, c) for x, c in zip(inputs, copies))


def test_shape_errors_name_the_tensor():
    gen = torch.Generator().manual_seed(6)
    q, k, v, g, beta, s_first = _inputs(1, 1, 2, 4, 8, 16, gen)
    with pytest.raises(InputError, match=r"tensor state.*k-last"):
        gdn_decode_ref(q, k, v, g, beta, s_first, layout="k-last")  # K != V: the label is checkable
    with pytest.raises(InputError, match="tensor v"):
        gdn_decode_ref(q, k, v[:, :, :3], g[..., :3], beta[..., :3], s_first[:, :3], layout="k-first")
    with pytest.raises(InputError, match="tensor beta"):
        gdn_decode_ref(q, k, v, g, beta[:, :, :2], s_first, layout="k-first")
    with pytest.raises(InputError, match="float32 or bfloat16"):
        gdn_decode_ref(q, k, v, g, beta, s_first.half(), layout="k-first")
