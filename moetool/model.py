"""What a checkpoint holds, read from headers only: per MoE layer, how its experts are stored.

Three storages of routed experts are recognised:

- ``per_expert``: ``P.{e}.{gate,up,down}_proj.weight`` (+ ``weight_scale_inv`` when FP8) — what
  transformers saves, and the ``--layout hf`` output.
- ``packed``: transformers v5 ``P.gate_up_proj [E, 2I, H]`` (gate rows first) and ``P.down_proj [E, H, I]``
  in a float dtype.
- ``deepgemm``: the same stacked tensors in F8_E4M3, each with its ``_scale_inv`` (DeepGEMM's ``[G, N, K]``
  operand; ``ArchSpec.deepgemm_names``), or under the names moetool 0.1 wrote (``P.w13_weight`` ...,
  ``ArchSpec.legacy_deepgemm_names``). ``ExpertStore.stacked`` says which names a checkpoint holds.

Per-expert weights are BF16/F16/F32, FP8 with ``weight_scale_inv``, or INT4 as compressed-tensors packs
them (``weight_packed``, ``weight_scale``, ``weight_shape``; ``moetool.transforms.int4``): an INT4
store's sources keep the logical ``...weight`` names, which ``pipeline.read_source`` dequantizes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from moetool.arch import ArchSpec, ModelInfo, language_config
from moetool.arch.identify import identify
from moetool.errors import InputError
from moetool.io.checkpoint import MANIFEST_NAME, Checkpoint, read_json
from moetool.io.fs import input_roots
from moetool.plan import Src

FP8_DTYPES = ("F8_E4M3",)
FLOAT_DTYPES = ("F32", "F16", "BF16")
#: An ExpertStore's dtype when its experts are compressed-tensors INT4 (not a safetensors dtype).
INT4 = "INT4"
FP4_DTYPE = "I8"  # DeepSeek-V4's FP4 experts: two e2m1 codes per byte, with E8M0 scales per 32
E8M0_DTYPE = "F8_E8M0"


def scale_name(weight: str) -> str:
    """``...weight`` → ``...weight_scale_inv`` (also ``w13_weight`` → ``w13_weight_scale_inv``)."""
    return weight + "_scale_inv"


def e8m0_scale_name(weight: str) -> str:
    """``...weight`` → ``...scale``: DeepSeek-V4's name for E8M0 block scales (FP8 and FP4 weights)."""
    return weight.removesuffix("weight") + "scale"


def find_scale(tensors: Mapping[str, Any], weight: str) -> str | None:
    """The block scales stored with a quantized ``weight``: ``weight_scale_inv`` (F32, DeepSeek-V3) or,
    for a ``...weight``, ``...scale`` (E8M0, DeepSeek-V4); None when neither exists."""
    for name in (scale_name(weight), e8m0_scale_name(weight) if weight.endswith(".weight") else None):
        if name is not None and name in tensors:
            return name
    return None


def require_scale(tensors: Mapping[str, Any], weight: str, *, file: str, what: str = "FP8 tensor") -> str:
    """``find_scale``, or an ``InputError`` naming ``weight`` in ``file`` when it has no block scales."""
    name = find_scale(tensors, weight)
    if name is None:
        raise InputError(
            f"{what} without its block scales (weight_scale_inv or scale)", file=file, tensor=weight
        )
    return name


