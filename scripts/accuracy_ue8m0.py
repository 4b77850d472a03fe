"""What quantizing straight to UE8M0 buys over the engines' load-time requantization (CPU, seconds).

On DeepSeek-V3-sized expert weights (random bf16 ``[7168, 2048]`` and ``[2048, 7168]``: normal with std
0.02, one row in 64 eight times wider, a few isolated outliers), compare three block-FP8 versions of each
weight W (128 × 128 blocks, the recipe of docs/contract.md §6, ``block_quant_ref``):

- (a) moetool: UE8M0 (power-of-two) scales, quantized straight from the BF16 weight;
- (b) engines at load time (SGLang's ``requant_weight_ue8m0`` on Blackwell): the float-scale FP8
  checkpoint dequantized to BF16, then requantized to UE8M0 — two roundings;
- (c) the float-scale FP8 checkpoint itself.

For each: the weight's relative error ``‖deq − W‖ / ‖W‖`` and the relative error of a GEMM output
``‖X·deqᵀ − X·Wᵀ‖ / ‖X·Wᵀ‖`` (X: 64 random bf16 tokens), in float64. Then how far (b) lands from (a):
relative divergence of the dequantized weights and of the GEMM outputs, and the share of FP8 bytes
and scales that differ.

Usage: python scripts/accuracy_ue8m0.py [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

from moetool.kernels.fp8_quant_ref import block_quant_ref, dequant_ref


def make_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen) * 0.02
    w[::64] *= 8.0  # outlier output channels
    idx = torch.randint(0, n * k, (n * k // 100_000,), generator=gen)
    w.view(-1)[idx] = torch.randn(idx.numel(), generator=gen) * 0.5  # isolated large weights
    return w.bfloat16()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a64, b64 = a.double(), b.double()
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    rows = []
    for n, k in ((7168, 2048), (2048, 7168)):
        w = make_weight(n, k, gen)
        x = torch.randn(64, k, generator=gen).bfloat16().double()
        y_ref = x @ w.double().t()

        q_c, s_c = block_quant_ref(w)  # (c) float scales
        q_a, s_a = block_quant_ref(w, ue8m0=True)  # (a) UE8M0 straight from BF16
        w_bf16 = dequant_ref(q_c, s_c, dtype=torch.bfloat16)  # (b) load time: FP8 -> BF16 -> UE8M0
        q_b, s_b = block_quant_ref(w_bf16, ue8m0=True)

        deq = {"a": dequant_ref(q_a, s_a), "b": dequant_ref(q_b, s_b), "c": dequant_ref(q_c, s_c)}
        y = {key: x @ d.double().t() for key, d in deq.items()}
        for key, label in (
            ("a", "(a) UE8M0 from BF16"),
            ("b", "(b) FP8 -> BF16 -> UE8M0"),
            ("c", "(c) float scale"),
        ):
            rows.append((f"{n}x{k}", label, rel(deq[key], w), rel(y[key], y_ref)))
        rows.append(
            (
                f"{n}x{k}",
                "(b) vs (a) divergence",
                rel(deq["b"], deq["a"]),
                rel(y["b"], y["a"]),
                float((q_a.view(torch.uint8) != q_b.view(torch.uint8)).float().mean()),
                float((s_a != s_b).float().mean()),
            )
        )

    print(f"block FP8 128x128, random DeepSeek-V3-sized bf16 weights (seed {args.seed})")
    print(
        f"{'weight':>10} {'version':>26} {'rel err W':>10} {'rel err XWt':>12} {'q bytes diff':>13} {'scales diff':>12}"
    )
    for r in rows:
        extra = f" {r[4]:13.2%} {r[5]:12.2%}" if len(r) > 4 else ""
        print(f"{r[0]:>10} {r[1]:>26} {r[2]:10.4%} {r[3]:12.4%}{extra}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
