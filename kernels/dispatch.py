"""The one switch between the Triton kernels and their torch references.

A tensor on a CUDA device goes to the Triton kernel, a tensor anywhere else to the torch reference beside
it; the two give the same bytes where the operation promises bytes (quantization, casts) and the same
arithmetic otherwise. Callers put their tensors on the device they want and call these functions; they
never test the device themselves. (The kernels' own tests call the Triton functions directly, in
Triton's interpreter on the CPU.)
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch


def uses_kernels(device: torch.device) -> bool:
    """Whether tensors on ``device`` go to the Triton kernels (else to the torch references)."""
    return device.type == "cuda"


@functools.cache
def _kernel(module: str, name: str) -> Callable:
    """The Triton launcher ``name`` of ``moetool.kernels.<module>``, imported on first use (Triton takes
    seconds to import) and looked up once (an import statement costs about a µs at every call)."""
    return getattr(importlib.import_module(f"moetool.kernels.{module}"), name)


def block_quant(
    w: torch.Tensor, *, ue8m0: bool = False, name: str | None = None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """128 × 128 block FP8 of ``w [N, K]`` or ``[E, N, K]`` on ``w``'s device: ``(q, s)`` as
    :func:`moetool.kernels.fp8_quant_ref.block_quant_ref` defines them. ``out``: a contiguous
    float8_e4m3fn tensor of ``w``'s shape on its device to fill and return as ``q``."""
    if uses_kernels(w.device):
        return _kernel("fp8_quant", "block_quant")(w.contiguous(), ue8m0=ue8m0, name=name, out_q=out)
    from moetool.kernels.fp8_quant_ref import block_quant_ref

    return block_quant_ref(w, ue8m0=ue8m0, name=name, out=out)


def token_quant(x: torch.Tensor, *, mn_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepGEMM's per-token 1 × 128 FP8 of activations ``x [M, K]`` on ``x``'s device: ``q`` and float32
    ``s [M, ceil(K/128)]`` (with ``mn_major`` the kernel stores ``s`` M-contiguous; the reference keeps
    it row-major, the same values)."""
    if uses_kernels(x.device):
        return _kernel("fp8_quant", "token_quant")(x, mn_major=mn_major)
    from moetool.kernels.fp8_quant_ref import BLOCK, block_quant_ref

    return block_quant_ref(x, block=(1, BLOCK))


def grouped_gemm(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, m_indices: torch.Tensor
) -> torch.Tensor:
    """DeepGEMM's contiguous-layout FP8 grouped GEMM ``d[m] = a[m] · b[m_indices[m]]ᵀ`` (bfloat16)."""
    if uses_kernels(a_q.device):
        return _kernel("fp8_grouped_gemm", "m_grouped_fp8_gemm_nt_contiguous")(a_q, a_s, b_q, b_s, m_indices)
    from moetool.kernels.fp8_grouped_gemm_ref import grouped_gemm_ref

    return grouped_gemm_ref(a_q, a_s, b_q, b_s, m_indices)


def gdn_decode_klast(*args: torch.Tensor) -> torch.Tensor:
    """Gated DeltaNet decode steps on a K-last, pool-indexed state, in place: ``(q, k, v, a, b, A_log,
    dt_bias, state_pool, slot_ids)`` as :func:`moetool.kernels.gdn_decode_ref.gdn_decode_klast_ref`
    takes them; returns the outputs."""
    if uses_kernels(args[0].device):
        return _kernel("gdn_decode", "gdn_decode_klast")(*args)
    from moetool.kernels.gdn_decode_ref import gdn_decode_klast_ref

    return gdn_decode_klast_ref(*args)


def fp4_cast(
    packed: torch.Tensor, scale: torch.Tensor, *, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's FP4 → block-FP8 cast on ``packed``'s device: ``(q, s, changed)`` as
    :func:`moetool.kernels.fp4_cast_ref.fp4_cast_ref` defines them."""
    if uses_kernels(packed.device):
        return _kernel("fp4_cast", "fp4_cast")(packed, scale, name=name)
    from moetool.kernels.fp4_cast_ref import fp4_cast_ref

    return fp4_cast_ref(packed, scale, name=name)
