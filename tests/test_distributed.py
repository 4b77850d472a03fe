"""torchrun on the CPU (gloo): ranks split the output shards and the result is byte-identical to one
process; a rank that fails fails the run and leaves no OUT."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moetool.io import Checkpoint
from moetool.model import analyze
from moetool.plan import parse_size
from moetool.quantize import QuantizeOptions, plan_quantize
from moetool.testing.factory import make_checkpoint

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "moetool",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def _moetool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moetool", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        "deepseek_v3",
        tmp_path_factory.mktemp("d") / "src",
        num_layers=3,
        hidden_size=256,
        moe_intermediate_size=128,
        num_experts=8,
        seed=3,
    )


def _weights(out: Path) -> dict[str, bytes]:
    names = [p.name for p in out.iterdir() if p.suffix == ".safetensors"]
    names += ["config.json", "model.safetensors.index.json"]
    return {n: (out / n).read_bytes() for n in sorted(names)}


def test_two_ranks_write_the_same_bytes_as_one_process(src: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _moetool("quantize", str(src), str(one), "--max-shard-size", "300KB", "-q")
    assert r1.returncode == 0, r1.stderr
    r2 = _torchrun("quantize", str(src), str(two), "--max-shard-size", "300KB", "--json")
    assert r2.returncode == 0, r2.stderr
    assert len([p for p in one.iterdir() if p.suffix == ".safetensors"]) >= 3  # work for both ranks
    assert _weights(two) == _weights(one)
    manifest = json.loads((two / "moetool.json").read_text())
    assert set(manifest["files"]) >= set(_weights(one))
    assert not (tmp_path / "two.partial").exists()


def test_a_failing_rank_fails_the_run_and_leaves_no_out(src: Path, tmp_path: Path) -> None:
    """A NaN planted in a source of a shard that rank 1 owns: rank 1 fails, rank 0 succeeds with its own
    shards, and the run as a whole fails with rank 1's error and leaves neither OUT nor OUT.partial."""
    bad = Path(shutil.copytree(src, tmp_path / "bad"))
    with Checkpoint(bad) as ckpt:
        plan = plan_quantize(analyze(ckpt), QuantizeOptions(max_shard_size=parse_size("300KB")))
        victim = next(
            job.sources[0].name
            for i, shard in enumerate(plan.shards)
            if i % 2 == 1
            for job in shard.jobs
            if job.op == "quant"
        )
        info = ckpt.info(victim)
    with open(info.file, "r+b") as f:  # the first element of the victim becomes a bf16 NaN
        f.seek(info.offset)
        f.write(b"\xc0\x7f")
    out = tmp_path / "out"
    r = _torchrun("quantize", str(bad), str(out), "--max-shard-size", "300KB")
    assert r.returncode != 0
    assert victim in r.stderr, r.stderr
    assert not out.exists()
    assert not (tmp_path / "out.partial").exists()
