"""Tensor names and layer rules of a factory checkpoint, from its ``config.json`` dict alone: the single
source of tensor names for the tests, the demo and the benchmarks (``experts_prefix``,
``expert_weight_name``, ``router_weight_name``, ``shared_expert_prefix``, ``moe_layers`` ...). Every
rule comes from the family's :class:`~moetool.testing.families.Naming`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetool.testing.families import defaults_of, naming_of


def layer_prefix(layer: int) -> str:
    """``model.layers.{layer}``."""
    return f"model.layers.{layer}"


def moe_block_prefix(config: Mapping[str, Any], layer: int, *, packed: bool = False) -> str:
    """The MoE block of ``layer``: ``model.layers.L.mlp``, or ``model.layers.L.block_sparse_moe`` for
    per-expert Mixtral (transformers v5 renames Mixtral's block to ``mlp`` in memory, so packed Mixtral
    checkpoints use ``mlp``)."""
    block = "mlp" if packed else naming_of(config).moe_block
    return f"{layer_prefix(layer)}.{block}"


def experts_prefix(config: Mapping[str, Any], layer: int, *, packed: bool = False) -> str:
    """The expert container of ``layer``, e.g. ``model.layers.3.mlp.experts``."""
    return f"{moe_block_prefix(config, layer, packed=packed)}.experts"


def expert_proj_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Module names of an expert's projections: ``{"gate": "gate_proj", "up": "up_proj", "down":
    "down_proj"}``, for Mixtral ``{"gate": "w1", "up": "w3", "down": "w2"}``."""
    return dict(zip(("gate", "up", "down"), naming_of(config).expert_projs))


def expert_weight_name(config: Mapping[str, Any], layer: int, expert: int, proj: str) -> str:
    """Per-expert weight name; ``proj`` is ``"gate"``, ``"up"`` or ``"down"``:
    ``model.layers.L.mlp.experts.E.gate_proj.weight``, ``...block_sparse_moe.experts.E.w1.weight``."""
    return f"{experts_prefix(config, layer)}.{expert}.{expert_proj_names(config)[proj]}.weight"


def packed_expert_names(config: Mapping[str, Any], layer: int) -> tuple[str, str]:
    """transformers-v5 packed names ``(P.gate_up_proj [E, 2I, H], P.down_proj [E, H, I])``."""
    p = experts_prefix(config, layer, packed=True)
    return f"{p}.gate_up_proj", f"{p}.down_proj"


#: The deepgemm layout's stacked FP8 tensors under an expert container ``P``, by DeepGEMM role: moetool
#: writes them under the names transformers' ``FP8Experts`` holds (``w13`` = gate rows then up rows).
DEEPGEMM_LEAVES: dict[str, str] = {
    "w13_weight": "gate_up_proj",
    "w13_weight_scale_inv": "gate_up_proj_scale_inv",
    "w2_weight": "down_proj",
    "w2_weight_scale_inv": "down_proj_scale_inv",
}


def deepgemm_names(config: Mapping[str, Any], layer: int, *, packed: bool = False) -> dict[str, str]:
    """``{role: name}`` of a layer's deepgemm-layout tensors (:data:`DEEPGEMM_LEAVES` under
    :func:`experts_prefix`), e.g. ``w13_weight`` -> ``model.layers.3.mlp.experts.gate_up_proj``."""
    p = experts_prefix(config, layer, packed=packed)
    return {role: f"{p}.{leaf}" for role, leaf in DEEPGEMM_LEAVES.items()}


def router_weight_name(config: Mapping[str, Any], layer: int, *, packed: bool = False) -> str:
    """Router weight ``[E, H]``: ``model.layers.L.mlp.gate.weight`` (Mixtral: ``block_sparse_moe``)."""
    return f"{moe_block_prefix(config, layer, packed=packed)}.gate.weight"


def router_bias_name(config: Mapping[str, Any], layer: int) -> str | None:
    """``...mlp.gate.e_score_correction_bias`` F32 ``[E]`` (DeepSeek-V3, Kimi-K2, GLM-4 MoE), else None."""
    if defaults_of(config).router_bias:
        return f"{layer_prefix(layer)}.mlp.gate.e_score_correction_bias"
    return None


def shared_expert_prefix(config: Mapping[str, Any], layer: int) -> str | None:
    """``model.layers.L.mlp.shared_experts`` (DeepSeek, GLM), ``...mlp.shared_expert`` (Qwen2-MoE,
    Qwen3-Next), or None; the module holds ``{gate,up,down}_proj.weight``."""
    shared = naming_of(config).shared
    return f"{layer_prefix(layer)}.mlp.{shared}" if shared else None


def shared_expert_gate_name(config: Mapping[str, Any], layer: int) -> str | None:
    """``model.layers.L.mlp.shared_expert_gate.weight`` ``[1, H]`` (Qwen2-MoE, Qwen3-Next), else None."""
    if naming_of(config).shared_gate:
        return f"{layer_prefix(layer)}.mlp.shared_expert_gate.weight"
    return None


def num_routed_experts(config: Mapping[str, Any]) -> int:
    """Routed experts per MoE layer, whichever key the family (or transformers version) uses."""
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        if config.get(key) is not None:
            return int(config[key])
    raise KeyError("config names no expert count (n_routed_experts / num_experts / num_local_experts)")


def expert_intermediate_size(config: Mapping[str, Any]) -> int:
    """``I``: ``moe_intermediate_size``, Mixtral's ``intermediate_size``."""
    return int(config[naming_of(config).expert_size_key])


def shared_intermediate_size(config: Mapping[str, Any]) -> int:
    """``S``: ``n_shared_experts * moe_intermediate_size`` (DeepSeek, GLM),
    ``shared_expert_intermediate_size`` (Qwen2-MoE, Qwen3-Next), 0 without shared experts."""
    kind = naming_of(config).shared_kind
    if kind == "count":
        return int(config.get("n_shared_experts") or 0) * int(config["moe_intermediate_size"])
    if kind == "size":
        return int(config.get("shared_expert_intermediate_size") or 0)
    return 0


def is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
    """Whether ``layer`` has routed experts, by the rule of the family's transformers model class."""
    rule = naming_of(config).moe_layers
    if rule == "all":
        return True
    if rule == "first_k_dense":
        if layer < int(config.get("first_k_dense_replace") or 0):
            return False
        return layer % int(config.get("moe_layer_freq") or 1) == 0
    step = int(config.get("decoder_sparse_step") or 1)
    return (
        layer not in (config.get("mlp_only_layers") or [])
        and num_routed_experts(config) > 0
        and (layer + 1) % step == 0
    )


def moe_layers(config: Mapping[str, Any]) -> list[int]:
    """Indices of the layers with routed experts."""
    return [i for i in range(int(config["num_hidden_layers"])) if is_moe_layer(config, i)]


def layer_type(config: Mapping[str, Any], layer: int) -> str:
    """``"linear_attention"`` (Gated DeltaNet) or ``"full_attention"``."""
    types = config.get("layer_types")
    if types:
        return str(types[layer])
    interval = config.get("full_attention_interval")
    if interval and naming_of(config).layer_types == "hybrid":
        return "full_attention" if (layer + 1) % int(interval) == 0 else "linear_attention"
    return "full_attention"
