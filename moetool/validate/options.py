"""``validate``'s options and the read budget that bounds its memory."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ValidateOptions:
    device: str = "auto"
    backend: str = "auto"  # auto | triton | deepgemm (torch references when the device is the CPU)
    layers: tuple[int, ...] | None = None
    experts: int | None = None  # sample this many experts per layer (all when None)
    tokens: int = 128
    seed: int = 0
    checks: tuple[str, ...] = ("structure", "tensors", "kernels", "moe")
    ssm_steps: int = 4
    #: most bytes of one read step; a layer above it is read in chunks of whole experts (a tensor larger
    #: than the budget gets a step of its own). None: ``default_read_budget``.
    read_budget: int | None = None
    family: str | None = None  # --family: read an unknown model_type as this family (both checkpoints)


MIN_READ_BUDGET = 1 << 30


def default_read_budget(largest: int) -> int:
    """Bytes per read step for a checkpoint pair whose largest tensor read whole (anything but the
    stacked experts, which are read expert by expert) has ``largest`` bytes: twice that, so a tensor
    and its original fit one step, and at least 1 GiB, so a step's reads still spread over every reader
    thread in 32 MiB pieces. Two buffers of it bound the host memory like quantize's 4 x largest tensor
    (+ 1 GB), whatever the number of experts per layer."""
    return max(MIN_READ_BUDGET, 2 * largest)
