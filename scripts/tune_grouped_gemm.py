"""Tune the FP8 block grouped GEMM's compute regime (>= 512 rows per expert) against DeepGEMM, in one run.

For every case (DeepSeek-V3 w13 N×K = 4096×7168 and w2 7168×2048; 8 and 32 experts; 512 and 4096 rows per
expert; contiguous layout, MN-major activation scales as DeepGEMM takes them) it times DeepGEMM and a
bounded list of launch configurations of ours (``CANDIDATES``: tile shape, warps, pipeline stages, tile
order, 256-wide tiles with per-column weight scales, the MMA issued a step ahead of the rescale, scales
loaded a step ahead), with the same timer as ``scripts/bench_grouped_gemm.py`` (``triton.testing.do_bench``
median, L2 flushed). Before a candidate is timed its output must be bit-identical to the default
configuration's on the same operands (written into a NaN-filled buffer): every configuration promotes each
128-deep K block into the float32 accumulator in K order with the same scale products, so any difference
is a bug and the candidate is dropped (``DIFF``). Candidates are timed in ``--rounds`` rounds in
alternating order, each keeping its fastest, and DeepGEMM before the first round and after each; the
ratio uses DeepGEMM's fastest. It prints, per case, every candidate's µs, TFLOP/s, ratio to DeepGEMM and
bit check; then the best candidate per case and the one whose worst ratio over all cases is highest (the
bar is >= 0.75x DeepGEMM in every case), as the ``GemmConfig(...)`` to put in ``_COMPUTE_TMA``
(``kernels/fp8_grouped_gemm.py``), and the best pair when w13 (K = 7168) and w2 (K = 2048) take different
ones (``_COMPUTE_TMA`` and ``_COMPUTE_TMA_SHORT_K``, split at K = ``_SHORT_K``).

Our candidates are compiled first in ``--jit-workers`` processes (Triton's cache then serves the timed
run). Cases run worst-first (by the ratios last measured on an H200); no new case starts after
``--budget-s`` seconds, and SIGTERM (``timeout``) stops the measuring and prints the report of what was
measured, so a run bounded by a device limit still reports.

DeepGEMM comes from ``scripts/build_deepgemm.sh`` (``eval "$(bash scripts/build_deepgemm.sh env)"``); without
it the table has no ratios. ``--dry-run`` runs everything on the CPU through Triton's interpreter at tiny
shapes (``TRITON_INTERPRET=1`` required): the candidates, the bit checks and the report, no timing worth
reading.

Usage: python scripts/tune_grouped_gemm.py [--experts 8,32] [--rows 512,4096] [--shapes dsv3-w13,dsv3-w2]
       [--only NAME,NAME] [--rep-ms 60] [--rounds 2] [--budget-s 300] [--jit-workers 8] [--dry-run]
Exit status: 0 when every candidate that ran matched the default's bits, 1 when one did not, 2 when it
cannot run here (no GPU without --dry-run, or --dry-run without the interpreter).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch
import triton

from moetool.kernels.fp8_grouped_gemm import (
    _SHORT_K,
    GemmConfig,
    contiguous_config,
    m_grouped_fp8_gemm_nt_contiguous,
    mn_major_scales,
)
from moetool.kernels.fp8_grouped_gemm_ref import contiguous_layout
from moetool.kernels.fp8_quant_ref import block_quant_ref

SHAPES = {
    "dsv3-w13": (4096, 7168),  # DeepSeek-V3 expert gate_up: N = 2·2048, K = hidden 7168
    "dsv3-w2": (7168, 2048),  # DeepSeek-V3 expert down: N = hidden 7168, K = 2048
}
# Interpreter: toy N, and K on either side of _SHORT_K so both depth classes are reported.
DRY_SHAPES = {"dsv3-w13": (128, 2176), "dsv3-w2": (384, 256)}
DRY_ROWS = {512: 67, 4096: 129}  # irregular rows per expert for the dry run
DEEPGEMM_BAR = 0.75
# Ratio to DeepGEMM last measured on an H200 (docs/benchmarks.md), to run the worst cases first.
LAST_RATIO = {
    ("dsv3-w13", 32, 4096): 0.65,
    ("dsv3-w2", 8, 512): 0.66,
    ("dsv3-w13", 8, 4096): 0.73,
    ("dsv3-w13", 32, 512): 0.73,
    ("dsv3-w2", 32, 512): 0.76,
    ("dsv3-w2", 8, 4096): 0.77,
    ("dsv3-w13", 8, 512): 0.79,
    ("dsv3-w2", 32, 4096): 0.91,
}


def _cfg(
    bm: int, bn: int, gm: int, warps: int, stages: int, pipe: bool = False, ahead: bool = False
) -> GemmConfig:
    return GemmConfig(bm, bn, gm, warps, stages, tma=True, mn_major=True, pipe_dot=pipe, scales_ahead=ahead)


# name -> configuration. Registers per thread bound the shapes: a warpgroup's m64nN tile holds N/2 float32
# accumulators plus N/2 for the step's partial sum (pipe: N/2 more), so 64×128 on 4 warps runs up to three
# programs per SM, 128×128 and 64×256 on 8 warps (two warpgroups, m64n128 each) one or two, and 128×256
# on 8 warps is at the 255-register limit (16 warps: half the registers each; both listed, measured).
CANDIDATES: dict[str, GemmConfig] = {
    "64x128 g32 w4 s3": _cfg(64, 128, 32, 4, 3),  # the default today (_COMPUTE_TMA)
    "64x128 g8 w4 s3": _cfg(64, 128, 8, 4, 3),
    "64x128 g16 w4 s3": _cfg(64, 128, 16, 4, 3),
    "64x128 g32 w4 s4": _cfg(64, 128, 32, 4, 4),
    "64x128 g32 w4 s3 pipe": _cfg(64, 128, 32, 4, 3, True),
    "64x128 g32 w4 s4 pipe": _cfg(64, 128, 32, 4, 4, True),
    "64x128 g32 w4 s3 ahead": _cfg(64, 128, 32, 4, 3, ahead=True),
    "128x128 g8 w8 s3": _cfg(128, 128, 8, 8, 3),
    "128x128 g8 w8 s4": _cfg(128, 128, 8, 8, 4),
    "128x128 g32 w8 s4": _cfg(128, 128, 32, 8, 4),
    "128x128 g8 w8 s5": _cfg(128, 128, 8, 8, 5),
    "128x128 g8 w8 s4 pipe": _cfg(128, 128, 8, 8, 4, True),
    "128x128 g8 w8 s4 ahead": _cfg(128, 128, 8, 8, 4, ahead=True),
    "64x256 g8 w8 s3": _cfg(64, 256, 8, 8, 3),
    "64x256 g8 w8 s4": _cfg(64, 256, 8, 8, 4),
    "64x256 g32 w8 s4": _cfg(64, 256, 32, 8, 4),
    "64x256 g8 w8 s5": _cfg(64, 256, 8, 8, 5),
    "64x256 g8 w8 s4 pipe": _cfg(64, 256, 8, 8, 4, True),
    "64x256 g8 w8 s4 ahead": _cfg(64, 256, 8, 8, 4, ahead=True),
    "128x256 g8 w8 s3": _cfg(128, 256, 8, 8, 3),
    "128x256 g8 w16 s3": _cfg(128, 256, 8, 16, 3),
    "128x256 g8 w16 s4": _cfg(128, 256, 8, 16, 4),
}


def config_source(cfg: GemmConfig) -> str:
    """``cfg`` as the Python expression to paste into ``kernels/fp8_grouped_gemm.py``."""
    extra = "".join(
        f", {name}=True" for name in ("tma", "mn_major", "pipe_dot", "scales_ahead") if getattr(cfg, name)
    )
    return (
        f"GemmConfig(block_m={cfg.block_m}, block_n={cfg.block_n}, group_m={cfg.group_m}, "
        f"num_warps={cfg.num_warps}, num_stages={cfg.num_stages}{extra})"
    )


@dataclass
class Result:
    name: str
    ms: float = float("nan")
    status: str = ""  # "ok", "DIFF", "failed: ...", "skipped"


@dataclass
class CaseResult:
    shape: str
    g: int
    rows: int
    m: int
    n: int
    k: int
    flops: float
    default_name: str
    dg_ms: list[float] = field(default_factory=list)
    dg_same: str = "-"
    results: dict[str, Result] = field(default_factory=dict)

    def tflops(self, ms: float) -> float:
        return self.flops / (ms * 1e-3) / 1e12

    def ratio(self, ms: float) -> float:
        return min(self.dg_ms) / ms if self.dg_ms and ms == ms else float("nan")


def _timer(device: str, rep_ms: int) -> Callable[[Callable[[], object]], float]:
    if device == "cpu":  # interpreter: one run, only to exercise the path

        def once(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

        return once
    return lambda fn: float(
        triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")
    )


def _operands(n: int, k: int, g: int, rows: int, device: str) -> dict:
    """Block-FP8 weights and per-token activations in the contiguous layout (each expert's ``rows`` rows,
    in a random token order, padded to 128), activation scales MN-major."""
    b_q = torch.empty(g, n, k, dtype=torch.float8_e4m3fn, device=device)
    b_s = torch.empty(g, -(-n // 128), -(-k // 128), dtype=torch.float32, device=device)
    for e0 in range(0, g, 8):
        e1 = min(g, e0 + 8)
        b_q[e0:e1], b_s[e0:e1] = block_quant_ref(
            torch.randn(e1 - e0, n, k, device=device, dtype=torch.bfloat16)
        )
    ids = torch.arange(g, device=device).repeat_interleave(rows)
    ids = ids[torch.randperm(ids.numel(), device=device)]
    x_q, x_s = block_quant_ref(
        torch.randn(ids.numel(), k, device=device, dtype=torch.bfloat16), block=(1, 128)
    )
    a_q, m_indices, _ = contiguous_layout(x_q, ids, g)
    a_s, _, _ = contiguous_layout(x_s, ids, g)
    return {"a_q": a_q, "a_s": mn_major_scales(a_s), "b_q": b_q, "b_s": b_s, "m_indices": m_indices}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def run_case(
    shape: str,
    g: int,
    rows: int,
    nk: tuple[int, int],
    candidates: dict[str, GemmConfig],
    dg,
    device: str,
    time_fn: Callable[[Callable[[], object]], float],
    rounds: int,
    results: list[CaseResult],
) -> bool:
    """Times DeepGEMM and every candidate on one case, its results appended to ``results`` as they come
    (so a run stopped midway still reports them); returns whether every candidate that ran gave the
    default's bits."""
    n, k = nk
    ops = _operands(n, k, g, rows, device)
    a_q, a_s, b_q, b_s, m_indices = ops["a_q"], ops["a_s"], ops["b_q"], ops["b_s"], ops["m_indices"]
    m = a_q.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    default = contiguous_config(a_q, b_q, expected_m=rows)
    default_name = next((name for name, c in candidates.items() if c == default), "default")
    cr = CaseResult(shape, g, rows, m, n, k, 2.0 * g * rows * n * k, default_name)
    results.append(cr)

    def ours(cfg: GemmConfig | None) -> Callable[[], torch.Tensor]:
        return lambda: m_grouped_fp8_gemm_nt_contiguous(
            a_q, a_s, b_q, b_s, m_indices, out=out, expected_m=rows, config=cfg
        )

    out.fill_(float("nan"))
    base = _bits(ours(None)().clone())
    real = m_indices >= 0
    out_dg = torch.empty_like(out)

    def call_dg() -> None:
        dg.m_grouped_fp8_gemm_nt_contiguous((a_q, a_s), (b_q, b_s), out_dg, m_indices)

    if dg is not None:
        call_dg()
        torch.cuda.synchronize()
        same = torch.equal(_bits(out_dg)[real], base[real])
        cr.dg_same = "bitwise" if same else "DIFFERENT"
        cr.dg_ms.append(time_fn(call_dg))
    all_same = True
    order = [default_name] if default_name in candidates else []
    order += [name for name in candidates if name != default_name]
    for name in order:
        cfg = candidates[name]
        res = Result(name)
        cr.results[name] = res
        try:
            out.fill_(float("nan"))
            ours(cfg)()
            if device != "cpu":
                torch.cuda.synchronize()
            if not torch.equal(_bits(out), base):
                res.status = "DIFF"
                all_same = False
                print(f"    {name}: output bits differ from the default's: dropped", flush=True)
                continue
            res.ms = time_fn(ours(cfg))
            res.status = "ok"
        except Exception as exc:  # a configuration this compiler or card cannot run (shared memory, ...)
            first = (str(exc).strip().splitlines() or [""])[0][:140]
            res.status = f"failed: {type(exc).__name__}: {first}"
            print(f"    {name}: {res.status}", flush=True)
            continue
        ratio = cr.ratio(res.ms)
        print(
            f"    {name:<24} {res.ms * 1e3:9.1f} µs {cr.tflops(res.ms):6.0f} TFLOP/s"
            + ("" if ratio != ratio else f"  {ratio:.3f}x DeepGEMM"),
            flush=True,
        )
    if dg is not None:
        cr.dg_ms.append(time_fn(call_dg))
    # Further rounds in alternating order, each followed by DeepGEMM again: a candidate's figure is its
    # fastest round, so a drift in the card's clocks during the run favours no position in the list.
    ran = [name for name in order if cr.results[name].status == "ok"]
    for r in range(1, rounds):
        for name in ran[::-1] if r % 2 else ran:
            res = cr.results[name]
            res.ms = min(res.ms, time_fn(ours(candidates[name])))
        if dg is not None:
            cr.dg_ms.append(time_fn(call_dg))
    if default_name not in candidates:  # the default is not in the list (e.g. the CPU's): time it too
        res = Result(default_name, time_fn(ours(None)), "ok")
        cr.results[default_name] = res
    return all_same


