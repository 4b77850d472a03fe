"""Benchmark: Triton GDN decode on a K-last pool against fla-core's fused recurrent kernel (GPU).

Qwen3-Next dimensions (H=16, HV=32, K=V=128), one token per call, bf16 activations, float32 and bfloat16
states, B in {1, 8, 64, 128, 256, 512}. Correctness first (our kernel against fla's K-first kernel on the
same inputs, states transposed; and against the torch reference), then for each B and state dtype:

- ours: ``gdn_decode_klast`` on a pool ``[B+1, HV, V, K]`` in place, slots in shuffled order
  as in an engine's pool (``--sorted-slots``: row b+1 for sequence b, the memory order of fla's h0),
  launched as by default (programmatic dependent launch on Hopper from B·HV = 2048, "/pdl") and, as
  ``plain``, without it;
- fla K-first (default layout) and fla ``state_v_first=True`` (K-last), gates fused in both
  (``use_gate_in_kernel``, ``use_beta_sigmoid_in_kernel``, ``use_qk_l2norm_in_kernel``), returning the
  final state as their API does;

each timed as a decode step pays it: ``loop`` = CUDA events around N back-to-back calls (host launch cost
included whenever it exceeds the GPU time), the median of 5 such windows taken in turn with the anchors',
``bench`` = ``triton.testing.do_bench`` median (GPU time, L2 flushed). States smaller than 4x L2 are
rotated over several copies. Memory traffic counts the state read and written, ``B·HV·V·K·elt·2`` (fla writes its
final state in float32 even from a bf16 state, so its bf16 runs move 1.5x these bytes). Copy bandwidth
(read + write) is measured in the same run.

Bars (docs/contract.md §11): ours ≥ 1.0x fla K-last at every B; ≥ 1.3x fla K-first where fla K-first is
under 77% of copy bandwidth, else ≥ 95% of copy bandwidth; ≥ 85% of copy bandwidth at B ≥ 256; ≥ 2x fla at
B = 1 (loop timings).

fla-core 0.6.0 needs einops; from a folder of wheels: ``pip install --no-index --no-deps DIR/*.whl``.
Run: ``python scripts/bench_gdn_decode.py`` (``--sweep`` also times other tile shapes of our kernel).
"""

from __future__ import annotations

import argparse
import faulthandler
import itertools
import math
import statistics
import sys

import torch
from host_timing import host_seconds

H, HV, K, V = 16, 32, 128, 128
DEVICE = "cuda"
# vs_kfirst holds where fla K-first reaches under kfirst_frac of copy bandwidth; where it reaches more,
# ours must reach copy_frac_fast of copy bandwidth instead (1.3x of a near-copy anchor is unreachable).
BARS = {
    "vs_klast": 1.0,
    "vs_kfirst": 1.3,
    "kfirst_frac": 0.77,
    "copy_frac_fast": 0.95,
    "copy_frac": 0.85,
    "b1": 2.0,
}
# (block_v, tiles per program, num_warps, stages[, keep_in_l2])
SORTED_SLOTS = False  # --sorted-slots: sequence b uses pool row b + 1, fla's h0 order
SWEEP = [
    (8, 1, 1, 1, True),
    (8, 1, 1, 1),
    (16, 1, 1, 1),
    (32, 1, 4, 1),
    (8, 2, 1, 2),
    (8, 8, 1, 3),
    (16, 2, 1, 2),
    (16, 8, 2, 3),
    (32, 4, 4, 3),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_fla():
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    except Exception as err:  # any import failure means "no anchor", reported, not fatal
        log(f"fla unavailable ({type(err).__name__}: {err}); timing ours and copy bandwidth only")
        return None
    return fused_recurrent_gated_delta_rule


def make_inputs(B: int, T: int, state_dtype: torch.dtype, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = {"device": DEVICE, "generator": gen}
    q = torch.randn(B, T, H, K, **dev).to(torch.bfloat16)
    k = torch.randn(B, T, H, K, **dev).to(torch.bfloat16)
    v = torch.randn(B, T, HV, V, **dev).to(torch.bfloat16)
    a = (2.0 * torch.randn(B, T, HV, **dev)).to(torch.bfloat16)
    b = (2.0 * torch.randn(B, T, HV, **dev)).to(torch.bfloat16)
    A_log = 0.5 * torch.randn(HV, **dev)
    dt_bias = 0.5 * torch.randn(HV, **dev)
    pool = (0.1 * torch.randn(B + 1, HV, V, K, **dev)).to(state_dtype)
    pool[0] = 0
    perm = torch.randperm(B, device=DEVICE, generator=gen) + 1
    if SORTED_SLOTS:
        perm = torch.arange(1, B + 1, device=DEVICE)
    slot_ids = perm.to(torch.int32)
    return q, k, v, a, b, A_log, dt_bias, pool, slot_ids


def fla_call(fla, q, k, v, a, b, A_log, dt_bias, h0, v_first: bool):
    return fla(
        q=q,
        k=k,
        v=v,
        g=a,
        beta=b,
        scale=K**-0.5,
        initial_state=h0,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=True,
        state_v_first=v_first,
    )


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y).clamp_min(1e-300))


