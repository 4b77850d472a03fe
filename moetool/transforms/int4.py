"""INT4 weights as compressed-tensors' ``pack-quantized`` format stores them (Kimi-K2-Thinking, K2.5, K2.6
routed experts), to their exact values.

A quantized Linear ``W [N, K]`` is stored as three tensors:

- ``weight_packed`` int32 ``[N, ceil(K/8)]``: 8 values per word, value ``i`` of a row in bits
  ``[4·(i % 8), 4·(i % 8) + 4)`` of word ``i // 8`` (little-endian nibbles), each stored as ``q + 8``
  for ``q`` in ``[-8, 7]``;
- ``weight_scale`` (BF16 in the releases) ``[N, K / group_size]``: one symmetric scale per group of
  ``group_size`` consecutive values of a row;
- ``weight_shape`` int ``[2]``: ``[N, K]``.

The value is ``q · scale``. In float32 that product is exact (a 4-bit integer times a scale of at most
24 significant bits), so ``dequantize`` returns the exact values, and FP8 quantization from them rounds
once. compressed-tensors' own decompressor computes the same product in the scale's dtype
(``q.to(scale.dtype) * scale``): for float32 scales its result is these bits; for BF16 scales it is these
values rounded once to BF16 (tests/test_int4.py checks both against the package).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moetool.errors import InputError

PACKED, SCALE, SHAPE = "weight_packed", "weight_scale", "weight_shape"
PER_WORD = 8
BITS = 4


@dataclass(frozen=True)
class Int4Scheme:
    """The weight scheme of a compressed-tensors ``pack-quantized`` checkpoint that moetool reads:
    symmetric signed 4-bit integers, one scale per ``group_size`` values of a row."""

    group_size: int

    @classmethod
    def from_config(cls, qc: Mapping[str, Any], *, file: str = "config.json") -> Int4Scheme:
        """Read ``quantization_config``; anything but symmetric INT4 groups in ``pack-quantized`` is refused
        naming the key (moetool would otherwise read the packed bits wrongly)."""

        def refuse(what: str) -> InputError:
            return InputError(
                f"quantization_config: {what}; moetool reads compressed-tensors pack-quantized weights that "
                "are symmetric int4 with group scales",
                file=file,
            )

        if qc.get("quant_method") not in (None, "compressed-tensors"):
            raise refuse(f"quant_method {qc.get('quant_method')!r}")
        if qc.get("format") != "pack-quantized":
            raise refuse(f"format {qc.get('format')!r}")
        groups = qc.get("config_groups")
        if not isinstance(groups, Mapping) or not groups:
            raise refuse("no config_groups")
        sizes = set()
        for name, group in groups.items():
            w = group.get("weights") if isinstance(group, Mapping) else None
            if not isinstance(w, Mapping):
                raise refuse(f"config_groups.{name} has no weights scheme")
            for key, want in (("num_bits", 4), ("type", "int"), ("symmetric", True), ("strategy", "group")):
                if w.get(key) != want:
                    raise refuse(f"config_groups.{name}.weights.{key} is {w.get(key)!r}, not {want!r}")
            if w.get("actorder") not in (None, False):
                # activation reordering permutes columns (a g_idx tensor); not read here
                raise refuse(f"config_groups.{name}.weights.actorder is {w.get('actorder')!r}")
            gs = w.get("group_size")
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1 or gs % PER_WORD:
                raise refuse(f"config_groups.{name}.weights.group_size is {gs!r}")
            sizes.add(gs)
        if len(sizes) != 1:
            raise refuse(f"config_groups use several group sizes {sorted(sizes)}")
        return cls(group_size=sizes.pop())


def stored_names(weight: str) -> tuple[str, str, str]:
    """The stored ``(weight_packed, weight_scale, weight_shape)`` names of logical weight ``X.weight``."""
    base = weight[: -len("weight")] if weight.endswith("weight") else weight + "."
    return base + PACKED, base + SCALE, base + SHAPE


def find_int4_config(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The compressed-tensors ``quantization_config`` of a checkpoint: top level, or in ``text_config``
    (where Kimi-K2.5 keeps it); None when there is none."""
    for holder in (config, config.get("text_config")):
        if isinstance(holder, Mapping):
            qc = holder.get("quantization_config")
            if isinstance(qc, Mapping) and (
                qc.get("quant_method") == "compressed-tensors" or "config_groups" in qc
            ):
                return qc
    return None


def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """``packed`` int32 ``[..., ceil(k/8)]`` -> int8 ``[..., k]`` values in ``[-8, 7]``."""
    if packed.dtype != torch.int32:
        raise InputError(f"weight_packed must be int32, got {packed.dtype}")
    if packed.shape[-1] * PER_WORD < k:
        raise InputError(f"weight_packed holds {packed.shape[-1] * PER_WORD} values per row, fewer than {k}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64, device=packed.device)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # [..., words, 8], value i of a word at bits 4i
    values = nibbles.reshape(*packed.shape[:-1], -1)[..., :k]
    return (values - 8).to(torch.int8)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Exact float32 values ``[N, k]`` of a packed INT4 weight: ``q · scale`` per group of a row.

    packed: int32 ``[N, ceil(k/8)]``; scale: any float dtype ``[N, k / group_size]``."""
    n = packed.shape[0]
    if k % group_size or tuple(scale.shape) != (n, k // group_size):
        raise InputError(
            f"weight_scale {list(scale.shape)} does not give one scale per {group_size} values of a "
            f"[{n}, {k}] weight"
        )
    q = unpack(packed, k).to(torch.float32).reshape(n, k // group_size, group_size)
    return (q * scale.to(torch.float32).unsqueeze(-1)).reshape(n, k)
