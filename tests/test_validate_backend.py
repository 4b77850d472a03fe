"""Which GEMM ``validate`` runs: ``resolve_backend`` (``--backend auto|triton|deepgemm``).

The CUDA cases need no GPU: the card's compute capability comes from ``torch.cuda`` (patched here) and
DeepGEMM from a stand-in ``deep_gemm`` package put on ``sys.path`` (importable, broken, or printing on
import, as a real build may). The real DeepGEMM on a real card: ``tests/test_deepgemm_gpu.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moetool.errors import EnvironmentError_, UsageError
from moetool.validate import Backend, resolve_backend

CUDA = torch.device("cuda", 0)


@pytest.fixture
def card(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Sets the compute capability ``torch.cuda`` reports."""

    def set_capability(major: int, minor: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return set_capability


def _stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str | None) -> None:
    """A ``deep_gemm`` package with ``body`` as its ``__init__.py`` (None: no package at all)."""
    monkeypatch.delitem(sys.modules, "deep_gemm", raising=False)
    if body is None:
        return
    pkg = tmp_path / "site" / "deep_gemm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_cpu_always_runs_the_torch_references() -> None:
    for name in ("auto", "triton", "deepgemm"):
        assert resolve_backend(name, torch.device("cpu")) == "torch"


def test_unknown_backend_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cublas"):
        resolve_backend("cublas", CUDA)


def test_auto_picks_deepgemm_on_sm90_when_importable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, card, capsys: pytest.CaptureFixture[str]
) -> None:
    _stand_in(tmp_path, monkeypatch, "print('a line a real build may print')\n")
    card(9)
    assert resolve_backend("auto", CUDA) == "deepgemm"
    assert capsys.readouterr().out == ""  # nothing on stdout, which --json owns
    card(10)  # SM100: its kernels would round float32 scales to UE8M0
    assert resolve_backend("auto", CUDA) == "triton"
    card(8)
    assert resolve_backend("auto", CUDA) == "triton"


@pytest.mark.parametrize(
    "body", [None, "raise ImportError('undefined symbol: _ZN3c10')\n"], ids=["absent", "broken"]
)
def test_auto_falls_back_to_triton_without_a_working_deepgemm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, card, body: str | None
) -> None:
    _stand_in(tmp_path, monkeypatch, body)
    card(9)
    assert resolve_backend("auto", CUDA) == "triton"


def test_an_explicit_backend_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, card) -> None:
    _stand_in(tmp_path, monkeypatch, None)
    card(9)
    assert resolve_backend("triton", CUDA) == "triton"
    assert resolve_backend("deepgemm", CUDA) == "deepgemm"
    with pytest.raises(EnvironmentError_, match="deep_gemm is not importable"):
        Backend(CUDA, "deepgemm")  # asked for by name and absent: exit 2, not a silent Triton run


@pytest.mark.parametrize("dims", [(200, 200), (7168, 200), (96, 2048)], ids=str)
def test_deepgemm_only_on_sizes_its_gemm_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, card, dims: tuple[int, int]
) -> None:
    """DeepGEMM's TMA descriptors reject a 200-wide FP8 row (the card's driver answers INVALID_VALUE):
    ``auto`` runs Triton for a model with a size that is not a multiple of 64, and asking for DeepGEMM
    by name is a usage error naming the sizes, never a crash inside the GEMM."""
    _stand_in(tmp_path, monkeypatch, "")
    card(9)
    assert resolve_backend("auto", CUDA, (7168, 2048)) == "deepgemm"
    assert resolve_backend("auto", CUDA, (320, 256)) == "deepgemm"  # ran right on an H200
    assert resolve_backend("auto", CUDA, dims) == "triton"
    with pytest.raises(UsageError, match=", ".join(map(str, dims))):
        resolve_backend("deepgemm", CUDA, dims)
    assert resolve_backend("triton", CUDA, dims) == "triton"