@dataclass(frozen=True)
class ExpertStore:
    layer: int
    kind: str  # "per_expert" | "packed" | "deepgemm"
    num_experts: int  # stored expert slots (routed + fused shared slots)
    fp8: bool
    dtype: str
    names: tuple[str, ...]  # every tensor of this layer's experts (weights and scales)
    prefix: str
    proj: dict[str, str]  # gate/up/down module names
    int4_group: int = 0  # group size of compressed-tensors INT4 experts (dtype INT4), else 0
    fp4: bool = False  # DeepSeek-V4 FP4: I8 [N, K/2] weights, E8M0 [N, K/32] ``.scale``
    # packed / deepgemm: the stacked tensors by role (w13_weight, w2_weight and, when FP8, their
    # *_scale_inv), as this checkpoint names them
    stacked: dict[str, str] = dataclasses.field(default_factory=dict)

    def gate_up(self, e: int, inter: int) -> tuple[Src, ...]:
        """Sources of expert ``e``'s gate rows then up rows, ``[2I, H]`` in all."""
        if self.kind == "per_expert":
            return (
                Src(f"{self.prefix}.{e}.{self.proj['gate']}.weight"),
                Src(f"{self.prefix}.{e}.{self.proj['up']}.weight"),
            )
        name = self.stacked["w13_weight"]
        return (Src(name, expert=e, rows=(0, inter)), Src(name, expert=e, rows=(inter, 2 * inter)))

    def down(self, e: int) -> Src:
        if self.kind == "per_expert":
            return Src(f"{self.prefix}.{e}.{self.proj['down']}.weight")
        return Src(self.stacked["w2_weight"], expert=e)


@dataclass(frozen=True)
class SharedExpert:
    layer: int
    gate: str
    up: str
    down: str
    fp8: bool
    intermediate: int
    gate_weight: str | None  # shared_expert_gate.weight (Qwen)
    names: tuple[str, ...]


@dataclass(frozen=True)
class CheckpointView:
    ckpt: Checkpoint
    arch: ArchSpec
    info: ModelInfo
    stores: dict[int, ExpertStore]
    shared: dict[int, SharedExpert]
    fused: dict[str, Any] | None  # config's moetool_fused_shared_experts
    quantization: dict[str, Any] | None  # config's quantization_config
    manifest: dict[str, Any] | None
    layout: str  # "hf" | "packed" | "deepgemm" | "mixed" | "none"
    note: str | None = None  # how the family was recognised, when not by model_type (for stderr)
    mtp_layers: tuple[int, ...] = ()  # MTP layers whose experts are stored (numbered from num_layers)

    @property
    def config(self) -> dict[str, Any]:
        return self.ckpt.config

    def expert_names(self) -> set[str]:
        names = {n for s in self.stores.values() for n in s.names}
        names |= {n for s in self.shared.values() for n in s.names}
        return names

    def router_names(self) -> set[str]:
        out = set()
        for layer in self.stores:
            out.add(self.arch.router_weight(layer))
            b = self.arch.router_bias(layer)
            if b:
                out.add(b)
            g = self.arch.shared_gate_weight(layer)
            if g:
                out.add(g)
            if layer in self.info.hash_layers:
                out.add(self.arch.hash_table(layer) or "")
        return out

    def is_linear_target(self, name: str) -> bool:
        """A Linear weight ``--targets linear`` quantizes: one of the text model's layers, not a sparse-
        attention indexer (DeepSeek-V3.2, GLM-5: it passes through) nor a wrapper's vision tower."""
        return (
            self.is_linear_weight(name)
            and name.startswith(f"{self.arch.root}.layers.")
            and ".indexer." not in name
        )

    def is_linear_weight(self, name: str) -> bool:
        """A 2-D ``.weight`` of a Linear: not a router, norm, embedding, lm_head, shared-expert gate or
        convolution. Those left unquantized are listed in the output's ``modules_to_not_convert``."""
        t = self.ckpt.tensors.get(name)
        if t is None or not name.endswith(".weight") or len(t.shape) != 2:
            return False
        if name in self.router_names():
            return False
        leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        return not (
            "norm" in leaf
            or "embed" in name
            or name.startswith("lm_head")
            or ".lm_head" in name
            or leaf in ("conv1d", "shared_expert_gate")
        )


_EXPERT_IDX = re.compile(
    r"^(?P<p>.+)\.(?P<e>\d+)\.(?P<proj>[A-Za-z0-9_]+)\."
    r"(?P<kind>weight|weight_scale_inv|weight_packed|weight_scale|weight_shape|scale)$"
)


