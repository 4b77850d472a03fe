"""Architecture specs: one ``configs/<family>.toml`` per model family, loaded into a frozen ``ArchSpec``.

An ``ArchSpec`` knows a family's tensor names, config keys, which layers are MoE, the routing rule and
the shared expert's weight; ``ArchSpec.model(config)`` resolves those against one checkpoint's
``config.json`` into a ``ModelInfo`` of plain numbers. Adding an architecture is adding a file.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from moetool.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_LAYERS = 100_000
MAX_EXPERTS = 1_000_000
MAX_DIM = 10_000_000
LAYER_RULES = ("first_k_dense", "sparse_step", "all")
SCORINGS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SLOT_WEIGHTS = ("one", "sigmoid_gate")

# The schema every configs/*.toml obeys: section -> key -> (type, required).
SCHEMA: dict[str, dict[str, tuple[type, bool]]] = {
    "": {"family": (str, True), "model_types": (list, True), "description": (str, True)},
    "config_keys": {
        "num_layers": (str, True),
        "hidden_size": (str, True),
        "num_experts": (str, True),
        "top_k": (str, True),
        "moe_intermediate_size": (str, True),
        "shared_count": (str, False),
        "shared_intermediate_size": (str, False),
    },
    "layers": {
        "rule": (str, True),
        "first_k_dense_key": (str, False),
        "freq_key": (str, False),
        "sparse_step_key": (str, False),
        "mlp_only_key": (str, False),
    },
    "tensors": {
        "moe": (str, True),
        "moe_alt": (str, False),
        "experts": (str, True),
        "gate_proj": (str, True),
        "up_proj": (str, True),
        "down_proj": (str, True),
        "router": (str, True),
        "router_bias": (str, True),
        "shared": (str, True),
        "shared_gate": (str, True),
    },
    "routing": {
        "scoring": (str, True),
        "scoring_key": (str, False),
        "topk_method": (str, True),
        "topk_method_key": (str, False),
        "n_group_key": (str, False),
        "topk_group_key": (str, False),
        "norm_topk_prob": (bool, True),
        "norm_topk_prob_key": (str, False),
        "routed_scaling_factor": (float, True),
        "routed_scaling_factor_key": (str, False),
    },
    "shared_expert": {"slot_weight": (str, True)},
    "gdn": {
        "prefix": (str, True),
        "layer_types_key": (str, True),
        "full_attention_interval_key": (str, True),
        "num_key_heads": (str, True),
        "num_value_heads": (str, True),
        "head_k_dim": (str, True),
        "head_v_dim": (str, True),
        "conv_kernel": (str, True),
    },
}
OPTIONAL_SECTIONS = ("shared_expert", "gdn")


@dataclass(frozen=True)
class Routing:
    """How a family's router turns logits into top-k expert ids and weights, resolved for one config."""

    scoring: str  # "softmax" | "sigmoid"
    topk_method: str  # "greedy" | "group_limited_greedy" | "noaux_tc"
    top_k: int
    num_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    has_score_bias: bool


@dataclass(frozen=True)
class GdnInfo:
    """Gated DeltaNet dimensions of a model (Qwen3-Next)."""

    layers: tuple[int, ...]
    num_key_heads: int
    num_value_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int


@dataclass(frozen=True)
class ModelInfo:
    """An ``ArchSpec`` resolved against one ``config.json``: plain numbers, no tensors."""

    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_experts: int
    moe_intermediate_size: int
    shared_intermediate_size: int  # 0 when the family has no shared expert
    moe_layers: tuple[int, ...]
    routing: Routing
    gdn: GdnInfo | None

    @property
    def shared_slots(self) -> int:
        """Fused slots a shared expert would make (SPEC §4); 0 without shared experts or when S % I != 0."""
        s, i = self.shared_intermediate_size, self.moe_intermediate_size
        return s // i if s and i and s % i == 0 else 0


