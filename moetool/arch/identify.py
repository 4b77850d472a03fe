"""Which family a checkpoint is, and where it keeps its text model, from ``config.json`` and tensor names.

1. ``model_type`` is one a family declares (``configs/<family>.toml``), or
2. the checkpoint wraps a text model (``text_config``) whose ``model_type`` a family declares, or
3. ``--family NAME`` is given and the tensor names match that family's (said on stderr).

The text model's root is found from the tensor names: ``model`` (``model.layers.*``) or a wrapper's
``model.language_model`` (Qwen3.5-MoE), ``language_model.model`` (Kimi-K2.5) or ``language_model``.
An unknown ``model_type`` without ``--family`` is refused, naming the families whose names match.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from moetool.arch import ArchSpec, get_arch, known_model_types, registry
from moetool.arch.schema import CANONICAL_ROOT
from moetool.errors import InputError, UsageError

#: Where checkpoints keep the text model, in the order they are tried.
ROOTS = (CANONICAL_ROOT, "model.language_model", "language_model.model", "language_model")


@dataclass(frozen=True)
class Identity:
    """A checkpoint's family, rooted where its tensors are, and how it was recognised."""

    arch: ArchSpec
    how: str  # "model_type" | "text_config" | "family_option"
    note: str | None  # one line for stderr when the family was not read off model_type

    @property
    def root(self) -> str:
        return self.arch.root


def family_of_config(config: Mapping[str, Any]) -> ArchSpec | None:
    """The family that declares ``config``'s ``model_type``, else its ``text_config``'s; None if neither."""
    spec, _ = _family_and_how(config)
    return spec


def _family_and_how(config: Mapping[str, Any]) -> tuple[ArchSpec | None, str]:
    by_type = {t: spec for spec in registry().values() for t in spec.model_types}
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in by_type:
        return by_type[model_type], "model_type"
    text = config.get("text_config")
    if isinstance(text, Mapping):
        text_type = text.get("model_type")
        if isinstance(text_type, str) and text_type in by_type:
            return by_type[text_type], "text_config"
    return None, ""


def find_root(names: Collection[str]) -> str:
    """The first of ``ROOTS`` under which the checkpoint has ``.layers.`` tensors (``model`` if none)."""
    for root in ROOTS:
        head = root + ".layers."
        if any(n.startswith(head) for n in names):
            return root
    return CANONICAL_ROOT


def _block_regex(pattern: str) -> re.Pattern[str]:
    head, tail = pattern.split("{layer}", 1)
    return re.compile("^" + re.escape(head) + r"(\d+)" + re.escape(tail) + r"\.")


def matching_root(spec: ArchSpec, names: Collection[str], *, fused: bool = False) -> str | None:
    """The root under which ``names`` look like ``spec``'s family, or None.

    They match when some layer holds, under the family's MoE block name, the family's router weight and
    routed experts (per-expert, packed or stacked), a score-correction bias exactly when the family has
    one, a shared expert (and its gate) exactly when the family has them (a fused checkpoint may have
    none left), and linear-attention tensors exactly when the family has Gated DeltaNet layers."""
    nameset = set(names)
    for root in ROOTS:
        if not any(n.startswith(root + ".layers.") for n in nameset):
            continue
        r = spec.rooted(root)
        gdn_pattern = r.gdn_spec["prefix"] if r.gdn_spec else root + ".layers.{layer}.linear_attn"
        has_gdn = any(_block_regex(gdn_pattern).match(n) for n in nameset)
        if bool(r.gdn_spec) != has_gdn:
            continue
        for moe_key in ("moe", "moe_alt"):
            pattern = r.tensors.get(moe_key)
            if not pattern:
                continue
            rr = r if moe_key == "moe" else _with_moe(r, pattern)
            layers = sorted({int(m.group(1)) for n in nameset if (m := _block_regex(pattern).match(n))})
            if any(_layer_matches(rr, layer, nameset, fused) for layer in layers):
                return root
    return None


def _with_moe(spec: ArchSpec, pattern: str) -> ArchSpec:
    import dataclasses

    return dataclasses.replace(spec, tensors={**spec.tensors, "moe": pattern})