def check_correctness(fla) -> bool:
    from moetool.kernels.gdn_decode import gdn_decode_klast
    from moetool.kernels.gdn_decode_ref import gdn_decode_klast_ref

    ok = True
    for state_dtype in (torch.float32, torch.bfloat16):
        for T in (1, 2):
            B = 48
            q, k, v, a, b, A_log, dt_bias, pool, slot_ids = make_inputs(B, T, state_dtype, 7 + T)
            slot_ids[5] = -1
            ids = slot_ids.long()
            before = pool.clone()
            o = gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, pool, slot_ids)
            ref_pool = before.to("cpu", copy=True)
            o_ref = gdn_decode_klast_ref(
                *(x.cpu() for x in (q, k, v, a, b, A_log, dt_bias)), ref_pool, slot_ids.cpu()
            )
            live = ids[ids >= 0]
            e_o = rel(o.float().cpu(), o_ref.float())
            e_s = rel(pool[live].float().cpu(), ref_pool[live.cpu()].float())
            untouched = torch.ones(B + 1, dtype=torch.bool, device=DEVICE)
            untouched[live] = False
            same = torch.equal(pool[untouched], before[untouched])
            # bf16 output and bf16 state: one rounding of identical float32 values, so <= 2^-8
            bound = 1e-5 if state_dtype == torch.float32 else 2.0**-8
            good = e_o <= 2.0**-8 and e_s <= bound and same
            line = f"check vs torch reference  state={str(state_dtype)[6:]:8s} T={T}: out {e_o:.2e} state {e_s:.2e}"
            if fla is not None:
                h0 = before[ids.clamp(min=0)].transpose(-1, -2).contiguous()
                h0[ids < 0] = 0
                o_f, ht = fla_call(fla, q, k, v, a, b, A_log, dt_bias, h0, False)
                f_o = rel(o.float(), o_f.float())
                mine = pool[live].transpose(-1, -2).float()
                theirs = ht[ids >= 0].to(state_dtype).float()
                f_s = rel(mine, theirs)
                good = good and f_o <= 2.0**-8 and f_s <= bound
                line += f" | vs fla K-first: out {f_o:.2e} state {f_s:.2e}"
            log(line + ("  ok" if good else "  MISMATCH"))
            ok = ok and good
    return ok


