"""Test-wide setup. Without CUDA, Triton kernels run in its interpreter (set before any kernel module is
imported, since ``triton.jit`` reads it at decoration time)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def seed() -> int:
    torch.manual_seed(1234)
    return 1234