def _layer_matches(spec: ArchSpec, layer: int, names: set[str], fused: bool) -> bool:
    if spec.router_weight(layer) not in names:
        return False
    prefix = spec.experts_prefix(layer)
    stored = (
        spec.expert_weight(layer, 0, "gate") in names
        or spec.packed_names(layer)[0] in names
        or spec.deepgemm_names(layer)["w13_weight"] in names
        or spec.legacy_deepgemm_names(layer)["w13_weight"] in names
        or any(n.startswith(f"{prefix}.0.{spec.proj_names['gate']}.") for n in names)
    )
    if not stored:
        return False
    bias = spec.router_bias(layer)
    # a score-correction bias under the block, by the usual name or the family's own (V4: gate.bias)
    suffixes = (".e_score_correction_bias", *(["." + spec.tensors["router_bias"]] if bias else []))
    has_bias = any(n.endswith(tuple(suffixes)) and n.startswith(spec.moe_prefix(layer) + ".") for n in names)
    if bool(bias) != has_bias or (bias and bias not in names):
        return False
    block = spec.moe_prefix(layer) + "."
    has_shared = any(n.startswith(block + "shared_expert") and ".shared_expert_gate." not in n for n in names)
    if spec.has_shared:
        if not has_shared and not fused:
            return False
        if has_shared and not any(n.startswith(spec.shared_prefix(layer) + ".") for n in names):
            return False
    elif has_shared:
        return False
    gate = spec.shared_gate_weight(layer)
    has_gate = any(n.startswith(block + "shared_expert_gate.") for n in names)
    return bool(gate) == has_gate and (not gate or gate in names)


def identify(
    config: Mapping[str, Any],
    names: Collection[str],
    *,
    family: str | None = None,
    file: str = "config.json",
) -> Identity:
    """The checkpoint's ``Identity``. ``family`` is ``--family``: it must agree with a known
    ``model_type``, and lets an unknown one be read as that family when the names match."""
    spec, how = _family_and_how(config)
    model_type = config.get("model_type")
    fused = isinstance(config.get("moetool_fused_shared_experts"), Mapping)
    if family is not None:
        forced = get_arch(family)
        if spec is not None and spec.family != forced.family:
            raise UsageError(
                f"model_type {model_type!r} is family {spec.family}; --family {family} contradicts it",
                file=file,
                fix="drop --family",
            )
        if spec is None:
            root = matching_root(forced, names, fused=fused)
            if root is None:
                example = forced.rooted(find_root(names)).expert_weight(1, 0, "gate")
                raise InputError(
                    f"--family {family}: the tensor names do not match {family}'s (router, experts such as "
                    f"{example}, score bias, shared expert)",
                    file=file,
                    fix=_suggestion(names, fused) or "the checkpoint is not of this family",
                )
            return Identity(
                forced.rooted(root),
                "family_option",
                f"reading model_type {model_type!r} as family {family}: its tensor names match {family}'s",
            )
    if spec is None:
        raise InputError(
            f"unsupported model_type {model_type!r}",
            file=file,
            fix=_suggestion(names, fused) or f"known: {', '.join(known_model_types())}",
        )
    note = None
    if how == "text_config":
        text_type = config["text_config"].get("model_type")
        note = f"model_type {model_type!r} wraps a {text_type!r} text model: read as family {spec.family}"
    return Identity(spec.rooted(find_root(names)), how, note)


def matching_families(names: Collection[str], *, fused: bool = False) -> list[str]:
    """Every family whose tensor names ``names`` match (``matching_root``), sorted."""
    return sorted(f for f, spec in registry().items() if matching_root(spec, names, fused=fused) is not None)


def _suggestion(names: Collection[str], fused: bool) -> str | None:
    found = matching_families(names, fused=fused)
    if not found:
        return None
    return (
        f"its tensor names match {', '.join(found)}: rerun with --family {found[0]}"
        + ("" if len(found) == 1 else " (or another of them)")
        + f"; known model_types: {', '.join(known_model_types())}"
    )
