#!/usr/bin/env python
"""Write a large synthetic MoE checkpoint for benchmarks: random weights (BF16 by default) under the
real tensor names of a family at its flagship's dimensions (DeepSeek-V3 experts 2048×7168, MLA
attention, ...), sharded like a Hub checkpoint.

The tensors, config.json and extra files are those of ``moetool.testing.factory.make_checkpoint``
with the same arguments and seed (same names, same bytes); this script only streams them: each shard's
header is written first, then every tensor chunk by chunk as a thread pool generates it, so memory
holds a few chunks (``CHUNK_ELEMS`` elements each), never a tensor or a shard. The checkpoint is
written into ``OUT.partial/`` and renamed to OUT when complete.

Sizing: give ``--size-gb`` and the script picks what you leave out — the expert count (closest to the
target, at most the flagship's) for ``--layers`` layers (default: the dense layers plus 2 MoE layers),
or the layer count for ``--experts``; when the flagship's expert count is reached it adds layers. Or
give ``--layers`` and ``--experts`` and no size. Unless ``--vocab`` is given, the vocabulary is the
flagship's, cut (to a multiple of 128) so that embeddings and lm_head stay within 10% of the target.

DeepSeek-V4 (``--family deepseek_v4``) is written in its release format at V4-Flash's dimensions: FP4
routed experts (random e2m1 bytes, E8M0 scales spanning 12 binades, so every block casts to FP8 exactly),
block-FP8 attention and shared experts with E8M0 scales, hash-routed first layers
(``moetool.testing.release_formats.write_v4_synthetic``); ``--size-gb`` picks the layer count for
``--experts`` (default 256).

Examples:
  python scripts/make_synthetic.py --family deepseek_v3 --size-gb 2.5 --out /tmp/dsv3-2g5
  python scripts/make_synthetic.py --family deepseek_v4 --size-gb 20 --out /data/dsv4-flash-20g
  python scripts/make_synthetic.py --family deepseek_v3 --layers 4 --experts 32 --out /tmp/dsv3 \\
      --max-shard-size 5GB
  python scripts/make_synthetic.py --family qwen3_moe --size-gb 20 --packed-experts --out /data/q3-20g
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from moetool.errors import UsageError
from moetool.testing.factory import (
    FAMILIES,
    DiskTensor,
    disk_tensors,
    family_config,
    family_defaults,
    flagship_arguments,
    generate_chunk,
    leaf_chunks,
    moe_layers,
    num_routed_experts,
    plan_shards,
    shard_file_names,
    tensor_specs,
    write_extra_files,
    write_index,
    write_json,
    write_safetensors,
)

T = TypeVar("T")
R = TypeVar("R")

_SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EMBEDDING_SHARE = 0.10  # embeddings + lm_head budget when the vocabulary is chosen for a target size
DEFAULT_MOE_LAYERS = 2


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5·10⁹, ``"500MiB"`` -> 500·2²⁰, ``"1234"`` -> 1234 bytes (as transformers reads
    ``max_shard_size``)."""
    t = text.strip().upper().replace(" ", "")
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            number = t[: -len(unit)]
            break
    else:
        unit, number = "B", t
    try:
        value = float(number)
    except ValueError:
        raise UsageError(f"cannot read size {text!r} (examples: 5GB, 500MiB, 1048576)") from None
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return int(value * _SIZE_UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_synthetic.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Sizing:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--family", required=True, choices=(*FAMILIES, "deepseek_v4"))
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    p.add_argument("--size-gb", type=float, help="target size in GB (10^9 bytes)")
    p.add_argument("--layers", type=int, help="decoder layers (dense + MoE)")
    p.add_argument("--experts", type=int, help="routed experts per MoE layer")
    p.add_argument("--preset", choices=("real", "tiny"), default="real",
                   help="real: the flagship's dimensions (default); tiny: the factory's small attention "
                        "geometry and 256/128 hidden/intermediate sizes (for quick runs)")  # fmt: skip
    p.add_argument("--hidden", type=int, help="hidden size (default from --preset)")
    p.add_argument("--moe-intermediate", type=int, help="expert intermediate size I (default from --preset)")
    p.add_argument("--intermediate", type=int, help="dense MLP intermediate size (default from --preset)")
    p.add_argument("--dense-layers", type=int, default=0, help="leading dense layers (default 0)")
    p.add_argument("--top-k", type=int, help="experts per token (default: the flagship's, at most --experts)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: see Sizing)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="bfloat16")
    p.add_argument("--packed-experts", action="store_true",
                   help="transformers-v5 packed experts (mlp.experts.gate_up_proj / down_proj)")  # fmt: skip
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generator threads")
    p.add_argument("--no-extra-files", action="store_true", help="skip tokenizer, generation config, LICENSE")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a checkpoint")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def _config(args: argparse.Namespace, layers: int, experts: int, vocab: int) -> dict[str, Any]:
    dims, overrides = flagship_arguments(args.family) if args.preset == "real" else ({}, {})
    hidden = args.hidden or dims.get("hidden_size", 256)
    inter = args.moe_intermediate or dims.get("moe_intermediate_size", 128)
    dense_inter = args.intermediate or dims.get("intermediate_size")
    top_k = args.top_k or min(int(dims.get("top_k", 2)), experts)
    shared = dims.get("shared")
    if shared is not None and family_defaults(args.family).shared_kind == "size":
        shared = shared * inter // dims["moe_intermediate_size"]  # keep the flagship's S / I when I changes
    return family_config(
        args.family,
        num_layers=layers,
        hidden_size=hidden,
        moe_intermediate_size=inter,
        intermediate_size=dense_inter,
        num_experts=experts,
        top_k=min(top_k, experts),
        shared=shared,
        dense_layers=args.dense_layers,
        vocab_size=vocab,
        dtype=_DTYPES[args.dtype],
        config_overrides=overrides,
    )


def _size(args: argparse.Namespace, layers: int, experts: int, vocab: int) -> int:
    cfg = _config(args, layers, experts, vocab)
    return sum(s.nbytes for s in tensor_specs(cfg, packed_experts=args.packed_experts))


def _closest(lo: int, hi: int, size: Callable[[int], int], target: int) -> int:
    """The n in [lo, hi] whose ``size(n)`` (increasing in n) is closest to ``target``."""
    a, b = lo, hi
    while a < b:  # first n with size(n) >= target
        mid = (a + b) // 2
        if size(mid) >= target:
            b = mid
        else:
            a = mid + 1
    candidates = {max(lo, a - 1), a}
    return min(candidates, key=lambda n: (abs(size(n) - target), n))


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The config.json of the checkpoint to write, sized per the rules in the module doc."""
    d = family_defaults(args.family)
    real_dims, _ = flagship_arguments(args.family)
    max_experts = int(real_dims["num_experts"]) if args.preset == "real" else 64
    given = [args.size_gb is not None, args.layers is not None, args.experts is not None]
    if all(given):
        raise UsageError("give --size-gb, or --layers and --experts, not all three")
    if args.size_gb is None and not (given[1] and given[2]):
        raise UsageError(
            "give --size-gb (and optionally one of --layers/--experts), or both --layers and --experts"
        )
    if args.dense_layers and d.naming == "mixtral":
        raise UsageError("mixtral has no dense layers: drop --dense-layers")
    probe_hidden = args.hidden or (real_dims["hidden_size"] if args.preset == "real" else 256)
    vocab = args.vocab
    if vocab is None:
        vocab = int(real_dims["vocab_size"]) if args.preset == "real" else 512
        if args.size_gb is not None:
            itemsize = torch.empty((), dtype=_DTYPES[args.dtype]).element_size()
            cap = int(EMBEDDING_SHARE * args.size_gb * 1e9 / (2 * probe_hidden * itemsize)) // 128 * 128
            vocab = max(min(vocab, cap), 384)
    if args.size_gb is None:
        return _config(args, args.layers, args.experts, vocab)
    target = int(args.size_gb * 1e9)
    min_layers = args.dense_layers + 1
    if args.experts is not None:
        return _config(args, _layers_for(args, min_layers, args.experts, vocab, target), args.experts, vocab)
    layers = args.layers if args.layers is not None else args.dense_layers + DEFAULT_MOE_LAYERS
    if layers < min_layers:
        raise UsageError(f"--layers must exceed --dense-layers ({args.dense_layers})")
    min_experts = args.top_k or 1
    experts = _closest(min_experts, max_experts, lambda e: _size(args, layers, e, vocab), target)
    if experts == max_experts and args.layers is None:
        layers = _layers_for(args, layers, experts, vocab, target)
    return _config(args, layers, experts, vocab)


def _layers_for(args: argparse.Namespace, min_layers: int, experts: int, vocab: int, target: int) -> int:
    """Layer count (at least ``min_layers``) whose size is closest to ``target``; the size grows by one
    MoE layer's bytes per layer, which bounds the search."""
    base = _size(args, min_layers, experts, vocab)
    per_layer = _size(args, min_layers + 1, experts, vocab) - base
    hi = min_layers + max(1, -(-(target - base) // per_layer)) + 1
    return _closest(min_layers, hi, lambda n: _size(args, n, experts, vocab), target)


def bounded_map(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], ahead: int
) -> Iterator[R]:
    """``map(fn, items)`` in order on ``pool``, at most ``ahead`` results pending (bounded memory)."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_shard(path: Path, shard: list[DiskTensor], seed: int, pool: ThreadPoolExecutor, ahead: int) -> int:
    """Stream one shard: every chunk of every tensor, generated ``ahead`` chunks in advance."""
    leaves = [leaf_chunks(t.source) for t in shard]
    flat = (leaf for per_tensor in leaves for leaf in per_tensor)
    stream = bounded_map(pool, lambda leaf: generate_chunk(leaf[0], seed, leaf[1]), flat, ahead)

    def produce(i: int) -> Iterator[torch.Tensor]:
        for _ in leaves[i]:
            yield next(stream)

    return write_safetensors(path, [(t.name, t.shape, t.dtype) for t in shard], produce)


def _prepare(out: Path, overwrite: bool) -> Path:
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        looks_like_checkpoint = (out / "config.json").exists() or any(out.glob("*.safetensors"))
        if not overwrite:
            raise UsageError(f"{out} exists (pass --overwrite to replace a checkpoint there)")
        if not looks_like_checkpoint:
            raise UsageError(f"{out} exists and holds no checkpoint; refusing to replace it")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Plan, write and return a summary (sizes, counts, seconds)."""
    if args.workers < 1:
        raise UsageError("--workers must be >= 1")
    config = plan(args)
    max_shard = parse_size(args.max_shard_size)
    specs = tensor_specs(config, packed_experts=args.packed_experts)
    disk = disk_tensors(specs)
    shards = plan_shards(disk, max_shard)
    names = shard_file_names(len(shards))
    total = sum(t.nbytes for t in disk)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(
        f"{args.family}: {config['num_hidden_layers']} layers, {len(moe_layers(config))} MoE x "
        f"{num_routed_experts(config)} experts, hidden {config['hidden_size']}, vocab {config['vocab_size']}: "
        f"{len(disk)} tensors, {total / 1e9:.3f} GB in {len(shards)} shard(s)"
    )
    partial = _prepare(args.out, args.overwrite)
    start = time.perf_counter()
    written = 0
    try:
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            for shard, fname in zip(shards, names):
                t0 = time.perf_counter()
                size = write_shard(partial / fname, shard, args.seed, pool, ahead=2 * args.workers)
                written += size
                dt = time.perf_counter() - t0
                log(
                    f"  {fname}: {size / 1e9:.3f} GB, {len(shard)} tensors, {dt:.1f} s ({size / dt / 1e9:.2f} GB/s)"
                )
        if len(shards) > 1:
            write_index(partial, shards, names)
        write_json(partial / "config.json", config)
        if not args.no_extra_files:
            write_extra_files(partial, config)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed or interrupted run leaves nothing behind
        raise
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(partial, args.out)
    seconds = time.perf_counter() - start
    summary = {
        "out": str(args.out),
        "family": args.family,
        "layers": config["num_hidden_layers"],
        "moe_layers": len(moe_layers(config)),
        "experts": num_routed_experts(config),
        "vocab_size": config["vocab_size"],
        "tensors": len(disk),
        "shards": len(shards),
        "bytes": written,
        "seconds": round(seconds, 3),
    }
    log(
        f"wrote {args.out}: {written / 1e9:.3f} GB in {seconds:.1f} s ({written / 1e9 / max(seconds, 1e-9):.2f} GB/s)"
    )
    return summary


def run_v4(args: argparse.Namespace) -> dict[str, Any]:
    """DeepSeek-V4 in its release format (module docstring)."""
    from moetool.testing.release_formats import V4_FLASH, v4_synthetic_layers, write_v4_synthetic

    experts = args.experts or V4_FLASH["n_routed_experts"]
    if args.layers:
        layers = args.layers
    elif args.size_gb:
        layers = v4_synthetic_layers(int(args.size_gb * 1e9), experts)
    else:
        raise UsageError("give --size-gb or --layers")
    partial = _prepare(args.out, args.overwrite)
    shutil.rmtree(partial)  # write_v4_synthetic makes the folder itself
    start = time.perf_counter()
    try:
        written = write_v4_synthetic(
            partial,
            num_layers=layers,
            num_experts=experts,
            vocab=args.vocab,
            seed=args.seed,
            max_shard_bytes=parse_size(args.max_shard_size),
            workers=args.workers,
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(partial, args.out)
    seconds = time.perf_counter() - start
    if not args.quiet:
        print(f"wrote {args.out}: {written / 1e9:.3f} GB in {seconds:.1f} s", file=sys.stderr)
    return {
        "out": str(args.out),
        "family": "deepseek_v4",
        "layers": layers,
        "experts": experts,
        "bytes": written,
        "seconds": round(seconds, 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_v4(args) if args.family == "deepseek_v4" else run(args)
    except (UsageError, ValueError) as err:
        print(f"make_synthetic.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
