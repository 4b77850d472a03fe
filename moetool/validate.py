"""``moetool validate``: prove a converted checkpoint (or state file) right against its original, or
name what is wrong (SPEC §6). Every check returns plain ``Check`` records; the CLI prints them.

1. structure  every original tensor accounted for, nothing extra, shapes/dtypes/config consistent,
              output sha256 as moetool.json records.
2. tensors    each FP8 tensor equals the SPEC §3 recipe applied to the original, byte for byte (scales
              bit for bit); copied and fused BF16 tensors equal their source bytes.
3. kernels    the FP8 block grouped GEMM (Triton; torch reference on ``--device cpu``; DeepGEMM with
              ``--backend deepgemm``) on the stored layout against the float32 GEMM of the original.
4. moe        the model's routing + experts (+ fused slots) on the converted weights, through the
              kernel, against the original layer in float32: same top-k ids, calc_diff bounded.
5. ssm        T decode steps from the converted state (Triton K-last, pool-indexed) against the
              k-first reference from the original state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moetool import tolerances as tol
from moetool.errors import InputError, UsageError
from moetool.io.checkpoint import MANIFEST_NAME, Checkpoint
from moetool.io.writer import sha256_file
from moetool.model import FP8_DTYPES, CheckpointView, analyze, scale_name
from moetool.pipeline import Quantizer, pick_device, read_source
from moetool.plan import Src

ADDED_CONFIG_KEYS = ("quantization_config", "moetool_fused_shared_experts")


@dataclass
class Check:
    group: str  # structure | tensors | kernels | moe | ssm
    scope: str  # what was checked ("layer 3", "files", ...)
    metric: str
    value: Any
    threshold: str
    passed: bool
    detail: str = ""  # names the culprit on failure


@dataclass
class Report:
    original: str
    converted: str
    device: str
    backend: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "converted": self.converted,
            "device": self.device,
            "backend": self.backend,
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
        }


@dataclass(frozen=True)
class ValidateOptions:
    device: str = "auto"
    backend: str = "triton"  # triton | deepgemm (torch references when the device is the CPU)
    layers: tuple[int, ...] | None = None
    experts: int | None = None  # sample this many experts per layer (all when None)
    tokens: int = 128
    seed: int = 0
    checks: tuple[str, ...] = ("structure", "tensors", "kernels", "moe")
    ssm_steps: int = 4


# -- backends ---------------------------------------------------------------------------------
class Backend:
    """Per-token activation quantization and the FP8 grouped GEMM on one device."""

    def __init__(self, device: torch.device, name: str) -> None:
        self.device, self.name = device, name
        from moetool.kernels.fp8_grouped_gemm_ref import contiguous_layout, grouped_gemm_ref
        from moetool.kernels.fp8_quant_ref import block_quant_ref

        self.layout = contiguous_layout
        if device.type == "cpu":
            self.name = "torch"
            self.act_quant = lambda x: block_quant_ref(x, block=(1, 128))
            self.gemm = grouped_gemm_ref
            return
        from moetool.kernels.fp8_quant import token_quant

        self.act_quant = token_quant
        if name == "deepgemm":
            try:
                import deep_gemm  # type: ignore[import-not-found]
            except ImportError:
                from moetool.errors import EnvironmentError_

                raise EnvironmentError_(
                    "--backend deepgemm but deep_gemm is not importable",
                    fix="install DeepGEMM or use --backend triton",
                ) from None

            def dg(a_q, a_s, b_q, b_s, m_idx):
                out = torch.empty(a_q.shape[0], b_q.shape[1], dtype=torch.bfloat16, device=a_q.device)
                deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a_q, a_s), (b_q, b_s), out, m_idx)
                return out

            self.gemm = dg
        else:
            from moetool.kernels.fp8_grouped_gemm import m_grouped_fp8_gemm_nt_contiguous

            self.gemm = m_grouped_fp8_gemm_nt_contiguous

    def grouped(
        self, x: torch.Tensor, ids: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor
    ) -> torch.Tensor:
        """``y[t] = x[t] @ W[ids[t]]ᵀ`` through the FP8 path: x [T, K] float, ids [T]; returns [T, N] f32."""
        dev = self.device
        x, ids = x.to(dev), ids.to(dev)
        a, m_idx, rows = self.layout(x.float(), ids, w_q.shape[0])
        a_q, a_s = self.act_quant(a)
        d = self.gemm(a_q, a_s, w_q.to(dev), w_s.to(dev), m_idx)
        return d.float()[rows]

    def experts_fn(self, w13_q, w13_s, w2_q, w2_s) -> Callable:
        """An ``ExpertsFn`` for ``moe_forward`` on stacked FP8 experts (w13 [E, 2I, H], w2 [E, H, I])."""
        inter = w13_q.shape[1] // 2

        def fn(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
            t, k = ids.shape
            flat_x = x.float().repeat_interleave(k, dim=0)
            flat_ids = ids.reshape(-1)
            h = self.grouped(flat_x, flat_ids, w13_q, w13_s)
            act = F.silu(h[:, :inter]) * h[:, inter:]
            y = self.grouped(act, flat_ids, w2_q, w2_s).reshape(t, k, -1)
            return (y * wts.to(y.device, torch.float32)[..., None]).sum(1).to(x.device)

        return fn


# -- helpers ----------------------------------------------------------------------------------
def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    from moetool.kernels.fp8_grouped_gemm_ref import calc_diff as cd

    return float(cd(x, y))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return (
        t.contiguous().view(torch.uint8)
        if t.element_size() == 1
        else t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    )


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...] | None:
    if a.shape != b.shape:
        return ()
    ne = _bits(a) != _bits(b)
    if not bool(ne.any()):
        return None
    return tuple(int(i) for i in ne.nonzero()[0])


def _expected_sources(
    orig: CheckpointView, conv: CheckpointView, layer: int, e: int
) -> tuple[tuple[Src, ...], Src]:
    """Original sources of converted expert ``e``: routed expert e, or a fused shared-expert slice."""
    inter, n_routed = orig.info.moe_intermediate_size, orig.info.num_experts
    if e < n_routed:
        store = orig.stores[layer]
        return store.gate_up(e, inter), store.down(e)
    sh = orig.shared.get(layer)
    if sh is None or not conv.fused:
        raise InputError(
            f"expert {e} exists in the converted layer {layer} but not in the original",
            tensor=conv.stores[layer].prefix,
        )
    j = (e - n_routed) % int(conv.fused["num_slots"])
    rows = (j * inter, (j + 1) * inter)
    return (Src(sh.gate, rows=rows), Src(sh.up, rows=rows)), Src(sh.down, cols=rows)


def region_name(src: Src, *, scale: bool = False) -> str:
    """How a report names a converted region: the tensor (its ``weight_scale_inv`` with ``scale``),
    with the expert index and row range of a stacked tensor."""
    name = scale_name(src.name) if scale else src.name
    if src.expert is None:
        return name
    rows = f", rows {src.rows[0]}:{src.rows[1]}" if src.rows else ""
    if scale and src.rows:
        rows = f", scale rows {src.rows[0] // 128}:{-(-src.rows[1] // 128)}"
    return f"{name}[{src.expert}{rows}]"


def _stored(conv: CheckpointView, layer: int, e: int) -> list[Src]:
    """Converted expert ``e``'s regions: gate, up, down."""
    store = conv.stores[layer]
    gu, d = store.gate_up(e, conv.info.moe_intermediate_size), store.down(e)
    return [*gu, d]


