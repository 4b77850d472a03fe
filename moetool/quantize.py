"""``moetool quantize``: the plan that turns a checkpoint's experts (or every Linear) into block FP8,
laid out for DeepGEMM (stacked ``[E, N, K]``) or as Hugging Face per-expert tensors (docs/contract.md §6)."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from moetool import __version__
from moetool.engines import marked, refusal, transformers_cpu_reading
from moetool.errors import PlanError, UsageError
from moetool.model import (
    E8M0_DTYPE,
    FP8_DTYPES,
    CheckpointView,
    check_fp8_scale,
    e8m0_scale_name,
    find_scale,
    scale_name,
)
from moetool.plan import Job, OutTensor, Plan, Src, Unit, Write, pack_shards
from moetool.transforms.fp8_block import BLOCK, cdiv, sm100_stored_shape

LAYOUTS = ("hf", "deepgemm")
SCALE_FMTS = ("float", "ue8m0")
SCALE_LAYOUTS = ("sm90", "sm100")
TARGETS = ("experts", "linear")


@dataclass(frozen=True)
class QuantizeOptions:
    layout: str = "hf"
    scale_fmt: str = "float"
    scale_layout: str = "sm90"
    targets: str = "experts"
    max_shard_size: int = 5 * 10**9
    require_lossless: bool = False  # an FP4 block the cast to FP8 cannot keep exactly is an error

    def check(self) -> None:
        for value, allowed, flag in (
            (self.layout, LAYOUTS, "--layout"),
            (self.scale_fmt, SCALE_FMTS, "--scale-fmt"),
            (self.scale_layout, SCALE_LAYOUTS, "--scale-layout"),
            (self.targets, TARGETS, "--targets"),
        ):
            if value not in allowed:
                raise UsageError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
        if self.scale_layout == "sm100" and (self.scale_fmt != "ue8m0" or self.layout != "deepgemm"):
            raise UsageError(
                "--scale-layout sm100 needs --scale-fmt ue8m0 and --layout deepgemm",
                fix="SM100 kernels take power-of-two scales packed as UE8M0 bytes",
            )


def natural_key(name: str) -> tuple:
    """Sort ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def quant_unit(weight: str, src: tuple[Src, ...], n: int, k: int, ue8m0: bool) -> Unit:
    """One Linear weight ``[n, k]`` quantized under its own name plus ``weight_scale_inv``."""
    q = OutTensor(weight, "F8_E4M3", (n, k))
    s = OutTensor(scale_name(weight), "F32", (cdiv(n, BLOCK), cdiv(k, BLOCK)))
    return Unit((q, s), (Job("quant", src, (Write(q.name), Write(s.name)), ue8m0=ue8m0),))


def stacked_units(
    names: dict[str, str],
    num: int,
    inter: int,
    hidden: int,
    gate_up: list[tuple[Src, ...]],
    down: list[tuple[Src, ...]],
    *,
    ue8m0: bool,
    scale_layout: str,
    op: str = "quant",
    lossless: bool = False,
) -> list[Unit]:
    """DeepGEMM's ``w13`` ``[E, 2I, H]`` and ``w2`` ``[E, H, I]`` with their scales, filled expert by
    expert at precomputed byte offsets, under ``names`` (``ArchSpec.deepgemm_names``). ``op='copy'``
    sources are (q, s) regions copied as they are; ``op='fp4_cast'`` sources are FP4 weights cast by
    DeepSeek's rule (F32 or SM100 scales)."""
    units = []
    for tag, n, k, srcs in (("w13", 2 * inter, hidden, gate_up), ("w2", hidden, inter, down)):
        qname, sname = names[f"{tag}_weight"], names[f"{tag}_weight_scale_inv"]
        if scale_layout == "sm100":
            per = sm100_stored_shape(n, k)
            s_t = OutTensor(sname, "I32", (num, *per))
            s_bytes = 4 * math.prod(per)
        else:
            s_t = OutTensor(sname, "F32", (num, cdiv(n, BLOCK), cdiv(k, BLOCK)))
            s_bytes = 4 * cdiv(n, BLOCK) * cdiv(k, BLOCK)
        q_t = OutTensor(qname, "F8_E4M3", (num, n, k))
        jobs = tuple(
            Job(
                op,
                sources,
                (Write(qname, e * n * k), Write(sname, e * s_bytes)),
                ue8m0=ue8m0,
                scale_layout=scale_layout,
                lossless=lossless,
            )
            for e, sources in enumerate(srcs)
        )
        units.append(Unit((q_t, s_t), jobs))
    return units


