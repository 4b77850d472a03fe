"""Launchers refuse arguments their kernels cannot take with an ``InputError`` naming the function and the
argument, under ``python -O`` too (a bare ``assert`` would vanish there and launch on bad memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CASES = {
    "block_quant dtype": (
        "from moetool.kernels.fp8_quant import block_quant; block_quant(torch.zeros(4, 4, dtype=torch.int32))",
        ["block_quant", "tensor w"],
    ),
    "block_quant rank": (
        "from moetool.kernels.fp8_quant import block_quant; block_quant(torch.zeros(2, 2, 4, 4))",
        ["block_quant", "[N, K] or [E, N, K]"],
    ),
    "block_quant out_q": (
        "from moetool.kernels.fp8_quant import block_quant; "
        "block_quant(torch.zeros(4, 4), out_q=torch.empty(4, 5, dtype=torch.float8_e4m3fn))",
        ["block_quant", "tensor out_q"],
    ),
    "token_quant strides": (
        "from moetool.kernels.fp8_quant import token_quant; token_quant(torch.zeros(8, 6).t())",
        ["token_quant", "contiguous"],
    ),
    "fp4_cast devices": (
        "from moetool.kernels.fp4_cast import fp4_cast; "
        "fp4_cast(torch.zeros(128, 64, dtype=torch.int8), torch.zeros(128, 4, dtype=torch.uint8, device='meta'))",
        ["fp4_cast", "tensor scale"],
    ),
}


@pytest.fixture(scope="module")
def refusals() -> dict[str, str]:
    """Each case run in one ``python -O`` process: its last line, ``REFUSED <error>`` or ``ACCEPTED``."""
    lines = ["import torch", "from moetool.errors import InputError"]
    for name, (code, _) in sorted(CASES.items()):
        lines += [
            "try:",
            f"    {code}",
            "except InputError as e:",
            f"    print({name!r} + '|REFUSED ' + str(e))",
            "else:",
            f"    print({name!r} + '|ACCEPTED')",
        ]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-O", "-c", "\n".join(lines)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return dict(line.split("|", 1) for line in r.stdout.splitlines() if "|" in line)


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_under_optimize(refusals: dict[str, str], case: str) -> None:
    line = refusals[case]
    assert line.startswith("REFUSED"), line
    assert all(w in line for w in CASES[case][1]), line