def analyze(ckpt: Checkpoint, *, family: str | None = None) -> CheckpointView:
    """Detect family, MoE layers and their expert storage from config and headers; checks consistency.
    ``family`` is ``--family``: read an unknown ``model_type`` as that family (``moetool.arch.identify``)."""
    cfg_file = str(ckpt.root / "config.json")
    identity = identify(ckpt.config, ckpt.tensors.keys(), family=family, file=cfg_file)
    arch = identity.arch
    alt = arch.tensors.get("moe_alt")
    if alt and not _holds_block(ckpt, arch.tensors["moe"]) and _holds_block(ckpt, alt):
        # the checkpoint names its MoE blocks the other way (Mixtral's packed experts live under mlp)
        arch = dataclasses.replace(arch, tensors={**arch.tensors, "moe": alt})
    info = arch.model(ckpt.config, file=cfg_file)
    mtp_present: list[int] = []
    if arch.mtp_spec and info.mtp_layers:
        # MTP layers are numbered after the decoder layers; a checkpoint may leave them out
        # (transformers does not build them)
        arch = arch.with_mtp(info.num_layers)
        for m in range(info.mtp_layers):
            head = arch.experts_prefix(info.num_layers + m) + "."
            if any(n.startswith(head) for n in ckpt.tensors):
                mtp_present.append(info.num_layers + m)
    fused = ckpt.config.get("moetool_fused_shared_experts")
    from moetool.moe import FusedSlots

    slots = FusedSlots.from_config(ckpt.config, file=cfg_file)
    if slots is not None:
        _check_fused_slots(slots, arch, info, cfg_file)
    extra_slots = slots.num_slots * slots.replicas if slots else 0
    _check_layer_range(ckpt, arch.root, info.num_layers, cfg_file)
    t = ckpt.tensors
    stores: dict[int, ExpertStore] = {}
    shared: dict[int, SharedExpert] = {}
    inter, hidden = info.moe_intermediate_size, info.hidden_size
    for layer in (*info.moe_layers, *mtp_present):
        prefix = arch.experts_prefix(layer)
        dg, legacy = arch.deepgemm_names(layer), arch.legacy_deepgemm_names(layer)
        packed_gu, packed_d = arch.packed_names(layer)
        stacked: dict[str, str] = {}
        names = tuple(sorted(n for n in t if n.startswith(prefix + ".")))
        if not names:
            raise InputError(
                f"layer {layer} should be MoE but holds no expert tensors under {prefix}",
                file=cfg_file,
                fix="the config and the weights disagree",
            )
        if legacy["w13_weight"] in t and packed_gu in t:
            raise InputError(
                f"layer {layer} stores its experts twice ({legacy['w13_weight']} and {packed_gu})",
                file=str(ckpt.root),
                tensor=packed_gu,
            )
        if legacy["w13_weight"] in t or (packed_gu in t and t[packed_gu].dtype in FP8_DTYPES):
            kind = "deepgemm"
            stacked = legacy if legacy["w13_weight"] in t else dg
            missing = [n for n in stacked.values() if n not in t]
            if missing:
                raise InputError(
                    "stacked FP8 experts without their down_proj or a scale tensor",
                    file=str(ckpt.root),
                    tensor=missing[0],
                )
            fp4 = False
            w13, w2 = t[stacked["w13_weight"]], t[stacked["w2_weight"]]
            n_exp, fp8, dtype = w13.shape[0], w13.dtype in FP8_DTYPES, w13.dtype
            _expect(w13, (n_exp, 2 * inter, hidden), ckpt)
            _expect(w2, (n_exp, hidden, inter), ckpt)
        elif packed_gu in t:
            kind = "packed"
            stacked = {"w13_weight": packed_gu, "w2_weight": packed_d}
            gu, d = t[packed_gu], t.get(packed_d)
            if d is None:
                raise InputError("packed experts lack down_proj", file=str(ckpt.root), tensor=packed_gu)
            fp4 = False
            n_exp, fp8, dtype = gu.shape[0], gu.dtype in FP8_DTYPES, gu.dtype
            _expect(gu, (n_exp, 2 * inter, hidden), ckpt)
            _expect(d, (n_exp, hidden, inter), ckpt)
        else:
            kind = "per_expert"
            ids = set()
            for n in names:
                m = _EXPERT_IDX.match(n)
                if not m or m["p"] != prefix or m["proj"] not in arch.proj_names.values():
                    raise InputError(
                        "unrecognised expert tensor",
                        file=str(ckpt.root),
                        tensor=n,
                        fix=f"expected {prefix}.<e>.{{{','.join(arch.proj_names.values())}}}.weight",
                    )
                ids.add(int(m["e"]))
            n_exp = len(ids)
            if ids != set(range(n_exp)):
                raise InputError(f"expert ids are not 0..{n_exp - 1}", file=str(ckpt.root), tensor=prefix)
            gate0 = f"{prefix}.0.{arch.proj_names['gate']}.weight"
            if gate0 not in t and f"{gate0}_packed" in t:
                int4_group = _int4_group(ckpt, cfg_file)
                _check_int4_experts(ckpt, prefix, n_exp, arch.proj_names, inter, hidden, int4_group)
                stores[layer] = ExpertStore(
                    layer, kind, n_exp, False, INT4, names, prefix, arch.proj_names, int4_group
                )
                _check_count(n_exp, info.num_experts, extra_slots, layer, cfg_file, prefix)
                _add_shared(ckpt, arch, info, layer, fused, shared, hidden)
                continue
            if gate0 not in t:
                raise InputError("expert weight missing", file=str(ckpt.root), tensor=gate0)
            first = t[gate0]
            fp8, dtype = first.dtype in FP8_DTYPES, first.dtype
            fp4 = dtype == FP4_DTYPE and arch.fp4_spec is not None
            for e in range(n_exp):
                for proj, (n, k) in (
                    ("gate", (inter, hidden)),
                    ("up", (inter, hidden)),
                    ("down", (hidden, inter)),
                ):
                    name = f"{prefix}.{e}.{arch.proj_names[proj]}.weight"
                    if name not in t:
                        raise InputError("expert weight missing", file=str(ckpt.root), tensor=name)
                    if t[name].dtype != dtype:
                        raise InputError(
                            f"dtype {t[name].dtype} differs from the layer's {dtype}",
                            file=str(ckpt.root),
                            tensor=name,
                        )
                    if fp4:
                        _check_fp4_expert(ckpt, name, n, k)
                        continue
                    _expect(t[name], (n, k), ckpt)
                    if fp8:
                        require_scale(t, name, file=str(ckpt.root), what="FP8 weight")
        if not fp4 and dtype not in FP8_DTYPES + FLOAT_DTYPES:
            raise InputError(f"unsupported expert dtype {dtype}", file=str(ckpt.root), tensor=names[0])
        _check_count(n_exp, info.num_experts, extra_slots, layer, cfg_file, prefix)
        _check_expert_dtype(info, layer, prefix, fp4, fp8, cfg_file)
        stores[layer] = ExpertStore(
            layer, kind, n_exp, fp8, dtype, names, prefix, arch.proj_names, fp4=fp4, stacked=stacked
        )
        if layer in info.hash_layers:
            _check_hash_table(ckpt, arch.hash_table(layer), info.routing.top_k)
        _add_shared(ckpt, arch, info, layer, fused, shared, hidden)
    _check_experts_covered(ckpt, arch, info.num_layers, stores, cfg_file)
    kinds = {s.kind for s in stores.values()}
    layout = "none" if not kinds else (kinds.pop() if len(kinds) == 1 else "mixed")
    if layout == "per_expert":
        layout = "hf"
    manifest = None
    mpath = ckpt.root / MANIFEST_NAME
    if os.path.lexists(mpath):  # one that cannot be read is an error, never taken as absent
        manifest = read_json(mpath, what="manifest", within=input_roots(ckpt.root))
    q = ckpt.config.get("quantization_config")
    return CheckpointView(
        ckpt,
        arch,
        info,
        stores,
        shared,
        fused if isinstance(fused, dict) else None,
        q if isinstance(q, dict) else None,
        manifest,
        layout,
        identity.note,
        tuple(mtp_present),
    )