def _copy_unit(ckpt: Any, name: str) -> Unit:
    t = ckpt.tensors[name]
    return Unit((OutTensor(name, t.dtype, t.shape),), (Job("copy", (Src(name),), (Write(name),)),))


#: dtype of the routed experts' block scales once a DeepSeek-V4 release's experts are FP8
#: (``expert_dtype: fp8``): float32 under ``.scale`` (vLLM's V4 code describes DeepSeek's FP8-expert
#: checkpoint, V4-Flash-Base, as float32-scaled).
#: vLLM 0.33 reads the experts of an ``expert_dtype: fp8`` V4 checkpoint with float32 scale parameters and
#: copies E8M0 scales in as their raw exponent bytes (2^-12 becomes 115.0), so E8M0 here would load
#: silently wrong there; float32 holds the same powers of two exactly and every engine reads it right.
FP8_EXPERT_SCALE_DTYPE = "F32"


def fp4_cast_unit(weight: str, n: int, k: int, lossless: bool) -> Unit:
    """One FP4 expert weight ``[n, k]`` cast to FP8 under its own name, with its block scales under
    ``.scale`` as DeepSeek-V4 names them (``[n/128, k/128]``, :data:`FP8_EXPERT_SCALE_DTYPE`)."""
    q = OutTensor(weight, "F8_E4M3", (n, k))
    s = OutTensor(e8m0_scale_name(weight), FP8_EXPERT_SCALE_DTYPE, (cdiv(n, BLOCK), cdiv(k, BLOCK)))
    job = Job(
        "fp4_cast",
        (Src(weight),),
        (Write(q.name), Write(s.name)),
        scale_dtype=FP8_EXPERT_SCALE_DTYPE,
        lossless=lossless,
    )
    return Unit((q, s), (job,))


def _expert_scale_unit(ckpt: Any, name: str) -> Unit:
    """A routed expert's FP8 block scales (``.scale``) copied in :data:`FP8_EXPERT_SCALE_DTYPE`; the same
    values (E8M0 powers of two become float32 exactly)."""
    t = ckpt.tensors[name]
    out = OutTensor(name, FP8_EXPERT_SCALE_DTYPE, t.shape)
    return Unit((out,), (Job("copy", (Src(name),), (Write(name),)),))


def release_quant_config(view: CheckpointView, layout: str, scale_layout: str = "sm90") -> dict[str, Any]:
    """config.json of a checkpoint that came with its own ``quantization_config`` and FP4 experts
    (DeepSeek-V4): the release's quantization_config kept, ``expert_dtype`` now ``fp8`` wherever the
    config declares it (top level for V4, in quantization_config for V4.1)."""
    cfg = copy.deepcopy(view.config)
    key = view.arch.fp4_spec["expert_dtype_key"] if view.arch.fp4_spec else "expert_dtype"
    if key in cfg:
        cfg[key] = "fp8"
    qc = dict(cfg.get("quantization_config") or {})
    if key in qc or key not in cfg:
        qc[key] = "fp8"
    cfg["quantization_config"] = qc
    return marked(cfg, refusal(layout, fused=view.fused is not None, scale_layout=scale_layout))


def unconverted_linears(view: CheckpointView, quantized: set[str]) -> list[str]:
    """The modules whose Linear weight stays unquantized (not in ``quantized``, not FP8): what
    ``modules_to_not_convert`` and ``ignored_layers`` must name, so that no engine expects FP8 bytes and
    scales for them. Routers and lm_head included; stacked experts are no Linear's ``.weight``."""
    return sorted(
        (
            n[: -len(".weight")]
            for n, t in view.ckpt.tensors.items()
            if n not in quantized
            and n.endswith(".weight")
            and len(t.shape) == 2
            and t.dtype not in FP8_DTYPES
            and (view.is_linear_weight(n) or n in view.router_names() or "lm_head" in n)
        ),
        key=natural_key,
    )


