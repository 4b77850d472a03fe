"""Check 4, MoE layers: the model's routing + experts (+ fused slots) on the converted weights, through
the GEMM backend, against the original layer in float32: same top-k ids, ``calc_diff`` bounded.
Hash-routed layers (DeepSeek-V4) are fed seeded token ids, each side routed by its own ``tid2eid``
table; the SwiGLU clamp of ``swiglu_limit`` applies on both sides."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moetool import tolerances as tol
from moetool.model import CheckpointView
from moetool.moe import MoeLayerWeights
from moetool.plan import Src
from moetool.validate.backend import calc_diff
from moetool.validate.protocol import Context, Tensors
from moetool.validate.reads import LayerStep
from moetool.validate.regions import slice_field
from moetool.validate.report import Check


def weighted_sum(y: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    """``out[t] = Σ_c wts[t, c] · y[t, c]`` for expert outputs y [T, k, H]: float32 [T, H]."""
    return (y * wts.to(y.device, torch.float32)[..., None]).sum(1)


@dataclass
class _MoeRun:
    """The MoE check of one layer, filled expert by expert: tokens ``x``, each layer's weights but its
    routed experts (``ow``, ``cw``), the expert ids and weights their routing gives the tokens, the
    original layer's expert sum ``ref`` and the converted one's ``got`` (one row per token and expert
    column when ``fp8``, weighed at the end; else the sum)."""

    x: torch.Tensor
    ow: MoeLayerWeights
    cw: MoeLayerWeights
    o_ids: torch.Tensor
    o_wts: torch.Tensor
    c_ids: torch.Tensor
    c_wts: torch.Tensor
    ref: torch.Tensor
    got: torch.Tensor
    fp8: bool
    o_hash: torch.Tensor | None = None  # hash layers: tid2eid[token ids] of each side
    c_hash: torch.Tensor | None = None
    bad_table: str = ""  # why the converted token-id table cannot route (the check fails)


def _hash_ids(table: torch.Tensor, tokens: torch.Tensor, view: CheckpointView) -> torch.Tensor:
    """``table[tokens]``: a hash layer's expert ids for the drawn token ids (``[T, top_k]`` int64)."""
    from moetool.errors import InputError

    ids = table.to(torch.int64)[tokens]
    n = view.info.num_experts
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise InputError(f"token-id table holds expert ids outside [0, {n})", file=str(view.ckpt.root))
    return ids


