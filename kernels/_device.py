"""What the kernels ask of the machine they launch on: Triton's interpreter, and Hopper-or-later cards."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET`` set and not 0): CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=16)
def hopper_or_later(index: int) -> bool:
    """Whether CUDA device ``index`` has compute capability 9.0 or later (TMA, grid dependency control)."""
    return torch.cuda.get_device_capability(index) >= (9, 0)
