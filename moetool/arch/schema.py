"""The schema every ``configs/<family>.toml`` obeys, and how a file is read: ``extends`` first, then checks.

A family file names its tensor patterns, config keys, MoE-layer rule, routing and shared-expert weight.
A file that starts with ``extends = "other_family"`` holds only what differs: it is laid over the
other family's file section by section (a key given replaces that key; a section given whole is merged
key by key), and the result must pass the schema like any file. A chain of ``extends`` is followed to
its root; a cycle or an unknown base is refused naming the file.
"""

from __future__ import annotations

import copy
import sys
from functools import cache
from importlib import resources
from typing import Any

from moetool.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LAYER_RULES = ("first_k_dense", "sparse_step", "all")
#: Router scoring functions; ``moetool.moe.SCORING`` holds one torch function per name.
SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
#: Top-k rules; ``moetool.moe.route`` implements each.
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SLOT_WEIGHTS = ("one", "sigmoid_gate")
#: The text model's root in a family's tensor patterns; a wrapped checkpoint stores it elsewhere.
CANONICAL_ROOT = "model"

# section -> key -> (type, required)
SCHEMA: dict[str, dict[str, tuple[type, bool]]] = {
    "": {
        "family": (str, True),
        "model_types": (list, True),
        "description": (str, True),
        "extends": (str, False),
    },
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
        # a per-layer list ("dense" | "sparse"), authoritative where the config has it (DeepSeek-V3.2)
        "mlp_types_key": (str, False),
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
        # block scales of X.weight: X.weight_scale_inv (F32, the default) or X.scale (E8M0, DeepSeek-V4)
        "scale": (str, False),
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
        # experts clamp gate <= limit and |up| <= limit before SwiGLU (DeepSeek-V4)
        "swiglu_limit_key": (str, False),
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
    # MoE layers routed by a frozen token-id -> expert-ids table instead of the router's top-k
    # (DeepSeek-V4's first layers); the router still weighs the chosen experts
    "hash_routing": {
        "layer_types_key": (str, True),
        "hash_value": (str, True),
        "count_key": (str, False),
        "table": (str, True),
    },
    # routed experts may ship in FP4 (I8 e2m1 pairs + E8M0 scale per 32), declared by this config key
    "fp4_experts": {"expert_dtype_key": (str, True)},
    # multi-token-prediction layers after the decoder layers, with MoE blocks of their own
    "mtp": {"moe": (str, True), "count_key": (str, True)},
}
OPTIONAL_SECTIONS = ("shared_expert", "gdn", "hash_routing", "fp4_experts", "mtp")
#: Expert formats a config may declare (``[fp4_experts] expert_dtype_key``).
EXPERT_DTYPES = ("fp4", "fp8")
SCALE_NAMES = ("weight_scale_inv", "scale")


def check_schema(data: dict[str, Any], source: str) -> None:
    """Raise ``InputError`` naming ``source`` and the key when ``data`` (a resolved file) breaks ``SCHEMA``."""
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
    for key in ("moe", "moe_alt"):
        pattern = data["tensors"].get(key)
        if pattern is not None and "{layer}" not in pattern:
            raise InputError(f"tensors.{key} must contain {{layer}}", file=source)
    if "mtp" in data and "{layer}" not in data["mtp"]["moe"]:
        raise InputError("mtp.moe must contain {layer}", file=source)
    if data["tensors"].get("scale", SCALE_NAMES[0]) not in SCALE_NAMES:
        raise InputError(f"tensors.scale must be one of {SCALE_NAMES}", file=source)
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


def overlay(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` laid over ``base``: top-level keys replace, sections (tables) merge key by key.
    ``extends`` itself is dropped from the result."""
    out = copy.deepcopy(base)
    out.pop("extends", None)
    for key, value in child.items():
        if key == "extends":
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


@cache
def raw_files() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every ``configs/*.toml`` as written: ``{file stem: (source label, parsed data)}``."""
    files: dict[str, tuple[str, dict[str, Any]]] = {}
    for entry in sorted(resources.files("moetool.configs").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".toml"):
            continue
        source = f"configs/{entry.name}"
        try:
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"not valid TOML: {e}", file=source) from None
        files[entry.name[: -len(".toml")]] = (source, data)
    return files


def resolve(
    data: dict[str, Any], source: str, files: dict[str, tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    """Follow ``data``'s ``extends`` chain through ``files`` (``raw_files()`` form) and overlay each
    level. The result has no ``extends`` key; it is not yet checked against the schema."""
    chain = [source]
    current = data
    layers = [data]
    while "extends" in current:
        base = current["extends"]
        if not isinstance(base, str) or base not in files:
            known = ", ".join(sorted(files))
            raise InputError(f"extends {base!r}: no such family file (known: {known})", file=source)
        base_source, base_data = files[base]
        if base_source in chain:
            raise InputError(f"extends forms a cycle: {' -> '.join([*chain, base_source])}", file=source)
        chain.append(base_source)
        layers.append(base_data)
        current = base_data
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = overlay(merged, layer)
    return merged
