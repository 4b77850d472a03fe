"""Memory stays bounded by the tensors in flight, not by the checkpoint (docs/contract.md §4 and §11: peak
≤ largest tensor × 4 + 1 GB): quantize a checkpoint several times larger than a much tighter bound and
measure the process's peak resident set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moetool.io import Checkpoint
from moetool.testing.factory import make_checkpoint

pytestmark = pytest.mark.slow

MIB = 1 << 20
# Pipeline headroom beyond the largest tensor x 4: one job per core plus two queued, each holding a
# gate/up pair with its float32 working copies (~50 MiB at these sizes), and the shard writer's buffers.
HEADROOM = 512 * MIB


def _peak_rss(*cmd: str) -> int:
    """Peak RSS in bytes of ``cmd`` run as the only child of a fresh wrapper process."""
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1]) * 1024  # Linux reports KiB


def _large_checkpoint(path: Path, num_layers: int, seed: int) -> Path:
    """DeepSeek-V3-style, 96 experts of 2048x1024 per MoE layer (1.2 GB of BF16 experts per layer)."""
    return make_checkpoint(
        "deepseek_v3",
        path,
        num_layers=num_layers,
        hidden_size=2048,
        moe_intermediate_size=1024,
        num_experts=96,
        top_k=8,
        max_shard_bytes=1 << 30,
        seed=seed,
    )


def test_quantize_peak_memory_is_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    src = _large_checkpoint(tmp_path / "src", num_layers=3, seed=5)
    with Checkpoint(src) as ckpt:
        total = ckpt.total_bytes
        largest = max(t.nbytes for t in ckpt.tensors.values())
    bound = 4 * largest + HEADROOM
    assert total > 3 * bound, "the checkpoint must dwarf the bound for the test to mean anything"

    baseline = _peak_rss(
        sys.executable,
        "-c",
        "import torch, moetool.cli.main, moetool.pipeline, moetool.kernels.fp8_quant_ref",
    )
    peak = _peak_rss(sys.executable, "-m", "moetool", "quantize", str(src), str(tmp_path / "out"), "-q")
    assert (tmp_path / "out" / "moetool.json").is_file()
    assert peak - baseline <= bound, f"peak {peak / MIB:.0f} MiB over a {baseline / MIB:.0f} MiB baseline"
    assert peak <= 4 * largest + 1024 * MIB  # the bar as docs/contract.md §11 states it


def test_validate_on_the_cpu_holds_its_read_buffers_not_a_layer(tmp_path: Path) -> None:
    """Validating on the CPU a MoE layer of 1.8 GB (original and converted) read in 256 MiB chunks: the
    peak stays within the read buffers plus headroom, well under the buffers plus the layer."""
    src = _large_checkpoint(tmp_path / "src", num_layers=2, seed=6)
    fp8 = tmp_path / "fp8"
    subprocess.run([sys.executable, "-m", "moetool", "quantize", str(src), str(fp8), "-q"], check=True)
    with Checkpoint(src) as o, Checkpoint(fp8) as c:
        layer = sum(t.nbytes for ck in (o, c) for n, t in ck.tensors.items() if ".experts." in n)
    imports = "import json, sys, torch, moetool.cli.main, moetool.moe, moetool.kernels.fp8_quant_ref; "
    imports += "from moetool.validate import ValidateOptions, validate_checkpoints"
    run = (
        "r = validate_checkpoints(sys.argv[1], sys.argv[2], "
        "ValidateOptions(device='cpu', tokens=32, read_budget=256 << 20)); "
        "open(sys.argv[3], 'w').write(json.dumps({'passed': r.passed, 'buffers': r.io['buffer_bytes']}))"
    )
    baseline = _peak_rss(sys.executable, "-c", imports)
    out = tmp_path / "result.json"
    peak = _peak_rss(sys.executable, "-c", f"{imports}; {run}", str(src), str(fp8), str(out))
    result = json.loads(out.read_text())
    assert result["passed"]
    buffers = result["buffers"]
    assert layer > 3 * buffers, "the layer must dwarf the read buffers for the test to mean anything"
    assert peak - baseline <= buffers + HEADROOM, (
        f"peak {peak / MIB:.0f} MiB over a {baseline / MIB:.0f} MiB baseline; buffers {buffers / MIB:.0f} "
        f"MiB, layer {layer / MIB:.0f} MiB"
    )
