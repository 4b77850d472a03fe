"""Real-named Hugging Face MoE checkpoints of any size, written with torch + safetensors + json only.

``make_checkpoint(family, out_dir, ...)`` writes what ``AutoModelForCausalLM.from_config(cfg)
.save_pretrained(out_dir)`` writes for that family — the same ``config.json`` keys, the same tensor
names, shapes and dtypes — filled with seeded random weights, optionally as transformers-v5 packed
experts, DeepSeek-V3-style block FP8, or several shards with an index. ``tests/test_factory.py`` proves
the equality against transformers' own classes.

One table, :data:`FAMILY_DEFAULTS`, holds every family's config defaults: the keys transformers writes,
small attention dimensions for tiny models, and the flagship model's real dimensions
(``scripts/make_synthetic.py`` builds from those). The naming functions below (``experts_prefix``,
``expert_weight_name``, ``router_weight_name``, ``shared_expert_prefix``, ``tensor_specs`` ...) take a
config dict and are the single source of tensor names for the tests, the demo and the benchmarks.

Values are deterministic: every tensor is generated in fixed-size chunks, each from its own generator
seeded by ``(seed, tensor name, chunk index)``, so a tensor's bytes depend neither on sharding, nor on
the order tensors are written, nor on how many threads generate them; a packed expert tensor holds
exactly the bytes of the per-expert tensors it stacks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FP8_BLOCK = 128
FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4
#: Elements per generated chunk: a tensor's values are a function of this constant (see module doc).
CHUNK_ELEMS = 1 << 22
#: transformers version the config templates follow; written as ``transformers_version``.
TEMPLATE_TRANSFORMERS_VERSION = "5.0.0"

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float8_e4m3fn: "F8_E4M3",
}
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class FamilyDefaults:
    """Everything family-specific that is not a tensor-naming rule.

    ``config``: the keys transformers writes for the family (values for a tiny model, attention
    dimensions included). ``flagship_dims``: :func:`make_checkpoint` dimension arguments of the real
    model ``flagship``; ``flagship_config``: its config values beyond those (attention geometry, ...).
    ``shared_default``: ``n_shared_experts`` (``"count"``) or a multiple of ``moe_intermediate_size``
    for ``shared_expert_intermediate_size`` (``"size"``); ``None`` when the family has none.
    """

    model_type: str
    architecture: str
    naming: str  # deepseek | glm | qwen2 | qwen3 | qwen3_next | mixtral
    config: Mapping[str, Any]
    flagship: str
    flagship_dims: Mapping[str, Any]
    flagship_config: Mapping[str, Any]
    shared_kind: str | None  # "count" | "size" | None
    shared_default: int | None
    default_dense_layers: int
    router_fp32: bool  # transformers >= 5.2x keeps these routers in float32 (``_keep_in_fp32_modules``)


_ROPE = {"rope_theta": 10000.0, "rope_type": "default"}

_DEEPSEEK_V3_CONFIG: dict[str, Any] = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "kv_lora_rank": 64,
    "max_position_embeddings": 4096,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_nextn_predict_layers": 0,
    "output_router_logits": False,
    "pretraining_tp": 1,
    "q_lora_rank": 96,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "rms_norm_eps": 1e-06,
    "rope_interleave": True,
    "rope_parameters": _ROPE,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "v_head_dim": 32,
}
_DEEPSEEK_V3_FLAGSHIP_CONFIG: dict[str, Any] = {
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
}

FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "deepseek_v2": FamilyDefaults(
        model_type="deepseek_v2",
        architecture="DeepseekV2ForCausalLM",
        naming="deepseek",
        config={
            "attention_bias": False,
            "attention_dropout": 0.0,
            "first_k_dense_replace": 1,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "kv_lora_rank": 64,
            "max_position_embeddings": 2048,
            "mlp_bias": False,
            "moe_layer_freq": 1,
            "n_group": 1,
            "n_shared_experts": 2,
            "norm_topk_prob": False,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "output_router_logits": False,
            "pretraining_tp": 1,
            "q_lora_rank": None,
            "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16,
            "rms_norm_eps": 1e-06,
            "rope_parameters": _ROPE,
            "routed_scaling_factor": 1.0,
            "scoring_func": "softmax",
            "topk_group": 1,
            "topk_method": "greedy",
            "v_head_dim": 32,
        },
        flagship="deepseek-ai/DeepSeek-V2-Lite",
        flagship_dims={
            "num_layers": 27,
            "hidden_size": 2048,
            "moe_intermediate_size": 1408,
            "intermediate_size": 10944,
            "num_experts": 64,
            "top_k": 6,
            "shared": 2,
            "dense_layers": 1,
            "vocab_size": 102400,
        },
        flagship_config={
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "max_position_embeddings": 163840,
        },
        shared_kind="count",
        shared_default=2,
        default_dense_layers=1,
        router_fp32=True,
    ),
    "deepseek_v3": FamilyDefaults(
        model_type="deepseek_v3",
        architecture="DeepseekV3ForCausalLM",
        naming="deepseek",
        config=_DEEPSEEK_V3_CONFIG,
        flagship="deepseek-ai/DeepSeek-V3",
        flagship_dims={
            "num_layers": 61,
            "hidden_size": 7168,
            "moe_intermediate_size": 2048,
            "intermediate_size": 18432,
            "num_experts": 256,
            "top_k": 8,
            "shared": 1,
            "dense_layers": 3,
            "vocab_size": 129280,
        },
        flagship_config=_DEEPSEEK_V3_FLAGSHIP_CONFIG,
        shared_kind="count",
        shared_default=1,
        default_dense_layers=1,
        router_fp32=True,
    ),
    "kimi_k2": FamilyDefaults(
        model_type="kimi_k2",
        architecture="DeepseekV3ForCausalLM",
        naming="deepseek",
        config={**_DEEPSEEK_V3_CONFIG, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827},
        flagship="moonshotai/Kimi-K2-Instruct",
        flagship_dims={
            "num_layers": 61,
            "hidden_size": 7168,
            "moe_intermediate_size": 2048,
            "intermediate_size": 18432,
            "num_experts": 384,
            "top_k": 8,
            "shared": 1,
            "dense_layers": 1,
            "vocab_size": 163840,
        },
        flagship_config={
            **_DEEPSEEK_V3_FLAGSHIP_CONFIG,
            "num_attention_heads": 64,
            "num_key_value_heads": 64,
            "max_position_embeddings": 131072,
        },
        shared_kind="count",
        shared_default=1,
        default_dense_layers=1,
        router_fp32=True,
    ),
    "glm4_moe": FamilyDefaults(
        model_type="glm4_moe",
        architecture="Glm4MoeForCausalLM",
        naming="glm",
        config={
            "attention_bias": True,
            "attention_dropout": 0.0,
            "first_k_dense_replace": 1,
            "head_dim": 32,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_position_embeddings": 131072,
            "n_group": 1,
            "n_shared_experts": 1,
            "norm_topk_prob": True,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_nextn_predict_layers": 0,
            "output_router_logits": False,
            "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {
                "partial_rotary_factor": 0.5,
                "rope_theta": 1000000.0,
                "rope_type": "default",
            },
            "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid",
            "topk_group": 1,
            "topk_method": "noaux_tc",
            "use_qk_norm": True,
        },
        flagship="zai-org/GLM-4.5",
        flagship_dims={
            "num_layers": 92,
            "hidden_size": 5120,
            "moe_intermediate_size": 1536,
            "intermediate_size": 12288,
            "num_experts": 160,
            "top_k": 8,
            "shared": 1,
            "dense_layers": 3,
            "vocab_size": 151552,
        },
        flagship_config={"num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128},
        shared_kind="count",
        shared_default=1,
        default_dense_layers=1,
        router_fp32=True,
    ),
    "qwen2_moe": FamilyDefaults(
        model_type="qwen2_moe",
        architecture="Qwen2MoeForCausalLM",
        naming="qwen2",
        config={
            "attention_dropout": 0.0,
            "decoder_sparse_step": 1,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_position_embeddings": 8192,
            "max_window_layers": 21,
            "norm_topk_prob": False,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "output_router_logits": False,
            "qkv_bias": True,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "router_aux_loss_coef": 0.001,
            "sliding_window": None,
            "use_sliding_window": False,
        },
        flagship="Qwen/Qwen1.5-MoE-A2.7B",
        flagship_dims={
            "num_layers": 24,
            "hidden_size": 2048,
            "moe_intermediate_size": 1408,
            "intermediate_size": 5632,
            "num_experts": 60,
            "top_k": 4,
            "shared": 5632,
            "dense_layers": 0,
            "vocab_size": 151936,
        },
        flagship_config={"num_attention_heads": 16, "num_key_value_heads": 16},
        shared_kind="size",
        shared_default=4,
        default_dense_layers=0,
        router_fp32=False,
    ),
    "qwen3_moe": FamilyDefaults(
        model_type="qwen3_moe",
        architecture="Qwen3MoeForCausalLM",
        naming="qwen3",
        config={
            "attention_bias": False,
            "attention_dropout": 0.0,
            "decoder_sparse_step": 1,
            "head_dim": 32,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_position_embeddings": 40960,
            "max_window_layers": 48,
            "norm_topk_prob": True,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "output_router_logits": False,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "router_aux_loss_coef": 0.001,
            "sliding_window": None,
            "use_sliding_window": False,
        },
        flagship="Qwen/Qwen3-30B-A3B",
        flagship_dims={
            "num_layers": 48,
            "hidden_size": 2048,
            "moe_intermediate_size": 768,
            "intermediate_size": 6144,
            "num_experts": 128,
            "top_k": 8,
            "shared": None,
            "dense_layers": 0,
            "vocab_size": 151936,
        },
        flagship_config={"num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128},
        shared_kind=None,
        shared_default=None,
        default_dense_layers=0,
        router_fp32=False,
    ),
    "qwen3_next": FamilyDefaults(
        model_type="qwen3_next",
        architecture="Qwen3NextForCausalLM",
        naming="qwen3_next",
        config={
            "attention_bias": False,
            "attention_dropout": 0.0,
            "decoder_sparse_step": 1,
            "head_dim": 32,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 32,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_value_head_dim": 32,
            "max_position_embeddings": 262144,
            "norm_topk_prob": True,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "output_router_logits": False,
            "partial_rotary_factor": 0.25,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {
                "partial_rotary_factor": 0.25,
                "rope_theta": 10000000.0,
                "rope_type": "default",
            },
            "router_aux_loss_coef": 0.001,
        },
        flagship="Qwen/Qwen3-Next-80B-A3B-Instruct",
        flagship_dims={
            "num_layers": 48,
            "hidden_size": 2048,
            "moe_intermediate_size": 512,
            "intermediate_size": 5120,
            "num_experts": 512,
            "top_k": 10,
            "shared": 512,
            "dense_layers": 0,
            "vocab_size": 151936,
        },
        flagship_config={
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "head_dim": 256,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
        },
        shared_kind="size",
        shared_default=4,
        default_dense_layers=0,
        router_fp32=False,
    ),
    "mixtral": FamilyDefaults(
        model_type="mixtral",
        architecture="MixtralForCausalLM",
        naming="mixtral",
        config={
            "attention_dropout": 0.0,
            "head_dim": None,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_position_embeddings": 32768,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "output_router_logits": False,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "router_aux_loss_coef": 0.02,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        },
        flagship="mistralai/Mixtral-8x7B-v0.1",
        flagship_dims={
            "num_layers": 32,
            "hidden_size": 4096,
            "moe_intermediate_size": 14336,
            "intermediate_size": None,
            "num_experts": 8,
            "top_k": 2,
            "shared": None,
            "dense_layers": 0,
            "vocab_size": 32000,
        },
        flagship_config={"num_attention_heads": 32, "num_key_value_heads": 8},
        shared_kind=None,
        shared_default=None,
        default_dense_layers=0,
        router_fp32=False,
    ),
}

#: Every family :func:`make_checkpoint` writes (``kimi_k2`` is DeepSeek-V3 under its own model_type).
FAMILIES: tuple[str, ...] = tuple(FAMILY_DEFAULTS)
#: model_type -> family key.
MODEL_TYPES: dict[str, str] = {d.model_type: name for name, d in FAMILY_DEFAULTS.items()}


def family_defaults(family: str) -> FamilyDefaults:
    """The :class:`FamilyDefaults` of ``family`` (a family key or a model_type); ValueError otherwise."""
    key = MODEL_TYPES.get(family, family)
    if key not in FAMILY_DEFAULTS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILY_DEFAULTS[key]


def _defaults_of(config: Mapping[str, Any]) -> FamilyDefaults:
    return family_defaults(str(config.get("model_type")))


def _grouping(num_experts: int, top_k: int, max_groups: int) -> tuple[int, int]:
    """``(n_group, topk_group)`` for grouped top-k: the most groups up to the family's that divide the
    experts into groups of at least 2 (the router scores a group by its top-2), half of them kept as
    DeepSeek-V3 does (8 groups, 4 kept), and enough kept groups to hold ``top_k`` experts."""
    groups = 1
    for g in range(max(1, max_groups), 0, -1):
        if num_experts % g == 0 and num_experts // g >= 2:
            groups = g
            break
    per_group = num_experts // groups
    keep = min(groups, max(math.ceil(groups / 2), math.ceil(top_k / per_group)))
    return groups, keep


def family_config(
    family: str,
    *,
    num_layers: int = 2,
    hidden_size: int = 256,
    moe_intermediate_size: int = 128,
    intermediate_size: int | None = None,
    num_experts: int = 4,
    top_k: int = 2,
    shared: int | None = None,
    dense_layers: int | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    config_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` dict of a ``family`` checkpoint with these dimensions.

    ``shared``: ``n_shared_experts`` for the DeepSeek/GLM families, ``shared_expert_intermediate_size``
    for qwen2_moe/qwen3_next (default ``4 * moe_intermediate_size``, as Qwen1.5-MoE); must stay None
    for qwen3_moe and mixtral. ``dense_layers``: leading layers with a dense MLP of
    ``intermediate_size`` (``first_k_dense_replace``, or ``mlp_only_layers`` for the Qwen families).
    For mixtral, ``moe_intermediate_size`` is written as ``intermediate_size`` (the experts' size).
    ``config_overrides`` are applied last, verbatim; tensor shapes follow the final dict.
    """
    d = family_defaults(family)
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {[_DTYPE_NAMES[t] for t in WEIGHT_DTYPES]}, got {dtype}")
    dense = d.default_dense_layers if dense_layers is None else dense_layers
    for name, value in (
        ("num_layers", num_layers),
        ("hidden_size", hidden_size),
        ("num_experts", num_experts),
        ("moe_intermediate_size", moe_intermediate_size),
        ("top_k", top_k),
        ("vocab_size", vocab_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) exceeds num_experts ({num_experts})")
    if not 0 <= dense < num_layers:
        raise ValueError(f"dense_layers must be in [0, num_layers) = [0, {num_layers}), got {dense}")
    if d.naming == "mixtral":
        if dense:
            raise ValueError("mixtral has no dense layers: dense_layers must be 0")
        if intermediate_size not in (None, moe_intermediate_size):
            raise ValueError(
                "mixtral's intermediate_size is its experts' size: pass moe_intermediate_size only"
            )
    if d.shared_kind is None and shared:
        raise ValueError(f"{family} has no shared experts: shared must be None")
    if d.shared_kind is not None and shared is not None and shared < 1:
        raise ValueError(f"shared must be >= 1 for {family}, got {shared}")

    cfg: dict[str, Any] = dict(d.config)
    cfg.update(
        architectures=[d.architecture],
        model_type=d.model_type,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        dtype=_DTYPE_NAMES[dtype],
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_experts_per_tok=top_k,
        tie_word_embeddings=False,
        transformers_version=TEMPLATE_TRANSFORMERS_VERSION,
        use_cache=True,
        vocab_size=vocab_size,
    )
    dense_size = 3 * moe_intermediate_size if intermediate_size is None else intermediate_size
    if d.naming == "mixtral":
        cfg.update(num_local_experts=num_experts, intermediate_size=moe_intermediate_size)
    else:
        cfg.update(moe_intermediate_size=moe_intermediate_size, intermediate_size=dense_size)
    if d.naming in ("deepseek", "glm"):
        n_group, topk_group = _grouping(num_experts, top_k, int(d.config["n_group"]))
        cfg.update(
            n_routed_experts=num_experts,
            n_shared_experts=d.shared_default if shared is None else shared,
            first_k_dense_replace=dense,
            n_group=n_group,
            topk_group=topk_group,
        )
    if d.naming == "deepseek":
        # transformers derives and writes these two from the MLA dimensions.
        cfg["qk_head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        cfg["head_dim"] = cfg["qk_rope_head_dim"]
    if d.naming in ("qwen2", "qwen3", "qwen3_next"):
        cfg.update(num_experts=num_experts, mlp_only_layers=list(range(dense)))
    if d.shared_kind == "size":
        default = int(d.shared_default or 0) * moe_intermediate_size
        cfg["shared_expert_intermediate_size"] = default if shared is None else shared
    if d.naming == "qwen2":
        cfg["layer_types"] = ["full_attention"] * num_layers
    if d.naming == "qwen3_next":
        # Full attention closes every block of 4 layers, and a short model still gets one.
        interval = min(4, num_layers)
        cfg["full_attention_interval"] = interval
        cfg["layer_types"] = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)
        ]
    if config_overrides:
        cfg.update(config_overrides)
        if d.naming == "deepseek":
            cfg["qk_head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
            cfg["head_dim"] = cfg["qk_rope_head_dim"]
    return cfg


def flagship_arguments(family: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(dims, config_overrides)`` of the family's flagship model: :func:`make_checkpoint` keyword
    arguments and the config values beyond them (attention geometry). Copies, free to edit."""
    d = family_defaults(family)
    return dict(d.flagship_dims), dict(d.flagship_config)


def layer_prefix(layer: int) -> str:
    """``model.layers.{layer}``."""
    return f"model.layers.{layer}"


def moe_block_prefix(config: Mapping[str, Any], layer: int, *, packed: bool = False) -> str:
    """The MoE block of ``layer``: ``model.layers.L.mlp``, or ``model.layers.L.block_sparse_moe`` for
    per-expert Mixtral (transformers v5 renames Mixtral's block to ``mlp`` in memory, so packed Mixtral
    checkpoints use ``mlp``)."""
    block = "block_sparse_moe" if _defaults_of(config).naming == "mixtral" and not packed else "mlp"
    return f"{layer_prefix(layer)}.{block}"


def experts_prefix(config: Mapping[str, Any], layer: int, *, packed: bool = False) -> str:
    """The expert container of ``layer`` (``P`` in SPEC §3), e.g. ``model.layers.3.mlp.experts``."""
    return f"{moe_block_prefix(config, layer, packed=packed)}.experts"


def expert_proj_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Module names of an expert's projections: ``{"gate": "gate_proj", "up": "up_proj", "down":
    "down_proj"}``, for Mixtral ``{"gate": "w1", "up": "w3", "down": "w2"}``."""
    if _defaults_of(config).naming == "mixtral":
        return {"gate": "w1", "up": "w3", "down": "w2"}
    return {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def expert_weight_name(config: Mapping[str, Any], layer: int, expert: int, proj: str) -> str:
    """Per-expert weight name; ``proj`` is ``"gate"``, ``"up"`` or ``"down"``:
    ``model.layers.L.mlp.experts.E.gate_proj.weight``, ``...block_sparse_moe.experts.E.w1.weight``."""
    return f"{experts_prefix(config, layer)}.{expert}.{expert_proj_names(config)[proj]}.weight"


def packed_expert_names(config: Mapping[str, Any], layer: int) -> tuple[str, str]:
    """transformers-v5 packed names ``(P.gate_up_proj [E, 2I, H], P.down_proj [E, H, I])``."""
    p = experts_prefix(config, layer, packed=True)
    return f"{p}.gate_up_proj", f"{p}.down_proj"


def router_weight_name(config: Mapping[str, Any], layer: int, *, packed: bool = False) -> str:
    """Router weight ``[E, H]``: ``model.layers.L.mlp.gate.weight`` (Mixtral: ``block_sparse_moe``)."""
    return f"{moe_block_prefix(config, layer, packed=packed)}.gate.weight"


def router_bias_name(config: Mapping[str, Any], layer: int) -> str | None:
    """``...mlp.gate.e_score_correction_bias`` F32 ``[E]`` (DeepSeek-V3, Kimi-K2, GLM-4 MoE), else None."""
    d = _defaults_of(config)
    if d.naming == "glm" or d.model_type in ("deepseek_v3", "kimi_k2"):
        return f"{layer_prefix(layer)}.mlp.gate.e_score_correction_bias"
    return None


def shared_expert_prefix(config: Mapping[str, Any], layer: int) -> str | None:
    """``model.layers.L.mlp.shared_experts`` (DeepSeek, GLM), ``...mlp.shared_expert`` (Qwen2-MoE,
    Qwen3-Next), or None; the module holds ``{gate,up,down}_proj.weight``."""
    naming = _defaults_of(config).naming
    if naming in ("deepseek", "glm"):
        return f"{layer_prefix(layer)}.mlp.shared_experts"
    if naming in ("qwen2", "qwen3_next"):
        return f"{layer_prefix(layer)}.mlp.shared_expert"
    return None


def shared_expert_gate_name(config: Mapping[str, Any], layer: int) -> str | None:
    """``model.layers.L.mlp.shared_expert_gate.weight`` ``[1, H]`` (Qwen2-MoE, Qwen3-Next), else None."""
    if _defaults_of(config).naming in ("qwen2", "qwen3_next"):
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
    if _defaults_of(config).naming == "mixtral":
        return int(config["intermediate_size"])
    return int(config["moe_intermediate_size"])


def shared_intermediate_size(config: Mapping[str, Any]) -> int:
    """``S``: ``n_shared_experts * moe_intermediate_size`` (DeepSeek, GLM),
    ``shared_expert_intermediate_size`` (Qwen2-MoE, Qwen3-Next), 0 without shared experts."""
    naming = _defaults_of(config).naming
    if naming in ("deepseek", "glm"):
        return int(config.get("n_shared_experts") or 0) * int(config["moe_intermediate_size"])
    if naming in ("qwen2", "qwen3_next"):
        return int(config.get("shared_expert_intermediate_size") or 0)
    return 0


def is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
    """Whether ``layer`` has routed experts, by the rule of the family's transformers model class."""
    naming = _defaults_of(config).naming
    if naming == "mixtral":
        return True
    if naming in ("deepseek", "glm"):
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
    if interval and _defaults_of(config).naming == "qwen3_next":
        return "full_attention" if (layer + 1) % int(interval) == 0 else "linear_attention"
    return "full_attention"


def scale_name(weight_name: str) -> str:
    """``X.weight`` -> ``X.weight_scale_inv``; packed ``P.gate_up_proj`` -> ``P.gate_up_proj_scale_inv``."""
    return f"{weight_name}_scale_inv"


def scale_grid(shape: Sequence[int], block: int = FP8_BLOCK) -> tuple[int, ...]:
    """Block-scale shape of a ``[..., N, K]`` weight: ``[..., ceil(N/128), ceil(K/128)]``."""
    *lead, n, k = shape
    return (*lead, -(-n // block), -(-k // block))


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the BF16 (or F16/F32) checkpoint, before any FP8 quantization.

    ``group``: ``embedding``, ``lm_head``, ``norm``, ``attention``, ``linear_attention``,
    ``dense_mlp``, ``expert``, ``shared_expert``, ``router`` (router weight and correction bias) or
    ``gate`` (``shared_expert_gate``). ``linear``: an ``nn.Linear``-style ``[out, in]`` weight (or a
    stack of them, ``[E, out, in]``). ``init``: the value distribution (see :data:`INITS`).
    ``parts``: for a packed expert tensor, the per-expert tensors whose bytes it concatenates, in order.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    group: str
    init: str
    linear: bool = False
    layer: int | None = None
    parts: tuple[TensorSpec, ...] = field(default=(), compare=False, repr=False)
    seed_name: str = ""  # name the values are seeded by, when not ``name`` (Mixtral's packed router)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    @property
    def module(self) -> str:
        """The owning module's name (``...q_proj`` for ``...q_proj.weight``)."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def fp8_target(self) -> bool:
        """Quantized by the DeepSeek-V3 official recipe: every Linear but router, gates and lm_head."""
        return self.linear and self.group not in ("router", "gate", "lm_head", "embedding")


#: ``init`` name -> (distribution, a, b): ``normal`` mean a std b; ``log_uniform``: log of U(a, b).
INITS: dict[str, tuple[str, float, float]] = {
    "weight": ("normal", 0.0, 0.02),
    "bias": ("normal", 0.0, 0.02),
    "norm": ("normal", 1.0, 0.02),  # RMSNorm weight, multiplies x
    "norm_zero": ("normal", 0.0, 0.02),  # zero-centred RMSNorm (Qwen3-Next): multiplies by 1 + w
    "conv": ("normal", 0.0, 0.2),  # depthwise causal conv: its fan-in is the kernel size (4), not H
    "a_log": ("log_uniform", 1.0, 16.0),  # GDN decay: A in U(1, 16) as transformers initialises it
    "dt_bias": ("normal", 1.0, 0.1),
    "score_bias": ("normal", 0.0, 0.02),
}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _linear(
    name: str, out_f: int, in_f: int, dtype: torch.dtype, group: str, layer: int | None, bias: bool = False
) -> list[TensorSpec]:
    specs = [TensorSpec(f"{name}.weight", (out_f, in_f), dtype, group, "weight", linear=True, layer=layer)]
    if bias:
        specs.append(TensorSpec(f"{name}.bias", (out_f,), dtype, group, "bias", layer=layer))
    return specs


def _norm(
    name: str, size: int, dtype: torch.dtype, layer: int | None, zero_centred: bool = False
) -> TensorSpec:
    return TensorSpec(
        f"{name}.weight", (size,), dtype, "norm", "norm_zero" if zero_centred else "norm", layer=layer
    )


def _attention_specs(cfg: Mapping[str, Any], layer: int, dtype: torch.dtype) -> list[TensorSpec]:
    naming = _defaults_of(cfg).naming
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    p = f"{layer_prefix(layer)}.self_attn"
    specs: list[TensorSpec] = []
    if naming == "deepseek":
        bias = bool(cfg.get("attention_bias"))
        nope, rope, v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
        kv_rank = int(cfg["kv_lora_rank"])
        q_rank = cfg.get("q_lora_rank")
        if q_rank:
            specs += _linear(f"{p}.q_a_proj", int(q_rank), h, dtype, "attention", layer, bias)
            specs.append(_norm(f"{p}.q_a_layernorm", int(q_rank), dtype, layer))
            specs += _linear(f"{p}.q_b_proj", heads * (nope + rope), int(q_rank), dtype, "attention", layer)
        else:
            specs += _linear(f"{p}.q_proj", heads * (nope + rope), h, dtype, "attention", layer)
        specs += _linear(f"{p}.kv_a_proj_with_mqa", kv_rank + rope, h, dtype, "attention", layer, bias)
        specs.append(_norm(f"{p}.kv_a_layernorm", kv_rank, dtype, layer))
        specs += _linear(f"{p}.kv_b_proj", heads * (nope + v), kv_rank, dtype, "attention", layer)
        specs += _linear(f"{p}.o_proj", h, heads * v, dtype, "attention", layer, bias)
        return specs
    head_dim = int(cfg.get("head_dim") or h // heads)
    q_out = heads * head_dim * (2 if naming == "qwen3_next" else 1)  # Qwen3-Next gates its output by q
    if naming == "qwen2":
        qkv_bias, o_bias = bool(cfg.get("qkv_bias", True)), False
    elif naming == "glm":
        qkv_bias, o_bias = bool(cfg.get("attention_bias")), False
    elif naming in ("qwen3", "qwen3_next"):
        qkv_bias = o_bias = bool(cfg.get("attention_bias"))
    else:
        qkv_bias = o_bias = False
    specs += _linear(f"{p}.q_proj", q_out, h, dtype, "attention", layer, qkv_bias)
    specs += _linear(f"{p}.k_proj", kv_heads * head_dim, h, dtype, "attention", layer, qkv_bias)
    specs += _linear(f"{p}.v_proj", kv_heads * head_dim, h, dtype, "attention", layer, qkv_bias)
    specs += _linear(f"{p}.o_proj", h, heads * head_dim, dtype, "attention", layer, o_bias)
    if naming in ("qwen3", "qwen3_next") or (naming == "glm" and cfg.get("use_qk_norm")):
        zero = naming == "qwen3_next"
        specs.append(_norm(f"{p}.q_norm", head_dim, dtype, layer, zero))
        specs.append(_norm(f"{p}.k_norm", head_dim, dtype, layer, zero))
    return specs


def _linear_attention_specs(cfg: Mapping[str, Any], layer: int, dtype: torch.dtype) -> list[TensorSpec]:
    """Qwen3-Next Gated DeltaNet: ``in_proj_qkvz [2·Hk·dk + 2·Hv·dv, H]``, ``in_proj_ba [2·Hv, H]``,
    depthwise ``conv1d.weight [2·Hk·dk + Hv·dv, 1, kernel]``, ``dt_bias``/``A_log [Hv]``, gated
    ``norm.weight [dv]``, ``out_proj [H, Hv·dv]``."""
    h = int(cfg["hidden_size"])
    key_dim = int(cfg["linear_num_key_heads"]) * int(cfg["linear_key_head_dim"])
    v_heads = int(cfg["linear_num_value_heads"])
    value_dim = v_heads * int(cfg["linear_value_head_dim"])
    p = f"{layer_prefix(layer)}.linear_attn"
    g = "linear_attention"
    return [
        *_linear(f"{p}.in_proj_qkvz", 2 * key_dim + 2 * value_dim, h, dtype, g, layer),
        *_linear(f"{p}.in_proj_ba", 2 * v_heads, h, dtype, g, layer),
        TensorSpec(
            f"{p}.conv1d.weight",
            (2 * key_dim + value_dim, 1, int(cfg["linear_conv_kernel_dim"])),
            dtype,
            g,
            "conv",
            layer=layer,
        ),
        TensorSpec(f"{p}.dt_bias", (v_heads,), dtype, g, "dt_bias", layer=layer),
        TensorSpec(f"{p}.A_log", (v_heads,), dtype, g, "a_log", layer=layer),
        _norm(f"{p}.norm", int(cfg["linear_value_head_dim"]), dtype, layer),
        *_linear(f"{p}.out_proj", h, value_dim, dtype, g, layer),
    ]


def _mlp(prefix: str, inter: int, h: int, dtype: torch.dtype, group: str, layer: int) -> list[TensorSpec]:
    return [
        *_linear(f"{prefix}.gate_proj", inter, h, dtype, group, layer),
        *_linear(f"{prefix}.up_proj", inter, h, dtype, group, layer),
        *_linear(f"{prefix}.down_proj", h, inter, dtype, group, layer),
    ]


def _moe_specs(
    cfg: Mapping[str, Any], layer: int, dtype: torch.dtype, packed: bool, router_dtype: torch.dtype
) -> list[TensorSpec]:
    h = int(cfg["hidden_size"])
    e = num_routed_experts(cfg)
    inter = expert_intermediate_size(cfg)
    specs = [
        TensorSpec(
            router_weight_name(cfg, layer, packed=packed),
            (e, h),
            router_dtype,
            "router",
            "weight",
            linear=True,
            layer=layer,
            seed_name=router_weight_name(cfg, layer),
        )
    ]
    bias = router_bias_name(cfg, layer)
    if bias:
        specs.append(TensorSpec(bias, (e,), torch.float32, "router", "score_bias", layer=layer))
    per_expert = {
        proj: [
            TensorSpec(
                expert_weight_name(cfg, layer, x, proj),
                (h, inter) if proj == "down" else (inter, h),
                dtype,
                "expert",
                "weight",
                linear=True,
                layer=layer,
            )
            for x in range(e)
        ]
        for proj in ("gate", "up", "down")
    }
    if packed:
        gate_up, down = packed_expert_names(cfg, layer)
        specs.append(
            TensorSpec(
                gate_up,
                (e, 2 * inter, h),
                dtype,
                "expert",
                "weight",
                linear=True,
                layer=layer,
                parts=tuple(t for x in range(e) for t in (per_expert["gate"][x], per_expert["up"][x])),
            )
        )
        specs.append(
            TensorSpec(
                down,
                (e, h, inter),
                dtype,
                "expert",
                "weight",
                linear=True,
                layer=layer,
                parts=tuple(per_expert["down"]),
            )
        )
    else:
        for x in range(e):
            specs += [per_expert["gate"][x], per_expert["up"][x], per_expert["down"][x]]
    shared = shared_expert_prefix(cfg, layer)
    size = shared_intermediate_size(cfg)
    if shared and size:
        specs += _mlp(shared, size, h, dtype, "shared_expert", layer)
    gate = shared_expert_gate_name(cfg, layer)
    if gate and size:
        specs.append(TensorSpec(gate, (1, h), dtype, "gate", "weight", linear=True, layer=layer))
    return specs


def tensor_specs(
    config: Mapping[str, Any],
    *,
    dtype: torch.dtype | None = None,
    packed_experts: bool = False,
    router_dtype: torch.dtype | None = None,
) -> list[TensorSpec]:
    """Every tensor of a checkpoint with ``config``, in transformers' module order (embeddings, layers
    0..L-1, final norm, lm_head), BF16-style (no FP8 scales; see :func:`disk_tensors`).

    ``dtype``: weight dtype (default: the config's ``dtype``). ``router_dtype``: the router weight's
    (default float32 for DeepSeek/GLM as transformers >= 5.2x saves them, else ``dtype``).
    ``e_score_correction_bias`` is always float32.
    """
    d = _defaults_of(config)
    if dtype is None:
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"))
    if router_dtype is None:
        router_dtype = torch.float32 if d.router_fp32 else dtype
    h, v = int(config["hidden_size"]), int(config["vocab_size"])
    zero_norm = d.naming == "qwen3_next"
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), dtype, "embedding", "weight")]
    for layer in range(int(config["num_hidden_layers"])):
        if layer_type(config, layer) == "linear_attention":
            specs += _linear_attention_specs(config, layer, dtype)
        else:
            specs += _attention_specs(config, layer, dtype)
        if is_moe_layer(config, layer):
            specs += _moe_specs(config, layer, dtype, packed_experts, router_dtype)
        elif d.naming != "mixtral":
            specs += _mlp(
                f"{layer_prefix(layer)}.mlp", int(config["intermediate_size"]), h, dtype, "dense_mlp", layer
            )
        specs.append(_norm(f"{layer_prefix(layer)}.input_layernorm", h, dtype, layer, zero_norm))
        specs.append(_norm(f"{layer_prefix(layer)}.post_attention_layernorm", h, dtype, layer, zero_norm))
    specs.append(_norm("model.norm", h, dtype, None, zero_norm))
    specs.append(TensorSpec("lm_head.weight", (v, h), dtype, "lm_head", "weight", linear=True))
    return specs


@dataclass(frozen=True)
class DiskTensor:
    """One tensor as stored: ``role`` ``value`` (``source`` as is), ``fp8`` (F8_E4M3 of ``source``) or
    ``scale`` (its F32 ``weight_scale_inv`` on the ceil grid)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str
    source: TensorSpec

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def disk_tensors(specs: Iterable[TensorSpec], *, fp8: bool = False) -> list[DiskTensor]:
    """The stored tensors of ``specs``; with ``fp8`` every :attr:`TensorSpec.fp8_target` becomes an
    F8_E4M3 weight plus its F32 ``weight_scale_inv`` ``[..., ceil(N/128), ceil(K/128)]``."""
    out: list[DiskTensor] = []
    for s in specs:
        if fp8 and s.fp8_target:
            out.append(DiskTensor(s.name, s.shape, torch.float8_e4m3fn, "fp8", s))
            out.append(DiskTensor(scale_name(s.name), scale_grid(s.shape), torch.float32, "scale", s))
        else:
            out.append(DiskTensor(s.name, s.shape, s.dtype, "value", s))
    return out


def fp8_quantization_config(specs: Iterable[TensorSpec]) -> dict[str, Any]:
    """SPEC §3 ``quantization_config`` for a checkpoint whose FP8 targets are quantized: the
    DeepSeek-V3 keys plus ``modules_to_not_convert``/``ignored_layers`` naming every Linear kept."""
    kept = sorted({s.module for s in specs if s.linear and not s.fp8_target})
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "ignored_layers": kept,
        "modules_to_not_convert": list(kept),
        "quant_method": "fp8",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }


def _derive_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _chunk_count(numel: int) -> int:
    return max(1, -(-numel // CHUNK_ELEMS))


def generate_chunk(spec: TensorSpec, seed: int, index: int) -> torch.Tensor:
    """Chunk ``index`` (``CHUNK_ELEMS`` elements, the last one shorter) of a non-packed ``spec``: flat,
    ``spec.dtype``, from a generator seeded by ``(seed, spec.seed_name or spec.name, index)``."""
    start = index * CHUNK_ELEMS
    n = min(CHUNK_ELEMS, spec.numel - start)
    g = torch.Generator().manual_seed(_derive_seed(seed, spec.seed_name or spec.name, index))
    kind, a, b = INITS[spec.init]
    if kind == "normal":
        return torch.empty(n, dtype=spec.dtype).normal_(a, b, generator=g)
    return torch.empty(n, dtype=torch.float32).uniform_(a, b, generator=g).log_().to(spec.dtype)


def leaf_chunks(spec: TensorSpec) -> list[tuple[TensorSpec, int]]:
    """``(leaf spec, chunk index)`` pairs whose :func:`generate_chunk` outputs, concatenated, are
    ``spec``'s bytes in storage order (a packed tensor's parts in order, each in chunks)."""
    return [(part, i) for part in (spec.parts or (spec,)) for i in range(_chunk_count(part.numel))]


def generate_chunks(
    spec: TensorSpec, seed: int, *, map_fn: Callable[..., Iterable[torch.Tensor]] = map
) -> Iterator[torch.Tensor]:
    """``spec``'s values as flat chunks in storage order (a packed tensor: its parts in order).
    ``map_fn``: e.g. a thread pool's ordered ``map`` to generate chunks in parallel (torch releases
    the GIL while it fills a tensor); the bytes do not depend on it."""
    yield from map_fn(lambda pair: generate_chunk(pair[0], seed, pair[1]), leaf_chunks(spec))


def generate(spec: TensorSpec, seed: int) -> torch.Tensor:
    """``spec``'s whole tensor, ``spec.shape`` and ``spec.dtype``."""
    chunks = list(generate_chunks(spec, seed))
    flat = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return flat.view(spec.shape)


def _block_quant_local(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §3 on ``w [N, K]``: ``q`` float8_e4m3fn ``[N, K]``, ``s`` float32 ``[ceil(N/128), ceil(K/128)]``."""
    n, k = w.shape
    nb, kb = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    wf = torch.zeros(nb * FP8_BLOCK, kb * FP8_BLOCK, dtype=torch.float32)
    wf[:n, :k] = w.float()
    blocks = wf.view(nb, FP8_BLOCK, kb, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=FP8_AMAX_FLOOR)
    s = amax / FP8_MAX
    q = (blocks * (1.0 / s)[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * FP8_BLOCK, kb * FP8_BLOCK)[:n, :k].contiguous(), s


def block_quant(w: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 of ``w [N, K]`` or ``[E, N, K]`` (experts independently) by SPEC §3: the project's
    reference (``moetool.kernels.fp8_quant_ref.block_quant_ref``) when importable, else a local copy of
    the recipe. Returns ``(q float8_e4m3fn, s float32 [..., ceil(N/128), ceil(K/128)])``."""
    try:
        from moetool.kernels.fp8_quant_ref import block_quant_ref
    except ImportError:
        block_quant_ref = None
    if block_quant_ref is not None:
        return block_quant_ref(w, name=name)
    if w.dim() == 2:
        return _block_quant_local(w)
    pairs = [_block_quant_local(x) for x in w]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def write_safetensors(
    path: str | Path,
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[int], Iterable[torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Stream a safetensors file: the header from ``tensors`` (name, shape, dtype) first, then each
    tensor's bytes from ``produce(i)`` (contiguous chunks of its dtype in row-major order), so memory
    holds one chunk, never the file. Written to ``path.tmp`` and renamed. Returns the file size."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    sizes = []
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * _itemsize(dtype)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        sizes.append(nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (name, _, dtype) in enumerate(tensors):
            written = 0
            for chunk in produce(i):
                if chunk.dtype != dtype:
                    raise ValueError(f"{name}: produced {chunk.dtype}, header says {dtype}")
                data = chunk.contiguous().view(torch.uint8).numpy()
                f.write(data.data)
                written += data.nbytes
            if written != sizes[i]:
                raise ValueError(f"{name}: produced {written} bytes, header says {sizes[i]}")
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def plan_shards(tensors: Sequence[DiskTensor], max_shard_bytes: int | None) -> list[list[DiskTensor]]:
    """Greedy split in order, as transformers shards: a new shard when the next tensor would push the
    current one past ``max_shard_bytes`` (a larger tensor gets a shard of its own). One shard if None."""
    if max_shard_bytes is None:
        return [list(tensors)]
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards: list[list[DiskTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors`` ..."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_json(path: str | Path, obj: Any) -> None:
    """JSON as transformers writes it: sorted keys, indent 2, trailing newline."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_index(out_dir: str | Path, shards: Sequence[Sequence[DiskTensor]], names: Sequence[str]) -> None:
    """``model.safetensors.index.json``: ``metadata.total_size`` (bytes), ``metadata.total_parameters``
    and ``weight_map`` (tensor -> shard file)."""
    weight_map = {t.name: fname for shard, fname in zip(shards, names) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    params = sum(math.prod(t.shape) for shard in shards for t in shard if t.role != "scale")
    write_json(
        Path(out_dir) / "model.safetensors.index.json",
        {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": weight_map},
    )


SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_symbols() -> list[str]:
    """The byte-level BPE alphabet: byte b as one printable character (printable Latin-1 bytes map to
    themselves, the others to code points from 256 up), so any text round-trips through 256 symbols."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tokenizer_json() -> dict[str, Any]:
    """A byte-level BPE tokenizer of ``3 + 256`` ids, no merges: the special tokens
    :data:`SPECIAL_TOKENS` (ids 0, 1, 2; ``bos``/``eos`` ids of the factory's configs), then one id per
    byte (ids 3..258)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({sym: len(SPECIAL_TOKENS) + b for b, sym in enumerate(_byte_symbols())})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, tok in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def write_extra_files(out_dir: str | Path, config: Mapping[str, Any]) -> list[str]:
    """The non-weight files a Hub checkpoint ships: ``generation_config.json``, ``LICENSE`` and, when
    the vocabulary holds the 259 ids of :func:`tokenizer_json`, ``tokenizer.json`` and
    ``tokenizer_config.json`` (with a chat template). Returns the file names written."""
    out = Path(out_dir)
    write_json(
        out / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": config.get("eos_token_id"),
            "transformers_version": config.get("transformers_version"),
        },
    )
    (out / "LICENSE").write_text(
        "Synthetic weights generated by moetool.testing.factory for tests and benchmarks.\n"
        "They encode no trained model. Released under the Apache License, Version 2.0.\n"
    )
    written = ["generation_config.json", "LICENSE"]
    if int(config["vocab_size"]) >= len(SPECIAL_TOKENS) + 256:
        write_json(out / "tokenizer.json", tokenizer_json())
        write_json(
            out / "tokenizer_config.json",
            {
                "add_bos_token": False,
                "bos_token": SPECIAL_TOKENS[0],
                "chat_template": _CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
                "eos_token": SPECIAL_TOKENS[1],
                "model_max_length": int(config.get("max_position_embeddings") or 4096),
                "pad_token": SPECIAL_TOKENS[2],
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
        )
        written += ["tokenizer.json", "tokenizer_config.json"]
    return written


def _prepare_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 256,
    moe_intermediate_size: int = 128,
    intermediate_size: int | None = None,
    num_experts: int = 4,
    top_k: int = 2,
    shared: int | None = None,
    dense_layers: int | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    packed_experts: bool = False,
    fp8: bool = False,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    extra_files: bool = True,
    router_dtype: torch.dtype | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write a real-named ``family`` checkpoint into ``out_dir`` (created; must be absent or empty).

    Dimensions as :func:`family_config` (``dense_layers`` defaults to 1 for the DeepSeek/GLM families,
    0 otherwise). ``packed_experts``: transformers-v5 ``P.gate_up_proj [E, 2I, H]`` (gate rows first)
    and ``P.down_proj [E, H, I]`` instead of per-expert tensors, holding the same values.
    ``fp8``: DeepSeek-V3 official style — every Linear but routers, ``shared_expert_gate`` and
    ``lm_head`` stored F8_E4M3 with F32 ``weight_scale_inv`` on ceil grids (SPEC §3; packed experts get
    ``P.gate_up_proj_scale_inv [E, ceil(2I/128), ceil(H/128)]``), config gains ``quantization_config``;
    values are the quantized values of the non-FP8 checkpoint of the same seed.
    ``max_shard_bytes``: several shards and ``model.safetensors.index.json``. ``router_dtype``: router
    weight dtype (default float32 for DeepSeek/GLM, as transformers >= 5.2x saves them, else ``dtype``).
    ``config_overrides``: extra or replaced config values (shapes follow them). Byte-identical on rerun.
    Returns ``out_dir`` as a Path.
    """
    config = family_config(
        family,
        num_layers=num_layers,
        hidden_size=hidden_size,
        moe_intermediate_size=moe_intermediate_size,
        intermediate_size=intermediate_size,
        num_experts=num_experts,
        top_k=top_k,
        shared=shared,
        dense_layers=dense_layers,
        vocab_size=vocab_size,
        dtype=dtype,
        config_overrides=config_overrides,
    )
    specs = tensor_specs(config, dtype=dtype, packed_experts=packed_experts, router_dtype=router_dtype)
    if fp8:
        config["quantization_config"] = fp8_quantization_config(specs)
    out = _prepare_out_dir(out_dir)
    disk = disk_tensors(specs, fp8=fp8)
    shards = plan_shards(disk, max_shard_bytes)
    names = shard_file_names(len(shards))
    for shard, fname in zip(shards, names):
        values = _materialize(shard, seed)
        entries = [(t.name, t.shape, t.dtype) for t in shard]
        write_safetensors(out / fname, entries, lambda i, e=entries, v=values: [v[e[i][0]]])
    if len(shards) > 1:
        write_index(out, shards, names)
    write_json(out / "config.json", config)
    if extra_files:
        write_extra_files(out, config)
    return out


def _materialize(shard: Sequence[DiskTensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of ``shard`` by name; an FP8 weight and its scale come from one quantization."""
    values: dict[str, torch.Tensor] = {}
    for t in shard:
        if t.name in values:
            continue
        if t.role == "value":
            values[t.name] = generate(t.source, seed)
            continue
        q, s = block_quant(generate(t.source, seed), name=t.source.name)
        values[t.source.name] = q
        values[scale_name(t.source.name)] = s.contiguous()
    return values