@dataclass(frozen=True)
class ArchSpec:
    """One family's naming and semantics, loaded from ``configs/<family>.toml``."""

    family: str
    model_types: tuple[str, ...]
    description: str
    config_keys: dict[str, str | list[str]] = field(hash=False)
    layers: dict[str, str] = field(hash=False)
    tensors: dict[str, str] = field(hash=False)
    routing_spec: dict[str, Any] = field(hash=False)
    slot_weight: str | None = None
    gdn_spec: dict[str, str] | None = field(default=None, hash=False)

    # -- tensor names -------------------------------------------------------------------------
    def moe_prefix(self, layer: int) -> str:
        """``model.layers.{L}.mlp`` (or ``.block_sparse_moe``): the MoE block of a layer."""
        return self.tensors["moe"].format(layer=layer)

    def experts_prefix(self, layer: int) -> str:
        """The expert container, ``P`` in SPEC §3 (``model.layers.{L}.mlp.experts``)."""
        return f"{self.moe_prefix(layer)}.{self.tensors['experts']}"

    def expert_weight(self, layer: int, expert: int, proj: str) -> str:
        """Per-expert weight name; ``proj`` is ``gate``, ``up`` or ``down``."""
        return f"{self.experts_prefix(layer)}.{expert}.{self.tensors[proj + '_proj']}.weight"

    def packed_names(self, layer: int) -> tuple[str, str]:
        """transformers v5 packed experts: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
        p = self.experts_prefix(layer)
        return f"{p}.gate_up_proj", f"{p}.down_proj"

    def deepgemm_names(self, layer: int) -> dict[str, str]:
        p = self.experts_prefix(layer)
        return {
            k: f"{p}.{k}" for k in ("w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv")
        }

    def router_weight(self, layer: int) -> str:
        return f"{self.moe_prefix(layer)}.{self.tensors['router']}.weight"

    def router_bias(self, layer: int) -> str | None:
        b = self.tensors["router_bias"]
        return f"{self.moe_prefix(layer)}.{b}" if b else None

    def shared_weight(self, layer: int, proj: str) -> str | None:
        s = self.tensors["shared"]
        return f"{self.moe_prefix(layer)}.{s}.{proj}_proj.weight" if s else None

    def shared_prefix(self, layer: int) -> str | None:
        s = self.tensors["shared"]
        return f"{self.moe_prefix(layer)}.{s}" if s else None

    def shared_gate_weight(self, layer: int) -> str | None:
        g = self.tensors["shared_gate"]
        return f"{self.moe_prefix(layer)}.{g}.weight" if g else None

    @property
    def has_shared(self) -> bool:
        return bool(self.tensors["shared"])

    @property
    def proj_names(self) -> dict[str, str]:
        """``{"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}`` (Mixtral: w1, w3, w2)."""
        return {p: self.tensors[p + "_proj"] for p in ("gate", "up", "down")}

    # -- resolution against config.json -------------------------------------------------------
    def model(self, config: dict[str, Any], *, file: str = "config.json") -> ModelInfo:
        """Resolve this spec against a checkpoint's config; missing keys are an ``InputError``."""

        def need(key: str | list[str]) -> Any:
            for k in [key] if isinstance(key, str) else key:
                if config.get(k) is not None:
                    return config[k]
            raise InputError(
                f"missing key {key if isinstance(key, str) else ' or '.join(key)!r} required for a "
                f"{self.family} checkpoint",
                file=file,
                fix="use the config.json that came with the checkpoint",
            )

        def opt(key: str | list[str] | None, default: Any) -> Any:
            for k in [key] if isinstance(key, str) else key or []:
                if k and config.get(k) is not None:
                    return config[k]
            return default

        def as_int(key: Any, value: Any, lo: int = 0, hi: int = MAX_DIM) -> int:
            name = key if isinstance(key, str) else "/".join(key or ["a config value"])
            if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
                raise InputError(
                    f"{name} must be an integer, got {value!r:.60}",
                    file=file,
                    fix="use the config.json that came with the checkpoint",
                )
            if not lo <= int(value) <= hi:
                raise InputError(f"{name}={int(value)} is outside [{lo}, {hi}]", file=file)
            return int(value)

        def as_float(key: Any, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InputError(f"{key} must be a finite number, got {value!r:.60}", file=file)
            return float(value)

        ck = self.config_keys
        num_layers = as_int(ck["num_layers"], need(ck["num_layers"]), 1, MAX_LAYERS)
        hidden = as_int(ck["hidden_size"], need(ck["hidden_size"]), 1)
        num_experts = as_int(ck["num_experts"], need(ck["num_experts"]), 0, MAX_EXPERTS)
        moe_i = as_int(ck["moe_intermediate_size"], need(ck["moe_intermediate_size"]), 1)
        top_k = as_int(ck["top_k"], need(ck["top_k"]), 1, max(num_experts, 1))
        shared_i = 0
        if self.has_shared:
            if "shared_count" in ck:
                shared_i = as_int(ck["shared_count"], opt(ck["shared_count"], 0) or 0, 0, MAX_EXPERTS) * moe_i
            elif "shared_intermediate_size" in ck:
                shared_i = as_int(ck["shared_intermediate_size"], opt(ck["shared_intermediate_size"], 0) or 0)

        ls = self.layers
        rule = ls["rule"]
        if rule == "first_k_dense":
            k = as_int(ls.get("first_k_dense_key"), opt(ls.get("first_k_dense_key"), 0))
            freq = as_int(ls.get("freq_key"), opt(ls.get("freq_key"), 1) or 1, 1)
            moe_layers = tuple(i for i in range(num_layers) if i >= k and i % freq == 0)
        elif rule == "sparse_step":
            step = as_int(ls.get("sparse_step_key"), opt(ls.get("sparse_step_key"), 1) or 1, 1)
            only_list = opt(ls.get("mlp_only_key"), []) or []
            if not isinstance(only_list, list):
                raise InputError(f"{ls.get('mlp_only_key')} must be a list of layer numbers", file=file)
            only = {as_int(ls.get("mlp_only_key"), x, 0, MAX_LAYERS) for x in only_list}
            moe_layers = tuple(
                i for i in range(num_layers) if i not in only and num_experts > 0 and (i + 1) % step == 0
            )
        else:
            moe_layers = tuple(range(num_layers))

        rs = self.routing_spec
        scoring = str(opt(rs.get("scoring_key"), rs["scoring"]))
        topk_method = str(opt(rs.get("topk_method_key"), rs["topk_method"]))
        if scoring not in SCORINGS:
            raise InputError(
                f"unsupported {rs.get('scoring_key')}={scoring!r} (known: {', '.join(SCORINGS)})", file=file
            )
        if topk_method not in TOPK_METHODS:
            raise InputError(
                f"unsupported topk_method={topk_method!r} (known: {', '.join(TOPK_METHODS)})", file=file
            )
        routing = Routing(
            scoring=scoring,
            topk_method=topk_method,
            top_k=top_k,
            num_experts=num_experts,
            n_group=as_int(rs.get("n_group_key"), opt(rs.get("n_group_key"), 1) or 1, 1, MAX_EXPERTS),
            topk_group=as_int(
                rs.get("topk_group_key"), opt(rs.get("topk_group_key"), 1) or 1, 1, MAX_EXPERTS
            ),
            norm_topk_prob=bool(opt(rs.get("norm_topk_prob_key"), rs["norm_topk_prob"])),
            routed_scaling_factor=as_float(
                rs.get("routed_scaling_factor_key"),
                opt(rs.get("routed_scaling_factor_key"), rs["routed_scaling_factor"]),
            ),
            has_score_bias=bool(self.tensors["router_bias"]),
        )

        gdn = None
        if self.gdn_spec:
            g = self.gdn_spec
            types = config.get(g["layer_types_key"])
            if types is not None and not isinstance(types, list):
                raise InputError(f"{g['layer_types_key']} must be a list", file=file)
            if types:
                layers = tuple(i for i, t in enumerate(types) if t == "linear_attention")
            else:
                interval = as_int(
                    g["full_attention_interval_key"], opt(g["full_attention_interval_key"], 4), 1
                )
                layers = tuple(i for i in range(num_layers) if (i + 1) % interval != 0)
            gdn = GdnInfo(
                layers=layers,
                num_key_heads=as_int(g["num_key_heads"], need(g["num_key_heads"]), 1),
                num_value_heads=as_int(g["num_value_heads"], need(g["num_value_heads"]), 1),
                head_k_dim=as_int(g["head_k_dim"], need(g["head_k_dim"]), 1),
                head_v_dim=as_int(g["head_v_dim"], need(g["head_v_dim"]), 1),
                conv_kernel=as_int(g["conv_kernel"], opt(g["conv_kernel"], 4), 1),
            )
        return ModelInfo(
            family=self.family,
            model_type=str(config.get("model_type", "")),
            num_layers=num_layers,
            hidden_size=hidden,
            num_experts=num_experts,
            moe_intermediate_size=moe_i,
            shared_intermediate_size=shared_i,
            moe_layers=moe_layers,
            routing=routing,
            gdn=gdn,
        )


def check_schema(data: dict[str, Any], source: str) -> None:
    """Raise ``InputError`` naming ``source`` and the key when ``data`` breaks ``SCHEMA``."""
    for section, keys in SCHEMA.items():
        if section and section not in data:
            if section in OPTIONAL_SECTIONS:
                continue
            raise InputError(f"missing section [{section}]", file=source)
        table = data if not section else data[section]
        if not isinstance(table, dict):
            raise InputError(f"[{section}] must be a table", file=source)
        for key, (typ, required) in keys.items():
            if key not in table:
                if required:
                    raise InputError(f"missing key {section + '.' if section else ''}{key}", file=source)
                continue
            value = table[key]
            ok = isinstance(value, typ) or (
                typ is float and isinstance(value, int) and not isinstance(value, bool)
            )
            if section == "config_keys" and isinstance(value, list):
                ok = bool(value) and all(isinstance(v, str) for v in value)
            if not ok:
                raise InputError(f"{section}.{key} must be {typ.__name__}", file=source)
        unknown = set(table) - set(keys) - (set(SCHEMA) - {""} if not section else set())
        if unknown:
            raise InputError(f"unknown key(s) {sorted(unknown)} in [{section or 'top level'}]", file=source)
    if data["layers"]["rule"] not in LAYER_RULES:
        raise InputError(f"layers.rule must be one of {LAYER_RULES}", file=source)
    if data["routing"]["scoring"] not in SCORINGS or data["routing"]["topk_method"] not in TOPK_METHODS:
        raise InputError("routing.scoring / routing.topk_method has an unknown value", file=source)
    has_shared = bool(data["tensors"]["shared"])
    if has_shared != ("shared_expert" in data):
        raise InputError("[shared_expert] is required exactly when tensors.shared is set", file=source)
    if has_shared:
        if data["shared_expert"]["slot_weight"] not in SLOT_WEIGHTS:
            raise InputError(f"shared_expert.slot_weight must be one of {SLOT_WEIGHTS}", file=source)
        ck = data["config_keys"]
        if ("shared_count" in ck) == ("shared_intermediate_size" in ck):
            raise InputError(
                "a family with shared experts names exactly one of config_keys.shared_count / "
                "config_keys.shared_intermediate_size",
                file=source,
            )


def _spec_from_toml(data: dict[str, Any], source: str) -> ArchSpec:
    check_schema(data, source)
    return ArchSpec(
        family=data["family"],
        model_types=tuple(data["model_types"]),
        description=data["description"],
        config_keys=dict(data["config_keys"]),
        layers=dict(data["layers"]),
        tensors=dict(data["tensors"]),
        routing_spec=dict(data["routing"]),
        slot_weight=data.get("shared_expert", {}).get("slot_weight"),
        gdn_spec=dict(data["gdn"]) if "gdn" in data else None,
    )


@cache
def registry() -> dict[str, ArchSpec]:
    """Every family in configs/, by family name."""
    specs: dict[str, ArchSpec] = {}
    for entry in sorted(resources.files("moetool.configs").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".toml"):
            continue
        data = tomllib.loads(entry.read_text(encoding="utf-8"))
        spec = _spec_from_toml(data, f"configs/{entry.name}")
        if entry.name != f"{spec.family}.toml":
            raise InputError(
                f"family {spec.family!r} must live in {spec.family}.toml", file=f"configs/{entry.name}"
            )
        specs[spec.family] = spec
    return specs


def known_model_types() -> list[str]:
    return sorted(t for spec in registry().values() for t in spec.model_types)


def get_arch(family: str) -> ArchSpec:
    try:
        return registry()[family]
    except KeyError:
        raise InputError(f"unknown family {family!r} (known: {', '.join(sorted(registry()))})") from None


def detect(config: dict[str, Any], *, file: str = "config.json") -> ArchSpec:
    """The ``ArchSpec`` for a config's ``model_type``; unknown types are refused with the known list."""
    model_type = config.get("model_type")
    for spec in registry().values():
        if model_type in spec.model_types:
            return spec
    raise InputError(
        f"unsupported model_type {model_type!r}",
        file=file,
        fix=f"known: {', '.join(known_model_types())}",
    )
