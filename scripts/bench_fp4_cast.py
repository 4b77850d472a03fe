"""Benchmark the Triton FP4 → FP8 cast (DeepSeek-V4 routed experts) against this card's device-to-device
copy bandwidth, on V4-Flash's expert stacks (GPU only).

Shapes come from transformers' ``DeepseekV4Config()`` defaults (V4-Flash: hidden 4096, moe_intermediate
2048, 256 routed experts): gate/up ``[E, 2048, 4096]`` and down ``[E, 4096, 2048]``, stored as FP4 bytes
``[E, N, K/2]`` with E8M0 scales ``[E, N, K/32]``.

Correctness first, byte for byte (FP8 bytes, E8M0 scales, changed-element counts): for every launch
configuration timed below, 4 experts of adversarial blocks (``adversarial_fp4``: every binade span, E < 6,
zero rows, code 8) against the CPU reference; then the launcher on 64 experts of realistic scales (12
binades per block, one block in 64 spanning 18, so lossy) against the torch reference run on the GPU,
two of them against the CPU reference too. Nothing is timed unless all of it matches.

Then ``triton.testing.do_bench`` medians (warm-up, two input stacks used in turn, each far larger than
L2) of:

- ``fp4_cast`` end to end (allocation, kernel and the NaN-scale check, one device sync);
- the kernel launch alone into preallocated outputs, for every launch in ``SWEEP`` (``*`` marks the
  launcher's default): the column-block loop, the same with the next block's loads issued first, the
  persistent grid prefetching one block ahead, and the persistent grid left to Triton's pipeliner, over
  warps, blocks per program (or programs per SM) and stages, most of them ``lean`` (32-bit offsets, the
  column-block count a compile-time constant; 3 and 2 with PTX loads of the table words, and of the scale
  bytes, ``Config``); and the default with the byte permute in integer operations instead of ``prmt``;
- ``copy_``: a device-to-device copy moving the same bytes (read + written) as the cast;
- the torch reference on the GPU, for information.

A launch that fails to compile, or gives other bytes than the reference, is reported and left out of the
timings (exit status 1); when the default does, nothing is timed. The summary names the launch fastest on
every shape (the largest of its smallest ratio to copy) and times ``fp4_cast`` end to end with it: that is
the one to make ``DEFAULT_CONFIG`` in ``kernels/fp4_cast.py``.

Bytes moved = FP4 bytes + E8M0 scales read, FP8 bytes + FP8 scales + int32 counts written.
Bar (docs/benchmarks.md): ``fp4_cast`` ≥ 70% of the copy bandwidth measured in this run.

Usage: python scripts/bench_fp4_cast.py [--experts 256] [--only SUBSTRING ...]
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


def v4_flash_shapes() -> list[tuple[str, int, int]]:
    from transformers import DeepseekV4Config

    cfg = DeepseekV4Config()
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    return [("w1/w3", i, h), ("w2", h, i)]


def make_fp4(e: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP4 bytes (every code) and E8M0 scales spanning 12 binades per 128x128 block, 18 in one
    block of 64 (its rows 0..127 of column block 0 get one scale 18 binades below)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    packed = torch.randint(-128, 128, (e, n, k // 2), dtype=torch.int8, device="cuda", generator=gen)
    scale = torch.randint(110, 123, (e, n, k // 32), dtype=torch.uint8, device="cuda", generator=gen)
    scale[::64, 0, 0] = 122 - 18
    return packed, scale.view(torch.float8_e8m0fnu)


def differ(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> str | None:
    """None when (q, s, changed) equal the reference bit for bit, else a one-line description."""
    out = []
    for what, a, b in zip(("q", "s", "changed"), got, want):
        a, b = a.cuda(), b.cuda()
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        n = int((a.view(torch.uint8) != b.view(torch.uint8)).sum())
        if n:
            out.append(f"{n} {what} bytes differ")
    return "; ".join(out) or None


def sweep() -> list:
    """Every launch timed (``Config``): the default first."""
    from moetool.kernels.fp4_cast import DEFAULT_CONFIG, Config

    grid = [Config("loop", 4, 2), Config("prefetch", 4, 4), Config("persistent", 8, 2)]
    grid += [Config("pipelined", 4, 1, stages=2)]
    # lean 1: 32-bit offsets, K compiled in, one reduction each, one operation fewer per word
    grid += [Config("loop", w, b, lean=1) for w, b in ((4, 2), (4, 4), (4, 8), (8, 4))]
    grid += [Config("prefetch", w, b, lean=1) for w, b in ((4, 4), (8, 4))]
    grid += [Config("persistent", 8, 2, lean=1), Config("pipelined", 8, 2, stages=2, lean=1)]
    # lean 3: and the table words by PTX loads (Triton 3.6 then keeps one layout: no shared-memory round
    # trip of the codes and words); lean 2: the scale bytes too
    grid += [Config("loop", w, b, lean=3) for w, b in ((4, 1), (4, 2), (4, 4), (4, 8), (8, 2), (8, 4))]
    grid += [Config("loop", 4, 4, scale4=True, lean=3)]
    grid += [Config("prefetch", w, b, lean=3) for w, b in ((4, 2), (4, 4), (8, 4), (8, 8))]
    grid += [Config("persistent", w, b, lean=3) for w, b in ((4, 3), (8, 2), (8, 3))]
    grid += [Config("pipelined", w, b, stages=st, lean=3) for w, b, st in ((4, 1, 2), (8, 2, 2), (8, 1, 3))]
    grid += [Config("loop", w, 4, lean=2) for w in (4, 8)]
    grid += [Config("prefetch", 8, 4, lean=2), Config("persistent", 8, 2, lean=2)]
    return [DEFAULT_CONFIG] + [c for c in grid if c != DEFAULT_CONFIG]


def check(experts: int, configs: list) -> tuple[list[str], list]:
    """Byte checks of every launch in ``configs`` (with ``prmt``) and of the default with the permute in
    integer operations on adversarial blocks, then of the launcher on realistic scales. Returns the
    failures and the launches that gave the reference's bytes on every shape."""
    from moetool.kernels.fp4_cast import DEFAULT_CONFIG, fp4_cast
    from moetool.kernels.fp4_cast_ref import fp4_cast_ref
    from moetool.testing.release_formats import adversarial_fp4

    failures = []
    good = list(configs)
    for tag, n, k in v4_flash_shapes():
        packed, scale = adversarial_fp4((4, n, k), seed=3)
        want = fp4_cast_ref(packed, scale)
        pc, sc = packed.cuda(), scale.cuda()
        for asm, config in [(True, c) for c in configs] + [(False, DEFAULT_CONFIG)]:
            what = f"adversarial {tag} [4, {n}, {k}] asm={asm} {config}"
            try:
                err = differ(fp4_cast(pc, sc, _asm=asm, _config=config), want)
            except Exception as exc:  # a launch Triton cannot compile here: reported, not timed
                err = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
            log(f"check {what}: {'ok' if err is None else 'MISMATCH ' + err}")
            if err:
                failures.append(f"{what}: {err}")
                if asm and config in good:
                    good.remove(config)
        del packed, scale, pc, sc, want

        packed, scale = make_fp4(experts, n, k, seed=1)
        got = fp4_cast(packed, scale)
        err = differ(got, fp4_cast_ref(packed, scale))
        for e in (0, experts - 1):
            one = tuple(t[e] for t in got)
            err = err or differ(one, fp4_cast_ref(packed[e].cpu(), scale[e].cpu()))
        lossy = int(got[2].sum())
        log(
            f"check fp4_cast {tag} [{experts}, {n}, {k}]: {'ok' if err is None else 'MISMATCH ' + err}; {lossy} changed"
        )
        if err:
            failures.append(f"fp4_cast {tag}: {err}")
        if lossy == 0:
            failures.append(f"fp4_cast {tag}: the planted 18-binade blocks lost nothing")
        del packed, scale, got
    return failures, good


