"""``moetool fuse-shared``: the plan that folds shared experts into the routed-expert tensors (docs/contract.md §7).

A shared expert of intermediate ``S`` becomes ``m = S / I`` slots; with ``R`` replicas, slot index
``idx = r·m + j`` (replica-major) is stored as expert ``E + idx`` and takes gate/up rows and down
columns ``[jI, (j+1)I)`` of the shared expert. Pure byte copies: BF16 stays BF16, FP8 bytes and their
128×128 scale blocks are sliced exactly (which needs ``I % 128 == 0``), so ``quantize`` then
``fuse-shared`` equals ``fuse-shared`` then ``quantize`` byte for byte.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from moetool import __version__
from moetool.engines import marked, refusal
from moetool.errors import PlanError, UsageError
from moetool.io.safetensors_format import ITEMSIZE
from moetool.model import (
    E8M0_DTYPE,
    FP8_DTYPES,
    CheckpointView,
    check_fp8_scale,
    e8m0_scale_name,
    scale_name,
)
from moetool.plan import Job, OutTensor, Plan, Src, Unit, Write, pack_shards
from moetool.quantize import natural_key
from moetool.transforms.fp8_block import BLOCK, cdiv
from moetool.transforms.shared_fusion import fused_config


@dataclass(frozen=True)
class FuseOptions:
    replicas: int = 1
    max_shard_size: int = 5 * 10**9


def _copy(name: str, view: CheckpointView) -> Unit:
    t = view.ckpt.tensors[name]
    return Unit((OutTensor(name, t.dtype, t.shape),), (Job("copy", (Src(name),), (Write(name),)),))


def plan_fuse(view: CheckpointView, opts: FuseOptions) -> Plan:
    ckpt, info, arch = view.ckpt, view.info, view.arch
    root = str(ckpt.root)
    if opts.replicas < 1:
        raise UsageError("--replicas must be at least 1")
    if view.fused:
        raise PlanError(
            "shared experts are already fused (config.json has moetool_fused_shared_experts)",
            file=str(ckpt.root / "config.json"),
            fix="fuse the original checkpoint instead",
        )
    if not arch.has_shared or not info.shared_intermediate_size:
        raise PlanError(
            f"{arch.family} checkpoints have no shared experts to fuse",
            file=root,
            fix="nothing to do; use the checkpoint as it is",
        )
    inter, hidden, n_routed = info.moe_intermediate_size, info.hidden_size, info.num_experts
    s_size = info.shared_intermediate_size
    if s_size % inter:
        raise PlanError(
            f"shared expert intermediate {s_size} is not a multiple of moe_intermediate_size {inter}",
            file=str(ckpt.root / "config.json"),
            fix="this model's shared expert cannot become slots",
        )
    if opts.replicas > n_routed:
        # Each replica is there for one expert-parallel rank, and a model is spread over at most as many
        # ranks as it has routed experts; the bound also keeps the output within (1 + m) times the
        # routed experts' bytes.
        raise UsageError(
            f"--replicas {opts.replicas} is more than the {n_routed} routed experts",
            fix=f"a replica serves one expert-parallel rank, and there are at most {n_routed} of those; "
            f"use --replicas {n_routed} or fewer",
        )
    m, reps = s_size // inter, opts.replicas
    total = n_routed + m * reps
    consumed: set[str] = set()
    units: list[Unit] = []
    for layer, store in sorted(view.stores.items()):
        sh = view.shared.get(layer)
        if sh is None:
            raise PlanError(
                f"MoE layer {layer} has no shared expert tensors",
                file=root,
                tensor=arch.shared_prefix(layer) or "",
            )
        if store.int4_group:
            raise PlanError(
                "routed experts are INT4 (compressed-tensors) and the shared expert is not: the slots "
                "would sit in a layer of another precision",
                file=root,
                tensor=store.prefix,
                fix="quantize to FP8 first (moetool quantize), then fuse-shared",
            )
        fp8 = store.fp8
        if store.fp4:
            raise PlanError(
                "routed experts are FP4: fusion copies FP8 bytes, and the FP4 experts have no 128x128 blocks",
                file=root,
                tensor=store.prefix,
                fix="moetool quantize the checkpoint first (FP4 experts become FP8), then fuse-shared",
            )
        if sh.fp8 != fp8:
            raise PlanError(
                "routed experts and shared expert differ in precision",
                file=root,
                tensor=sh.gate,
                fix="quantize both (the default --targets experts does) or neither",
            )
        if fp8 and inter % BLOCK:
            raise PlanError(
                f"FP8 slices need moe_intermediate_size % 128 == 0, got {inter}",
                file=root,
                tensor=sh.gate,
                fix="fuse the BF16 checkpoint, then quantize",
            )
        if store.kind == "deepgemm" and ckpt.tensors[store.stacked["w13_weight_scale_inv"]].dtype != "F32":
            raise PlanError(
                "cannot fuse into SM100-packed scales",
                file=root,
                tensor=store.stacked["w13_weight_scale_inv"],
                fix="fuse the sm90 (or BF16) checkpoint, then quantize with --scale-layout sm100",
            )
        if fp8:  # FP8 experts are sliced in 128-row scale blocks: their scales must be the block grid
            for n in (*store.names, *sh.names):
                if ckpt.tensors[n].dtype in FP8_DTYPES:
                    check_fp8_scale(ckpt, n)
        consumed.update(sh.names)
        consumed.update(store.names)
        slots = [(r * m + j, j) for r in range(reps) for j in range(m)]
        rows = {j: (j * inter, (j + 1) * inter) for j in range(m)}
        if store.kind == "per_expert":
            for name in store.names:
                units.append(_copy(name, view))
            # slots take the routed experts' scale convention: weight_scale_inv F32, or DeepSeek-V4's
            # E8M0 .scale (a shared expert's F32 scales can only become E8M0 when they are powers of two,
            # which the pipeline's store would refuse otherwise)
            first = f"{store.prefix}.0.{store.proj['gate']}.weight"
            e8m0 = e8m0_scale_name(first) in ckpt.tensors
            for idx, j in slots:
                e = n_routed + idx
                for proj, src, shape in (
                    ("gate", Src(sh.gate, rows=rows[j]), (inter, hidden)),
                    ("up", Src(sh.up, rows=rows[j]), (inter, hidden)),
                    ("down", Src(sh.down, cols=rows[j]), (hidden, inter)),
                ):
                    name = f"{store.prefix}.{e}.{store.proj[proj]}.weight"
                    q = OutTensor(name, store.dtype, shape)
                    if fp8:
                        s = OutTensor(
                            e8m0_scale_name(name) if e8m0 else scale_name(name),
                            E8M0_DTYPE if e8m0 else "F32",
                            (cdiv(shape[0], BLOCK), cdiv(shape[1], BLOCK)),
                        )
                        units.append(Unit((q, s), (Job("copy", (src,), (Write(q.name), Write(s.name))),)))
                    else:
                        units.append(Unit((q,), (Job("copy", (src,), (Write(q.name),)),)))
        else:
            if store.kind == "deepgemm":
                held = store.stacked
                names = arch.deepgemm_names(layer)  # written under today's names, whatever the input used
            else:
                held = store.stacked
                names = {"w13_weight": held["w13_weight"], "w2_weight": held["w2_weight"]}
            pairs = (
                ("w13", held["w13_weight"], names["w13_weight"], 2 * inter, hidden),
                ("w2", held["w2_weight"], names["w2_weight"], hidden, inter),
            )
            for tag, held_name, name, n, k in pairs:
                isz = ITEMSIZE[store.dtype]
                q = OutTensor(name, store.dtype, (total, n, k))
                tensors = [q]
                jobs: list[Job] = []
                copies = [(held_name, name)]
                if fp8:
                    s = OutTensor(scale_name(name), "F32", (total, cdiv(n, BLOCK), cdiv(k, BLOCK)))
                    tensors.append(s)
                    copies.append((scale_name(held_name), scale_name(name)))
                for src_name, out_name in copies:
                    jobs.append(Job("copy", (Src(src_name),), (Write(out_name),)))
                s_row = 4 * cdiv(k, BLOCK)  # bytes of one 128-row block of scales
                for idx, j in slots:
                    e = n_routed + idx
                    if tag == "w13":
                        parts = ((Src(sh.gate, rows=rows[j]), 0), (Src(sh.up, rows=rows[j]), inter))
                    else:
                        parts = ((Src(sh.down, cols=rows[j]), 0),)
                    for src, row0 in parts:
                        writes = [Write(name, (e * n + row0) * k * isz)]
                        if fp8:
                            writes.append(
                                Write(scale_name(name), (e * cdiv(n, BLOCK) + row0 // BLOCK) * s_row)
                            )
                        jobs.append(Job("copy", (src,), tuple(writes)))
                units.append(Unit(tuple(tensors), tuple(jobs)))
    for name in ckpt.tensors:
        if name in consumed:
            continue
        units.append(_copy(name, view))  # shared_expert_gate.weight stays (docs/contract.md §7)
    units.sort(key=lambda u: natural_key(u.tensors[0].name))
    cfg = fused_config(copy.deepcopy(view.config), n_routed, m, reps, arch.slot_weight or "one")
    cfg = marked(cfg, refusal(view.layout, fused=True))  # no engine adds fused slots as the contract says
    return Plan(
        command="fuse-shared",
        options={"replicas": reps, "max_shard_size": opts.max_shard_size},
        layout=view.layout,
        shards=pack_shards(units, opts.max_shard_size),
        config=cfg,
        copy_files=tuple(ckpt.other_files()),
        shard_metadata={
            "format": "pt",
            "moetool.layout": _shard_layout(view),
            "moetool.version": __version__,
        },
        notes=(f"{m} slot(s) x {reps} replica(s) per MoE layer, experts {n_routed}..{total - 1}",),
    )


def _shard_layout(view: CheckpointView) -> str:
    return "deepgemm" if view.layout == "deepgemm" else "hf"
