"""Check 3, kernels: the FP8 block grouped GEMM (Triton; the torch reference on ``--device cpu``;
DeepGEMM with ``--backend deepgemm``) on the stored layout, with activations quantized per token in
1×128 blocks, against the float32 GEMM on the original weights: DeepGEMM's ``calc_diff`` below its bar."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moetool import tolerances as tol
from moetool.validate.backend import calc_diff, w13_parts
from moetool.validate.protocol import Context, Tensors
from moetool.validate.reads import LayerStep
from moetool.validate.report import Check


@dataclass
class _KernelsRun:
    """The kernels check of one layer, filled expert by expert: tokens ``ids`` (into ``experts``) with
    activations ``x`` per weight (``w13``/``w2``), the FP8 GEMM's rows ``got`` and the float32 GEMM's
    rows ``ref``."""

    experts: list[int]
    ids: torch.Tensor
    x: dict[str, torch.Tensor]
    got: dict[str, torch.Tensor]
    ref: dict[str, torch.Tensor]


class KernelsCheck:
    """The kernels check (a :class:`~moetool.validate.protocol.LayerCheck`) of each FP8 layer."""

    group = "kernels"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._run: _KernelsRun | None = None

    def wants(self, step: LayerStep) -> bool:
        return step.kernels is not None

    def start(self, step: LayerStep, batch: Tensors) -> None:
        """The layer's random tokens: ids into ``step.kernels`` (irregular group sizes, one expert left
        empty when there are several) and activations for w13 and w2."""
        gen = torch.Generator().manual_seed(self.ctx.opts.seed * 100_003 + step.layer)
        experts = step.kernels
        assert experts is not None
        n, t = len(experts), max(self.ctx.opts.tokens, 1)
        ids = torch.randint(0, n, (t,), generator=gen)
        if n > 1:
            ids[ids == n - 1] = 0
        _, rows13, hidden = step.layout["c|w13"].shape
        _, rows2, inter = step.layout["c|w2"].shape
        x = {"w13": torch.randn(t, hidden, generator=gen), "w2": torch.randn(t, inter, generator=gen)}
        got = {"w13": torch.zeros(t, rows13), "w2": torch.zeros(t, rows2)}
        self._run = _KernelsRun(experts, ids, x, got, {k: torch.zeros_like(v) for k, v in got.items()})

    def part(self, step: LayerStep, batch: Tensors, experts: list[int]) -> None:
        """The rows whose expert is among ``experts`` (held by ``step``/``batch``): the FP8 grouped GEMM
        and the float32 GEMM on the original weights. A row's result depends only on the row and its
        expert, so the check gives the same bits run at once or part by part."""
        run = self._run
        assert run is not None
        inside = set(experts)
        here = [e for e in run.experts if e in inside]
        if not here:
            return
        q13, s13, q2, s2 = self.ctx.conv_fp8(step, batch, here)
        w13, w2 = self.ctx.orig_weights(step, batch, here)
        where = {e: i for i, e in enumerate(run.experts)}
        local = torch.full((len(run.experts),), -1, dtype=torch.int64)
        for i, e in enumerate(here):
            local[where[e]] = i
        lid = local[run.ids]
        rows = torch.nonzero(lid >= 0).squeeze(1)
        be = self.ctx.backend()
        for tag, wq, ws, wf in (("w13", q13, s13, w13), ("w2", q2, s2, w2)):
            x = run.x[tag]
            parts = w13_parts(wq.shape[1] // 2) if tag == "w13" else 1
            run.got[tag][rows] = be.grouped(x[rows], lid[rows], wq, ws, parts=parts).cpu()
            # the float32 GEMM per expert on the original weights, gathered where they are and brought
            # back at once (one synchronisation a part, not one an expert)
            xd, ld = x.to(wf.device), lid.to(wf.device)
            ref = torch.zeros(x.shape[0], wf.shape[1], device=wf.device)
            for i in lid[rows].unique().tolist():
                sel = ld == i
                ref[sel] = xd[sel] @ wf[i].float().T
            run.ref[tag][rows] = ref[rows.to(wf.device)].cpu()

    def result(self, step: LayerStep, batch: Tensors) -> Check:
        run = self._run
        assert run is not None
        self._run = None
        for tag in ("w13", "w2"):
            bad = ~torch.isfinite(run.ref[tag]).all(dim=1)
            if bool(bad.any()):  # the original's own GEMM overflows: its defect, not the conversion's
                e = run.experts[int(run.ids[bad.nonzero()[0, 0]])]
                raise self.ctx.original_overflows(step.layer, e, f"the {tag} GEMM")
        diffs = {tag: calc_diff(run.got[tag], run.ref[tag]) for tag in ("w13", "w2")}
        # NaN (a converted expert gave NaN or infinity) ranks worst, never hides behind a finite value
        tag = max(diffs, key=lambda k: diffs[k] if diffs[k] == diffs[k] else math.inf)
        worst = (diffs[tag], tag)
        ok = worst[0] < tol.GEMM_CALC_DIFF
        prefix = self.ctx.conv.stores[step.layer].prefix
        detail = ""
        if not ok:
            tag = worst[1]
            per_expert = {
                run.experts[i]: calc_diff(run.got[tag][run.ids == i], run.ref[tag][run.ids == i])
                for i in run.ids.unique().tolist()
            }
            bad = [e for e, d in per_expert.items() if not d < tol.GEMM_CALC_DIFF]
            bad.sort(
                key=lambda e: per_expert[e] if per_expert[e] == per_expert[e] else math.inf, reverse=True
            )
            named = ", ".join(f"expert {e} ({per_expert[e]:.2e})" for e in bad[:8])
            if len(bad) > 8:
                named += f" and {len(bad) - 8} more"
            detail = (
                f"{prefix} {tag}: FP8 GEMM disagrees with the original weights: "
                f"{named or 'no single expert over the bar, the error is spread over them'}"
            )
        return Check(
            "kernels",
            f"layer {step.layer}",
            f"calc_diff ({self.ctx.backend().name} grouped GEMM, {len(run.experts)} experts, "
            f"{run.ids.numel()} tokens)",
            f"{worst[0]:.2e}",
            f"< {tol.GEMM_CALC_DIFF:g}",
            ok,
            detail,
        )
