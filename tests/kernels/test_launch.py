"""The launcher that skips Triton's dispatch (kernels/_launch.py), on the CPU, with Triton's own dispatch as
the oracle.

A stand-in driver and stand-in compiled kernels (``moetool/testing/triton_stub.py``: one per Triton cache
key, each recording its launches) let Triton's real ``JITFunction.run`` run without a GPU: it binds,
specializes and looks kernels up exactly as on a card. Every launch the grouped GEMM and the GDN
decode make for a sequence of calls whose specializations change between calls (pointer alignment, M = 1,
integers divisible by 16 or not, TMA descriptors or pointers, masked or contiguous, dtypes, devices, knobs)
is replayed through our launcher and through Triton's dispatch: each must launch the kernel compiled for
the same Triton cache key, with the same grid, stream and arguments, and the later calls of a
specialization must skip the dispatch. The bytes the two paths compute on a card are compared in the GPU
test at the end of this file.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
from triton.runtime.jit import JITFunction

from moetool.errors import InputError
from moetool.kernels import _launch, fp8_grouped_gemm, gdn_decode
from moetool.kernels._launch import Launcher, triton_dispatch
from moetool.kernels.fp8_grouped_gemm import GemmConfig, mn_major_scales
from moetool.kernels.fp8_quant_ref import block_quant_ref
from moetool.testing.triton_stub import stub_driver, stub_jit

pytestmark = pytest.mark.skipif(not _launch._SUPPORTED, reason=f"Triton {triton.__version__}: no fast path")


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the wrappers' CPU-tensor check; plans only
    with stub_driver() as drv:
        yield drv


def _replay(raw_fn, launches, drv, between=None):
    """Replay ``launches`` (grid, args, key, options) through Triton's dispatch of one JITFunction and our
    launcher of another; return (theirs, ours, launcher) where theirs/ours are the recorded launches."""
    theirs_log, ours_log = [], []
    ref = stub_jit(raw_fn, theirs_log)
    launcher = Launcher(stub_jit(raw_fn, ours_log))
    for i, (grid, args, key, options) in enumerate(launches):
        if between is not None:
            between(i, drv)
        ref[grid](*args, **options)
        launcher(grid, args, key, options)
    return theirs_log, ours_log, launcher


def _assert_same_launches(theirs, ours) -> None:
    assert len(theirs) == len(ours)
    for i, (t, o) in enumerate(zip(theirs, ours)):
        assert o[0].triton_key == t[0].triton_key, f"launch {i}: another specialization than Triton's"
        assert o[1:3] == t[1:3], f"launch {i}: grid or stream"
        assert len(o[3]) == len(t[3]) and all(x is y for x, y in zip(o[3], t[3])), f"launch {i}: arguments"


def _expected_fast(launches, devices) -> int:
    """Launches whose (device, key) came before: the ones that must skip Triton's dispatch."""
    seen, fast = set(), 0
    for (_, _, key, _), dev in zip(launches, devices):
        fast += (dev, key) in seen
        seen.add((dev, key))
    return fast