class _Stopped(BaseException):
    """SIGTERM (``timeout``): stop measuring and report what was measured. A BaseException, as
    KeyboardInterrupt, so that no ``except Exception`` (a candidate that fails, Triton's) swallows it."""


def _stop(signum, frame) -> None:
    raise _Stopped()


def _warm_ours(nk: tuple[int, int], g: int, name: str, device: str) -> tuple[str, float, str]:
    """Compile one candidate for one (shape, G) in a worker process, so the timed run finds it in Triton's
    cache: a call with operands that specialize as the case's do (same G, N, K and strides; 128 rows per
    expert instead of the case's count changes only M, a multiple of 16 either way)."""
    label = f"{name} N={nk[0]} K={nk[1]} G={g}"
    t0 = time.perf_counter()
    try:
        n, k = nk
        m = g * 128
        b_q = torch.zeros(g, n, k, dtype=torch.float8_e4m3fn, device=device)
        b_s = torch.ones(g, -(-n // 128), -(-k // 128), dtype=torch.float32, device=device)
        a_q = torch.zeros(m, k, dtype=torch.float8_e4m3fn, device=device)
        a_s = mn_major_scales(torch.ones(m, -(-k // 128), dtype=torch.float32, device=device))
        m_indices = torch.arange(g, dtype=torch.int32, device=device).repeat_interleave(128)
        m_grouped_fp8_gemm_nt_contiguous(
            a_q, a_s, b_q, b_s, m_indices, expected_m=512, config=CANDIDATES[name]
        )
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # the timed run reports it again, with its case
        return label, time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[:160]}"
    return label, time.perf_counter() - t0, ""


def _warm_all(tasks: list[tuple], workers: int) -> None:
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_warm_ours, *zip(*tasks)))
    slow = max(done, key=lambda r: r[1])
    failed = [r for r in done if r[2]]
    print(
        f"our candidates compiled: {len(tasks)} kernels in {time.perf_counter() - t0:.1f} s with {workers} "
        f"processes (slowest {slow[1]:.1f} s: {slow[0]}); {len(failed)} failed",
        flush=True,
    )
    for label, _, err in failed:
        print(f"  compile of {label} failed: {err}", flush=True)


def _report(cases: list[CaseResult], candidates: dict[str, GemmConfig], have_dg: bool) -> None:
    print()
    print("per case (µs / TFLOP/s / ratio to DeepGEMM's faster timing; DIFF = bits differ, dropped):")
    for cr in cases:
        dg = (
            f"DeepGEMM {min(cr.dg_ms) * 1e3:.1f} µs {cr.tflops(min(cr.dg_ms)):.0f} TFLOP/s "
            f"(timings {', '.join(f'{t * 1e3:.1f}' for t in cr.dg_ms)}; bits vs ours: {cr.dg_same})"
            if cr.dg_ms
            else "DeepGEMM not timed"
        )
        print(f"{cr.shape} G={cr.g} rows={cr.rows} (M={cr.m} N={cr.n} K={cr.k}): {dg}")
        ok = [r for r in cr.results.values() if r.status == "ok"]
        for r in sorted(ok, key=lambda r: r.ms):
            ratio = cr.ratio(r.ms)
            mark = " (default)" if r.name == cr.default_name else ""
            bar = "" if ratio != ratio else f" {ratio:6.3f}x {'ok' if ratio >= DEEPGEMM_BAR else 'NO'}"
            print(f"  {r.name + mark:<34} {r.ms * 1e3:9.1f} {cr.tflops(r.ms):6.0f}{bar}")
        for r in cr.results.values():
            if r.status != "ok":
                print(f"  {r.name:<34} {r.status}")
    print()
    print("best per case:")
    for cr in cases:
        ok = [r for r in cr.results.values() if r.status == "ok"]
        if not ok:
            print(f"  {cr.shape} G={cr.g} rows={cr.rows}: nothing ran")
            continue
        best = min(ok, key=lambda r: r.ms)
        dflt = cr.results.get(cr.default_name)
        gain = dflt.ms / best.ms if dflt is not None and dflt.status == "ok" else float("nan")
        ratio = cr.ratio(best.ms)
        print(
            f"  {cr.shape} G={cr.g} rows={cr.rows}: {best.name} {best.ms * 1e3:.1f} µs, "
            f"{gain:.3f}x the default" + ("" if ratio != ratio else f", {ratio:.3f}x DeepGEMM")
        )
    # One configuration for the whole compute regime, then one per depth class (select_config takes
    # _COMPUTE_TMA_SHORT_K at K <= _SHORT_K): the highest worst-case ratio (to DeepGEMM where it ran, else
    # to the default), geometric mean as the tie-break.
    print()
    print("one configuration for every case (worst case first, then geometric mean):")
    unit = "x DeepGEMM" if have_dg else "x the default"
    single = _rank(cases, candidates, have_dg)
    for worst, geo, name in single[:8]:
        print(f"  {name:<24} worst {worst:.3f}{unit}, geometric mean {geo:.3f}")
    if not single:
        print("  none ran in every case")
        return
    worst, _, name = single[0]
    if have_dg:
        verdict = "meets" if worst >= DEEPGEMM_BAR else "does NOT meet"
        print(
            f"winner: {name}, worst case {worst:.3f}{unit}: {verdict} the {DEEPGEMM_BAR}x bar in every case"
        )
    else:
        print(f"winner: {name}, worst case {worst:.3f}{unit} (no DeepGEMM: the bar is not judged)")
    print(f"apply: in kernels/fp8_grouped_gemm.py set _COMPUTE_TMA = {config_source(candidates[name])}")
    print("       and _COMPUTE_TMA_SHORT_K = _COMPUTE_TMA")
    short = [cr for cr in cases if cr.k <= _SHORT_K]
    deep = [cr for cr in cases if cr.k > _SHORT_K]
    if short and deep:
        best_short = _rank(short, candidates, have_dg)
        best_deep = _rank(deep, candidates, have_dg)
        if best_short and best_deep:
            split = min(best_short[0][0], best_deep[0][0])
            print(
                f"split by depth: K > {_SHORT_K}: {best_deep[0][2]} (worst {best_deep[0][0]:.3f}); "
                f"K <= {_SHORT_K}: {best_short[0][2]} (worst {best_short[0][0]:.3f}); worst over all "
                f"{split:.3f}{unit} against {worst:.3f} with one configuration"
            )
            if best_short[0][2] != best_deep[0][2] and split > worst + 0.01:
                print(
                    f"apply instead: _COMPUTE_TMA = {config_source(candidates[best_deep[0][2]])}\n"
                    f"               _COMPUTE_TMA_SHORT_K = {config_source(candidates[best_short[0][2]])}"
                )


def _rank(
    cases: list[CaseResult], candidates: dict[str, GemmConfig], have_dg: bool
) -> list[tuple[float, float, str]]:
    """(worst ratio, geometric mean, name) of every candidate that ran in all ``cases``, best first."""
    scores = []
    for name in candidates:
        vals = []
        for cr in cases:
            r = cr.results.get(name)
            if r is None or r.status != "ok":
                vals = None
                break
            dflt = cr.results.get(cr.default_name)
            if have_dg and cr.dg_ms:
                vals.append(cr.ratio(r.ms))
            elif dflt is not None and dflt.status == "ok":
                vals.append(dflt.ms / r.ms)
            else:  # a case stopped before its default was timed: nothing to compare with
                vals = None
                break
        if vals:
            scores.append((min(vals), math.exp(sum(map(math.log, vals)) / len(vals)), name))
    return sorted(scores, reverse=True)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=_ints, default=[8, 32], help="expert counts G (comma list)")
    parser.add_argument("--rows", type=_ints, default=[512, 4096], help="rows per expert (comma list)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--only", default="", help="comma list of candidate names (default: all)")
    parser.add_argument("--rep-ms", type=int, default=60, help="do_bench measuring time per figure (ms)")
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds per candidate (fastest kept)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no new case after this many s (300; dry run: none)",
    )
    parser.add_argument(
        "--jit-workers",
        type=int,
        default=8,
        help="processes compiling DeepGEMM's and our kernels first (0: none)",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    args = parser.parse_args()

    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"error: unknown shapes {unknown}; known: {sorted(SHAPES)}", file=sys.stderr)
        return 2
    candidates = CANDIDATES
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        missing = [s for s in names if s not in CANDIDATES]
        if missing:
            print(f"error: unknown candidates {missing}; known: {list(CANDIDATES)}", file=sys.stderr)
            return 2
        candidates = {name: CANDIDATES[name] for name in names}
    for cfg in candidates.values():
        cfg.check()

    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("error: --dry-run runs Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device, dg, dg_text = "cpu", None, "not used in a dry run"
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; this tuning needs an H100/H200 (or --dry-run)", file=sys.stderr)
            return 2
        device = "cuda"
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_grouped_gemm import _load_deepgemm

        dg, dg_text = _load_deepgemm()
    torch.manual_seed(0)
    started = time.time()
    card = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (Triton interpreter)"
    print(f"card: {card}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    print(f"anchor: DeepGEMM: {dg_text}", flush=True)
    print(f"{len(candidates)} candidates: {', '.join(candidates)}", flush=True)

    cases = [(s, g, r) for s in shapes for g in args.experts for r in args.rows]
    if args.dry_run:  # the interpreter runs at most 2 experts: one case per shape and row count
        cases = list({(s, min(g, 2), r): None for s, g, r in cases})
    cases.sort(key=lambda c: LAST_RATIO.get(c, 1.0))
    if dg is not None and args.jit_workers > 0:
        from bench_grouped_gemm import _warm_deepgemm

        _warm_deepgemm(cases, args.jit_workers)
    shape_nk = DRY_SHAPES if args.dry_run else SHAPES
    if args.budget_s is None:
        args.budget_s = math.inf if args.dry_run else 300.0
    if args.jit_workers > 0:
        # Triton specializes integer arguments on divisibility by 16, so each (shape, G) of the cases may
        # be its own compilation of every candidate: done first, in parallel.
        combos = sorted({(shape_nk[s], g) for s, g, _ in cases})
        _warm_all([(nk, g, name, device) for nk, g in combos for name in candidates], args.jit_workers)
    time_fn = _timer(device, args.rep_ms)
    results: list[CaseResult] = []
    all_same = True
    signal.signal(signal.SIGTERM, _stop)
    try:
        for shape, g, rows in cases:
            if time.time() - started > args.budget_s:
                print(
                    f"  budget of {args.budget_s:.0f} s spent: {shape} G={g} rows={rows} not run", flush=True
                )
                continue
            nk = shape_nk[shape]
            run_rows = DRY_ROWS.get(rows, rows) if args.dry_run else rows
            print(
                f"  {shape} G={g} rows={run_rows} (N={nk[0]} K={nk[1]}) at {time.time() - started:.0f} s",
                flush=True,
            )
            try:
                all_same &= run_case(
                    shape, g, run_rows, nk, candidates, dg, device, time_fn, args.rounds, results
                )
            except torch.cuda.OutOfMemoryError:
                print(f"  skip {shape} G={g} rows={rows}: out of GPU memory", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    except _Stopped:
        print("stopped by SIGTERM: reporting what was measured", flush=True)

    print()
    print(f"FP8 grouped GEMM tuning on {card}; torch {torch.__version__}, triton {triton.__version__}; "
          f"elapsed {time.time() - started:.0f} s")  # fmt: skip
    _report(results, candidates, dg is not None)
    if not all_same:
        print("FAILED: a candidate's output bits differ from the default's (see DIFF above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
