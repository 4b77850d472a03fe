"""The read schedule of ``validate``: which bytes of both checkpoints each step reads, and where in the
step's buffer they land.

Every MoE layer with work is one :class:`LayerStep`: the original's experts (and shared expert), the
converted experts and the router tensors, read once into one buffer and shared by every layer check.
Each expert's gate/up sources are read straight into ``{side}|w13[k]`` and its down source into
``{side}|w2[k]`` (scales alike, ``regions.Stack``), so the stacks the kernels take need no copy. A layer
larger than the read budget is read as :class:`Chunk` s instead (its whole tensors, then runs of whole
experts). The non-expert tensors not read with a layer are read in :class:`OthersStep` s of at most
the largest layer step, between the layer steps where they lie in the converted files. Fields are
named ``o:NAME`` / ``c:NAME`` for whole tensors of the original / converted checkpoint and ``o|w13``
... for stacks.
"""

from __future__ import annotations

import bisect
import math
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moetool.errors import InputError, InternalError, UsageError
from moetool.io import prefetch
from moetool.io.checkpoint import Checkpoint
from moetool.io.fs import real_path
from moetool.io.prefetch import Field, ReadPlan
from moetool.model import CheckpointView, e8m0_scale_name, find_scale, require_scale, scale_name
from moetool.plan import Src
from moetool.transforms import fp8_block
from moetool.validate.options import ValidateOptions, default_read_budget
from moetool.validate.regions import Stack, expected_sources, stored_regions

if TYPE_CHECKING:
    pass


@dataclass
class LayerStep:
    """One MoE layer's work: the stored experts read (all of them when the MoE check runs), the
    experts each check takes (None: the check does not run here), and the other tensors compared
    from this batch because the MoE check reads them anyway (router, unfused shared expert)."""

    layer: int
    experts: list[int]
    tensors: list[int] | None
    kernels: list[int] | None
    moe: bool
    others: list[str] = field(default_factory=list)
    orig: Stack | None = None
    conv: Stack | None = None
    layout: dict[str, Field] = field(default_factory=dict)  # the whole layer's fields


@dataclass
class Chunk:
    """Part ``index`` of ``count`` of a layer step read in several: whole tensors (``experts`` empty) or
    the experts ``step.experts[start:start + len(experts)]``, which are at index ``start`` on in the
    step's converted stack and, for the routed ones, in its original stack too (routed experts come
    first). ``orig``/``conv``: the same experts as stacked in this chunk's own batch."""

    step: LayerStep
    index: int
    count: int
    start: int = 0
    experts: list[int] = field(default_factory=list)
    orig: Stack | None = None
    conv: Stack | None = None


@dataclass
class OthersStep:
    """Non-expert tensors compared byte for byte (or against the recipe when quantized in place); a
    tensor larger than a step comes in runs of rows (``rows``: ``name`` -> ``(r0, r1)``,
    ``r0`` on a 128-block boundary), one step each, in row order."""

    names: list[str]
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)