def _check_count(n_exp: int, routed: int, extra: int, layer: int, cfg_file: str, prefix: str) -> None:
    if n_exp != routed + extra:
        raise InputError(
            f"layer {layer} stores {n_exp} experts, config says {routed}"
            + (f" + {extra} fused slots" if extra else ""),
            file=cfg_file,
            tensor=prefix,
        )


def _add_shared(
    ckpt: Checkpoint,
    arch: ArchSpec,
    info: ModelInfo,
    layer: int,
    fused: Any,
    shared: dict[int, SharedExpert],
    hidden: int,
) -> None:
    t = ckpt.tensors
    sp = arch.shared_prefix(layer)
    if sp and info.shared_intermediate_size and not fused:
        g, u, d = (arch.shared_weight(layer, p) or "" for p in ("gate", "up", "down"))
        for n in (g, u, d):
            if n not in t:
                raise InputError("shared expert weight missing", file=str(ckpt.root), tensor=n)
        s = info.shared_intermediate_size
        _expect(t[g], (s, hidden), ckpt)
        _expect(t[u], (s, hidden), ckpt)
        _expect(t[d], (hidden, s), ckpt)
        sh_names = tuple(sorted(n for n in t if n.startswith(sp + ".")))
        shared[layer] = SharedExpert(
            layer, g, u, d, t[g].dtype in FP8_DTYPES, s, arch.shared_gate_weight(layer), sh_names
        )


