"""What the kernels ask of their launch: the machine (Triton's interpreter, Hopper-or-later cards) and
their arguments. Every launcher refuses an argument its kernel cannot take the same way, through
:func:`require` / :func:`launch_error`: an :class:`InputError` naming the function, the argument and what
it must be, raised whatever Python's ``-O`` says (never a bare ``assert``)."""

from __future__ import annotations

import functools
import os

import torch

from moetool.errors import InputError


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET`` set and not 0): CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=16)
def hopper_or_later(index: int) -> bool:
    """Whether CUDA device ``index`` has compute capability 9.0 or later (TMA, grid dependency control)."""
    return torch.cuda.get_device_capability(index) >= (9, 0)


def launch_error(fn: str, message: str, *, tensor: str | None = None, fix: str | None = None) -> InputError:
    """The error of launcher ``fn`` for an argument (``tensor``) its kernel cannot take."""
    return InputError(f"{fn}: {message}", tensor=tensor, fix=fix)


def require(ok: bool, fn: str, message: str, *, tensor: str | None = None, fix: str | None = None) -> None:
    """Raise :func:`launch_error` unless ``ok``."""
    if not ok:
        raise launch_error(fn, message, tensor=tensor, fix=fix)


def require_launchable(t: torch.Tensor, fn: str, *, tensor: str, reference: str) -> None:
    """Triton runs ``t`` on a CUDA device, or on the CPU in its interpreter; else name the reference."""
    require(
        t.is_cuda or interpreting(),
        fn,
        "CPU tensors need TRITON_INTERPRET=1",
        tensor=tensor,
        fix=f"use {reference} on the CPU",
    )
