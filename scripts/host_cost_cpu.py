"""Host cost per call of the grouped-GEMM and GDN-decode launchers, measured on a machine without a GPU.

A launch's host cost has three parts: our wrapper (checks, configuration, arguments), Triton's dispatch
(binding and specializing the arguments, the cache key and lookup, launch metadata) and the compiled
kernel's launcher (driver call, TMA descriptor encoding). The first two are Python and run the same without
a GPU: here CPU tensors of the benchmark's shapes stand in for CUDA ones, ``moetool/testing/triton_stub.py``
stands in for the driver and the compiled kernel (its launch entry does nothing), and the configuration is
the one an H200 gets (132 SMs, TMA), so TMA descriptors are built as on the card. Timed per call:

- wrapper: the call with the launch replaced by nothing (what our Python costs);
- + Triton's dispatch: every launch through ``JITFunction.run`` (``kernels/_launch.triton_dispatch``);
- + direct launch: as the call runs, the compiled kernel's launch entry called directly;
- dispatch alone / direct alone: the launch of the same arguments, without the wrapper.

The last part, the compiled kernel's launcher, is not in these figures: on a card add it (the GPU
benchmarks' host split measures it). Windows of each mode alternate; each figure is the median over
windows, with the fastest window beside it (on a shared machine the load moves the medians).

With ``--against REV`` the launchers of an earlier revision (``git show REV:kernels/...``) are timed in the
same windows: their wrapper alone and their call through Triton's dispatch.

Usage: python scripts/host_cost_cpu.py [--calls 2000] [--windows 7] [--against REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # the launchers accept CPU tensors only for the interpreter

import torch

from moetool.kernels import fp8_grouped_gemm as gemm
from moetool.kernels import gdn_decode as gdn
from moetool.kernels._launch import Launcher, triton_dispatch
from moetool.testing.triton_stub import stub_driver, stub_jit

H200_SMS = 132


def _as_h200(rows, n, k, m_tiles, a_q, b_q):
    """The configuration an H200 picks (TMA where the operands allow it)."""
    return gemm.select_config(max(1, rows), n, k, max(1, m_tiles), H200_SMS, gemm._tma_layout_ok(a_q, b_q))


def _gemm_case(module, masked: bool, g: int, rows: int, n: int, k: int):
    """A call of ``module``'s masked or contiguous grouped GEMM on DeepSeek-V3-shaped CPU tensors."""
    fp8 = torch.float8_e4m3fn
    if masked:
        a_q = torch.empty(g, 128, k, dtype=fp8)
        a_s = torch.empty(g, k // 128, 128).transpose(1, 2)  # MN-major, as the benchmark's
        layout = torch.full((g,), rows, dtype=torch.int32)
        out = torch.empty(g, 128, n, dtype=torch.bfloat16)
        run = module.m_grouped_fp8_gemm_nt_masked
    else:
        m = g * rows
        a_q = torch.empty(m, k, dtype=fp8)
        a_s = torch.empty(k // 128, m).t()
        layout = torch.arange(g, dtype=torch.int32).repeat_interleave(rows)
        out = torch.empty(m, n, dtype=torch.bfloat16)
        run = module.m_grouped_fp8_gemm_nt_contiguous
    b_q = torch.empty(g, n, k, dtype=fp8)
    b_s = torch.empty(g, n // 128, k // 128)

    def call() -> None:
        run(a_q, a_s, b_q, b_s, layout, out=out, expected_m=rows)

    return call


def _gdn_case(module, B: int):
    """A T = 1 call of ``module``'s GDN decode (H = 16, HV = 32, K = V = 128, bf16, float32 state)."""
    H, HV, K, V = 16, 32, 128, 128
    bf = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, 1, H, K, generator=gen).to(bf), torch.randn(B, 1, H, K, generator=gen).to(bf)
    v = torch.randn(B, 1, HV, V, generator=gen).to(bf)
    a, b = torch.randn(B, 1, HV, generator=gen).to(bf), torch.randn(B, 1, HV, generator=gen).to(bf)
    A_log, dt_bias = torch.randn(HV, generator=gen), torch.randn(HV, generator=gen)
    pool = torch.zeros(B + 1, HV, V, K)
    slots = torch.arange(1, B + 1, dtype=torch.int32)

    def call() -> None:
        module.gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool, slots)

    return call


def _recorded(module, attr: str, call) -> tuple:
    """The (grid, args, key, options) ``call`` hands the launcher ``module.<attr>``."""
    launches = []
    saved = getattr(module, attr)
    setattr(module, attr, lambda *parts: launches.append(parts))
    try:
        call()
    finally:
        setattr(module, attr, saved)
    return launches[0]


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _time(fn: Callable[[], None], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _modes(module, attr: str, raw_fn, call) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """The current launchers' modes: name -> (set the launcher up, one call)."""
    grid, args, key, options = _recorded(module, attr, call)
    stub = Launcher(stub_jit(raw_fn))

    def via_dispatch() -> None:
        with triton_dispatch():
            call()

    def use(launcher):
        return lambda: setattr(module, attr, launcher)

    return {
        "wrapper": (use(lambda *parts: None), call),
        "+ Triton's dispatch": (use(stub), via_dispatch),
        "+ direct launch": (use(stub), call),
        "dispatch alone": (use(stub), lambda: stub.fn[grid](*args, **options)),
        "direct alone": (use(stub), lambda: stub(grid, args, key, options)),
    }


def _previous_modes(module, kernel_attr: str, call, wrapper: bool) -> dict:
    """A previous revision's launcher (it launched through ``module.<kernel_attr>[grid](...)``)."""
    raw_fn = getattr(module, kernel_attr).fn
    through_triton = stub_jit(raw_fn)
    modes = {"previous: + Triton's dispatch": (lambda: setattr(module, kernel_attr, through_triton), call)}
    if wrapper:
        modes["previous: wrapper"] = (lambda: setattr(module, kernel_attr, _NoLaunch()), call)
    return modes


def _measure(modes: dict, calls: int, windows: int) -> dict[str, tuple[float, float]]:
    """Median and fastest seconds per call of each mode, windows of the modes alternating."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    for setup, fn in modes.values():  # warm-up: plans made, kernels "compiled"
        setup()
        for _ in range(20):
            fn()
    for _ in range(windows):
        for name, (setup, fn) in modes.items():
            setup()
            times[name].append(_time(fn, calls))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def _previous(rev: str, name: str):
    """``kernels/<name>.py`` at git revision ``rev``, imported as a module of its own."""
    src = subprocess.run(
        ["git", "show", f"{rev}:kernels/{name}.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"previous_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"previous_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000, help="calls per window")
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument(
        "--against", metavar="REV", help="also time the launchers of this git revision (same shapes)"
    )
    args = parser.parse_args()
    gemm._device_config = _as_h200
    old_gemm = old_gdn = None
    if args.against:
        old_gemm, old_gdn = _previous(args.against, "fp8_grouped_gemm"), _previous(args.against, "gdn_decode")
        old_gemm._device_config = lambda rows, n, k, m_tiles, a_q, b_q: old_gemm.select_config(
            max(1, rows), n, k, max(1, m_tiles), H200_SMS, old_gemm._tma_layout_ok(a_q, b_q)
        )
    kernel = gemm.fp8_grouped_gemm_kernel.fn
    cases = {}
    for label, masked, rows in (("w13 8 x 64 masked", True, 64), ("w13 8 x 512 contiguous", False, 512)):
        modes = _modes(gemm, "_GEMM", kernel, _gemm_case(gemm, masked, 8, rows, 4096, 7168))
        if old_gemm is not None:
            old_call = _gemm_case(old_gemm, masked, 8, rows, 4096, 7168)
            modes |= _previous_modes(old_gemm, "fp8_grouped_gemm_kernel", old_call, wrapper=True)
        cases[f"GEMM {label}"] = (modes, (gemm, "_GEMM"))
    modes = _modes(gdn, "_GDN", gdn.gdn_decode_klast_kernel.fn, _gdn_case(gdn, 1))
    if old_gdn is not None:
        modes |= _previous_modes(old_gdn, "gdn_decode_klast_kernel", _gdn_case(old_gdn, 1), wrapper=False)
    cases["GDN decode B=1"] = (modes, (gdn, "_GDN"))

    print(
        f"host µs per call on this CPU ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), torch "
        f"{torch.__version__}, launch stubbed: median over windows (fastest window)"
    )
    with stub_driver():
        for name, (modes, (module, attr)) in cases.items():
            saved = getattr(module, attr)
            try:
                res = _measure(modes, args.calls, args.windows)
            finally:
                setattr(module, attr, saved)
            text = ", ".join(f"{mode} {med * 1e6:.1f} ({low * 1e6:.1f})" for mode, (med, low) in res.items())
            print(f"{name}: {text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
