"""Benchmark the Triton FP8 block grouped GEMM (contiguous layout) against torch._scaled_mm looped over
experts, on DeepSeek-V3 expert shapes. GPU only.

For every (shape, experts G, rows per expert) it first checks correctness on a sample of experts:
calc_diff against the float32 product of the unquantized inputs (< 1e-3, DeepGEMM's bar) and against
torch._scaled_mm on the same FP8 bytes and scales (< 1e-4: same inputs, only summation order and the bf16
rounding differ). Then it times both and prints TFLOP/s, weight GB/s and the ratio to the bar of docs
BENCHMARKS.md:

- ≥ 512 rows per expert: our TFLOP/s ≥ 0.8 × the _scaled_mm loop's, both timed with
  triton.testing.do_bench (median; L2 flushed before every run);
- ≤ 64 rows per expert: weight bytes read per second ≥ 70% of this card's device-to-device copy
  bandwidth (read + write bytes), measured in the same run with the same timer. That timer is CUDA events
  around each call after a read-only L2 flush (a 1 GiB reduction), median of many. do_bench's flush
  writes zeros, which leaves the L2 full of dirty lines that the timed kernel then writes back: on an H100
  that adds about 8 µs, 15% of a 55 µs weight-streaming call but 1% of the 1 GiB copy it is compared
  with. The do_bench figure is printed beside it.

If this torch build refuses 1×128 / 128×128 block scales in _scaled_mm, the anchor falls back to a
per-tensor-scaled loop on the same FP8 bytes (timing only, labelled as such).

Usage: python scripts/bench_grouped_gemm.py [--experts 8,64,256] [--rows 64,512,4096]
       [--shapes dsv3-w13,dsv3-w2] [--max-rows 262144] [--sweep]
Exit status: 0 when every correctness check passed, 1 when one failed, 2 when no GPU is usable.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
from host_timing import host_seconds

from moetool.kernels.fp8_grouped_gemm import (
    GemmConfig,
    contiguous_config,
    m_grouped_fp8_gemm_nt_contiguous,
    mn_major_scales,
)
from moetool.kernels.fp8_grouped_gemm_ref import calc_diff, contiguous_layout
from moetool.kernels.fp8_quant_ref import block_quant_ref
from moetool.tolerances import GEMM_CALC_DIFF

SHAPES = {
    "dsv3-w13": (4096, 7168),  # DeepSeek-V3 expert gate_up: N = 2·2048, K = hidden 7168
    "dsv3-w2": (7168, 2048),  # DeepSeek-V3 expert down: N = hidden 7168, K = 2048
}
CALC_DIFF_BAR = GEMM_CALC_DIFF  # DeepGEMM's bar against the FP32 product of unquantized inputs
SAME_INPUTS_BAR = 1e-4  # same FP8 bytes and scales: about one bf16 ulp apart at most
TFLOPS_BAR = 0.8  # ≥ 512 rows per expert: fraction of the _scaled_mm loop's TFLOP/s
BANDWIDTH_BAR = 0.70  # ≤ 64 rows per expert: fraction of copy bandwidth in weight bytes read
STREAMING_ROWS = 64
COMPUTE_ROWS = 512

SWEEP_COMPUTE = [
    (64, 128, 32, 4, 4, True),
    (64, 128, 8, 4, 4, True),
    (64, 128, 32, 4, 3, True),
    (128, 128, 8, 8, 4, True),
    (128, 128, 8, 8, 4),
    (128, 128, 8, 8, 3),
    (128, 128, 8, 8, 5),
    (128, 128, 8, 4, 4),
    (128, 128, 4, 8, 4),
    (64, 128, 8, 4, 4),
    (128, 128, 16, 8, 4),
]
SWEEP_STREAMING = [
    (64, 128, 1, 4, 4, True),
    (64, 64, 1, 4, 5, True),
    (64, 128, 1, 4, 6, True),
    (64, 128, 1, 4, 4),
    (64, 128, 1, 4, 3),
    (64, 64, 1, 4, 5),
    (32, 128, 1, 4, 4),
    (16, 128, 1, 4, 5),
    (64, 128, 1, 8, 4),
]


@dataclass
class Row:
    shape: str
    g: int
    rows: int
    ours_ms: float
    anchor_ms: float
    tflops: float
    anchor_tflops: float
    weight_gbs: float
    bar: str
    ratio: float
    ok: bool
    config: str


def _bench(fn: Callable[[], object], rep_ms: int) -> float:
    return float(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))


_FLUSH: list[torch.Tensor] = []


def _bench_clean(fn: Callable[[], object], reps: int = 60) -> float:
    """Median ms of ``fn`` between CUDA events, each run after a read-only L2 flush: a reduction over
    1 GiB, so the cache holds clean lines and the timed call writes back nothing it did not write. The
    flush also keeps the GPU busy (0.2-0.4 ms) while the host prepares the next call, so a launch that
    costs more host time than the kernel takes on the GPU is still timed as GPU time."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.float32, device="cuda").uniform_())
    for _ in range(5):
        fn()
    events = []
    for _ in range(reps):
        _FLUSH[0].sum()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def _copy_bandwidth(rep_ms: int) -> tuple[float, float]:
    """Device-to-device copy of 1 GiB, in GB/s counting bytes read plus bytes written: (do_bench,
    events after a read-only flush)."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), rep_ms)
    ms_clean = _bench_clean(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9, 2 * n / (ms_clean * 1e-3) / 1e9


def _probe_blockwise_scaled_mm() -> str | None:
    """None when torch._scaled_mm takes 1×128 / 128×128 block scales here, else the reason."""
    m, n, k = 128, 256, 256
    try:
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        sa = torch.rand(m, k // 128, device="cuda").t().contiguous().t()
        sb = torch.rand(n // 128, k // 128, device="cuda")
        torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return None


def _make_weights(g: int, n: int, k: int, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Random weights quantized by the §3 recipe, 8 experts at a time; the unquantized bf16 weights of the
    experts in ``keep`` are returned for the correctness check."""
    b_q = torch.empty(g, n, k, dtype=torch.float8_e4m3fn, device="cuda")
    b_s = torch.empty(g, -(-n // 128), -(-k // 128), dtype=torch.float32, device="cuda")
    kept = {}
    for e0 in range(0, g, 8):
        e1 = min(g, e0 + 8)
        w = torch.randn(e1 - e0, n, k, device="cuda", dtype=torch.bfloat16)
        b_q[e0:e1], b_s[e0:e1] = block_quant_ref(w)
        for e in keep:
            if e0 <= e < e1:
                kept[e] = w[e - e0].clone()
        del w
    return b_q, b_s, kept


def _run_case(
    shape: str,
    g: int,
    rows: int,
    args: argparse.Namespace,
    anchor_fallback: str | None,
    copy: tuple[float, float],
) -> Row | None:
    n, k = SHAPES[shape]
    sample = sorted({0, g // 2, g - 1})
    b_q, b_s, w_kept = _make_weights(g, n, k, sample)

    ids = torch.arange(g, device="cuda").repeat_interleave(rows)
    ids = ids[torch.randperm(ids.numel(), device="cuda")]
    x = torch.randn(ids.numel(), k, device="cuda", dtype=torch.bfloat16)
    x_q, x_s = block_quant_ref(x, block=(1, 128))
    a_q, m_indices, row_of_token = contiguous_layout(x_q, ids, g)
    a_s, _, _ = contiguous_layout(x_s, ids, g)
    # Activation scales MN-major, as DeepGEMM takes them (and as the anchor gets them below):
    # token_quant(..., mn_major=True) writes them so in validate.
    a_s = mn_major_scales(a_s)
    del x_q, x_s
    seg = -(-rows // 128) * 128  # every expert has `rows` tokens, padded to a 128-row segment

    out = torch.empty(a_q.shape[0], n, dtype=torch.bfloat16, device="cuda")

    def ours(config: GemmConfig | None = None) -> torch.Tensor:
        return m_grouped_fp8_gemm_nt_contiguous(
            a_q, a_s, b_q, b_s, m_indices, out=out, expected_m=rows, config=config
        )

    # The anchor gets its operands in the layouts cuBLAS wants, prepared outside the timed loop.
    anchor_args = []
    ones = torch.ones((), device="cuda")
    for e in range(g):
        r0 = e * seg
        a_e = a_q[r0 : r0 + rows]
        if anchor_fallback is None:
            sa = a_s[r0 : r0 + rows].t().contiguous().t()  # [rows, K/128], M-contiguous
            sb = b_s[e].t()  # [K/128, N/128] view of the row-major [N/128, K/128]
        else:
            sa, sb = ones, ones
        anchor_args.append((a_e, b_q[e].t(), sa, sb))

    def anchor() -> list[torch.Tensor]:
        return [
            torch._scaled_mm(a_e, b_e, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            for a_e, b_e, sa, sb in anchor_args
        ]

    # Correctness first, on the sampled experts.
    d = ours().clone()
    torch.cuda.synchronize()
    pad_rows = m_indices < 0
    problems = []
    if bool(torch.isnan(d).any()):
        problems.append("NaN in output")
    if bool(pad_rows.any()) and not bool((d[pad_rows] == 0).all()):
        problems.append("padding rows not zero")
    try:
        anchor_out = anchor()
        torch.cuda.synchronize()
    except RuntimeError as exc:  # cuBLAS may refuse a shape the probe accepted
        print(f"  anchor failed for {shape} G={g} rows={rows}: {str(exc).splitlines()[0][:160]}", flush=True)
        anchor_out = None
    for e in sample:
        rows_e = row_of_token[ids == e]
        tokens_e = x[ids == e].float()
        exact = tokens_e @ w_kept[e].float().t()
        diff_exact = calc_diff(d[rows_e], exact)
        if not diff_exact < CALC_DIFF_BAR:
            problems.append(f"expert {e}: calc_diff vs fp32 product {diff_exact:.2e} ≥ {CALC_DIFF_BAR}")
        if anchor_fallback is None and anchor_out is not None:
            # The anchor's rows are the segment's first `rows` rows, in layout order.
            diff_anchor = calc_diff(d[e * seg : e * seg + rows], anchor_out[e])
            if not diff_anchor < SAME_INPUTS_BAR:
                problems.append(f"expert {e}: calc_diff vs _scaled_mm {diff_anchor:.2e} ≥ {SAME_INPUTS_BAR}")
    anchor_ok = anchor_out is not None
    del anchor_out
    cfg = contiguous_config(a_q, b_q, expected_m=rows)
    cfg_text = f"{cfg.block_m}x{cfg.block_n} g{cfg.group_m} w{cfg.num_warps} s{cfg.num_stages}" + (
        " tma" if cfg.tma else ""
    )
    if problems:
        print(f"  FAIL {shape} G={g} rows={rows}: " + "; ".join(problems), flush=True)
        return Row(shape, g, rows, float("nan"), float("nan"), 0, 0, 0, "correctness", 0, False, cfg_text)

    copy_gbs, copy_clean_gbs = copy
    weight_bytes = b_q.numel() + 4 * b_s.numel()
    streaming = rows <= STREAMING_ROWS

    def timer(fn: Callable[[], object]) -> float:
        return _bench_clean(fn) if streaming else _bench(fn, args.rep_ms)

    ours_ms = _bench(ours, args.rep_ms)
    note = ""
    if streaming:
        dobench_ratio = weight_bytes / (ours_ms * 1e-3) / 1e9 / copy_gbs
        ours_ms = timer(ours)
        note = f" (do_bench: {dobench_ratio:.2f} of its copy BW; host {host_seconds(ours, 200) * 1e6:.0f} µs per call)"
    anchor_ms = timer(anchor) if anchor_ok else float("nan")
    flops = 2.0 * g * rows * n * k
    tflops = flops / (ours_ms * 1e-3) / 1e12
    anchor_tflops = flops / (anchor_ms * 1e-3) / 1e12
    weight_gbs = weight_bytes / (ours_ms * 1e-3) / 1e9
    if streaming:
        bar, ratio = f"≥{BANDWIDTH_BAR:.2f} copy BW", weight_gbs / copy_clean_gbs
        ok = ratio >= BANDWIDTH_BAR
    elif rows >= COMPUTE_ROWS and anchor_fallback is None and anchor_ok:
        bar, ratio = f"≥{TFLOPS_BAR:.2f} anchor", tflops / anchor_tflops
        ok = ratio >= TFLOPS_BAR
    else:
        bar, ratio, ok = "(none)", tflops / anchor_tflops, True

    if args.sweep:
        candidates = SWEEP_STREAMING if streaming else SWEEP_COMPUTE
        best = None
        for cand in candidates:
            c = GemmConfig(*cand)
            try:
                dc = ours(c)
                same = calc_diff(dc, d)
                if not same < SAME_INPUTS_BAR:
                    print(f"    sweep {cand}: WRONG (calc_diff {same:.2e} vs default config)", flush=True)
                    continue
                ms = timer(lambda c=c: ours(c))
            except Exception as exc:
                print(f"    sweep {cand}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
                continue
            print(f"    sweep {cand}: {ms:.3f} ms, {flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s", flush=True)
            if best is None or ms < best[0]:
                best = (ms, cand)
        if best is not None:
            print(f"    sweep best {best[1]}: {best[0]:.3f} ms (table config {ours_ms:.3f} ms)", flush=True)

    row = Row(shape, g, rows, ours_ms, anchor_ms, tflops, anchor_tflops, weight_gbs, bar, ratio, ok, cfg_text)
    print(
        f"  {shape} G={g} rows={rows}: ours {ours_ms:.3f} ms {tflops:.0f} TFLOP/s {weight_gbs:.0f} GB/s "
        f"[{cfg_text}] | anchor {anchor_ms:.3f} ms {anchor_tflops:.0f} TFLOP/s | ratio {ratio:.2f} {bar}{note}",
        flush=True,
    )
    return row


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=_ints, default=[8, 64, 256], help="expert counts G (comma list)")
    parser.add_argument("--rows", type=_ints, default=[64, 512, 4096], help="rows per expert (comma list)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument(
        "--max-rows", type=int, default=262144, help="skip cases with more total rows (memory and time)"
    )
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per figure (ms)")
    parser.add_argument("--sweep", action="store_true", help="also time a few other launch configurations")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("error: no CUDA device; this benchmark needs an H100/H200", file=sys.stderr)
        return 2
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"error: unknown shapes {unknown}; known: {sorted(SHAPES)}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference product must be IEEE
    torch.manual_seed(0)
    started = time.time()
    card = torch.cuda.get_device_name(0)
    print(f"card: {card}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    copy_gbs = _copy_bandwidth(args.rep_ms)
    print(
        f"device-to-device copy: {copy_gbs[1]:.0f} GB/s (read + write; events after a read-only flush), "
        f"{copy_gbs[0]:.0f} GB/s (do_bench)",
        flush=True,
    )
    fallback = _probe_blockwise_scaled_mm()
    if fallback is None:
        anchor_name = "torch._scaled_mm 1x128/128x128 blockwise, looped over experts"
    else:
        anchor_name = "torch._scaled_mm PER-TENSOR scales, looped over experts (timing only)"
        print(
            f"torch._scaled_mm refuses block scales on this build ({fallback}); anchor falls back to "
            "per-tensor scales on the same FP8 bytes",
            flush=True,
        )
    print(f"anchor: {anchor_name}", flush=True)

    results: list[Row] = []
    failed = False
    for shape in shapes:
        for g in args.experts:
            for rows in args.rows:
                if g * rows > args.max_rows:
                    print(f"  skip {shape} G={g} rows={rows}: {g * rows} rows > --max-rows {args.max_rows}")
                    continue
                try:
                    row = _run_case(shape, g, rows, args, fallback, copy_gbs)
                except torch.cuda.OutOfMemoryError:
                    print(f"  skip {shape} G={g} rows={rows}: out of GPU memory", flush=True)
                    row = None
                except Exception as exc:
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    print(f"  ERROR {shape} G={g} rows={rows}: {type(exc).__name__}: {first}", flush=True)
                    failed = True
                    row = None
                torch.cuda.empty_cache()
                if row is None:
                    continue
                results.append(row)
                failed |= row.bar == "correctness"

    print()
    print(f"FP8 block grouped GEMM (contiguous layout) on {card}; anchor: {anchor_name}")
    print(
        f"copy bandwidth {copy_gbs[1]:.0f} GB/s (events after a read-only flush; do_bench {copy_gbs[0]:.0f}); "
        f"elapsed {time.time() - started:.0f} s"
    )
    header = (
        f"{'shape':<9} {'G':>4} {'rows':>5} {'ours ms':>8} {'TFLOP/s':>8} {'anchor':>8} {'x anchor':>8} "
        f"{'wt GB/s':>8} {'ratio':>6} {'bar':<18} {'met':<4} config"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        met = "FAIL" if r.bar == "correctness" else ("yes" if r.ok else "NO")
        print(
            f"{r.shape:<9} {r.g:>4} {r.rows:>5} {r.ours_ms:>8.3f} {r.tflops:>8.0f} {r.anchor_tflops:>8.0f} "
            f"{r.tflops / r.anchor_tflops if r.anchor_tflops else float('nan'):>8.2f} "
            f"{r.weight_gbs:>8.0f} {r.ratio:>6.2f} {r.bar:<18} {met:<4} {r.config}"
        )
    if failed:
        print("FAILED: a correctness check or a run failed; those cases have no figures")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
