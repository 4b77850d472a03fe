"""Architecture specs: one ``configs/<family>.toml`` per model family, loaded into a frozen ``ArchSpec``.

An ``ArchSpec`` knows a family's tensor names, config keys, which layers are MoE, the routing rule and
the shared expert's weight; ``ArchSpec.model(config)`` resolves those against one checkpoint's
``config.json`` into a ``ModelInfo`` of plain numbers. Adding an architecture is adding a file — often a
few lines that ``extends`` an existing one (``moetool.arch.schema``).

Which family a checkpoint is (``moetool.arch.identify``): its ``model_type``, else the ``model_type`` of the
text model it wraps (``text_config``), else ``--family NAME`` when the tensor names match that family's.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from moetool.arch.schema import (
    CANONICAL_ROOT,
    LAYER_RULES,
    OPTIONAL_SECTIONS,
    SCHEMA,
    SCORINGS,
    SLOT_WEIGHTS,
    TOPK_METHODS,
    check_schema,
    raw_files,
    resolve,
)
from moetool.arch.spec import (
    MAX_DIM,
    MAX_EXPERTS,
    MAX_LAYERS,
    ArchSpec,
    GdnInfo,
    ModelInfo,
    Routing,
    language_config,
)
from moetool.errors import InputError

__all__ = [
    "CANONICAL_ROOT",
    "LAYER_RULES",
    "MAX_DIM",
    "MAX_EXPERTS",
    "MAX_LAYERS",
    "OPTIONAL_SECTIONS",
    "SCHEMA",
    "SCORINGS",
    "SLOT_WEIGHTS",
    "TOPK_METHODS",
    "ArchSpec",
    "GdnInfo",
    "ModelInfo",
    "Routing",
    "check_schema",
    "detect",
    "get_arch",
    "known_model_types",
    "language_config",
    "registry",
    "resolved_file",
]


def _spec_from_toml(data: dict[str, Any], source: str, *, extends: str | None = None) -> ArchSpec:
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
        extends=extends,
        hash_spec=dict(data["hash_routing"]) if "hash_routing" in data else None,
        fp4_spec=dict(data["fp4_experts"]) if "fp4_experts" in data else None,
        mtp_spec=dict(data["mtp"]) if "mtp" in data else None,
    )


def resolved_file(stem: str) -> dict[str, Any]:
    """``configs/<stem>.toml`` with its ``extends`` chain applied: the data the schema checks."""
    files = raw_files()
    source, data = files[stem]
    for key in ("family", "model_types", "description"):
        if "extends" in data and key not in data:
            # inherited model_types would make two families claim one model_type
            raise InputError(f"a file that extends another must set {key} itself", file=source)
    return resolve(data, source, files)


@cache
def registry() -> dict[str, ArchSpec]:
    """Every family in configs/, by family name."""
    specs: dict[str, ArchSpec] = {}
    owner: dict[str, str] = {}
    for stem, (source, data) in raw_files().items():
        spec = _spec_from_toml(resolved_file(stem), source, extends=data.get("extends"))
        if stem != spec.family:
            raise InputError(f"family {spec.family!r} must live in {spec.family}.toml", file=source)
        for model_type in spec.model_types:
            if model_type in owner:
                raise InputError(
                    f"model_type {model_type!r} is claimed by both {owner[model_type]} and {spec.family}",
                    file=source,
                )
            owner[model_type] = spec.family
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
    """The ``ArchSpec`` for a config's ``model_type`` (or, for a wrapper, its ``text_config``'s);
    unknown types are refused with the known list. ``moetool.arch.identify.identify`` also reads the
    tensor names (the text model's root, ``--family``)."""
    from moetool.arch.identify import family_of_config

    spec = family_of_config(config)
    if spec is None:
        model_type = config.get("model_type")
        raise InputError(
            f"unsupported model_type {model_type!r}",
            file=file,
            fix=f"known: {', '.join(known_model_types())}; --family NAME reads another model_type as NAME",
        )
    return spec
