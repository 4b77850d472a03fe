"""``block_quant_ref(..., out=q)``: quantizing into a reused buffer gives the bytes of a fresh result
(every byte overwritten, whatever the buffer held), and a buffer of the wrong kind is refused."""

from __future__ import annotations

import pytest
import torch

from moetool.errors import InputError
from moetool.kernels.fp8_quant_ref import block_quant_ref

FP8 = torch.float8_e4m3fn


def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-6, 3, shape[-1])  # 9 decades across columns
    w.view(-1, shape[-1])[0, :7] = 0.0  # part of a block all zeros
    return w.to(dtype)


@pytest.mark.parametrize(
    ("shape", "dtype", "ue8m0"),
    [
        ((67, 300), torch.bfloat16, False),
        ((3, 131, 257), torch.float32, True),
        ((256, 128), torch.float16, False),
    ],
)
def test_out_buffer_gets_the_bytes_of_a_fresh_result(
    shape: tuple[int, ...], dtype: torch.dtype, ue8m0: bool
) -> None:
    w = _weights(shape, dtype, seed=sum(shape))
    q_ref, s_ref = block_quant_ref(w, ue8m0=ue8m0)
    # poisoned: NaN bytes everywhere, so a byte the quantizer skips shows
    out = torch.full(shape, 0x7F, dtype=torch.uint8).view(FP8)
    q, s = block_quant_ref(w, ue8m0=ue8m0, out=out)
    assert q.data_ptr() == out.data_ptr()
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize(
    "bad",
    [
        torch.empty(67, 300, dtype=torch.uint8),
        torch.empty(67, 301, dtype=FP8),
        torch.empty(300, 67, dtype=FP8).t(),
    ],
    ids=["wrong-dtype", "wrong-shape", "not-contiguous"],
)
def test_out_buffer_of_the_wrong_kind_is_refused(bad: torch.Tensor) -> None:
    w = _weights((67, 300), torch.bfloat16, seed=5)
    with pytest.raises(InputError, match="out must be"):
        block_quant_ref(w, out=bad, name="w")