class Validator:
    def __init__(self, orig: CheckpointView, conv: CheckpointView, opts: ValidateOptions) -> None:
        self.o_ck, self.c_ck, self.opts = orig.ckpt, conv.ckpt, opts
        self.orig, self.conv = orig, conv
        self.device = pick_device(opts.device)
        self.quantizer = Quantizer(self.device)
        self.rng = random.Random(opts.seed)
        self._layer_cache: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        q = self.conv.quantization or {}
        self.ue8m0 = q.get("scale_fmt") == "ue8m0"
        self.report = Report(
            str(self.o_ck.root),
            str(self.c_ck.root),
            str(self.device),
            "torch" if self.device.type == "cpu" else opts.backend,
        )

    def add(self, *args: Any, **kw: Any) -> None:
        self.report.checks.append(Check(*args, **kw))

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

    # 1. structure ------------------------------------------------------------------------------
    def check_structure(self) -> None:
        o, c = self.orig, self.conv
        manifest = c.manifest
        if manifest is None:
            self.add(
                "structure",
                "manifest",
                "moetool.json",
                "missing",
                "present",
                False,
                f"{self.c_ck.root / MANIFEST_NAME} not found: not a moetool output",
            )
        else:
            bad = []
            for rel, rec in sorted((manifest.get("files") or {}).items()):
                p = self.c_ck.root / rel
                if (
                    not p.is_file()
                    or p.stat().st_size != rec.get("size")
                    or sha256_file(p) != rec.get("sha256")
                ):
                    bad.append(rel)
            self.add(
                "structure",
                "files",
                "sha256 as recorded",
                f"{len(bad)} differ",
                "0 differ",
                not bad,
                f"file {bad[0]} does not match its recorded sha256" if bad else "",
            )
            listed = set(manifest.get("tensors") or {})
            extra = sorted(set(self.c_ck.tensors) - listed)
            missing = sorted(listed - set(self.c_ck.tensors))
            ok = not extra and not missing
            self.add(
                "structure",
                "manifest tensors",
                "listed == stored",
                f"{len(extra)} extra, {len(missing)} missing",
                "0",
                ok,
                f"tensor {(extra or missing)[0]} " + ("not in the manifest" if extra else "missing")
                if not ok
                else "",
            )
        # every original tensor accounted for, nothing extra
        o_experts, c_experts = o.expert_names(), c.expert_names()
        fused_shared = {n for s in o.shared.values() for n in s.names} if c.fused else set()
        problems: list[str] = []
        for name, info in sorted(self.o_ck.tensors.items()):
            if name in o_experts or name in fused_shared:
                continue
            if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in self.o_ck.tensors:
                continue  # travels with its weight
            ct = self.c_ck.tensors.get(name)
            if ct is None:
                problems.append(f"tensor {name} of the original is missing")
            elif ct.shape != info.shape:
                problems.append(f"tensor {name} has shape {list(ct.shape)}, original {list(info.shape)}")
            elif ct.dtype != info.dtype and ct.dtype not in FP8_DTYPES:
                problems.append(f"tensor {name} changed dtype {info.dtype} -> {ct.dtype}")
        for name in sorted(self.c_ck.tensors):
            if name in c_experts or name in self.o_ck.tensors:
                continue
            if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in self.c_ck.tensors:
                continue
            problems.append(f"tensor {name} is not in the original and not an expert tensor")
        for layer in sorted(o.stores):
            if layer not in c.stores:
                problems.append(f"MoE layer {layer} has no experts in the converted checkpoint")
                continue
            want = o.info.num_experts + (
                int(c.fused["num_slots"]) * int(c.fused["replicas"]) if c.fused else 0
            )
            if c.stores[layer].num_experts != want:
                problems.append(
                    f"layer {layer} stores {c.stores[layer].num_experts} experts, expected {want}"
                )
        if c.fused:
            m_expected = o.info.shared_slots
            if int(c.fused["num_slots"]) != m_expected or int(c.fused["first_slot"]) != o.info.num_experts:
                problems.append(
                    f"moetool_fused_shared_experts {c.fused} does not match the original's shared "
                    f"expert ({m_expected} slots after {o.info.num_experts} experts)"
                )
            if c.fused.get("slot_weight") != o.arch.slot_weight:
                problems.append(
                    f"moetool_fused_shared_experts.slot_weight is {c.fused.get('slot_weight')!r}, "
                    f"the family's shared expert weighs {o.arch.slot_weight!r}"
                )
        for key in sorted(set(o.config) | set(c.config)):
            if key in ADDED_CONFIG_KEYS and key not in o.config:
                continue
            if key == "quantization_config":
                continue
            if o.config.get(key) != c.config.get(key):
                problems.append(f"config.json key {key!r} differs from the original")
        has_fp8 = any(t.dtype in FP8_DTYPES for t in self.c_ck.tensors.values())
        if has_fp8 != bool(c.quantization):
            problems.append("FP8 tensors and quantization_config disagree")
        self.add(
            "structure",
            "tensors & config",
            "problems",
            len(problems),
            "0",
            not problems,
            problems[0] if problems else "",
        )

    # 2. tensors --------------------------------------------------------------------------------
    def _expected_quant(self, src: Src, read: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t, s = read if read is not None else read_source(self.o_ck, src)
        if s is None:
            return self.quantizer.quant(t, ue8m0=self.ue8m0, name=src.describe())
        return self.quantizer.from_fp8(t, s, ue8m0=self.ue8m0, name=src.describe())

    def _compare_region(self, conv_src: Src, orig_src: Src, errs: list[float] | None) -> str | None:
        """None when the converted region is what the recipe makes of the original region, else why."""
        display = region_name(conv_src)
        got_q, got_s = read_source(self.c_ck, conv_src)
        if got_s is None:  # not quantized: bytes must equal the source's
            want, _ = read_source(self.o_ck, orig_src)
            pos = _first_diff(got_q, want)
            return None if pos is None else f"{display} differs from {orig_src.describe()} at {list(pos)}"
        orig = read_source(self.o_ck, orig_src)
        want_q, want_s = self._expected_quant(orig_src, orig)
        pos = _first_diff(got_q, want_q)
        if pos is not None:
            return (
                f"{display} FP8 bytes differ from the recipe applied to {orig_src.describe()} at {list(pos)}"
            )
        pos = _first_diff(got_s.float(), want_s.float())
        if pos is not None:
            return (
                f"{region_name(conv_src, scale=True)} differs from the recipe at block {list(pos)} "
                f"({float(got_s.float()[pos]):.9g} vs {float(want_s.float()[pos]):.9g})"
            )
        w = orig[0]
        if errs is not None and w.dtype != torch.float8_e4m3fn:  # quantization error for the report
            from moetool.kernels.fp8_quant_ref import dequant_ref

            dev = self.device
            wf = w.to(dev).float()
            d = dequant_ref(got_q.to(dev), got_s.to(dev))
            errs.append(float((d - wf).norm() / wf.norm().clamp_min(1e-30)))
        return None

    def check_tensors(self) -> None:
        packed = any(self.c_ck.tensors[n].dtype == "I32" for s in self.conv.stores.values() for n in s.names)
        for layer in self.layers():
            bad: str | None = None
            errs: list[float] = []
            experts = self.experts(layer)
            for e in experts:
                o_gu, o_d = _expected_sources(self.orig, self.conv, layer, e)
                regions = _stored(self.conv, layer, e)
                if packed:
                    bad = self._compare_sm100(layer, e, o_gu, o_d)
                else:
                    for csrc, osrc in zip(regions, (*o_gu, o_d)):
                        bad = self._compare_region(csrc, osrc, errs if e == experts[0] else None)
                        if bad:
                            break
                if bad:
                    break
            metric = f"{len(experts)} experts byte-equal"
            value = (
                "mismatch" if bad else (f"rel err {max(errs):.2e} (expert {experts[0]})" if errs else "equal")
            )
            self.add("tensors", f"layer {layer}", metric, value, "bytes equal", bad is None, bad or "")
        # everything that is not a routed expert: copied or quantized in place
        bad = None
        count = 0
        skip = self.conv.expert_names()
        for name in sorted(self.c_ck.tensors):
            if name in skip or name.endswith("_scale_inv") or name not in self.o_ck.tensors:
                continue
            count += 1
            bad = self._compare_region(Src(name), Src(name), [])
            if bad:
                break
        self.add(
            "tensors",
            "other tensors",
            f"{count} tensors",
            "mismatch" if bad else "equal",
            "bytes equal",
            bad is None,
            bad or "",
        )

    def _compare_sm100(self, layer: int, e: int, o_gu: tuple[Src, ...], o_d: Src) -> str | None:
        from moetool.kernels.fp8_quant_ref import pack_sm100_scales_ref, sm100_scales_to_storage

        names = self.conv.arch.deepgemm_names(layer)
        for tag, srcs in (("w13", o_gu), ("w2", (o_d,))):
            parts = [self._expected_quant(s) for s in srcs]
            want_q = torch.cat([p[0] for p in parts])
            want_s = sm100_scales_to_storage(
                pack_sm100_scales_ref(torch.cat([p[1] for p in parts]), want_q.shape[0])
            )
            got_q = self.c_ck.read(names[f"{tag}_weight"])[e]
            got_s = self.c_ck.read(names[f"{tag}_weight_scale_inv"])[e]
            pos = _first_diff(got_q, want_q)
            if pos is not None:
                return f"{names[tag + '_weight']}[{e}] FP8 bytes differ from the recipe at {list(pos)}"
            pos = _first_diff(got_s, want_s.reshape(got_s.shape))
            if pos is not None:
                return f"{names[tag + '_weight_scale_inv']}[{e}] packed scales differ at {list(pos)}"
        return None

    # 3. / 4. kernels and MoE layers -------------------------------------------------------------
    def _stacked_fp8(self, layer: int, experts: list[int]) -> tuple[torch.Tensor, ...]:
        """Converted experts as stacked (w13_q, w13_s, w2_q, w2_s), in the order of ``experts``."""
        store = self.conv.stores[layer]
        if not store.fp8:
            raise InputError("experts are not FP8", tensor=store.prefix)
        if store.kind == "deepgemm":
            names = self.conv.arch.deepgemm_names(layer)
            idx = torch.tensor(experts)
            out = [
                self.c_ck.read(names[k])[idx]
                for k in ("w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv")
            ]
            if out[1].dtype == torch.int32:
                from moetool.kernels.fp8_quant_ref import sm100_scales_from_storage, unpack_sm100_scales_ref

                n13, h = out[0].shape[1:]
                n2, i = out[2].shape[1:]
                out[1] = unpack_sm100_scales_ref(sm100_scales_from_storage(out[1], n13), n13, h)
                out[3] = unpack_sm100_scales_ref(sm100_scales_from_storage(out[3], n2), n2, i)
            return tuple(out)
        inter = self.conv.info.moe_intermediate_size
        q13, s13, q2, s2 = [], [], [], []
        for e in experts:
            g, u = (read_source(self.c_ck, s) for s in store.gate_up(e, inter))
            d = read_source(self.c_ck, store.down(e))
            q13.append(torch.cat([g[0], u[0]]))
            s13.append(torch.cat([g[1], u[1]]))
            q2.append(d[0])
            s2.append(d[1])
        return torch.stack(q13), torch.stack(s13), torch.stack(q2), torch.stack(s2)

    def _original_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The original weights behind every stored expert of ``layer`` (routed experts, then fused-slot
        slices of the shared expert): w13 [n, 2I, H], w2 [n, H, I] on the device, in the original's float
        dtype (bf16 stays bf16, exact; FP8 is dequantized in float32). Read once per layer, shared by the
        kernel and MoE checks."""
        if self._layer_cache is not None and self._layer_cache[0] == layer:
            return self._layer_cache[1]
        self._layer_cache = None  # free the previous layer before reading the next
        from moetool.kernels.fp8_quant_ref import dequant_ref

        dev = self.device

        def f(src: Src) -> torch.Tensor:
            t, s = read_source(self.o_ck, src)
            t = t.to(dev)
            return dequant_ref(t, s.to(dev)) if s is not None else t

        w13, w2 = [], []
        for e in range(self.conv.stores[layer].num_experts):
            gu, d = _expected_sources(self.orig, self.conv, layer, e)
            w13.append(torch.cat([f(s) for s in gu]))
            w2.append(f(d))
        weights = (torch.stack(w13), torch.stack(w2))
        self._layer_cache = (layer, weights)
        return weights

    def _backend(self) -> Backend:
        if not hasattr(self, "_be"):
            self._be = Backend(self.device, self.opts.backend)
        return self._be

    def check_kernels(self, layer: int) -> None:
        be = self._backend()
        gen = torch.Generator().manual_seed(self.opts.seed * 100_003 + layer)
        if not self.conv.stores[layer].fp8:
            return
        experts = self.experts(layer)
        q13, s13, q2, s2 = self._stacked_fp8(layer, experts)
        all13, all2 = self._original_layer(layer)
        w13, w2 = all13[experts], all2[experts]
        n = len(experts)
        t = max(self.opts.tokens, 1)
        # irregular group sizes, one expert left empty when there are several
        ids = torch.randint(0, n, (t,), generator=gen)
        if n > 1:
            ids[ids == n - 1] = 0
        worst = (0.0, "")
        for tag, wq, ws, wf in (("w13", q13, s13, w13), ("w2", q2, s2, w2)):
            x = torch.randn(t, wf.shape[2], generator=gen)
            got = be.grouped(x, ids, wq, ws).cpu()
            ref = torch.zeros(t, wf.shape[1])
            xd = x.to(wf.device)
            for e in ids.unique().tolist():  # float32 GEMM per expert on the original weights
                rows = ids == e
                ref[rows] = (xd[rows.to(wf.device)] @ wf[e].float().T).cpu()
            diff = calc_diff(got, ref)
            if diff > worst[0] or not worst[1]:
                worst = (diff, tag)
        ok = worst[0] < tol.GEMM_CALC_DIFF
        prefix = self.conv.stores[layer].prefix
        self.add(
            "kernels",
            f"layer {layer}",
            f"calc_diff ({be.name} grouped GEMM, {n} experts, {t} tokens)",
            f"{worst[0]:.2e}",
            f"< {tol.GEMM_CALC_DIFF:g}",
            ok,
            "" if ok else f"{prefix} {worst[1]}: FP8 GEMM disagrees with the original weights",
        )

    def _layer_weights(self, view: CheckpointView, ck: Checkpoint, layer: int, w13, w2):
        from moetool.moe import FusedSlots, MoeLayerWeights

        arch = view.arch
        dev = self.device
        bias_name = arch.router_bias(layer)
        gate_name = arch.shared_gate_weight(layer)
        shared = None
        sh = view.shared.get(layer)
        if sh is not None:

            def f(name: str) -> torch.Tensor:
                t, s = read_source(ck, Src(name))
                if s is not None:
                    from moetool.kernels.fp8_quant_ref import dequant_ref

                    return dequant_ref(t.to(dev), s.to(dev))
                return t.to(dev).float()

            shared = (f(sh.gate), f(sh.up), f(sh.down))

        def read(name: str | None) -> torch.Tensor | None:
            return ck.read(name).to(dev).float() if name and name in ck else None

        return MoeLayerWeights(
            router_weight=read(arch.router_weight(layer)),
            score_bias=read(bias_name),
            w13=w13.to(dev),
            w2=w2.to(dev),
            shared_w13=torch.cat([shared[0], shared[1]]) if shared else None,
            shared_w2=shared[2] if shared else None,
            shared_gate=read(gate_name),
            fused=FusedSlots.from_config(view.config),
        )

    def check_moe(self, layer: int) -> None:
        from moetool.moe import moe_forward

        be = self._backend()
        gen = torch.Generator().manual_seed(self.opts.seed * 100_003 + layer + 1)
        n_all_routed = self.orig.info.num_experts
        store = self.conv.stores[layer]
        if not store.fp8 and not self.conv.fused:
            return
        t = max(self.opts.tokens, 1)
        x = torch.randn(t, self.orig.info.hidden_size, generator=gen).to(self.device)
        # original layer, float32 on the original's own weights
        all13, all2 = self._original_layer(layer)
        ow13, ow2 = all13[:n_all_routed], all2[:n_all_routed]
        ow = self._layer_weights(self.orig, self.o_ck, layer, ow13, ow2)
        ref, ref_ids = moe_forward(x, ow, self.orig.info.routing, self.orig.arch.slot_weight)
        all_experts = list(range(store.num_experts))
        if store.fp8:
            q13, s13, q2, s2 = self._stacked_fp8(layer, all_experts)
            fn = be.experts_fn(q13, s13, q2, s2)
            inter = self.conv.info.moe_intermediate_size
            # the kernel path reads the FP8 tensors; the float slots only carry the expert count
            cw = self._layer_weights(
                self.conv,
                self.c_ck,
                layer,
                torch.empty(store.num_experts, 2 * inter, 0),
                torch.empty(store.num_experts, 0, inter),
            )
            got, got_ids = moe_forward(
                x, cw, self.conv.info.routing, self.conv.arch.slot_weight, experts_fn=fn
            )
            label = f"{be.name} FP8 experts"
        else:
            cw13, cw2 = self._stacked_float(layer, all_experts)
            cw = self._layer_weights(self.conv, self.c_ck, layer, cw13, cw2)
            got, got_ids = moe_forward(x, cw, self.conv.info.routing, self.conv.arch.slot_weight)
            label = "float32 experts"
        same_ids = torch.equal(torch.sort(got_ids.cpu(), 1).values, torch.sort(ref_ids.cpu(), 1).values)
        diff = calc_diff(got.cpu(), ref.cpu())
        ok = same_ids and diff < tol.MOE_CALC_DIFF
        why = (
            ""
            if ok
            else (
                f"{store.prefix}: top-k ids differ from the original's routing"
                if not same_ids
                else f"{store.prefix}: layer output disagrees with the original layer"
            )
        )
        self.add(
            "moe",
            f"layer {layer}",
            f"calc_diff ({label}, {t} tokens), top-k ids",
            f"{diff:.2e}, ids {'equal' if same_ids else 'DIFFER'}",
            f"< {tol.MOE_CALC_DIFF:g}, equal",
            ok,
            why,
        )

    def _stacked_float(self, layer: int, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        store = self.conv.stores[layer]
        inter = self.conv.info.moe_intermediate_size
        w13, w2 = [], []
        for e in experts:
            w13.append(torch.cat([read_source(self.c_ck, s)[0].float() for s in store.gate_up(e, inter)]))
            w2.append(read_source(self.c_ck, store.down(e))[0].float())
        return torch.stack(w13), torch.stack(w2)

    def run(self) -> Report:
        for name in self.opts.checks:
            if name not in ("kernels", "moe"):
                getattr(self, f"check_{name}")()
        # layer by layer, so both checks share one read of the layer's original weights
        for layer in self.layers():
            for name in ("kernels", "moe"):
                if name in self.opts.checks:
                    getattr(self, f"check_{name}")(layer)
        return self.report


def validate_checkpoints(original: str | Path, converted: str | Path, opts: ValidateOptions) -> Report:
    with Checkpoint(original) as o, Checkpoint(converted) as c:
        orig = analyze(o)  # an unreadable original is a usage problem (exit 2), not a finding
        try:
            conv = analyze(c)
            if conv.arch.family != orig.arch.family:
                raise InputError(
                    f"it is a {conv.arch.family} checkpoint, the original a {orig.arch.family} one",
                    file=str(c.root),
                    fix="give the original it was converted from",
                )
        except InputError as e:
            # the converted checkpoint contradicts itself (e.g. a fused slot dropped but still in
            # config.json): that is what validate exists to find, so it is a failed check (exit 1)
            dev = pick_device(opts.device)
            report = Report(
                str(o.root), str(c.root), str(dev), "torch" if dev.type == "cpu" else opts.backend
            )
            report.checks.append(
                Check(
                    "structure",
                    "converted checkpoint",
                    "consistent with its config",
                    "inconsistent",
                    "consistent",
                    False,
                    e.line(),
                )
            )
            return report
        return Validator(orig, conv, opts).run()


# -- 5. SSM state files -----------------------------------------------------------------------
def validate_states(original: str | Path, converted: str | Path, opts: ValidateOptions) -> Report:
    """The converted state file decodes like the original: T steps of the K-last pool-indexed kernel
    (Triton; torch reference on the CPU) on the converted state against the k-first reference on the
    original; outputs and final states compared (relative error)."""
    from moetool.gdn import gdn_decode_gated_ref, relative_error
    from moetool.ssm import read_state_file, recurrent_state_name, slot_ids_name, state_layers
    from moetool.transforms.ssm_layout import convert_layout, from_pool

    device = pick_device(opts.device)
    report = Report(str(original), str(converted), str(device), "torch" if device.type == "cpu" else "triton")
    o_t, o_meta = read_state_file(original)
    c_t, c_meta = read_state_file(converted)
    o_t, o_meta = convert_layout(*from_pool(o_t, o_meta), "k-first")
    o_layers, c_layers = state_layers(o_t), state_layers(c_t)
    same = (o_meta.num_value_heads, o_meta.head_k_dim, o_meta.head_v_dim) == (
        c_meta.num_value_heads,
        c_meta.head_k_dim,
        c_meta.head_v_dim,
    )
    report.checks.append(
        Check(
            "structure",
            "state file",
            "layers and head dims match",
            "equal" if o_layers == c_layers and same else "differ",
            "equal",
            o_layers == c_layers and same,
            ""
            if o_layers == c_layers and same
            else f"layers {o_layers} vs {c_layers}, dims {o_meta} vs {c_meta}",
        )
    )
    if o_layers != c_layers or not same:
        return report
    if device.type == "cpu":
        from moetool.kernels.gdn_decode_ref import gdn_decode_klast_ref as kernel
    else:
        from moetool.kernels.gdn_decode import gdn_decode_klast as kernel
    gen = torch.Generator().manual_seed(opts.seed)
    hv, kd, vd = c_meta.num_value_heads, c_meta.head_k_dim, c_meta.head_v_dim
    h = c_meta.num_key_heads or o_meta.num_key_heads or hv
    steps = max(opts.ssm_steps, 1)
    for layer in (opts.layers and [x for x in c_layers if x in opts.layers]) or c_layers:
        orig_state = o_t[recurrent_state_name(layer)]
        n = orig_state.shape[0]
        if c_meta.pooled:
            pool = c_t[recurrent_state_name(layer)].clone()
            slots = c_t[slot_ids_name(layer)].to(torch.int32)
        else:
            dense, _ = (
                convert_layout(
                    {recurrent_state_name(layer): c_t[recurrent_state_name(layer)]}, c_meta, "k-last"
                )
                if c_meta.layout == "k-first"
                else (c_t, c_meta)
            )
            st = dense[recurrent_state_name(layer)]
            pool = torch.cat([torch.zeros_like(st[:1]), st]).contiguous()
            slots = torch.arange(1, n + 1, dtype=torch.int32)
        q = torch.randn(n, steps, h, kd, generator=gen)
        k = torch.randn(n, steps, h, kd, generator=gen)
        v = torch.randn(n, steps, hv, vd, generator=gen)
        a = torch.randn(n, steps, hv, generator=gen)
        b = torch.randn(n, steps, hv, generator=gen)
        A_log = torch.randn(hv, generator=gen) * 0.5
        dt_bias = torch.randn(hv, generator=gen) * 0.5
        bf16 = orig_state.dtype == torch.bfloat16
        # the kernel keeps the state in float32 across the T steps of one launch and rounds it once
        ref_o, ref_s = gdn_decode_gated_ref(q, k, v, a, b, A_log, dt_bias, orig_state, layout="k-first")
        dev = device
        pool_d = pool.to(dev)
        out = kernel(
            q.to(dev),
            k.to(dev),
            v.to(dev),
            a.to(dev),
            b.to(dev),
            A_log.to(dev),
            dt_bias.to(dev),
            pool_d,
            slots.to(dev),
        )
        got_s = pool_d.cpu()[slots.long()].transpose(-1, -2)
        err = max(
            relative_error(out.cpu().float(), ref_o.float()), relative_error(got_s.float(), ref_s.float())
        )
        bound = tol.SSM_REL_ERROR_BF16 if bf16 or pool.dtype == torch.bfloat16 else tol.SSM_REL_ERROR_FP32
        ok = err <= bound
        report.checks.append(
            Check(
                "ssm",
                f"layer {layer}",
                f"rel error of {steps} decode steps (outputs, final state)",
                f"{err:.2e}",
                f"<= {bound:g}",
                ok,
                ""
                if ok
                else f"{recurrent_state_name(layer)}: decoding from the converted state disagrees "
                f"(labelled {c_meta.layout}; a mislabelled layout does this)",
            )
        )
    return report
