"""Benchmark the Triton block-FP8 weight quantization kernel against this card's device-to-device copy
bandwidth, on DeepSeek-V3 expert stacks (GPU only).

Correctness first, byte for byte: ``block_quant`` on the whole first stack against the torch reference
run on the GPU, and two experts against the CPU reference, float and UE8M0 scales; ``token_quant`` on
``[4096, 7168]`` against the CPU reference's 1×128 recipe. Nothing is timed unless all of it matches.

Then ``triton.testing.do_bench`` medians (warm-up, L2 flushed before every run; two input stacks used in
turn, each far larger than L2) of:

- ``block_quant`` end to end (kernel + the finite check on the scales, one device sync), float/UE8M0;
- the kernel launch alone, at num_warps 4, 8 (the default) and 16;
- ``copy_``: a device-to-device copy moving the same bytes (read + written) as the quantization;
- the torch reference on the GPU, for information.

Bandwidth counts bytes read (the bf16 stack) plus bytes written (e4m3 bytes and float32 scales).
Bar (docs/contract.md §11): ``block_quant`` ≥ 70% of the copy bandwidth measured in this run.

Usage: python scripts/bench_quant_kernel.py [--experts 64] [--shapes 2048x7168,7168x2048]
Exit status: 0 when every correctness check passed, 1 when one failed, 2 when no GPU is usable.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
from collections.abc import Callable
from functools import partial

import torch

BAR = 0.70


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def same_bytes(q: torch.Tensor, s: torch.Tensor, q_ref: torch.Tensor, s_ref: torch.Tensor) -> str | None:
    """None when q and s equal the reference bit for bit, else a one-line description."""
    q, s, q_ref, s_ref = (t.to("cuda") for t in (q, s, q_ref, s_ref))
    if q.shape != q_ref.shape or s.shape != s_ref.shape:
        return f"shapes {list(q.shape)}/{list(s.shape)} vs {list(q_ref.shape)}/{list(s_ref.shape)}"
    nq = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
    ns = int((s.view(torch.int32) != s_ref.view(torch.int32)).sum())
    return None if nq == ns == 0 else f"{nq} q bytes and {ns} scales differ"


def make_stack(e: int, n: int, k: int, seed: int) -> torch.Tensor:
    """bf16 [e, n, k]: normal, std 0.02, with one row in 64 scaled by 8 (outlier channels)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn((e, n, k), device="cuda", dtype=torch.bfloat16, generator=gen).mul_(0.02)
    w[:, ::64, :] *= 8
    return w


def check(shapes: list[tuple[int, int]], experts: int) -> list[str]:
    from moetool.kernels.fp8_quant import block_quant, token_quant
    from moetool.kernels.fp8_quant_ref import block_quant_ref

    failures = []
    for n, k in shapes:
        w = make_stack(experts, n, k, seed=1)
        for ue8m0 in (False, True):
            tag = f"[{experts}, {n}, {k}] {'ue8m0' if ue8m0 else 'float'}"
            q, s = block_quant(w, ue8m0=ue8m0)
            err = same_bytes(q, s, *block_quant_ref(w, ue8m0=ue8m0))
            for e in (0, experts - 1):
                err = err or same_bytes(q[e], s[e], *block_quant_ref(w[e].cpu(), ue8m0=ue8m0))
            log(f"check block_quant {tag}: {'ok' if err is None else 'MISMATCH ' + err}")
            if err:
                failures.append(f"block_quant {tag}: {err}")
            del q, s
        del w
    x = make_stack(1, 4096, 7168, seed=2)[0]
    for ue8m0 in (False, True):
        err = same_bytes(*token_quant(x, ue8m0=ue8m0), *block_quant_ref(x.cpu(), ue8m0=ue8m0, block=(1, 128)))
        log(f"check token_quant [4096, 7168] ue8m0={ue8m0}: {'ok' if err is None else 'MISMATCH ' + err}")
        if err:
            failures.append(f"token_quant ue8m0={ue8m0}: {err}")
    return failures


def median_ms(fn: Callable[[], object], rep: int = 200) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median"))


