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


@pytest.fixture(scope="session")
def v4_float(tmp_path_factory: pytest.TempPathFactory):
    """A tiny float DeepSeek-V4 saved by transformers (3 layers, the first hash-routed), built once."""
    pytest.importorskip("transformers", minversion="5.24")
    from moetool.testing.release_formats import make_deepseek_v4_checkpoint

    return make_deepseek_v4_checkpoint(tmp_path_factory.mktemp("v4") / "float", seed=11)


@pytest.fixture
def untouched():
    """``untouched(path, ...)`` hashes each tree (files, links, folders) now; the test fails at teardown
    if any changed. Every reliability test that writes registers its inputs here."""
    from reliability_helpers import Untouched

    u = Untouched()
    yield u
    u.check()