class MoeCheck:
    """The MoE-layer check (a :class:`~moetool.validate.protocol.LayerCheck`) of each FP8 or fused layer."""

    group = "moe"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._run: _MoeRun | None = None

    def wants(self, step: LayerStep) -> bool:
        return step.moe

    def _layer_weights(
        self, view: CheckpointView, side: str, b: Tensors, layer: int, w13: torch.Tensor, w2: torch.Tensor
    ) -> MoeLayerWeights:
        from moetool.moe import FusedSlots
        from moetool.transforms.fp8_block import dequantize

        arch = view.arch
        dev = self.ctx.device
        shared = None
        sh = view.shared.get(layer)
        if sh is not None:

            def f(name: str) -> torch.Tensor:
                t, s = slice_field(b, side, Src(name), view.ckpt.root)
                if s is not None:
                    return dequantize(t.to(dev), s.to(dev))
                return t.to(dev).float()

            shared = (f(sh.gate), f(sh.up), f(sh.down))

        def read(name: str | None) -> torch.Tensor | None:
            return b[f"{side}:{name}"].to(dev).float() if name and name in view.ckpt else None

        return MoeLayerWeights(
            router_weight=read(arch.router_weight(layer)),
            score_bias=read(arch.router_bias(layer)),
            w13=w13.to(dev),
            w2=w2.to(dev),
            shared_w13=torch.cat([shared[0], shared[1]]) if shared else None,
            shared_w2=shared[2] if shared else None,
            shared_gate=read(arch.shared_gate_weight(layer)),
            fused=FusedSlots.from_config(view.config),
        )

    def start(self, step: LayerStep, batch: Tensors) -> None:
        """The layer's tokens and both layers' weights but the routed experts (router, shared expert or
        fused-slot metadata), and the expert ids and weights each layer's routing gives them
        (``moe_forward`` run once with an experts function that only records what it is asked)."""
        from moetool.moe import moe_forward

        ctx = self.ctx
        layer = step.layer
        gen = torch.Generator().manual_seed(ctx.opts.seed * 100_003 + layer + 1)
        store = ctx.conv.stores[layer]
        t = max(ctx.opts.tokens, 1)
        x = torch.randn(t, ctx.orig.info.hidden_size, generator=gen).to(ctx.device)
        inter = ctx.conv.info.moe_intermediate_size
        n_routed = ctx.orig.info.num_experts
        # The routed experts come in parts, through ``part``: the layers carry empty stand-ins.
        ow = self._layer_weights(
            ctx.orig, "o", batch, layer, torch.empty(n_routed, 2 * inter, 0), torch.empty(n_routed, 0, inter)
        )
        cw = self._layer_weights(
            ctx.conv,
            "c",
            batch,
            layer,
            torch.empty(store.num_experts, 2 * inter, 0),
            torch.empty(store.num_experts, 0, inter),
        )
        asked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def record(side: str) -> Callable:
            def fn(xx: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
                asked[side] = (ids, wts)
                return torch.zeros(xx.shape[0], xx.shape[1], device=xx.device)

            return fn

        from moetool.errors import InputError

        hashed: dict[str, torch.Tensor | None] = {"o": None, "c": None}
        bad_table = ""
        if layer in ctx.orig.info.hash_layers:
            vocab = batch[f"o:{ctx.orig.arch.hash_table(layer)}"].shape[0]
            tokens = torch.randint(0, vocab, (t,), generator=gen)
            hashed["o"] = _hash_ids(batch[f"o:{ctx.orig.arch.hash_table(layer)}"], tokens, ctx.orig)
            try:
                hashed["c"] = _hash_ids(batch[f"c:{ctx.conv.arch.hash_table(layer)}"], tokens, ctx.conv)
            except InputError as e:  # the converted table is wrong: this layer's check fails
                bad_table = e.message
                hashed["c"] = hashed["o"]
        for side, view, w in (("o", ctx.orig, ow), ("c", ctx.conv, cw)):
            unshared = dataclasses.replace(w, shared_w13=None, shared_w2=None)
            moe_forward(
                x,
                unshared,
                view.info.routing,
                view.arch.slot_weight,
                experts_fn=record(side),
                hash_ids=hashed[side],
            )
        c_ids, c_wts = asked["c"]
        if store.fp8:  # one row per (token, expert column), weighed and summed at the end
            got = torch.zeros(c_ids.numel(), x.shape[1], device=ctx.device)
        else:
            got = torch.zeros(t, x.shape[1], device=ctx.device)
        self._run = _MoeRun(
            x,
            ow,
            cw,
            *asked["o"],
            c_ids,
            c_wts,
            torch.zeros_like(x),
            got,
            store.fp8,
            hashed["o"],
            hashed["c"],
        )
        self._run.bad_table = bad_table

    def part(self, step: LayerStep, batch: Tensors, experts: list[int]) -> None:
        """Add ``experts`` (consecutive ids, held by ``step``/``batch``) to both layers' sums: the
        original's through the float32 reference, the converted one's through the FP8 kernels (or
        float32 when it is not FP8). Parts in ascending order give the bits of one part."""
        from moetool.errors import InternalError
        from moetool.moe import experts_reference_into

        run = self._run
        assert run is not None
        if not experts:
            return
        first = experts[0]
        if experts != list(range(first, first + len(experts))):
            raise InternalError("the MoE check takes consecutive experts", tensor=str(experts[:4]))
        dev = self.ctx.device
        routed = [e for e in experts if e < self.ctx.orig.info.num_experts]
        o_limit, c_limit = self.ctx.orig.info.swiglu_limit, self.ctx.conv.info.swiglu_limit
        if routed:
            ow13, ow2 = self.ctx.orig_weights(step, batch, routed)
            experts_reference_into(
                run.ref, run.x, run.o_ids, run.o_wts, ow13.to(dev), ow2.to(dev), first, limit=o_limit
            )
        assert step.conv is not None
        if run.fp8:
            q13, s13, q2, s2 = self.ctx.conv_fp8(step, batch, experts)
            flat_ids = run.c_ids.reshape(-1)
            rows = torch.nonzero((flat_ids >= first) & (flat_ids < first + len(experts))).squeeze(1)
            if rows.numel():
                k = run.c_ids.shape[1]
                x_rows = run.x.float()[rows // k]
                run.got[rows] = self.ctx.backend().expert_rows(
                    x_rows, flat_ids[rows] - first, q13, s13, q2, s2, limit=c_limit
                )
        else:
            cw13 = step.conv.select(batch["c|w13"], experts).float().to(dev)
            cw2 = step.conv.select(batch["c|w2"], experts).float().to(dev)
            experts_reference_into(run.got, run.x, run.c_ids, run.c_wts, cw13, cw2, first, limit=c_limit)

    def result(self, step: LayerStep, batch: Tensors) -> Check:
        from moetool.moe import moe_forward

        run = self._run
        assert run is not None
        self._run = None
        ctx = self.ctx
        layer = step.layer
        store = ctx.conv.stores[layer]
        ref, ref_ids = moe_forward(
            run.x,
            run.ow,
            ctx.orig.info.routing,
            ctx.orig.arch.slot_weight,
            experts_fn=lambda *_: run.ref,
            swiglu_limit=ctx.orig.info.swiglu_limit,
            hash_ids=run.o_hash,
        )
        if not bool(torch.isfinite(ref).all()):  # the original's own layer overflows: its defect
            raise ctx.original_overflows(layer, None, "the MoE layer output")
        if run.fp8:
            t, k = run.c_ids.shape
            summed = weighted_sum(run.got.reshape(t, k, -1), run.c_wts).to(run.x.device)
            label = f"{ctx.backend().name} FP8 experts"
        else:
            summed, label = run.got, "float32 experts"
        got, got_ids = moe_forward(
            run.x,
            run.cw,
            ctx.conv.info.routing,
            ctx.conv.arch.slot_weight,
            experts_fn=lambda *_: summed,
            swiglu_limit=ctx.conv.info.swiglu_limit,
            hash_ids=run.c_hash,
        )
        same_ids = torch.equal(torch.sort(got_ids.cpu(), 1).values, torch.sort(ref_ids.cpu(), 1).values)
        diff = calc_diff(got.cpu(), ref.cpu())
        ok = same_ids and diff < tol.MOE_CALC_DIFF and not run.bad_table
        why = ""
        if run.bad_table:
            why = f"{ctx.conv.arch.hash_table(layer)}: {run.bad_table}"
        elif not ok:
            why = (
                f"{store.prefix}: top-k ids differ from the original's routing"
                if not same_ids
                else f"{store.prefix}: layer output disagrees with the original layer"
            )
            if not bool(torch.isfinite(got).all()):
                why = f"{store.prefix}: " + _non_finite_experts(run)
        return Check(
            "moe",
            f"layer {layer}",
            f"calc_diff ({label}, {run.x.shape[0]} tokens), top-k ids",
            f"{diff:.2e}, ids {'equal' if same_ids else 'DIFFER'}",
            f"< {tol.MOE_CALC_DIFF:g}, equal",
            ok,
            why,
        )


def _non_finite_experts(run: _MoeRun) -> str:
    """Which converted experts give NaN or infinite outputs (for the per-expert FP8 rows), in words."""
    if not run.fp8:
        return "the converted layer's output is not finite (NaN or infinity in its experts)"
    bad = ~torch.isfinite(run.got).all(dim=1)
    experts = sorted({int(e) for e in run.c_ids.reshape(-1)[bad.to(run.c_ids.device)].tolist()})
    listed = ", ".join(str(e) for e in experts[:8]) + (
        f" and {len(experts) - 8} more" if len(experts) > 8 else ""
    )
    return f"converted expert(s) {listed} give NaN or infinite outputs"