def median_ms(fn: Callable[[], object], rep: int = 200) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median"))


def rotate(fns: list[Callable[[], object]]) -> Callable[[], object]:
    state = [0]

    def call() -> object:
        state[0] = (state[0] + 1) % len(fns)
        return fns[state[0]]()

    return call


def stacks(e: int, n: int, k: int) -> tuple[list, list, int]:
    """Two input stacks, an output set for each, and the bytes one cast moves (read + written)."""
    ins = [make_fp4(e, n, k, seed=10 + i) for i in range(2)]
    nb, kb = n // 128, k // 128
    outs = [
        (
            torch.empty((e, n, k), dtype=torch.uint8, device="cuda"),
            torch.empty((e, nb, kb), dtype=torch.uint8, device="cuda"),
            torch.empty((e, nb, kb), dtype=torch.int32, device="cuda"),
        )
        for _ in ins
    ]
    return ins, outs, e * n * k // 2 + e * n * k // 32 + e * n * k + e * nb * kb * 5


def copy_moving(moved: int) -> Callable[[], object]:
    """Device-to-device copies that read and write ``moved`` bytes in all, two buffer pairs in turn."""
    half = moved // 2  # a copy of `half` bytes reads and writes `moved` bytes
    bufs = [torch.randint(0, 255, (half,), dtype=torch.uint8, device="cuda") for _ in range(4)]
    return rotate([partial(bufs[2 + i].copy_, bufs[i]) for i in range(2)])


