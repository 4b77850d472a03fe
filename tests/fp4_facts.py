"""DeepSeek's FP4 -> FP8 cast written from its published description (DeepSeek-V4 ``inference/convert.py``,
``cast_e2m1fn_to_e4m3fn``), independently of moetool's kernels: the oracle the byte-identity tests use."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu


def deepseek_cast(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4's ``cast_e2m1fn_to_e4m3fn`` as its description states it, for one ``[N, K/2]`` matrix:
    decode with the table (code 8 is +0), view as 128 x 128 blocks, FP8 scale = block max of the FP4
    scales / 2**6, every value times its FP4 scale / the FP8 scale, cast to e4m3; scale cast to E8M0."""
    table = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
    u8 = packed.view(torch.uint8)
    out_dim, in_dim = u8.shape[0], u8.shape[1] * 2
    x = torch.stack([table[(u8 & 0x0F).long()], table[(u8 >> 4).long()]], dim=-1).flatten(1)
    bo, bi = out_dim // 128, in_dim // 128
    x = x.view(bo, 128, bi, 128).transpose(1, 2)  # [bo, bi, 128, 128]
    sf = scale.float().view(bo, 128, bi, 4).transpose(1, 2).flatten(2)  # [bo, bi, 512]
    block_scale = sf.amax(dim=-1, keepdim=True) / 2**6
    offset = (sf / block_scale).unflatten(-1, (128, 4)).repeat_interleave(32, dim=-1)
    q = (x * offset).transpose(1, 2).reshape(out_dim, in_dim).to(FP8)
    return q, block_scale.squeeze(-1).to(E8M0)