def _gemm_operands(g, m, n, k, *, masked, misalign=None, seed=0, device="cpu"):
    """FP8 operands; ``misalign`` names the tensor ("a_q", "a_s", "b_s", "layout") placed 4 bytes off a
    16-byte boundary (a view into a larger buffer, same values and strides)."""
    gen = torch.Generator().manual_seed(seed)
    shape_a = (g, m, k) if masked else (m, k)
    x = torch.randn(*shape_a, generator=gen).to(device)
    a_q, a_s = block_quant_ref(x, block=(1, 128))
    b_q, b_s = block_quant_ref(torch.randn(g, n, k, generator=gen).to(device) * 0.05)
    if masked:
        layout = torch.randint(0, m + 1, (g,), generator=gen, dtype=torch.int32).to(device)
    else:  # each expert's rows in one 128-row segment, the rest padding
        layout = torch.full((m,), -1, dtype=torch.int32)
        for e in range(min(g, -(-m // 128))):
            rows = min(128, m - 128 * e)
            layout[128 * e : 128 * e + int(torch.randint(1, rows + 1, (), generator=gen))] = e
        layout = layout.to(device)
    if misalign == "a_q":  # 4 columns in: the rows stay K-major
        buf = torch.zeros(*shape_a[:-1], k + 4, dtype=torch.uint8, device=device)
        buf[..., 4:] = a_q.view(torch.uint8)
        a_q = buf[..., 4:].view(torch.float8_e4m3fn)
    elif misalign in ("a_s", "b_s", "layout"):
        t = {"a_s": a_s, "b_s": b_s, "layout": layout}[misalign]
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=device)
        flat[1:] = t.reshape(-1)
        t = flat[1:].view(t.shape)
        a_s, b_s, layout = (t if misalign == "a_s" else a_s, t if misalign == "b_s" else b_s,
                            t if misalign == "layout" else layout)  # fmt: skip
    return a_q, a_s, b_q, b_s, layout


_TMA = GemmConfig(64, 128, 1, 4, 3, tma=True)
_PTR = GemmConfig(64, 64, 2, 4, 2)


def _gemm_calls():
    """(masked, operands, out, expected_m, config) of calls whose specializations change between calls."""
    calls = []
    for masked in (False, True):
        base = _gemm_operands(3, 128, 256, 256, masked=masked)
        calls += [
            (masked, base, None, None, None),
            (masked, base, None, None, None),  # same again: the fast path
            (masked, base, None, None, _TMA),  # TMA descriptors instead of pointers
            (masked, base, None, None, _TMA),
            (masked, base, None, None, _PTR),  # other constexprs and options
        ]
        for bad in ("a_q", "a_s", "b_s", "layout"):  # one pointer off 16 bytes, then aligned again
            calls.append(
                (masked, _gemm_operands(3, 128, 256, 256, masked=masked, misalign=bad), None, None, None)
            )
            calls.append((masked, base, None, None, None))
        # M = 1 (an integer argument of 1 is a constexpr to Triton) and N, K not multiples of 16
        one = _gemm_operands(1, 1, 200, 136, masked=masked, seed=3)
        calls += [(masked, one, None, None, None), (masked, one, None, None, None)]
        odd = _gemm_operands(2, 128, 72, 200, masked=masked, seed=4)
        calls += [(masked, odd, None, None, None), (masked, odd, None, 8, None)]
        # an output given, with other strides (a column slice: stride(0) ≠ N)
        wide = torch.empty(*((3, 128) if masked else (128,)), 264, dtype=torch.bfloat16)
        calls += [(masked, base, wide[..., :256], None, None)] * 2
    return calls


def _record(monkeypatch, module, attr):
    launches = []
    monkeypatch.setattr(
        module, attr, lambda grid, args, key, options: launches.append((grid, args, key, options))
    )
    return launches


def test_gemm_launches_match_triton_dispatch(fake_gpu, monkeypatch):
    launches = _record(monkeypatch, fp8_grouped_gemm, "_GEMM")
    outs = []
    for masked, (a_q, a_s, b_q, b_s, layout), out, expected_m, config in _gemm_calls():
        run = (
            fp8_grouped_gemm.m_grouped_fp8_gemm_nt_masked
            if masked
            else fp8_grouped_gemm.m_grouped_fp8_gemm_nt_contiguous
        )
        outs.append(run(a_q, a_s, b_q, b_s, layout, out=out, expected_m=expected_m, config=config))
    assert len(launches) == len(outs)

    # a second device takes the last calls: a kernel recorded on device 0 is not reused there
    switch = len(launches) - 4

    def between(i, drv):
        drv.device = 1 if i >= switch else 0

    theirs, ours, launcher = _replay(fp8_grouped_gemm.fp8_grouped_gemm_kernel.fn, launches, fake_gpu, between)
    _assert_same_launches(theirs, ours)
    devices = [1 if i >= switch else 0 for i in range(len(launches))]
    assert launcher.fast_launches == _expected_fast(launches, devices) > len(launches) // 3
    # Triton compiled more than one specialization, and ours launched every one of them
    assert len({t[0].triton_key for t in theirs}) > 8
    assert {o[0].triton_key for o in ours} == {t[0].triton_key for t in theirs}
    # fast launches pass no hook and no launch metadata (no hook is registered)
    assert sum(o[4] is None and o[5] is None for o in ours) == launcher.fast_launches


def test_gdn_launches_match_triton_dispatch(fake_gpu, monkeypatch):
    launches = _record(monkeypatch, gdn_decode, "_GDN")
    gen = torch.Generator().manual_seed(5)

    def inputs(B, T, H, HV, K, V, io=torch.bfloat16, state=torch.float32, misalign=False, rows=None):
        q = torch.randn(B, T, H, K, generator=gen).to(io)
        if misalign:  # the same values 4 bytes off a 16-byte boundary, contiguous
            flat = torch.zeros(q.numel() + 2, dtype=io)
            flat[2:] = q.reshape(-1)
            q = flat[2:].view(q.shape)
        k = torch.randn(B, T, H, K, generator=gen).to(io)
        v = torch.randn(B, T, HV, V, generator=gen).to(io)
        a = torch.randn(B, T, HV, generator=gen).to(io)
        b = torch.randn(B, T, HV, generator=gen).to(io)
        A_log, dt_bias = torch.randn(HV, generator=gen), torch.randn(HV, generator=gen)
        pool = torch.zeros(B + 1 if rows is None else rows, HV, V, K, dtype=state)
        slots = (
            torch.arange(1, B + 1, dtype=torch.int32)
            if rows is None
            else torch.full((B,), -1, dtype=torch.int32)
        )
        return q, k, v, a, b, A_log, dt_bias, pool, slots

    base = inputs(2, 1, 1, 2, 16, 8)
    calls = [
        (base, {}),
        (base, {}),
        (inputs(2, 1, 1, 2, 16, 8, misalign=True), {}),
        (base, {}),
        (inputs(1, 1, 1, 2, 16, 8), {}),  # B = 1
        (inputs(1, 1, 1, 2, 16, 8, rows=1), {}),  # a pool of one row: an integer argument of 1
        (inputs(2, 3, 1, 2, 16, 8), {}),  # T = 3: a runtime integer, and SINGLE_TOKEN off
        (inputs(2, 1, 1, 2, 16, 8, io=torch.float32, state=torch.bfloat16), {}),  # other dtypes
        (base, {"scale": 0.5}),
        (base, {"pdl": True}),
        (base, {"config": gdn_decode.LaunchConfig(block_v=4, tiles=2, num_warps=1, stages=2)}),
        (inputs(2, 1, 1, 2, 12, 24), {}),  # K, V not powers of two: masked tiles
        (base, {}),
    ]
    for args, kw in calls:
        gdn_decode.gdn_decode_klast(*args, **kw)
    assert len(launches) == len(calls)
    theirs, ours, launcher = _replay(gdn_decode.gdn_decode_klast_kernel.fn, launches, fake_gpu)
    _assert_same_launches(theirs, ours)
    assert launcher.fast_launches == _expected_fast(launches, [0] * len(launches)) >= 3
    assert len({t[0].triton_key for t in theirs}) >= 8


def test_state_changes_go_through_triton(fake_gpu, monkeypatch):
    """A knob Triton folds into the compile options, a launch hook, a pre-run hook, a changed global the
    kernel reads, or the switch: each sends the launch through Triton's dispatch."""
    launches = _record(monkeypatch, fp8_grouped_gemm, "_GEMM")
    a_q, a_s, b_q, b_s, layout = _gemm_operands(2, 128, 128, 128, masked=False)
    fp8_grouped_gemm.m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, b_q, b_s, layout)
    (grid, args, key, options) = launches[0]
    log = []
    fn = stub_jit(fp8_grouped_gemm.fp8_grouped_gemm_kernel.fn, log)
    launcher = Launcher(fn)
    launcher(grid, args, key, options)
    launcher(grid, args, key, options)
    assert launcher.fast_launches == 1 and len(log) == 2

    def via_triton(expect_new_kernel: bool) -> None:
        before_fast, before_keys = launcher.fast_launches, {x[0].triton_key for x in log}
        launcher(grid, args, key, options)
        assert launcher.fast_launches == before_fast
        assert (log[-1][0].triton_key not in before_keys) == expect_new_kernel

    knobs = triton.knobs
    monkeypatch.setattr(knobs.runtime, "debug", True)
    via_triton(expect_new_kernel=True)  # debug is a compile option: Triton compiles another kernel
    launcher(grid, args, key, options)  # and that one is remembered under the new state
    assert launcher.fast_launches == 3 - 1 and log[-1][0] is log[-2][0]
    monkeypatch.setattr(knobs.runtime, "debug", False)
    launcher(grid, args, key, options)
    assert log[-1][0] is log[0][0]  # back to the first kernel, fast

    calls = []
    knobs.runtime.launch_enter_hook.add(calls.append)
    try:
        via_triton(expect_new_kernel=False)
        assert len(calls) == 1  # the hook saw the launch
    finally:
        knobs.runtime.launch_enter_hook.remove(calls.append)

    fn.pre_run_hooks.append(lambda *a, **k: calls.append("pre"))
    via_triton(expect_new_kernel=False)
    assert calls[-1] == "pre"
    fn.pre_run_hooks.clear()

    globals_dict = {"_X": 1}
    fn.used_global_vals[("_X", id(globals_dict))] = (1, globals_dict)
    fast = launcher.fast_launches
    launcher(grid, args, key, options)
    assert launcher.fast_launches == fast + 1
    globals_dict["_X"] = 2
    with pytest.raises(RuntimeError, match="Global variable _X has changed"):
        launcher(grid, args, key, options)  # Triton refuses, and so does the launcher, through it
    del fn.used_global_vals[("_X", id(globals_dict))]

    with triton_dispatch():
        via_triton(expect_new_kernel=False)
    launcher(grid, args, key, options)
    assert launcher.fast_launches == fast + 2


def test_unsupported_or_interpreted_kernels_always_dispatch(fake_gpu, monkeypatch):
    log = []
    fn = stub_jit(gdn_decode.gdn_decode_klast_kernel.fn, log)
    calls = []
    monkeypatch.setattr(JITFunction, "__getitem__", lambda self, grid: lambda *a, **k: calls.append(grid))
    monkeypatch.setattr(_launch, "_SUPPORTED", False)
    launcher = Launcher(fn)
    for _ in range(3):
        launcher((1, 1, 1), (), "k", {})
    assert calls == [(1, 1, 1)] * 3 and launcher.fast_launches == 0
    monkeypatch.setattr(_launch, "_SUPPORTED", True)
    interpreted = Launcher(gdn_decode.gdn_decode_klast_kernel)  # the interpreter's function under CI
    assert interpreted._usable == isinstance(gdn_decode.gdn_decode_klast_kernel, JITFunction)


def test_entries_are_bounded(fake_gpu, monkeypatch):
    monkeypatch.setattr(_launch, "MAX_ENTRIES", 4)
    launches = _record(monkeypatch, fp8_grouped_gemm, "_GEMM")
    a_q, a_s, b_q, b_s, layout = _gemm_operands(2, 128, 128, 128, masked=False)
    fp8_grouped_gemm.m_grouped_fp8_gemm_nt_contiguous(a_q, a_s, b_q, b_s, layout)
    grid, args, _, options = launches[0]
    log = []
    launcher = Launcher(stub_jit(fp8_grouped_gemm.fp8_grouped_gemm_kernel.fn, log))
    for key in range(10):
        launcher(grid, args, key, options)
    assert len(launcher._entries) <= 4 and launcher.fast_launches == 0
    launcher(grid, args, 9, options)
    assert launcher.fast_launches == 1


def test_rebased_descriptor_is_the_constructors():
    """A descriptor put over another tensor field by field equals the one Triton's constructor builds."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    a = torch.zeros(3, 64, 256, dtype=torch.float8_e4m3fn)
    b = torch.ones(3, 64, 256, dtype=torch.float8_e4m3fn)
    proto = TensorDescriptor(a, [192, 256], [256, 1], [64, 128])
    proto.base = None
    got = _launch.rebased(proto, b)
    want = TensorDescriptor(b, [192, 256], [256, 1], [64, 128])
    assert type(got) is type(want) and got.base is b and proto.base is None
    assert vars(got).keys() == vars(want).keys()
    assert all(v == vars(want)[name] for name, v in vars(got).items() if name != "base")


def test_plan_strides_of_scales_copy(fake_gpu, monkeypatch):
    """Where the configuration reads MN-major scales and the caller's are row-major, the call copies them:
    the plan's scale strides (worked out on shapes) must be the copy's."""
    launches = _record(monkeypatch, fp8_grouped_gemm, "_GEMM")
    mn = dataclasses.replace(_PTR, mn_major=True)
    for masked in (False, True):
        for m in (128, 1):
            a_q, a_s, b_q, b_s, layout = _gemm_operands(2, m, 128, 384, masked=masked, seed=m)
            assert a_s.stride(-1) == 1  # row-major, as block_quant_ref writes them
            run = (
                fp8_grouped_gemm.m_grouped_fp8_gemm_nt_masked
                if masked
                else fp8_grouped_gemm.m_grouped_fp8_gemm_nt_contiguous
            )
            run(a_q, a_s, b_q, b_s, layout, config=mn)
            _, args, _, _ = launches[-1]
            passed = args[3]
            assert torch.equal(passed, a_s)
            want = passed.stride() if masked else (0, *passed.stride())
            assert args[8 + 4 + 3 : 8 + 4 + 6] == want
            assert (passed is a_s) == (m == 1)  # one row per group is both layouts at once


def test_gemm_plans_keep_every_check(monkeypatch):
    """A plan is made once per key, so each check must follow from the key: after a good call, the same
    shapes with one thing wrong are still refused (and the wrong call leaves no plan behind)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launches = _record(monkeypatch, fp8_grouped_gemm, "_GEMM")
    run = fp8_grouped_gemm.m_grouped_fp8_gemm_nt_contiguous
    a_q, a_s, b_q, b_s, layout = _gemm_operands(2, 128, 128, 256, masked=False)
    run(a_q, a_s, b_q, b_s, layout)
    bad = [
        ((a_q.view(torch.uint8), a_s, b_q, b_s, layout), {}, "float8_e4m3fn"),
        ((a_q, a_s.double(), b_q, b_s, layout), {}, "float32"),
        ((a_q, a_s, b_q, b_s, torch.stack([layout, layout], 1)[:, 0]), {}, "contiguous int32"),
        ((a_q, a_s, b_q, b_s, layout.long()), {}, "int32"),
        ((a_q, a_s, b_q, b_s, layout), {"out": torch.empty(128, 128)}, "bfloat16"),
        ((a_q, a_s, b_q, b_s, layout), {"config": GemmConfig(64, 512, 1, 4, 2)}, "block_n"),
        ((a_q, a_s, b_q, b_s, layout), {"config": GemmConfig(64, 128, 1, 4, 2, tma=True)}, None),  # fine
    ]
    for args, kw, match in bad:
        if match is None:
            run(*args, **kw)
            continue
        for _ in range(2):
            with pytest.raises(InputError, match=match):
                run(*args, **kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="TRITON_INTERPRET"):
        run(a_q, a_s, b_q, b_s, layout)  # the same arguments as the first call: its plan is not reused
    assert len(launches) == 2


def test_gdn_plans_keep_every_check(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g_launches = _record(monkeypatch, gdn_decode, "_GDN")
    B, T, H, HV, K, V = 2, 1, 1, 2, 16, 8
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v, a, b = torch.randn(B, T, HV, V), torch.randn(B, T, HV), torch.randn(B, T, HV)
    A_log, dt_bias, pool = torch.randn(HV), torch.randn(HV), torch.zeros(B + 1, HV, V, K)
    ids = torch.tensor([1, 2], dtype=torch.int32)
    gdn_decode.gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool, ids)
    for args, match in (
        ((q, k, v, a, b, A_log.bfloat16(), dt_bias, pool, ids), "A_log.*float32"),
        ((q, k, v, a, b, A_log, dt_bias, pool, ids.long()), "slot_ids.*int32"),
        ((q, k.transpose(0, 1).contiguous().transpose(0, 1), v, a, b, A_log, dt_bias, pool, ids), None),
        ((q, k, v, a, b, A_log, dt_bias, torch.zeros(B + 1, HV, K, V).transpose(-1, -2), ids), "contiguous"),
    ):
        if match is None:  # B = 2, T = 1: a transposed copy that is contiguous again is fine
            gdn_decode.gdn_decode_klast(*args)
            continue
        for _ in range(2):
            with pytest.raises(InputError, match=match):
                gdn_decode.gdn_decode_klast(*args)
    with pytest.raises(InputError, match="tensor out"):
        gdn_decode.gdn_decode_klast(
            q, k, v, a, b, A_log, dt_bias, pool, ids, out=torch.empty(B, T, HV, V + 1)
        )
    assert len(g_launches) == 2


# GPU: the bytes of both paths ---------------------------------------------------------------------------


def _same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


@pytest.mark.gpu
def test_gpu_gemm_fast_path_same_bytes_as_triton_dispatch(seed):
    """Calls whose specialization changes from one call to the next (TMA-fed and pointer tiles, scales
    copied MN-major or read as given, a pointer off 16 bytes, M = 1, N and K not multiples of 16, an output
    with its own strides), each made through Triton's dispatch and through the compiled kernel: the same
    bytes, and the compiled kernel was used."""
    dev = "cuda"
    cases = []
    for masked in (False, True):
        m = 128 if masked else 4 * 128
        big = _gemm_operands(4, m, 512, 512, masked=masked, device=dev)
        a_q, a_s, b_q, b_s, layout = big
        cases += [
            (masked, big, None, None),  # compute regime (TMA, scales copied MN-major), or streaming
            (masked, big, 16, None),  # streaming tiles
            (masked, (a_q, mn_major_scales(a_s), b_q, b_s, layout), None, None),  # scales read as given
            (masked, big, None, _PTR),
        ]
        for bad in ("a_q", "a_s", "b_s", "layout"):
            cases.append(
                (masked, _gemm_operands(4, m, 512, 512, masked=masked, misalign=bad, device=dev), None, None)
            )
        cases.append((masked, _gemm_operands(1, 1, 256, 256, masked=masked, seed=2, device=dev), None, None))
        cases.append(
            (masked, _gemm_operands(2, 128, 200, 136, masked=masked, seed=3, device=dev), None, None)
        )
    assert any(fp8_grouped_gemm.contiguous_config(c[1][0], c[1][2]).tma for c in cases if not c[0])

    def call(case, out):
        masked, (a_q, a_s, b_q, b_s, layout), expected_m, config = case
        run = (
            fp8_grouped_gemm.m_grouped_fp8_gemm_nt_masked
            if masked
            else fp8_grouped_gemm.m_grouped_fp8_gemm_nt_contiguous
        )
        return run(a_q, a_s, b_q, b_s, layout, out=out, expected_m=expected_m, config=config)

    def nan_out(case, wide):
        _, (a_q, _, b_q, _, _), _, _ = case
        shape = (*a_q.shape[:-1], b_q.shape[1])
        if wide:  # a column slice of a wider buffer: strides of its own
            return torch.full((*shape[:-1], shape[-1] + 8), float("nan"), dtype=torch.bfloat16, device=dev)[
                ..., : shape[-1]
            ]
        return torch.full(shape, float("nan"), dtype=torch.bfloat16, device=dev)

    fast_before = fp8_grouped_gemm._GEMM.fast_launches
    kept = []
    order = list(range(len(cases))) * 3  # every specialization again after the others
    for n_call, i in enumerate(order):
        wide = n_call % 2 == 1
        with triton_dispatch():
            ref = call(cases[i], nan_out(cases[i], wide))
        got = call(cases[i], nan_out(cases[i], wide))
        torch.cuda.synchronize()
        assert not bool(torch.isnan(got).any()), f"call {n_call} (case {i}): output not written"
        assert _same_bytes(got, ref), f"call {n_call} (case {i})"
        kept += [ref, got]
    # from the second round on every call was a fast launch (the first round met each key once or twice)
    assert fp8_grouped_gemm._GEMM.fast_launches - fast_before >= 2 * len(cases)


@pytest.mark.gpu
def test_gpu_gdn_fast_path_same_bytes_as_triton_dispatch(seed):
    dev = "cuda"
    gen = torch.Generator().manual_seed(9)

    def inputs(B, T, HV, K, V, io, state, misalign=False):
        H = HV // 2
        r = lambda *shape: torch.randn(*shape, generator=gen).to(dev)  # noqa: E731
        q = r(B, T, H, K).to(io)
        if misalign:
            flat = torch.zeros(q.numel() + 2, dtype=io, device=dev)
            flat[2:] = q.reshape(-1)
            q = flat[2:].view(q.shape)
        k, v = r(B, T, H, K).to(io), r(B, T, HV, V).to(io)
        a, b = r(B, T, HV).to(io), r(B, T, HV).to(io)
        pool = (0.1 * r(B + 1, HV, V, K)).to(state)
        pool[0] = 0
        slots = (torch.randperm(B, generator=gen) + 1).to(torch.int32).to(dev)
        if B > 1:
            slots[-1] = -1  # a sequence with no state yet
        return q, k, v, a, b, 0.5 * r(HV), 0.5 * r(HV), pool, slots

    bf, f32 = torch.bfloat16, torch.float32
    cases = [
        inputs(1, 1, 32, 128, 128, bf, f32),  # B = 1: host-bound
        inputs(64, 1, 32, 128, 128, bf, bf),  # B·HV = 2048: launched with programmatic dependent launch
        inputs(3, 2, 4, 128, 128, f32, f32),
        inputs(3, 1, 4, 128, 128, bf, f32, misalign=True),
        inputs(2, 1, 4, 100, 72, bf, bf),  # partial tiles
    ]
    fast_before = gdn_decode._GDN.fast_launches
    for n_call, i in enumerate(list(range(len(cases))) * 3):
        q, k, v, a, b, A_log, dt_bias, pool, slots = cases[i]
        pool_ref, pool_got = pool.clone(), pool.clone()
        with triton_dispatch():
            o_ref = gdn_decode.gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool_ref, slots)
        o_got = gdn_decode.gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool_got, slots)
        torch.cuda.synchronize()
        assert not _same_bytes(pool_got, pool), f"call {n_call}: state not advanced"
        assert _same_bytes(o_got, o_ref) and _same_bytes(pool_got, pool_ref), f"call {n_call} (case {i})"
    assert gdn_decode._GDN.fast_launches - fast_before >= 2 * len(cases)
