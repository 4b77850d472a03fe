"""Seeded tensor values: every tensor is generated in fixed-size chunks, each from its own generator
seeded by ``(seed, tensor name, chunk index)``, so a tensor's bytes depend neither on sharding, nor on
the order tensors are written, nor on how many threads generate them; a packed expert tensor holds
exactly the bytes of the per-expert tensors it stacks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

import torch

from moetool.testing.specs import TensorSpec

#: Elements per generated chunk: a tensor's values are a function of this constant (see module doc).
CHUNK_ELEMS = 1 << 22

#: ``init`` name -> (distribution, a, b): ``normal`` mean a std b; ``log_uniform``: log of U(a, b).
INITS: dict[str, tuple[str, float, float]] = {
    "weight": ("normal", 0.0, 0.02),
    "bias": ("normal", 0.0, 0.02),
    "norm": ("normal", 1.0, 0.02),  # RMSNorm weight, multiplies x
    "norm_zero": ("normal", 0.0, 0.02),  # zero-centred RMSNorm (Qwen3-Next): multiplies by 1 + w
    "conv": ("normal", 0.0, 0.2),  # depthwise causal conv: its fan-in is the kernel size (4), not H
    "a_log": ("log_uniform", 1.0, 16.0),  # GDN decay: A in U(1, 16) as transformers initialises it
    "dt_bias": ("normal", 1.0, 0.1),
    "score_bias": ("normal", 0.0, 0.02),
}


def _derive_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _chunk_count(numel: int) -> int:
    return max(1, -(-numel // CHUNK_ELEMS))


def generate_chunk(spec: TensorSpec, seed: int, index: int) -> torch.Tensor:
    """Chunk ``index`` (``CHUNK_ELEMS`` elements, the last one shorter) of a non-packed ``spec``: flat,
    ``spec.dtype``, from a generator seeded by ``(seed, spec.seed_name or spec.name, index)``."""
    start = index * CHUNK_ELEMS
    n = min(CHUNK_ELEMS, spec.numel - start)
    g = torch.Generator().manual_seed(_derive_seed(seed, spec.seed_name or spec.name, index))
    kind, a, b = INITS[spec.init]
    if kind == "normal":
        return torch.empty(n, dtype=spec.dtype).normal_(a, b, generator=g)
    return torch.empty(n, dtype=torch.float32).uniform_(a, b, generator=g).log_().to(spec.dtype)


def leaf_chunks(spec: TensorSpec) -> list[tuple[TensorSpec, int]]:
    """``(leaf spec, chunk index)`` pairs whose :func:`generate_chunk` outputs, concatenated, are
    ``spec``'s bytes in storage order (a packed tensor's parts in order, each in chunks)."""
    return [(part, i) for part in (spec.parts or (spec,)) for i in range(_chunk_count(part.numel))]


def generate_chunks(
    spec: TensorSpec, seed: int, *, map_fn: Callable[..., Iterable[torch.Tensor]] = map
) -> Iterator[torch.Tensor]:
    """``spec``'s values as flat chunks in storage order (a packed tensor: its parts in order).
    ``map_fn``: e.g. a thread pool's ordered ``map`` to generate chunks in parallel (torch releases
    the GIL while it fills a tensor); the bytes do not depend on it."""
    yield from map_fn(lambda pair: generate_chunk(pair[0], seed, pair[1]), leaf_chunks(spec))


def generate(spec: TensorSpec, seed: int) -> torch.Tensor:
    """``spec``'s whole tensor, ``spec.shape`` and ``spec.dtype``."""
    chunks = list(generate_chunks(spec, seed))
    flat = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return flat.view(spec.shape)