def bench_shape(tag: str, e: int, n: int, k: int, configs: list) -> list[dict]:
    from moetool.kernels.fp4_cast import DEFAULT_CONFIG, _launch_fp4_cast, fp4_cast
    from moetool.kernels.fp4_cast_ref import fp4_cast_ref

    ins, outs, moved = stacks(e, n, k)
    shape = f"{tag} [{e}, {n}, {k}]"
    rows = []

    def row(variant: str, ms: float, config=None) -> None:
        rows.append({"shape": shape, "variant": variant, "ms": ms, "gbs": moved / ms / 1e6, "config": config})
        log(f"time {shape} {variant}: {ms:.3f} ms")  # as measured: kept if the run is cut short

    row("copy_", median_ms(copy_moving(moved)))

    row("fp4_cast", median_ms(rotate([partial(fp4_cast, p, s) for p, s in ins])))
    for asm, config in [(True, c) for c in configs] + [(False, DEFAULT_CONFIG)]:
        calls = [
            partial(_launch_fp4_cast, p.view(torch.uint8), s.view(torch.uint8), *o, asm=asm, config=config)
            for (p, s), o in zip(ins, outs)
        ]
        default = "*" if config == DEFAULT_CONFIG else ""
        name = f"{config}{default}" if asm else f"int-permute {config}{default}"
        row(name, median_ms(rotate(calls)), config if asm else None)
    row("torch reference", median_ms(partial(fp4_cast_ref, *ins[0]), rep=100))
    return rows


def bench_end_to_end(tag: str, e: int, n: int, k: int, config) -> float:
    """``fp4_cast`` end to end with ``config``: ms."""
    from moetool.kernels.fp4_cast import fp4_cast

    ins, _, _ = stacks(e, n, k)
    return median_ms(rotate([partial(fp4_cast, p, s, _config=config) for p, s in ins]))


