"""``validate``'s options and the read budget that bounds its memory."""

from __future__ import annotations

from dataclasses import dataclass

from moetool.errors import UsageError


@dataclass(frozen=True)
class ValidateOptions:
    device: str = "auto"
    backend: str = "auto"  # auto | triton | deepgemm (torch references when the device is the CPU)
    layers: tuple[int, ...] | None = None
    experts: int | None = None  # sample this many experts per layer (all when None)
    tokens: int = 128
    seed: int = 0
    checks: tuple[str, ...] = ("structure", "tensors", "kernels", "moe")
    ssm_steps: int = 4
    #: most bytes of one read step; a layer above it is read in chunks of whole experts (a tensor larger
    #: than the budget gets a step of its own). None: ``default_read_budget``.
    read_budget: int | None = None
    family: str | None = None  # --family: read an unknown model_type as this family (both checkpoints)
    #: where the structure check's sha256 of the converted files takes their bytes: ``reads`` (from the
    #: other checks' read buffers, each byte read once), ``files`` (a thread per file reading it
    #: itself, never waiting for the reader), ``auto`` (:func:`hashes_from_reads`)
    hash_source: str = "auto"


HASH_SOURCES = ("auto", "reads", "files")


def hashes_from_reads(hash_source: str, device_type: str) -> bool:
    """Whether the converted files' sha256 comes from the checks' read buffers. ``auto``: on the CPU,
    where the checks keep the cores busy and each byte read once is time saved; not on CUDA, where the
    host's cores are otherwise idle and a hash fed from the buffers waits for the reader to reach its
    file's steps (the files take turns), which on an H200 with a warm page cache made the hashes, not
    the reads or the checks, end the pass (docs/benchmarks.md)."""
    if hash_source not in HASH_SOURCES:
        raise UsageError(f"hash_source {hash_source!r}: one of {', '.join(HASH_SOURCES)}")
    return hash_source == "reads" or (hash_source == "auto" and device_type != "cuda")


MIN_READ_BUDGET = 1 << 30


def default_read_budget(largest: int) -> int:
    """Bytes per read step for a checkpoint pair whose largest tensor read whole (anything but the
    stacked experts, which are read expert by expert, and the matrices outside them that are read in
    runs of rows: ``ReadSchedule.splittable``) has ``largest`` bytes: twice that, so a tensor and its
    original fit one step, and at least 1 GiB, so a step's reads still spread over every reader thread
    in 32 MiB pieces. Runs of rows keep a large embedding or LM head (1.85 GB each in DeepSeek-V3) from
    sizing the buffers: on CUDA they are pinned, and pinned memory costs its time to lock and to let
    go. Two buffers of it bound the host memory like quantize's 4 x largest tensor (+ 1 GB), whatever
    the number of experts per layer."""
    return max(MIN_READ_BUDGET, 2 * largest)