def time_loops(fns: dict, n: int, windows: int = 5) -> dict:
    """Seconds per call of ``n`` back-to-back calls between two CUDA events (host cost included), for each
    of ``fns``: windows of the functions alternate (ours, anchor, anchor, ours, …) and each figure is the
    median of its ``windows``, so a host hiccup, even one lasting a whole window, touches every side
    alike or no figure at all."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    per_call: dict = {name: [] for name in fns}
    for _ in range(windows):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            per_call[name].append(start.elapsed_time(end) * 1e-3 / n)
    return {name: statistics.median(t) for name, t in per_call.items()}


def time_bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def copy_bandwidth() -> float:
    nbytes = 1 << 30
    src = torch.empty(nbytes // 4, device=DEVICE, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_bench(lambda: dst.copy_(src))


def rotation(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(256, math.ceil(4 * l2 / max(nbytes, 1))))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,8,64,128,256,512")
    parser.add_argument("--tokens", type=int, default=1, help="tokens per call (T)")
    parser.add_argument("--sweep", action="store_true", help="also time other launch configurations")
    parser.add_argument(
        "--timeout", type=float, default=170.0, help="abort with a traceback after this many s"
    )
    parser.add_argument(
        "--sorted-slots",
        action="store_true",
        help="sequence b uses pool row b+1 (the memory order of fla's contiguous h0) instead of a random "
        "permutation of the rows (what an engine's pool looks like)",
    )
    args = parser.parse_args()
    global SORTED_SLOTS
    SORTED_SLOTS = args.sorted_slots
    faulthandler.dump_traceback_later(args.timeout, exit=True)

    if not torch.cuda.is_available():
        log("no CUDA device: this benchmark runs on a GPU machine")
        return 2
    try:
        from moetool.kernels._launch import triton_dispatch
        from moetool.kernels.gdn_decode import LaunchConfig, gdn_decode_klast, launch_config, pdl_by_default
    except ImportError as err:
        log(f"cannot import moetool.kernels ({err}): install the project first, pip install --no-deps -e .")
        return 2

    card = torch.cuda.get_device_name(0)
    log(f"card: {card}; torch {torch.__version__}")
    fla = load_fla()
    if not check_correctness(fla):
        log("correctness check failed: no timings")
        return 1

    copy_bw = copy_bandwidth()
    log(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)")
    T = args.tokens
    rows = []
    host = {}
    for state_dtype in (torch.float32, torch.bfloat16):
        for B in (int(x) for x in args.batches.split(",")):
            elt = torch.finfo(state_dtype).bits // 8
            state_bytes = B * HV * V * K * elt
            n_rot = rotation(state_bytes)
            q, k, v, a, b, A_log, dt_bias, pool, slot_ids = make_inputs(B, T, state_dtype, 100 + B)
            pools = [pool] + [pool.clone() for _ in range(n_rot - 1)]
            it_ours = itertools.cycle(pools)

            def ours(it=it_ours, q=q, k=k, v=v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, slot_ids=slot_ids):
                return gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, next(it), slot_ids)

            def ours_plain(
                it=it_ours, q=q, k=k, v=v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, slot_ids=slot_ids
            ):
                return gdn_decode_klast(q, k, v, a, b, A_log, dt_bias, next(it), slot_ids, pdl=False)

            probe = time_bench(ours)
            n = int(min(2000, max(20, 0.1 / max(probe, 1e-6))))
            res = {"B": B, "state": "f32" if elt == 4 else "bf16", "bytes": 2 * state_bytes}
            loops = {"ours": ours, "plain": ours_plain}
            res["ours_bench"] = time_bench(ours)
            bk, cfg = launch_config(B * HV, K, V, state_dtype == torch.bfloat16)
            res["cfg"] = (
                f"{cfg.block_v}x{bk}x{cfg.tiles}/{cfg.num_warps}w"
                + ("/L2" if cfg.keep_in_l2 else "")
                + ("/pdl" if pdl_by_default(B * HV, pool.device) else "")
            )
            if B == 1:
                host[(res["state"], "ours")] = host_seconds(ours)

                def ours_via_triton(ours=ours):
                    with triton_dispatch():
                        return ours()

                # what the call cost before it launched the compiled kernel directly (kernels/_launch.py)
                host[(res["state"], "ours, launch through Triton's dispatch")] = host_seconds(ours_via_triton)
            if args.sweep:
                best = None
                for sweep_cfg in (LaunchConfig(*c) for c in SWEEP):

                    def tile(
                        cfg_=sweep_cfg,
                        it=it_ours,
                        q=q,
                        k=k,
                        v=v,
                        a=a,
                        b=b,
                        A_log=A_log,
                        dt_bias=dt_bias,
                        slot_ids=slot_ids,
                    ):
                        return gdn_decode_klast(
                            q, k, v, a, b, A_log, dt_bias, next(it), slot_ids, config=cfg_
                        )

                    t = time_bench(tile)
                    log(f"  sweep B={B} {res['state']} {sweep_cfg}: {t * 1e6:.1f} us")
                    if best is None or t < best[0]:
                        c = sweep_cfg
                        best = (t, f"{c.block_v}x{bk}x{c.tiles}/{c.num_warps}w/{c.stages}s")
                res["best_tile"] = f"{best[1]} {best[0] * 1e6:.1f}us"

            if fla is not None:
                for name, v_first in (("fla_kf", False), ("fla_kl", True)):
                    base = pool[1:]
                    h = base if v_first else base.transpose(-1, -2)
                    h0s = [h.contiguous()] + [h.contiguous() for _ in range(n_rot - 1)]
                    it = itertools.cycle(h0s)

                    def call(it=it, v_first=v_first, q=q, k=k, v=v, a=a, b=b, A_log=A_log, dt_bias=dt_bias):
                        return fla_call(fla, q, k, v, a, b, A_log, dt_bias, next(it), v_first)

                    loops[name] = call
                    res[f"{name}_bench"] = time_bench(call)
                    if B == 1:
                        host[(res["state"], name)] = host_seconds(call)
                    del h0s, it
            res.update({f"{name}_loop": t for name, t in time_loops(loops, n).items()})
            del loops
            rows.append(res)
            log(
                f"B={B:4d} {res['state']:4s} ours {res['ours_loop'] * 1e6:8.1f} us loop "
                f"{res['ours_bench'] * 1e6:8.1f} us bench"
                + (
                    f" | fla K-first {res['fla_kf_loop'] * 1e6:8.1f} / K-last {res['fla_kl_loop'] * 1e6:8.1f} us loop"
                    if fla is not None
                    else ""
                )
            )
            del pools, pool, it_ours
            torch.cuda.empty_cache()

    for (state, who), t in sorted(host.items()):
        log(f"host time per call at B=1 ({state} state): {who} {t * 1e6:.1f} us")

    failures = []
    order = "sorted" if SORTED_SLOTS else "permuted"
    print(f"\nGDN decode, T={T}, H={H} HV={HV} K={K} V={V}, bf16 activations, {order} slots; card: {card}")
    print(
        f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; times in us (loop = back-to-back calls, bench = do_bench median)"
    )
    print("plain = ours launched without programmatic dependent launch (pdl=False), xKLp its x fla K-last")
    head = (
        f"{'B':>4} {'state':>5} {'tile':>14} {'ours loop':>9} {'plain':>7} {'ours bench':>10} {'flaKF loop':>10} "
        f"{'flaKL loop':>10} {'TB/s':>5} {'%copy':>5} {'xKL':>6} {'xKF':>6} {'xKLp':>6}  bars"
    )
    print(head)
    for r in rows:
        tbs = r["bytes"] / r["ours_loop"]
        frac = tbs / copy_bw
        notes = []
        if fla is not None:
            xkl = r["fla_kl_loop"] / r["ours_loop"]
            xkf = r["fla_kf_loop"] / r["ours_loop"]
            xklp = r["fla_kl_loop"] / r["plain_loop"]
            if xkl < BARS["vs_klast"]:
                notes.append(f"xKL<{BARS['vs_klast']}")
            kf_frac = r["bytes"] / r["fla_kf_loop"] / copy_bw
            if kf_frac < BARS["kfirst_frac"]:
                if xkf < BARS["vs_kfirst"]:
                    notes.append(f"xKF<{BARS['vs_kfirst']}")
            elif frac < BARS["copy_frac_fast"]:
                notes.append(f"copy<{BARS['copy_frac_fast']:.0%} (fla K-first at {kf_frac:.0%})")
            if r["B"] == 1 and min(xkl, xkf) < BARS["b1"]:
                notes.append(f"B=1 <{BARS['b1']}x")
        else:
            xkl = xkf = xklp = float("nan")
            notes.append("no fla")
        if r["B"] >= 256 and frac < BARS["copy_frac"]:
            notes.append(f"copy<{BARS['copy_frac']:.0%}")
        failures += [f"B={r['B']} {r['state']}: {n}" for n in notes if n != "no fla"]
        print(
            f"{r['B']:>4} {r['state']:>5} {r['cfg']:>14} {r['ours_loop'] * 1e6:>9.1f} {r['plain_loop'] * 1e6:>7.1f} "
            f"{r['ours_bench'] * 1e6:>10.1f} "
            f"{r.get('fla_kf_loop', float('nan')) * 1e6:>10.1f} {r.get('fla_kl_loop', float('nan')) * 1e6:>10.1f} "
            f"{tbs / 1e12:>5.2f} {frac:>5.0%} {xkl:>6.3f} {xkf:>6.3f} {xklp:>6.3f}  "
            f"{'ok' if not notes else ' '.join(notes)}"
            + (f"  best tile {r['best_tile']}" if "best_tile" in r else "")
        )
    print("bars: " + ("all met" if not failures and fla is not None else "; ".join(failures) or "no anchor"))
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main())
