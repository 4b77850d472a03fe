"""Host time per call of a GPU launch, shared by the benchmark scripts (imported from ``scripts/``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def host_seconds(fn: Callable[[], object], n: int = 2000, warmup: int = 10) -> float:
    """Seconds of host time per call of ``fn``: ``n`` launches queued without waiting for the GPU. When
    the GPU keeps up (a small kernel), this is what each call costs a loop that does not use graphs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n