class ReadSchedule:
    """Plans the reads of one ``validate`` run over ``orig`` and ``conv``: which layers and experts each
    check takes (a seeded sample with ``--experts``), and the :class:`ReadPlan` of every step."""

    def __init__(self, orig: CheckpointView, conv: CheckpointView, opts: ValidateOptions) -> None:
        self.orig, self.conv, self.opts = orig, conv, opts
        self.o_ck, self.c_ck = orig.ckpt, conv.ckpt
        self.rng = random.Random(opts.seed)
        self._others: list[str] | None = None
        #: each converted shard (as ``TensorInfo.file`` names it) by its place in the shard list
        self._ranks = {
            os.fspath(real_path(self.c_ck.root / rel)): i for i, rel in enumerate(self.c_ck.shard_files)
        }
        self.read_budget = (
            max(1, opts.read_budget) if opts.read_budget is not None else default_read_budget(self._largest())
        )

    def _largest(self) -> int:
        """Bytes of the largest tensor read whole (stacked experts are read expert by expert, the other
        tensors that can be are read in runs of rows: :meth:`splittable`)."""
        stacked = {n for v in (self.orig, self.conv) for s in v.stores.values() for n in s.names}
        split = {x for n in self.others_names() if self.splittable(n) for x in self._with_scales(n)}
        return max(
            (
                t.nbytes
                for ck in (self.o_ck, self.c_ck)
                for n, t in ck.tensors.items()
                if n not in stacked and n not in split
            ),
            default=0,
        )

    def _with_scales(self, name: str) -> list[str]:
        """``name`` and the block scales either checkpoint keeps beside it."""
        return [name] + [s for ck in (self.o_ck, self.c_ck) if (s := find_scale(ck.tensors, name))]

    def splittable(self, name: str) -> bool:
        """Whether other tensor ``name`` can be read and compared in runs of rows: a matrix of the same
        shape in both checkpoints, float in the original, and in the converted one the same dtype (a
        copy) or block FP8 with one scale per 128 x 128 block (quantized in place), so that a run
        starting on a block boundary carries exactly its own scale rows."""
        o, c = self.o_ck.info(name), self.c_ck.info(name)
        if len(o.shape) != 2 or tuple(o.shape) != tuple(c.shape) or o.shape[0] <= fp8_block.BLOCK:
            return False
        if (
            not o.torch_dtype.is_floating_point
            or o.torch_dtype.itemsize == 1
            or find_scale(self.o_ck.tensors, name)
        ):
            return False
        scale = find_scale(self.c_ck.tensors, name)
        if c.dtype == o.dtype and not scale:
            return True
        blocks = [fp8_block.cdiv(d, fp8_block.BLOCK) for d in o.shape]
        return (
            c.dtype == "F8_E4M3"
            and scale is not None
            and scale == scale_name(name)
            and list(self.c_ck.info(scale).shape) == blocks
        )

    def layers(self) -> list[int]:
        layers = sorted(self.conv.stores)
        if self.opts.layers is not None:
            bad = sorted(set(self.opts.layers) - set(layers))
            if bad:
                raise UsageError(f"--layers {bad} are not MoE layers (MoE layers: {layers})")
            layers = [x for x in layers if x in self.opts.layers]
        return layers

    def experts(self, layer: int) -> list[int]:
        n = self.conv.stores[layer].num_experts
        if self.opts.experts is None or self.opts.experts >= n:
            return list(range(n))
        routed = self.orig.info.num_experts
        pick = sorted(self.rng.sample(range(routed), min(self.opts.experts, routed)))
        return pick + list(range(routed, n))  # fused slots are always checked

    def steps(self, layers: list[int]) -> list[LayerStep]:
        """One step per layer with work. Expert samples are drawn in a fixed order (every layer's tensors
        sample, then each layer's kernels sample), so a seed always picks the same experts."""
        checks = self.opts.checks
        t_exp = {layer: self.experts(layer) for layer in layers} if "tensors" in checks else {}
        k_exp = {}
        if "kernels" in checks:
            k_exp = {layer: self.experts(layer) for layer in layers if self.conv.stores[layer].fp8}
        steps = []
        for layer in layers:
            store = self.conv.stores[layer]
            moe = "moe" in checks and (store.fp8 or bool(self.conv.fused))
            t, k = t_exp.get(layer), k_exp.get(layer)
            if moe:
                experts = list(range(store.num_experts))
            else:
                experts = sorted(set(t or []) | set(k or []))
            if t is None and k is None and not moe:
                continue
            steps.append(LayerStep(layer, experts, t, k, moe))
        return steps

    def others_names(self) -> list[str]:
        """Converted tensors outside the routed experts that the original also has, in name order: copied
        (bytes equal) or quantized in place (the recipe), an unfused shared expert included."""
        if self._others is None:
            routed = {n for s in self.conv.stores.values() for n in s.names}
            self._others = [
                name
                for name in sorted(self.c_ck.tensors)
                if name not in routed and not name.endswith("_scale_inv") and name in self.o_ck.tensors
            ]
        return self._others

    def _plan_whole(self, plan: ReadPlan, side: str, name: str, rows: tuple[int, int] | None = None) -> None:
        """Field ``{side}:{name}``: the whole tensor (or its ``rows``), and its ``weight_scale_inv`` (the
        blocks covering them) when it is FP8."""
        ck = self.o_ck if side == "o" else self.c_ck
        key = f"{side}:{name}"
        if key in plan.fields:
            return
        plan.tensor(key, ck, name, rows)
        sname = find_scale(ck.tensors, name)
        if ck.info(name).dtype == "F8_E4M3" and sname and f"{side}:{sname}" not in plan.fields:
            plan.tensor(f"{side}:{sname}", ck, sname, fp8_block.scale_span(rows))

    def _plan_stack(
        self, plan: ReadPlan, prefix: str, ck: Checkpoint, items: list[tuple[int, tuple[Src, ...], Src]]
    ) -> Stack:
        """Read each expert's gate/up sources straight into ``{prefix}w13[k]`` and its down source into
        ``{prefix}w2[k]`` (scales alike), so the stacks the kernels take need no copy."""

        def region(src: Src, scale: bool = False) -> tuple[str, tuple[int, int] | None, list[int]]:
            if src.cols:
                raise InternalError("a stacked expert source cannot slice columns", tensor=src.name)
            name, rows = src.name, src.rows
            if scale:
                name = require_scale(ck.tensors, src.name, file=str(ck.root), what="quantized expert")
                if not fp4:  # FP4 scales have a row per weight row; FP8's one per 128
                    rows = fp8_block.scale_span(rows)
            info, _, _, shape = ck.region(name, rows, expert=src.expert)
            return info.dtype, rows, shape

        def scale_of(src: Src) -> str:
            return find_scale(ck.tensors, src.name) or scale_name(src.name)

        n = len(items)
        _, gu0, d0 = items[0]
        if gu0[0].name not in ck:
            return self._plan_int4_stack(plan, prefix, ck, items)
        info0 = ck.info(gu0[0].name)
        fp8 = info0.dtype == "F8_E4M3"
        fp4 = info0.dtype == "I8" and e8m0_scale_name(gu0[0].name) in ck
        parts, shapes, r = [], [], 0
        for src in gu0:
            _, _, shape = region(src)
            parts.append((r, r + shape[0]))
            shapes.append(shape)
            r += shape[0]
        inner = shapes[0][1:]
        row = math.prod(inner)
        _, _, d_shape = region(d0)
        plan.field(prefix + "w13", info0.torch_dtype, (n, r, *inner))
        plan.field(prefix + "w2", info0.torch_dtype, (n, *d_shape))
        sparts: list[tuple[int, int]] | None = None
        whole = False
        if fp8 or fp4:
            s_dtype, _, _ = region(gu0[0], scale=True)
            s_torch = ck.info(scale_of(gu0[0])).torch_dtype
            whole = s_dtype == "I32"  # SM100 scales: one packed block per expert, not per source
            if whole:
                w_scale = Src(gu0[0].name, expert=gu0[0].expert)
                _, _, s13_shape = region(w_scale, scale=True)
                s13_shape = [n, *s13_shape]
            else:
                sparts, sr = [], 0
                for src in gu0:
                    _, _, shape = region(src, scale=True)
                    sparts.append((sr, sr + shape[0]))
                    sr += shape[0]
                s13_shape = [n, sr, *shape[1:]]
            _, _, s2_shape = region(d0, scale=True)
            plan.field(prefix + "s13", s_torch, s13_shape)
            plan.field(prefix + "s2", ck.info(scale_of(d0)).torch_dtype, (n, *s2_shape))
        for k, (_, gu, d) in enumerate(items):
            if len(gu) != len(parts):
                raise InputError("experts of one layer differ in their sources", tensor=gu[0].name)
            for src, (r0, r1) in zip(gu, parts):
                if region(src)[2] != [r1 - r0, *inner]:
                    raise InputError("experts of one layer differ in shape", tensor=src.name)
                plan.read(prefix + "w13", ck, src.name, src.rows, expert=src.expert, at=(k * r + r0) * row)
            if region(d)[2] != d_shape:
                raise InputError("experts of one layer differ in shape", tensor=d.name)
            plan.read(prefix + "w2", ck, d.name, d.rows, expert=d.expert, at=k * math.prod(d_shape))
            if not (fp8 or fp4):
                continue
            if whole:
                f = plan.fields[prefix + "s13"]
                per = math.prod(f.shape[1:])
                plan.read(prefix + "s13", ck, scale_of(gu[0]), expert=gu[0].expert, at=k * per)
            else:
                f = plan.fields[prefix + "s13"]
                per, srow = math.prod(f.shape[1:]), math.prod(f.shape[2:])
                for src, (s0, _) in zip(gu, sparts or []):
                    _, rows, _ = region(src, scale=True)
                    at = k * per + s0 * srow
                    plan.read(prefix + "s13", ck, scale_of(src), rows, expert=src.expert, at=at)
            _, rows, _ = region(d, scale=True)
            at = k * math.prod(plan.fields[prefix + "s2"].shape[1:])
            plan.read(prefix + "s2", ck, scale_of(d), rows, expert=d.expert, at=at)
        return Stack(prefix, [e for e, _, _ in items], parts, sparts, fp8, whole, fp4=fp4)

    def _plan_int4_stack(
        self, plan: ReadPlan, prefix: str, ck: Checkpoint, items: list[tuple[int, tuple[Src, ...], Src]]
    ) -> Stack:
        """``_plan_stack`` for compressed-tensors INT4 experts (per-expert ``weight_packed`` and
        ``weight_scale``, named by their logical ``...weight``): the packed words and the scales are
        stacked row for row, dequantized when a check asks (``Stack.int4_values``)."""
        from moetool.transforms import int4

        qc = int4.find_int4_config(ck.config)
        if qc is None:
            raise InputError(
                "INT4 experts without a compressed-tensors quantization_config", file=str(ck.root)
            )
        group = int4.Int4Scheme.from_config(qc, file=str(ck.root / "config.json")).group_size
        _, gu0, d0 = items[0]

        def stored(src: Src) -> tuple[str, str]:
            if src.cols or src.expert is not None or src.rows:
                raise InternalError("INT4 experts are read whole, per expert", tensor=src.name)
            packed, scale, _ = int4.stored_names(src.name)
            for name in (packed, scale):
                if name not in ck:
                    raise InputError("INT4 expert tensor missing", file=str(ck.root), tensor=name)
            return packed, scale

        parts, r = [], 0
        for src in gu0:
            rows = ck.info(stored(src)[0]).shape[0]
            parts.append((r, r + rows))
            r += rows
        n = len(items)
        p13, s13 = (ck.info(x) for x in stored(gu0[0]))
        p2, s2 = (ck.info(x) for x in stored(d0))
        plan.field(prefix + "w13", torch.int32, (n, r, p13.shape[1]))
        plan.field(prefix + "s13", s13.torch_dtype, (n, r, s13.shape[1]))
        plan.field(prefix + "w2", torch.int32, (n, *p2.shape))
        plan.field(prefix + "s2", s2.torch_dtype, (n, *s2.shape))
        for k, (_, gu, d) in enumerate(items):
            for src, (r0, r1) in zip(gu, parts, strict=True):
                packed, scale = stored(src)
                if ck.info(packed).shape != (r1 - r0, p13.shape[1]) or ck.info(scale).shape != (
                    r1 - r0,
                    s13.shape[1],
                ):
                    raise InputError("experts of one layer differ in shape", tensor=packed)
                plan.read(prefix + "w13", ck, packed, None, at=(k * r + r0) * p13.shape[1])
                plan.read(prefix + "s13", ck, scale, None, at=(k * r + r0) * s13.shape[1])
            packed, scale = stored(d)
            if ck.info(packed).shape != p2.shape or ck.info(scale).shape != s2.shape:
                raise InputError("experts of one layer differ in shape", tensor=packed)
            plan.read(prefix + "w2", ck, packed, None, at=k * math.prod(p2.shape))
            plan.read(prefix + "s2", ck, scale, None, at=k * math.prod(s2.shape))
        return Stack(prefix, [e for e, _, _ in items], parts, None, False, False, int4_group=group)

    def _items(
        self, step: LayerStep
    ) -> tuple[list[tuple[int, tuple[Src, ...], Src]], list[tuple[int, tuple[Src, ...], Src]]]:
        """The (expert, gate/up sources, down source) of the step's routed original experts and of its
        converted experts, in ``step.experts`` order."""
        o, c, layer = self.orig, self.conv, step.layer
        routed = [e for e in step.experts if e < o.info.num_experts]
        o_items = [(e, *expected_sources(o, c, layer, e)) for e in routed]
        c_items: list[tuple[int, tuple[Src, ...], Src]] = []
        for e in step.experts:
            gate, up, down = stored_regions(c, layer, e)
            c_items.append((e, (gate, up), down))
        return o_items, c_items

    def layer_plans(self, step: LayerStep) -> list[ReadPlan]:
        """The step as one plan when it fits the read budget, else as chunks of at most the budget:
        its whole tensors, then runs of experts (an expert's tensors never split; anything larger
        than the budget alone in its chunk). Chunks are labelled ``Chunk`` in reading order."""
        full = self.plan(step)
        step.layout = dict(full.fields)
        budget = self.read_budget
        if full.nbytes <= budget:
            return [full]
        groups: list[tuple[list[str], list[int]]] = []  # (whole-tensor keys, expert positions)
        size = 0
        for key, f in full.fields.items():
            if key[1] == "|":
                continue
            need = f.nbytes + prefetch.ALIGN
            if not groups or size + need > budget:
                groups.append(([], []))
                size = 0
            groups[-1][0].append(key)
            size += need
        n_orig = len(step.orig.experts) if step.orig is not None else 0
        per = {k: f.nbytes // max(f.shape[0], 1) for k, f in full.fields.items() if k[1] == "|"}
        base = len(per) * prefetch.ALIGN
        first_experts = len(groups)
        for i in range(len(step.experts)):
            need = sum(n for k, n in per.items() if k[0] == "c" or i < n_orig)
            if len(groups) == first_experts or size + need > budget:
                groups.append(([], []))
                size = base
            groups[-1][1].append(i)
            size += need
        o_items, c_items = self._items(step)
        plans = []
        for index, (keys, positions) in enumerate(groups):
            start = positions[0] if positions else 0
            chunk = Chunk(step, index, len(groups), start, [step.experts[i] for i in positions])
            plan = ReadPlan(chunk)
            for key in keys:
                plan.tensor(key, self.o_ck if key[0] == "o" else self.c_ck, key[2:])
            if positions:
                end = positions[-1] + 1
                if start < n_orig:
                    chunk.orig = self._plan_stack(plan, "o|", self.o_ck, o_items[start : min(end, n_orig)])
                chunk.conv = self._plan_stack(plan, "c|", self.c_ck, c_items[start:end])
            plans.append(plan)
        return plans

    def plan(self, step: LayerStep | OthersStep) -> ReadPlan:
        plan = ReadPlan(step)
        if isinstance(step, OthersStep):
            for name in step.names:
                self._plan_whole(plan, "o", name, step.rows.get(name))
                self._plan_whole(plan, "c", name, step.rows.get(name))
            return plan
        o, c, layer = self.orig, self.conv, step.layer
        o_items, c_items = self._items(step)
        if o_items:
            step.orig = self._plan_stack(plan, "o|", self.o_ck, o_items)
        sh = o.shared.get(layer)
        if sh is not None and (step.moe or len(o_items) < len(step.experts)):
            for name in (sh.gate, sh.up, sh.down):  # the fused slots are slices of it
                self._plan_whole(plan, "o", name)
        step.conv = self._plan_stack(plan, "c|", self.c_ck, c_items)
        if step.moe:
            for side, view in (("o", o), ("c", c)):
                ck = view.ckpt
                for name in (
                    view.arch.router_weight(layer),
                    view.arch.router_bias(layer),
                    view.arch.shared_gate_weight(layer),
                    view.arch.hash_table(layer) if layer in view.info.hash_layers else None,
                ):
                    if name and name in ck:
                        self._plan_whole(plan, side, name)
                csh = view.shared.get(layer)
                if csh is not None:
                    for name in (csh.gate, csh.up, csh.down):
                        self._plan_whole(plan, side, name)
        if step.tensors is not None:
            step.others = [
                n for n in self.others_names() if f"o:{n}" in plan.fields and f"c:{n}" in plan.fields
            ]
        return plan

    def _conv_pos(self, name: str) -> tuple[int, int]:
        """Where converted tensor ``name`` lies: (its shard's place in the shard list, byte offset)."""
        info = self.c_ck.tensors[name]
        return self._ranks.get(info.file, len(self._ranks)), info.offset

    def _plans_pos(self, plans: list[ReadPlan]) -> tuple[int, int]:
        """Where ``plans`` first read the converted checkpoint (the end of it when they never do)."""
        rank = self._ranks
        return min(
            (
                (rank.get(p.file, len(rank)), p.file_offset)
                for plan in plans
                for p in plan.pieces
                if p.ckpt is self.c_ck
            ),
            default=(len(rank) + 1, 0),
        )

    def others_steps(
        self, steps: list[LayerStep], bounds: list[tuple[int, int]], budget: int
    ) -> list[OthersStep]:
        """The other tensors not read with a layer, in the order they lie in the converted files, in
        steps of at most ``budget`` bytes that never reach across one of ``bounds`` (where a layer step
        starts reading the converted files), so that every step can be read between the layers around
        it. A tensor that does not fit a step is read in runs of rows where it can be
        (:meth:`splittable`: whole 128-row blocks, at least one a step), each run a step of its own;
        otherwise a step holds at least one whole tensor."""
        if "tensors" not in self.opts.checks:
            return []
        done = {n for s in steps for n in s.others}
        bounds = sorted(bounds)
        others: list[OthersStep] = []
        size = 0
        region = -1
        for name in sorted((n for n in self.others_names() if n not in done), key=self._conv_pos):
            need = sum(
                ck.tensors[n].nbytes + prefetch.ALIGN
                for ck in (self.o_ck, self.c_ck)
                for n in (name, find_scale(ck.tensors, name) or scale_name(name))
                if n in ck.tensors
            )
            here = bisect.bisect_right(bounds, self._conv_pos(name))
            if need > budget and self.splittable(name):
                n_rows = self.o_ck.info(name).shape[0]
                blocks = fp8_block.cdiv(n_rows, fp8_block.BLOCK)
                per = max(1, budget * blocks // need)  # 128-row blocks a step
                for b0 in range(0, blocks, per):
                    r0, r1 = b0 * fp8_block.BLOCK, min(n_rows, (b0 + per) * fp8_block.BLOCK)
                    others.append(OthersStep([name], {name: (r0, r1)}))
                size, region = budget, here  # nothing joins a run's step
                continue
            if not others or size + need > budget or here != region:
                others.append(OthersStep([]))
                size = 0
            region = here
            others[-1].names.append(name)
            size += need
        return others

    def all_plans(self, layers: list[int]) -> list[ReadPlan]:
        """Every step's plan in reading order. Each converted file's steps come in the order they lie in
        it (the layers, whole or in chunks, a layer's chunks together, and the other tensors between
        them), so that its sha256, taken from the read buffers, finds its bytes in the order it needs
        them; the files take turns, the one given the fewest bytes so far next, so that their hashes
        (one thread per file) run side by side."""
        steps = self.steps(layers)
        groups = [self.layer_plans(step) for step in steps]
        flat = [p for g in groups for p in g]
        budget = min(max((p.nbytes for p in flat), default=self.read_budget), self.read_budget)
        at = [self._plans_pos(g) for g in groups]
        others = [self.plan(s) for s in self.others_steps(steps, at, budget)]
        units = [(at[i], groups[i]) for i in range(len(groups))]
        units += [(self._plans_pos([p]), [p]) for p in others]
        units.sort(key=lambda u: u[0])  # stable: the layers keep their order where they start together
        return [p for i in self._turns([u for _, u in units]) for p in units[i][1]]

    def _turns(self, units: list[list[ReadPlan]]) -> list[int]:
        """An order of ``units`` (each a step's plans, sorted by where they start in the converted
        files) in which every file still gets the units that read it in the order they lie in it, the
        files taking turns: next, of the units every file of which has no earlier unit left, the one
        whose first file was given the fewest bytes so far. Where no unit is ready (a file lists two
        units one way, another file the other way) the first one left goes next."""
        rank = self._ranks
        where: list[dict[int, int]] = []  # unit -> {file rank: first offset it reads there}
        nbytes: list[int] = []
        for plans in units:
            first: dict[int, int] = {}
            n = 0
            for plan in plans:
                for p in plan.pieces:
                    if p.ckpt is self.c_ck:
                        r = rank.get(p.file, len(rank))
                        first[r] = min(first.get(r, p.file_offset), p.file_offset)
                        n += p.nbytes
            where.append(first)
            nbytes.append(n)
        lines: dict[int, list[int]] = {}  # file rank -> its units, in file order
        for i in range(len(units)):
            for r in where[i]:
                lines.setdefault(r, []).append(i)
        for r in lines:
            lines[r].sort(key=lambda i: where[i][r])
        heads = dict.fromkeys(lines, 0)
        given = dict.fromkeys(lines, 0)
        done = [False] * len(units)
        order: list[int] = []
        while len(order) < len(units):
            ready = [
                i
                for r, line in lines.items()
                if heads[r] < len(line)
                for i in [line[heads[r]]]
                if all(lines[q][heads[q]] == i for q in where[i])
            ]
            if ready:
                i = min(ready, key=lambda i: (given[min(where[i])], i))
            else:  # also a unit that reads no converted file, once no other is ready
                i = next(j for j in range(len(units)) if not done[j])
            done[i] = True
            order.append(i)
            for r in where[i]:
                given[r] += nbytes[i]
                while heads[r] < len(lines[r]) and done[lines[r][heads[r]]]:
                    heads[r] += 1
        return order
