"""Assertions shared by the tests that compare checkpoints tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder by name (all shards); a tensor in two shards fails."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        part = load_file(f)
        assert not set(part) & set(out), f"tensor in two shards: {set(part) & set(out)}"
        out.update(part)
    return out


def assert_bytes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same dtype, same shape, same bytes."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    a = got.contiguous().view(torch.uint8)
    b = want.contiguous().view(torch.uint8)
    if not torch.equal(a, b):
        bad = int((a != b).sum())
        raise AssertionError(f"{what}: {bad} of {a.numel()} bytes differ")
