"""How a layer check plugs into ``validate``'s one pass: the :class:`LayerCheck` protocol, the
:class:`Tensors` a check reads its weights from, and the :class:`Context` the checks share.

The run (``run.py``) reads each MoE layer once and hands it to every layer check in turn, either whole
or, for a layer larger than the read budget, chunk by chunk (runs of whole experts, in ascending order):

- ``start(step, batch)`` once per layer, before its first experts: draw tokens, read the router, ...;
- ``part(step, batch, experts)`` for each run of experts held by ``batch`` (all of them at once when
  the layer is read whole; ``step.orig``/``step.conv`` then describe the stacks of that batch);
- ``result(step, batch) -> Check`` once every expert has been added; ``batch`` then holds the layer's
  whole tensors (router, shared expert, other tensors of the step) but no longer its experts.

A check must give the same result whether the layer came whole or in parts: it adds each expert's
contribution independently of which other experts share the call. One layer is in flight at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import torch

from moetool.model import CheckpointView
from moetool.validate.options import ValidateOptions

if TYPE_CHECKING:
    from moetool.errors import InputError
    from moetool.plan import Src
    from moetool.validate.backend import Backend
    from moetool.validate.reads import LayerStep
    from moetool.validate.report import Check


class Tensors(Protocol):
    """Named tensors of one read step (a prefetch ``Batch``, or a chunked layer's tensors kept so far)."""

    def __contains__(self, key: str) -> bool: ...

    def __getitem__(self, key: str) -> torch.Tensor: ...

    def get(self, key: str) -> torch.Tensor | None: ...


class LayerCheck(Protocol):
    """A check of one MoE layer at a time, fed by the one read pass (module docstring)."""

    #: the report group and the name in ``ValidateOptions.checks``: tensors | kernels | moe
    group: str

    def wants(self, step: LayerStep) -> bool:
        """Whether this check runs on ``step``'s layer."""
        ...

    def start(self, step: LayerStep, batch: Tensors) -> None: ...

    def part(self, step: LayerStep, batch: Tensors, experts: list[int]) -> None: ...

    def result(self, step: LayerStep, batch: Tensors) -> Check: ...


class Context:
    """What the checks of one run share: both checkpoints, the options, the device, a thread pool for
    large CPU comparisons, the GEMM backend, and the original weights of the layer in flight (built
    once for the kernels and MoE checks)."""

    def __init__(
        self, orig: CheckpointView, conv: CheckpointView, opts: ValidateOptions, device: torch.device
    ) -> None:
        self.orig, self.conv, self.opts, self.device = orig, conv, opts, device
        self.o_ck, self.c_ck = orig.ckpt, conv.ckpt
        q = conv.quantization or {}
        self.ue8m0 = q.get("scale_fmt") == "ue8m0"
        self.pool: ThreadPoolExecutor | None = None
        self._backend: Backend | None = None
        self._orig_cache: tuple[LayerStep, tuple[torch.Tensor, torch.Tensor]] | None = None

    def backend(self) -> Backend:
        if self._backend is None:
            from moetool.validate.backend import Backend, model_dims

            self._backend = Backend(self.device, self.opts.backend, model_dims(self.orig.info))
        return self._backend

    def original_overflows(self, layer: int, e: int | None, what: str) -> InputError:
        """The error for an original whose own float32 output is not finite (weights so large a GEMM
        with unit-scale activations overflows): no conversion can be checked against it, and it is the
        original's defect (exit 2), named by its expert tensor and file."""
        from moetool.errors import InputError
        from moetool.validate.regions import expected_sources

        if e is None:
            name, file = self.orig.stores[layer].prefix, str(self.o_ck.root)
        else:
            gu, _ = expected_sources(self.orig, self.conv, layer, e)
            name = gu[0].name
            file = self.o_ck.info(name).file if name in self.o_ck else str(self.o_ck.root)
        return InputError(
            f"{what} of the original is not finite in float32 (layer {layer}"
            + (f", expert {e}" if e is not None else "")
            + "): it holds NaN, or weights so large that a GEMM with unit-scale activations overflows, "
            "so nothing can be checked against it",
            file=file,
            tensor=name,
            fix="the original checkpoint is corrupt",
        )

    def forget_layer(self) -> None:
        """Drop the cached original weights (views of a batch about to be reused)."""
        self._orig_cache = None

    def orig_region(
        self, step: LayerStep, b: Tensors, e: int, j: int
    ) -> tuple[Src, tuple[torch.Tensor, torch.Tensor | None]]:
        """Original source ``j`` (gate, up, down) of converted expert ``e`` and its data."""
        from moetool.validate.regions import expected_sources, slice_field

        gu, d = expected_sources(self.orig, self.conv, step.layer, e)
        src = (*gu, d)[j]
        if step.orig is not None and e in step.orig.pos:
            return src, step.orig.region(b, e, j)
        return src, slice_field(b, "o", src, self.o_ck.root)

    def _orig_all(self, step: LayerStep, b: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """The original weights behind every expert of the step, in ``step.experts`` order: w13
        [n, 2I, H], w2 [n, H, I] in the original's float dtype (bf16 stays bf16, exact; FP8 and FP4 are
        dequantized in float32). Routed experts are the read stacks themselves (no copy for bf16); fused
        slots are cut from the shared expert. Built once per layer for the kernels and MoE checks."""
        if self._orig_cache is not None and self._orig_cache[0] is step:
            return self._orig_cache[1]
        from moetool.kernels.fp4_cast_ref import dequant_fp4_ref
        from moetool.transforms.fp8_block import dequantize

        def f(data: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
            t, s = data
            if s is None:
                return t
            return dequant_fp4_ref(t, s) if t.dtype == torch.int8 else dequantize(t, s.float())

        st = step.orig
        parts13, parts2 = [], []
        if st is not None:
            w13, w2 = b["o|w13"], b["o|w2"]
            if st.int4_group:
                w13, w2 = st.int4_values(w13, b["o|s13"]), st.int4_values(w2, b["o|s2"])
            elif st.fp4:  # DeepSeek-V4's FP4 experts: their exact values, in float32
                w13 = dequant_fp4_ref(w13, b["o|s13"])
                w2 = dequant_fp4_ref(w2, b["o|s2"])
            elif st.fp8:
                s13, s2 = b["o|s13"], b["o|s2"]
                assert st.sparts is not None
                w13 = torch.cat(
                    [f((w13[:, r0:r1], s13[:, s0:s1])) for (r0, r1), (s0, s1) in zip(st.parts, st.sparts)],
                    dim=1,
                )
                w2 = f((w2, s2))
            parts13.append(w13)
            parts2.append(w2)
        slots = [e for e in step.experts if st is None or e not in st.pos]  # after the routed experts
        if slots:
            parts13.append(
                torch.stack(
                    [torch.cat([f(self.orig_region(step, b, e, j)[1]) for j in (0, 1)]) for e in slots]
                )
            )
            parts2.append(torch.stack([f(self.orig_region(step, b, e, 2)[1]) for e in slots]))
        weights = (parts13[0], parts2[0]) if len(parts13) == 1 else (torch.cat(parts13), torch.cat(parts2))
        self._orig_cache = (step, weights)
        return weights

    def orig_weights(
        self, step: LayerStep, b: Tensors, experts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The original weights of ``experts`` (a view when they lead the step's experts)."""
        w13, w2 = self._orig_all(step, b)
        where = {e: i for i, e in enumerate(step.experts)}
        pos = [where[e] for e in experts]
        if pos == list(range(len(pos))):
            return w13[: len(pos)], w2[: len(pos)]
        idx = torch.tensor(pos, device=w13.device)
        return w13[idx], w2[idx]

    def conv_fp8(self, step: LayerStep, b: Tensors, experts: list[int]) -> tuple[torch.Tensor, ...]:
        """Converted experts as stacked (w13_q, w13_s, w2_q, w2_s) in the order of ``experts``, SM100
        and E8M0 scales as float32 blocks."""
        from moetool.errors import InputError

        st = step.conv
        assert st is not None
        if not st.fp8:
            raise InputError("experts are not FP8", tensor=self.conv.stores[step.layer].prefix)
        out = [st.select(b[f"c|{k}"], experts) for k in ("w13", "s13", "w2", "s2")]
        for i in (1, 3):
            if out[i].dtype == torch.float8_e8m0fnu:  # DeepSeek-V4's E8M0 .scale: exact in float32
                out[i] = out[i].float()
        if st.whole_scales:
            from moetool.transforms.fp8_block import sm100_unpack

            n13, h = out[0].shape[1:]
            n2, i = out[2].shape[1:]
            out[1] = sm100_unpack(out[1], n13, h)
            out[3] = sm100_unpack(out[3], n2, i)
        return tuple(out)