def compare_end_to_end(experts: int, configs: list, rounds: int, card: str) -> None:
    """``fp4_cast`` end to end (allocation, launch, the NaN-scale check and its device sync) and the
    launch alone into preallocated outputs, for each of ``configs`` in turn, ``rounds`` times, with a
    copy of the same bytes in every round: medians, as a fraction of the copy's bandwidth."""
    import statistics

    from moetool.kernels.fp4_cast import _launch_fp4_cast, fp4_cast

    print(f"\nFP4 -> FP8 cast end to end and launch alone, {card}, median of {rounds} rounds taken in turn")
    print(f"{'shape':>26} {'launch':>30} {'end to end':>11} {'alone':>7} {'x copy':>14}")
    for tag, n, k in v4_flash_shapes():
        ins, outs, moved = stacks(experts, n, k)
        copy = copy_moving(moved)
        times: dict = {"copy_": []}
        for _ in range(rounds):
            times["copy_"].append(median_ms(copy, rep=100))
            for c in configs:
                e2e = rotate([partial(fp4_cast, p, s, _config=c) for p, s in ins])
                alone = rotate(
                    [
                        partial(
                            _launch_fp4_cast, p.view(torch.uint8), s.view(torch.uint8), *o, asm=True, config=c
                        )
                        for (p, s), o in zip(ins, outs)
                    ]
                )
                times.setdefault((c, "e2e"), []).append(median_ms(e2e, rep=100))
                times.setdefault((c, "alone"), []).append(median_ms(alone, rep=100))
        cp = statistics.median(times["copy_"])
        shape = f"{tag} [{experts}, {n}, {k}]"
        print(f"{shape:>26} {'copy_':>30} {cp:11.3f} {'':>7} {1.0:14.2f}")
        for c in configs:
            e2e, alone = (statistics.median(times[(c, w)]) for w in ("e2e", "alone"))
            print(f"{shape:>26} {c!s:>30} {e2e:11.3f} {alone:7.3f} {cp / e2e:7.2f} /{cp / alone:5.2f}")
        del ins, outs, copy
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument(
        "--only", nargs="*", default=[], help="time only the launches whose name holds one of these"
    )
    ap.add_argument("--timeout", type=int, default=570, help="dump stacks and exit after this many seconds")
    ap.add_argument(
        "--end-to-end",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead of the sweep: fp4_cast end to end and its launch alone with the default and each "
        "--only launch, in turn, ROUNDS times, against copy_ (medians)",
    )
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)

    if not torch.cuda.is_available():
        log("error: no CUDA device; this benchmark runs on an H100/H200")
        return 2
    try:
        import triton  # noqa: F401
        from transformers import DeepseekV4Config  # noqa: F401
    except ImportError as err:
        log(f"error: {err} (needs triton and transformers >= 5.24 for V4-Flash's shapes)")
        return 2
    card = torch.cuda.get_device_name()
    log(f"card: {card}; torch {torch.__version__}; experts {args.experts}; shapes {v4_flash_shapes()}")

    configs = sweep()
    if args.only:
        configs = [c for c in configs if any(o in str(c) for o in args.only) or c == configs[0]]
    failures, good = check(min(args.experts, 64), configs)
    if failures:
        print("CORRECTNESS FAILED:")
        for f in failures:
            print(f"  {f}")
    if (
        not good
        or good[0] != configs[0]
        or any(f.startswith("fp4_cast") or "asm=False" in f for f in failures)
    ):
        print("the default launch or the launcher failed: nothing timed")
        return 1

    if args.end_to_end:
        compare_end_to_end(args.experts, good, args.end_to_end, card)
        return 1 if failures else 0

    rows = []
    for tag, n, k in v4_flash_shapes():
        rows += bench_shape(tag, args.experts, n, k, good)
        torch.cuda.empty_cache()

    print(f"\nFP4 -> FP8 cast, {card} (bytes = FP4 + E8M0 read, FP8 + scales + counts written)")
    print(f"{'shape':>26} {'variant':>34} {'ms':>8} {'GB/s':>8} {'x copy':>7}")
    ratios: dict = {}
    copy_gbs = {}
    verdicts = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        copy_gbs[shape] = next(r["gbs"] for r in group if r["variant"] == "copy_")
        for r in group:
            ratio = r["gbs"] / copy_gbs[shape]
            print(f"{shape:>26} {r['variant']:>34} {r['ms']:8.3f} {r['gbs']:8.0f} {ratio:7.2f}")
            if r["variant"] == "fp4_cast":
                verdicts.append((shape, "default", ratio))
            if r["config"] is not None:
                ratios.setdefault(r["config"], []).append(ratio)

    best = max(ratios, key=lambda c: min(ratios[c]))
    print(f"\nfastest on every shape: {best!r}: " + " / ".join(f"{x:.2f}" for x in ratios[best]) + " x copy")
    shapes = v4_flash_shapes()
    for (tag, n, k), shape in zip(shapes, copy_gbs):
        ms = bench_end_to_end(tag, args.experts, n, k, best)
        moved = args.experts * (n * k // 2 + n * k // 32 + n * k + (n // 128) * (k // 128) * 5)
        ratio = moved / ms / 1e6 / copy_gbs[shape]
        print(
            f"{shape:>26} {'fp4_cast with ' + str(best):>34} {ms:8.3f} {moved / ms / 1e6:8.0f} {ratio:7.2f}"
        )
        verdicts.append((shape, str(best), ratio))

    print(f"\nbar: fp4_cast >= {BAR:.2f} x copy bandwidth on the same card")
    for shape, what, ratio in verdicts:
        print(f"  {shape} ({what}): {ratio:.2f}  {'PASS' if ratio >= BAR else 'BELOW BAR'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