def quant_config(
    view: CheckpointView, quantized: set[str], ue8m0: bool, layout: str, scale_layout: str = "sm90"
) -> dict[str, Any]:
    """config.json with ``quantization_config`` (docs/contract.md §6): DeepSeek-V3's format, and every Linear left
    unquantized named in ``modules_to_not_convert`` and ``ignored_layers``. An output engines must not
    load (deepgemm layout, fused shared experts) carries the refusal marker of ``moetool.engines``."""
    cfg = copy.deepcopy(view.config)
    skipped = unconverted_linears(view, quantized)
    qc: dict[str, Any] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": skipped,
        "ignored_layers": skipped,
    }
    if ue8m0:
        qc["scale_fmt"] = "ue8m0"
    cfg = with_quantization_config(cfg, qc)
    return marked(cfg, refusal(layout, fused=view.fused is not None, scale_layout=scale_layout))


def with_quantization_config(cfg: dict[str, Any], qc: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` whose quantization_config is ``qc``: at the top level, and in ``text_config`` too when the
    wrapped text model's config carries one (Kimi-K2.5 keeps its INT4 config there, and SGLang reads that
    one over the top-level's: a stale one would describe weights that are no longer there)."""
    cfg["quantization_config"] = qc
    text = cfg.get("text_config")
    if isinstance(text, dict) and "quantization_config" in text:
        text["quantization_config"] = copy.deepcopy(qc)
    return cfg


def plan_quantize(
    view: CheckpointView, opts: QuantizeOptions, *, options: dict[str, Any] | None = None
) -> Plan:
    opts.check()
    info, ckpt = view.info, view.ckpt
    inter, hidden = info.moe_intermediate_size, info.hidden_size
    ue8m0 = opts.scale_fmt == "ue8m0"
    if opts.layout == "deepgemm" and view.stores and inter % BLOCK:
        raise PlanError(
            f"--layout deepgemm needs moe_intermediate_size % 128 == 0, got {inter}",
            file=str(ckpt.root / "config.json"),
            fix="use --layout hf",
        )
    # whatever the experts' source format (an FP8 release's grids are the same ceil grids)
    stores = list(view.stores.values())
    if (
        opts.layout == "hf"
        and view.fused is None
        and stores
        and "misreads"
        in {transformers_cpu_reading((inter, hidden)), transformers_cpu_reading((hidden, inter))}
    ):
        s0 = stores[0]
        raise PlanError(
            f"experts of [{inter}, {hidden}] and [{hidden}, {inter}] make scale grids that transformers reads "
            "with blocks of other than 128 (it would load this output wrong)",
            file=str(ckpt.root),
            tensor=s0.gate_up(0, inter)[0].name,
            fix="use --layout deepgemm (for moetool.layout and DeepGEMM runtimes)",
        )
    if view.arch.fp4_spec and opts.targets == "linear":
        raise PlanError(
            f"--targets linear does not apply to {view.arch.family}: it ships its Linears in FP8 already, "
            "and the ones it ships in BF16 (attention compressor and indexer projections, the head) must "
            "stay BF16 for transformers to load them right",
            file=str(ckpt.root),
            fix="use --targets experts (the default)",
        )
    if any(s.kind == "deepgemm" for s in view.stores.values()) and "I32" in {
        ckpt.tensors[n].dtype for s in view.stores.values() for n in s.names
    }:
        raise PlanError(
            "input has SM100-packed scales; quantize from the sm90 or BF16 checkpoint", file=str(ckpt.root)
        )
    for name in sorted(n for n, t in ckpt.tensors.items() if t.dtype in FP8_DTYPES):
        check_fp8_scale(ckpt, name)  # every FP8 tensor is read with its scales, in block-scale units
    consumed: set[str] = set()
    units: list[Unit] = []
    for _, store in sorted(view.stores.items()):
        consumed.update(store.names)
        gu = [store.gate_up(e, inter) for e in range(store.num_experts)]
        dn = [(store.down(e),) for e in range(store.num_experts)]
        if store.fp4 and (inter % BLOCK or hidden % BLOCK):
            name = f"{store.prefix}.0.{store.proj['gate']}.weight"
            raise PlanError(
                f"FP4 experts cast to 128x128 FP8 blocks need hidden_size and moe_intermediate_size "
                f"divisible by 128, got {hidden} and {inter}",
                file=str(ckpt.root),
                tensor=name,
                fix="only FP4 experts with N and K divisible by 128 can be cast",
            )
        if store.fp4 and opts.layout == "deepgemm":
            units += stacked_units(
                view.arch.deepgemm_names(store.layer),
                store.num_experts,
                inter,
                hidden,
                gu,
                dn,
                ue8m0=False,
                scale_layout=opts.scale_layout,
                op="fp4_cast",
                lossless=opts.require_lossless,
            )
        elif (
            store.fp8
            and store.kind == "per_expert"
            and opts.layout == "hf"
            and ckpt.tensors.get(e8m0_scale_name(f"{store.prefix}.0.{store.proj['gate']}.weight")) is not None
        ):
            # FP8 experts with E8M0 scales (DeepSeek-V4 after the cast): powers of two satisfy any scale
            # request, so the values stay as they are; the scales are stored as FP8_EXPERT_SCALE_DTYPE
            units += [
                _expert_scale_unit(ckpt, n) if n.endswith(".scale") else _copy_unit(ckpt, n)
                for n in store.names
            ]
        elif store.fp4:
            for e in range(store.num_experts):
                for proj, (n, k) in (
                    ("gate", (inter, hidden)),
                    ("up", (inter, hidden)),
                    ("down", (hidden, inter)),
                ):
                    name = f"{store.prefix}.{e}.{store.proj[proj]}.weight"
                    units.append(fp4_cast_unit(name, n, k, opts.require_lossless))
        elif opts.layout == "deepgemm":
            units += stacked_units(
                view.arch.deepgemm_names(store.layer),
                store.num_experts,
                inter,
                hidden,
                gu,
                dn,
                ue8m0=ue8m0,
                scale_layout=opts.scale_layout,
            )
        else:
            for e in range(store.num_experts):
                for proj, srcs, (n, k) in (
                    ("gate", gu[e][:1], (inter, hidden)),
                    ("up", gu[e][1:], (inter, hidden)),
                    ("down", dn[e], (hidden, inter)),
                ):
                    name = f"{store.prefix}.{e}.{store.proj[proj]}.weight"
                    units.append(quant_unit(name, srcs, n, k, ue8m0))
    targets: set[str] = {n for sh in view.shared.values() for n in (sh.gate, sh.up, sh.down)}
    if opts.targets == "linear":
        targets |= {n for n in ckpt.tensors if view.is_linear_target(n)}
    targets |= {n for n, t in ckpt.tensors.items() if t.dtype in FP8_DTYPES}
    targets -= consumed
    engine_checkpoint = opts.layout == "hf" and view.fused is None
    misread = sorted(
        n
        for n in targets
        if engine_checkpoint
        and ckpt.tensors[n].dtype not in FP8_DTYPES
        and transformers_cpu_reading(ckpt.tensors[n].shape) == "misreads"
    )
    shared_names = {n for sh in view.shared.values() for n in (sh.gate, sh.up, sh.down)}
    # a release's own FP8 Linear whose grid transformers' CPU loader misreads (a 192-row q_b_proj: two
    # 96-row blocks): kept FP8 it would load wrong, and no other precision holds the release's values
    kept_misread = sorted(
        n
        for n in targets
        if engine_checkpoint
        and ckpt.tensors[n].dtype in FP8_DTYPES
        and transformers_cpu_reading(ckpt.tensors[n].shape) == "misreads"
    )
    if kept_misread:
        raise PlanError(
            f"this input's FP8 weight of shape {list(ckpt.tensors[kept_misread[0]].shape)} has a 128x128 "
            f"ceil scale grid that transformers' CPU loader reads with blocks of other than 128 "
            f"({len(kept_misread)} such weights; it would load an hf output, and this input, wrong)",
            file=str(ckpt.root),
            tensor=kept_misread[0],
            fix="use --layout deepgemm (for moetool.layout and DeepGEMM runtimes)"
            + (
                ""
                if kept_misread[0] in shared_names
                else ", or quantize the model's BF16 checkpoint (moetool then leaves these Linears in BF16)"
            ),
        )
    if misread and misread[0] in shared_names:
        raise PlanError(
            f"shape {list(ckpt.tensors[misread[0]].shape)} makes a scale grid that transformers reads "
            "with blocks of other than 128 (it would load this output wrong)",
            file=str(ckpt.root),
            tensor=misread[0],
            fix="use --layout deepgemm (for moetool.layout and DeepGEMM runtimes)",
        )
    # a Linear whose 128x128 ceil grid transformers' CPU loader would apply to the wrong rows stays in
    # its own precision (named in modules_to_not_convert); SGLang and vLLM read it either way
    targets -= set(misread)
    # FP8 with E8M0 scales (DeepSeek-V4's Linears): powers of two satisfy a float and a UE8M0 request
    # alike, so weight and .scale stay as they are, under their names
    targets -= {
        n for n in targets if (sc := find_scale(ckpt.tensors, n)) and ckpt.tensors[sc].dtype == E8M0_DTYPE
    }
    for name in sorted(targets):
        t = ckpt.tensors[name]
        if len(t.shape) != 2:
            raise PlanError(f"cannot quantize a {len(t.shape)}-D tensor", file=str(ckpt.root), tensor=name)
        units.append(quant_unit(name, (Src(name),), t.shape[0], t.shape[1], ue8m0))
        consumed.add(name)
        if t.dtype in FP8_DTYPES:
            consumed.add(find_scale(ckpt.tensors, name) or scale_name(name))
    for name, t in ckpt.tensors.items():
        if name in consumed:
            continue
        if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in consumed:
            continue
        units.append(Unit((OutTensor(name, t.dtype, t.shape),), (Job("copy", (Src(name),), (Write(name),)),)))
    units.sort(key=lambda u: natural_key(u.tensors[0].name))
    if view.arch.fp4_spec and view.quantization:
        cfg = release_quant_config(view, opts.layout, opts.scale_layout)
    else:
        cfg = quant_config(view, consumed, ue8m0, opts.layout, opts.scale_layout)
    notes = []
    if misread:
        notes.append(
            f"{len(misread)} Linear weights left in {ckpt.tensors[misread[0]].dtype} (e.g. {misread[0]} "
            f"{list(ckpt.tensors[misread[0]].shape)}): transformers' CPU loader would read their 128x128 "
            "ceil scale grids with other blocks"
        )
    fp4_names = {n for s in view.stores.values() if s.fp4 for n in s.names}
    odd = sorted(
        n
        for n in consumed - fp4_names
        if n in ckpt.tensors
        and not n.endswith("_scale_inv")
        and len(ckpt.tensors[n].shape) in (2, 3)
        and any(d % BLOCK for d in ckpt.tensors[n].shape[-2:])
    )
    if odd:
        refused = [n for n in odd if transformers_cpu_reading(ckpt.tensors[n].shape) == "raises"]
        notes.append(
            f"{len(odd)} quantized weights have a dimension not divisible by 128 (e.g. {odd[0]}): their "
            "scale grids are ceil grids, which SGLang, vLLM and transformers on GPU read"
            + (
                f"; transformers on CPU refuses {len(refused)} of them (e.g. {refused[0]}) when it loads"
                if refused and opts.layout == "hf"
                else ""
            )
        )
    return Plan(
        command="quantize",
        options=options if options is not None else asdict(opts),
        layout=opts.layout,
        shards=pack_shards(units, opts.max_shard_size),
        config=cfg,
        copy_files=tuple(ckpt.other_files()),
        shard_metadata={"format": "pt", "moetool.layout": opts.layout, "moetool.version": __version__},
        notes=tuple(notes),
    )
