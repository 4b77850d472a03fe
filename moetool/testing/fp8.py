"""The DeepSeek-V3 official block-FP8 format as a release writer: every Linear but routers, gates and
``lm_head`` stored F8_E4M3 with an F32 ``weight_scale_inv`` on the ceil grid
``[..., ceil(N/128), ceil(K/128)]``, and ``quantization_config`` in ``config.json``.

The values come from the kernels' torch reference (``block_quant_ref``), not from a copy of the recipe
here: these checkpoints are inputs, so they need the format's bytes, not an independent derivation of
them. What checks moetool's FP8 bytes independently are the plain transcriptions of the recipe the tests
compare with (``tests/kernels/test_fp8_quant.py``, ``tests/test_quantize.py``), which never share code
with the quantizer they check.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from moetool.kernels.fp8_quant_ref import BLOCK as FP8_BLOCK
from moetool.kernels.fp8_quant_ref import FP8_MAX, block_quant_ref
from moetool.testing.files import DiskTensor
from moetool.testing.specs import TensorSpec

__all__ = [
    "FP8_BLOCK",
    "FP8_MAX",
    "block_quant",
    "fp8_disk_tensors",
    "fp8_quantization_config",
    "fp8_values",
    "scale_grid",
    "scale_name",
]


def scale_name(weight_name: str) -> str:
    """``X.weight`` -> ``X.weight_scale_inv``; packed ``P.gate_up_proj`` -> ``P.gate_up_proj_scale_inv``."""
    return f"{weight_name}_scale_inv"


def scale_grid(shape: Sequence[int], block: int = FP8_BLOCK) -> tuple[int, ...]:
    """Block-scale shape of a ``[..., N, K]`` weight: ``[..., ceil(N/128), ceil(K/128)]``."""
    *lead, n, k = shape
    return (*lead, -(-n // block), -(-k // block))


def fp8_disk_tensors(spec: TensorSpec) -> list[DiskTensor]:
    """The stored tensors of one FP8 target: its F8_E4M3 weight, then its F32 ``weight_scale_inv``."""
    return [
        DiskTensor(spec.name, spec.shape, torch.float8_e4m3fn, "fp8", spec),
        DiskTensor(scale_name(spec.name), scale_grid(spec.shape), torch.float32, "scale", spec),
    ]


def fp8_quantization_config(specs: Iterable[TensorSpec]) -> dict[str, Any]:
    """The ``quantization_config`` of a checkpoint whose FP8 targets are quantized: the DeepSeek-V3 keys
    plus ``modules_to_not_convert``/``ignored_layers`` naming every Linear kept."""
    kept = sorted({s.module for s in specs if s.linear and not s.fp8_target})
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "ignored_layers": kept,
        "modules_to_not_convert": list(kept),
        "quant_method": "fp8",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }


def block_quant(w: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 of ``w [N, K]`` or ``[E, N, K]`` (experts independently): ``(q float8_e4m3fn,
    s float32 [..., ceil(N/128), ceil(K/128)])``."""
    return block_quant_ref(w, name=name)


def fp8_values(spec: TensorSpec, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors of FP8 target ``spec`` whose float values are ``w``, by name (one quantization
    gives the weight and its scale)."""
    q, s = block_quant(w, name=spec.name)
    return {spec.name: q, scale_name(spec.name): s.contiguous()}