def _int4_group(ckpt: Checkpoint, cfg_file: str) -> int:
    from moetool.transforms.int4 import Int4Scheme, find_int4_config

    qc = find_int4_config(ckpt.config)
    if qc is None:
        raise InputError(
            "experts are stored packed (weight_packed) but config.json has no compressed-tensors "
            "quantization_config",
            file=cfg_file,
            fix="use the config.json that came with the checkpoint",
        )
    return Int4Scheme.from_config(qc, file=cfg_file).group_size


def _check_int4_experts(
    ckpt: Checkpoint, prefix: str, n_exp: int, proj: dict[str, str], inter: int, hidden: int, group: int
) -> None:
    """Every expert has packed INT4 gate/up/down of the config's shapes, their group scales and shape."""
    from moetool.transforms.int4 import PACKED, PER_WORD, SCALE, SHAPE

    t = ckpt.tensors
    for e in range(n_exp):
        for p, (n, k) in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            base = f"{prefix}.{e}.{proj[p]}"
            for suffix, dtypes, shape in (
                (PACKED, ("I32",), (n, -(-k // PER_WORD))),
                (SCALE, FLOAT_DTYPES, (n, k // group) if k % group == 0 else None),
                (SHAPE, ("I32", "I64"), (2,)),
            ):
                name = f"{base}.{suffix}"
                if name not in t:
                    raise InputError("INT4 expert tensor missing", file=str(ckpt.root), tensor=name)
                if shape is None:
                    raise InputError(
                        f"{k} columns do not split into groups of {group}", file=str(ckpt.root), tensor=name
                    )
                _expect(t[name], shape, ckpt)
                if t[name].dtype not in dtypes:
                    raise InputError(
                        f"dtype {t[name].dtype}, expected {' or '.join(dtypes)}",
                        file=str(ckpt.root),
                        tensor=name,
                    )


def _check_fused_slots(slots: Any, arch: ArchSpec, info: ModelInfo, cfg_file: str) -> None:
    """``moetool_fused_shared_experts`` must place its slots where a model with a shared expert can hold
    them: right after the routed experts. (A slot count or slot weight that differs from what fusing
    gives still describes a runnable layer: ``validate`` finds those by running it.)"""
    from moetool.moe import FUSED_KEY

    fix = "config.json was edited after fusing; use the one moetool wrote"
    if not arch.has_shared or not info.shared_intermediate_size:
        raise InputError(f"{FUSED_KEY} is set but {arch.family} has no shared expert", file=cfg_file, fix=fix)
    if slots.first_slot != info.num_experts:
        raise InputError(
            f"{FUSED_KEY}.first_slot is {slots.first_slot}, but the slots follow the {info.num_experts} "
            f"routed experts: it must be {info.num_experts}",
            file=cfg_file,
            fix=fix,
        )


def _check_layer_range(ckpt: Checkpoint, root: str, num_layers: int, cfg_file: str) -> None:
    """Weights of a layer the config does not have would be copied unconverted: refuse them. DeepSeek's
    multi-token-prediction layers (``num_nextn_predict_layers``) follow the last layer and are allowed,
    but only a layer that is one (it holds the ``eh_proj`` that makes an MTP layer): a config that
    simply says fewer layers cannot pass its last layers off as MTP layers."""
    mtp = language_config(ckpt.config).get("num_nextn_predict_layers", 0)
    limit = num_layers + (mtp if isinstance(mtp, int) and not isinstance(mtp, bool) and 0 <= mtp <= 16 else 0)
    layer_re = re.compile("^" + re.escape(root) + r"\.layers\.(\d+)\.")
    for name in ckpt.tensors:
        m = layer_re.match(name)
        if m is None:
            continue
        layer = int(m.group(1))
        if layer >= limit or (
            layer >= num_layers and f"{root}.layers.{layer}.eh_proj.weight" not in ckpt.tensors
        ):
            raise InputError(
                f"weights hold layer {m.group(1)} but config.json has {num_layers} layers"
                + (f" (+ {mtp} multi-token-prediction, which hold eh_proj)" if limit > num_layers else ""),
                file=cfg_file,
                tensor=name,
                fix="use the config.json that came with the weights",
            )


def _check_fp4_expert(ckpt: Checkpoint, name: str, n: int, k: int) -> None:
    """An FP4 expert weight ``[n, k]``: I8 ``[n, k/2]`` with E8M0 ``.scale`` ``[n, k/32]``."""
    t = ckpt.tensors
    if k % 32:
        raise InputError(
            f"FP4 experts need K % 32 == 0 (one E8M0 scale per 32 columns), got K = {k}",
            file=str(ckpt.root),
            tensor=name,
        )
    _expect(t[name], (n, k // 2), ckpt)
    sname = e8m0_scale_name(name)
    if sname not in t:
        raise InputError("FP4 expert weight without its E8M0 .scale", file=str(ckpt.root), tensor=name)
    if t[sname].dtype != E8M0_DTYPE:
        raise InputError(
            f"FP4 scales must be F8_E8M0, got {t[sname].dtype}",
            file=str(ckpt.root),
            tensor=sname,
            fix="only DeepSeek-V4's FP4 format (e2m1 values, one E8M0 scale per 32) is read",
        )
    if tuple(t[sname].shape) != (n, k // 32):
        raise InputError(
            f"FP4 scale grid {list(t[sname].shape)} does not match the weight (expected [{n}, {k // 32}])",
            file=str(ckpt.root),
            tensor=sname,
        )


def _check_expert_dtype(
    info: ModelInfo, layer: int, prefix: str, fp4: bool, fp8: bool, cfg_file: str
) -> None:
    """The experts' stored format must be the one config.json declares (``expert_dtype``, DeepSeek-V4):
    a loader reads what the config says, so a mismatch would load wrong. FP4 experts need the declaration."""
    stored = "fp4" if fp4 else "fp8" if fp8 else "float"
    declared = info.expert_dtype
    if declared == stored or (declared is None and stored != "fp4"):
        return
    raise InputError(
        f"layer {layer} stores {stored} experts but config.json declares expert_dtype {declared!r}",
        file=cfg_file,
        tensor=prefix,
        fix="use the config.json that came with the weights",
    )


def _check_hash_table(ckpt: Checkpoint, name: str | None, top_k: int) -> None:
    """A hash-routed layer's token-id table: integer ``[vocab, top_k]`` (values are checked on read)."""
    t = ckpt.tensors.get(name or "")
    if t is None:
        raise InputError(
            "hash-routed layer without its token-id table",
            file=str(ckpt.root),
            tensor=name,
            fix="use the config.json that came with the weights (mlp_layer_types / num_hash_layers)",
        )
    if t.dtype not in ("I64", "I32") or len(t.shape) != 2 or t.shape[1] != top_k:
        raise InputError(
            f"token-id table must be integer [vocab, {top_k}], got {t.dtype} {list(t.shape)}",
            file=str(ckpt.root),
            tensor=name,
        )


_PROBE_LAYER = 987654321


def _layer_names(prefix_of: Callable[[int], str | None]) -> re.Pattern[str] | None:
    """A pattern matching tensor names under ``prefix_of(L)`` for any layer L (group 1 = L)."""
    probe = prefix_of(_PROBE_LAYER)
    if not probe or str(_PROBE_LAYER) not in probe:
        return None
    head, tail = probe.split(str(_PROBE_LAYER), 1)
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\.")


def _check_experts_covered(
    ckpt: Checkpoint, arch: ArchSpec, num_layers: int, stores: dict[int, ExpertStore], cfg_file: str
) -> None:
    """Every routed or shared expert tensor of a layer must lie in a layer the config makes MoE:
    otherwise it would be copied unconverted while config.json declares the conversion. (Layers past
    ``num_layers`` are DeepSeek's multi-token-prediction layers, which ``_check_layer_range`` admits and
    which are kept as they are and listed as unconverted.)"""
    specs = [arch]
    alt = arch.tensors.get("moe_alt")
    if alt and alt != arch.tensors["moe"]:
        specs.append(dataclasses.replace(arch, tensors={**arch.tensors, "moe": alt}))
    patterns = [
        p for a in specs for p in (_layer_names(a.experts_prefix), _layer_names(a.shared_prefix)) if p
    ]
    for name in sorted(ckpt.tensors):
        for pattern in patterns:
            m = pattern.match(name)
            if m is None:
                continue
            layer = int(m.group(1))
            if layer in stores or layer >= num_layers:
                continue
            keys = [
                arch.layers.get(k)
                for k in ("first_k_dense_key", "freq_key", "sparse_step_key", "mlp_only_key")
            ]
            said = ", ".join(f"{k}={language_config(ckpt.config).get(k)!r:.40}" for k in keys if k)
            raise InputError(
                f"layer {layer} stores expert tensors but config.json makes it a dense layer"
                + (f" ({said})" if said else ""),
                file=cfg_file,
                tensor=name,
                fix="the config and the weights disagree; use the config.json that came with the weights",
            )


def check_fp8_scale(ckpt: Checkpoint, weight: str) -> None:
    """The F8_E4M3 tensor ``weight`` (``[N, K]`` or stacked ``[E, N, K]``) must come with its block
    scales (``find_scale``), one per 128×128 block (``[..., ceil(N/128), ceil(K/128)]``): float32
    ``weight_scale_inv`` (DeepSeek-V3) or ``scale`` (DeepSeek-V4: E8M0, or float32 as its FP8-expert
    checkpoints store routed experts' scales). Anything else would be read with the wrong block scales: an
    ``InputError`` naming the scale and the grid the weight needs."""
    w = ckpt.info(weight)
    sname = require_scale(ckpt.tensors, weight, file=w.file, what="F8_E4M3 tensor")
    s = ckpt.info(sname)
    if len(w.shape) not in (2, 3):
        raise InputError(
            f"an F8_E4M3 weight of shape {list(w.shape)} is not a matrix", file=w.file, tensor=weight
        )
    *lead, n, k = w.shape
    want = (*lead, -(-n // 128), -(-k // 128))
    dtypes = ("F32",) if sname == scale_name(weight) else (E8M0_DTYPE, "F32")
    if s.dtype not in dtypes or tuple(s.shape) != want:
        dtype = " or ".join(dtypes)
        raise InputError(
            f"scale is {s.dtype} {list(s.shape)}; {weight} ({w.dtype} {list(w.shape)}) needs {dtype} "
            f"{list(want)}, one per 128x128 block",
            file=s.file,
            tensor=sname,
            fix="the checkpoint is corrupt or not DeepSeek-style block FP8",
        )


def _holds_block(ckpt: Checkpoint, pattern: str) -> bool:
    """Whether any tensor lies under an MoE block named by ``pattern`` (``model.layers.{layer}.mlp``)."""
    head, tail = pattern.split("{layer}")
    block = re.compile(re.escape(head) + r"\d+" + re.escape(tail) + r"\.experts\.")
    return any(block.match(n) for n in ckpt.tensors)


def _expect(info, shape: tuple[int, ...], ckpt: Checkpoint) -> None:
    if tuple(info.shape) != tuple(shape):
        raise InputError(
            f"shape {list(info.shape)} contradicts config.json (expected {list(shape)})",
            file=str(ckpt.root),
            tensor=info.name,
            fix="the config and the weights disagree",
        )