def rotate(fns: list[Callable[[], object]]) -> Callable[[], object]:
    state = [0]

    def call() -> object:
        state[0] = (state[0] + 1) % len(fns)
        return fns[state[0]]()

    return call


def bench_shape(e: int, n: int, k: int) -> list[dict]:
    from moetool.kernels.fp8_quant import _launch_block_quant, block_quant
    from moetool.kernels.fp8_quant_ref import block_quant_ref

    ws = [make_stack(e, n, k, seed=10 + i) for i in range(2)]
    qs = [torch.empty(w.shape, dtype=torch.float8_e4m3fn, device="cuda") for w in ws]
    ss = [torch.empty((e, -(-n // 128), -(-k // 128)), device="cuda") for _ in ws]
    moved = ws[0].numel() * 2 + qs[0].numel() + ss[0].numel() * 4  # bytes read + written
    rows = []

    def row(variant: str, fmt: str, ms: float) -> None:
        rows.append(
            {"shape": f"[{e}, {n}, {k}]", "variant": variant, "fmt": fmt, "ms": ms, "gbs": moved / ms / 1e6}
        )

    half = moved // 2  # a copy of `half` bytes reads and writes `moved` bytes
    bufs = [torch.randint(0, 255, (half,), dtype=torch.uint8, device="cuda") for _ in range(4)]
    row("copy_", "-", median_ms(rotate([partial(bufs[2 + i].copy_, bufs[i]) for i in range(2)])))
    bufs.clear()

    for ue8m0 in (False, True):
        fmt = "ue8m0" if ue8m0 else "float"
        calls = [partial(block_quant, ws[i], ue8m0=ue8m0, out_q=qs[i], out_s=ss[i]) for i in range(2)]
        row("block_quant", fmt, median_ms(rotate(calls)))
        for warps, exact in ((4, False), (8, False), (16, False), (8, True)):
            calls = [
                partial(
                    _launch_block_quant,
                    ws[i],
                    qs[i].view(torch.uint8),
                    ss[i],
                    ue8m0=ue8m0,
                    exact_cvt=exact,
                    num_warps=warps,
                )
                for i in range(2)
            ]
            variant = "kernel int-rounding" if exact else f"kernel warps={warps}"
            row(variant, fmt, median_ms(rotate(calls)))
    row("torch reference", "float", median_ms(partial(block_quant_ref, ws[0]), rep=300))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--shapes", default="2048x7168,7168x2048", help="NxK per expert, comma-separated")
    ap.add_argument("--timeout", type=int, default=110, help="dump stacks and exit after this many seconds")
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)

    if not torch.cuda.is_available():
        log("error: no CUDA device; this benchmark runs on an H100/H200")
        return 2
    try:
        import triton  # noqa: F401
    except ImportError as err:
        log(f"error: triton unavailable ({err})")
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    card = torch.cuda.get_device_name()
    log(f"card: {card}; torch {torch.__version__}; experts {args.experts}; shapes {shapes}")

    failures = check(shapes, args.experts)
    if failures:
        print("CORRECTNESS FAILED, nothing timed:")
        for f in failures:
            print(f"  {f}")
        return 1

    rows = []
    for n, k in shapes:
        rows += bench_shape(args.experts, n, k)
        torch.cuda.empty_cache()

    print(f"\nblock-FP8 weight quantization, {card} (bytes = bf16 read + e4m3/f32 written)")
    print(f"{'shape':>18} {'variant':>20} {'fmt':>6} {'ms':>8} {'GB/s':>8} {'x copy':>7}")
    verdicts = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        copy_gbs = next(r["gbs"] for r in group if r["variant"] == "copy_")
        for r in group:
            ratio = r["gbs"] / copy_gbs
            print(f"{shape:>18} {r['variant']:>20} {r['fmt']:>6} {r['ms']:8.3f} {r['gbs']:8.0f} {ratio:7.2f}")
            if r["variant"] == "block_quant":
                verdicts.append((shape, r["fmt"], ratio))
    print(f"\nbar: block_quant >= {BAR:.2f} x copy bandwidth on the same card")
    for shape, fmt, ratio in verdicts:
        print(f"  {shape} {fmt:>5}: {ratio:.2f}  {'PASS' if ratio >= BAR else 'BELOW BAR'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
