"""The families the factory writes, in two tables: :data:`NAMINGS`, how each kind of family names and
lays out its tensors (read from transformers' modeling files), and :data:`FAMILY_DEFAULTS`, each
family's ``config.json`` keys for a tiny model and its flagship's real dimensions.

Adding a family whose tensors follow a known kind is one :data:`FAMILY_DEFAULTS` entry; a new kind of
naming is one :data:`NAMINGS` entry (plus, for tensors no kind has yet, their specs in ``names.py``).
Nothing here reads ``configs/`` or imports ``moetool.arch``: see the package docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

#: transformers version the config templates follow; written as ``transformers_version``.
TEMPLATE_TRANSFORMERS_VERSION = "5.0.0"

WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class Naming:
    """How one kind of family names its tensors and which layers hold what (its transformers model).

    ``expert_projs``: an expert's gate, up and down modules. ``moe_block``: the MoE block of a
    per-expert checkpoint (packed experts live under ``mlp`` in every family). ``shared``: the shared
    expert's module in the block, sized by ``n_shared_experts`` (``shared_kind`` ``"count"``) or
    ``shared_expert_intermediate_size`` (``"size"``); ``shared_gate``: it has a ``shared_expert_gate``.
    ``expert_count_key`` / ``expert_size_key``: the config keys of E and I. ``moe_layers``: which layers
    are sparse — ``"all"``, ``"first_k_dense"`` (``first_k_dense_replace`` + ``moe_layer_freq``) or
    ``"sparse_step"`` (``decoder_sparse_step`` + ``mlp_only_layers``); ``dense_mlp``: whether the other
    layers have an MLP. ``grouped_topk``: the router's ``n_group``/``topk_group``. ``router_fp32``:
    transformers >= 5.2x keeps the router in float32 (``_keep_in_fp32_modules``). ``attention``:
    ``"mla"`` (DeepSeek's latent attention) or ``"gqa"``, with biases switched by ``(config key,
    default)`` pairs, q/k norms (always, never, or by a config key), a doubled ``q_proj`` gating the
    output (``gated_q``) and zero-centred norms. ``layer_types``: ``"full"`` writes ``layer_types`` of
    full attention; ``"hybrid"`` makes every ``full_attention_interval``-th layer full attention and
    the others Gated DeltaNet.
    """

    expert_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    moe_block: str = "mlp"
    shared: str | None = None
    shared_gate: bool = False
    shared_kind: str | None = None  # "count" | "size" | None
    expert_count_key: str = "num_experts"
    expert_size_key: str = "moe_intermediate_size"
    moe_layers: str = "sparse_step"  # all | first_k_dense | sparse_step
    dense_mlp: bool = True
    default_dense_layers: int = 0
    grouped_topk: bool = False
    router_fp32: bool = False
    attention: str = "gqa"  # gqa | mla
    qkv_bias: tuple[str, bool] | None = None
    o_bias: tuple[str, bool] | None = None
    qk_norm: bool | str = False
    gated_q: bool = False
    zero_centred_norms: bool = False
    layer_types: str | None = None  # full | hybrid | None


_DEEPSEEK_NAMING = Naming(
    shared="shared_experts",
    shared_kind="count",
    expert_count_key="n_routed_experts",
    moe_layers="first_k_dense",
    default_dense_layers=1,
    grouped_topk=True,
    router_fp32=True,
    attention="mla",
)
_QWEN_SHARED = {"shared": "shared_expert", "shared_gate": True, "shared_kind": "size"}

#: naming kind -> its rules.
NAMINGS: dict[str, Naming] = {
    "deepseek": _DEEPSEEK_NAMING,
    "glm": replace(
        _DEEPSEEK_NAMING, attention="gqa", qkv_bias=("attention_bias", False), qk_norm="use_qk_norm"
    ),
    "qwen2": Naming(**_QWEN_SHARED, qkv_bias=("qkv_bias", True), layer_types="full"),
    "qwen3": Naming(qkv_bias=("attention_bias", False), o_bias=("attention_bias", False), qk_norm=True),
    "qwen3_next": Naming(
        **_QWEN_SHARED,
        qkv_bias=("attention_bias", False),
        o_bias=("attention_bias", False),
        qk_norm=True,
        gated_q=True,
        zero_centred_norms=True,
        layer_types="hybrid",
    ),
    "mixtral": Naming(
        expert_projs=("w1", "w3", "w2"),
        moe_block="block_sparse_moe",
        expert_count_key="num_local_experts",
        expert_size_key="intermediate_size",
        moe_layers="all",
        dense_mlp=False,
    ),
}


@dataclass(frozen=True)
class FamilyDefaults:
    """Everything family-specific beyond its :class:`Naming`.

    ``config``: the keys transformers writes for the family (values for a tiny model, attention
    dimensions included; :data:`_COMMON_CONFIG` is added to every family's). ``flagship_dims``:
    :func:`make_checkpoint` dimension arguments of the real model ``flagship``; ``flagship_config``: its
    config values beyond those (attention geometry, ...). ``shared_default``: ``n_shared_experts``
    (naming ``shared_kind`` ``"count"``) or a multiple of ``moe_intermediate_size`` for
    ``shared_expert_intermediate_size`` (``"size"``); None when the family has none. ``router_bias``:
    the router has an ``e_score_correction_bias``.
    """

    model_type: str
    architecture: str
    naming: str  # a key of NAMINGS
    config: Mapping[str, Any]
    flagship: str
    flagship_dims: Mapping[str, Any]
    flagship_config: Mapping[str, Any]
    shared_default: int | None
    router_bias: bool = False

    @property
    def rules(self) -> Naming:
        return NAMINGS[self.naming]

    @property
    def shared_kind(self) -> str | None:
        return self.rules.shared_kind

    @property
    def default_dense_layers(self) -> int:
        return self.rules.default_dense_layers

    @property
    def router_fp32(self) -> bool:
        return self.rules.router_fp32


#: Config keys every family's transformers config writes with these values.
_COMMON_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "output_router_logits": False,
}


_ROPE = {"rope_theta": 10000.0, "rope_type": "default"}

_DEEPSEEK_V3_CONFIG: dict[str, Any] = {
    "attention_bias": False,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 64,
    "max_position_embeddings": 4096,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_nextn_predict_layers": 0,
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
            "first_k_dense_replace": 1,
            "kv_lora_rank": 64,
            "max_position_embeddings": 2048,
            "mlp_bias": False,
            "moe_layer_freq": 1,
            "n_group": 1,
            "n_shared_experts": 2,
            "norm_topk_prob": False,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
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
        shared_default=2,
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
        shared_default=1,
        router_bias=True,
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
        shared_default=1,
        router_bias=True,
    ),
    "glm4_moe": FamilyDefaults(
        model_type="glm4_moe",
        architecture="Glm4MoeForCausalLM",
        naming="glm",
        config={
            "attention_bias": True,
            "first_k_dense_replace": 1,
            "head_dim": 32,
            "max_position_embeddings": 131072,
            "n_group": 1,
            "n_shared_experts": 1,
            "norm_topk_prob": True,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_nextn_predict_layers": 0,
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
        shared_default=1,
        router_bias=True,
    ),
    "qwen2_moe": FamilyDefaults(
        model_type="qwen2_moe",
        architecture="Qwen2MoeForCausalLM",
        naming="qwen2",
        config={
            "decoder_sparse_step": 1,
            "max_position_embeddings": 8192,
            "max_window_layers": 21,
            "norm_topk_prob": False,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
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
        shared_default=4,
    ),
    "qwen3_moe": FamilyDefaults(
        model_type="qwen3_moe",
        architecture="Qwen3MoeForCausalLM",
        naming="qwen3",
        config={
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "head_dim": 32,
            "max_position_embeddings": 40960,
            "max_window_layers": 48,
            "norm_topk_prob": True,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
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
        shared_default=None,
    ),
    "qwen3_next": FamilyDefaults(
        model_type="qwen3_next",
        architecture="Qwen3NextForCausalLM",
        naming="qwen3_next",
        config={
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "head_dim": 32,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 32,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_value_head_dim": 32,
            "max_position_embeddings": 262144,
            "norm_topk_prob": True,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
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
        shared_default=4,
    ),
    "mixtral": FamilyDefaults(
        model_type="mixtral",
        architecture="MixtralForCausalLM",
        naming="mixtral",
        config={
            "head_dim": None,
            "max_position_embeddings": 32768,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
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
        shared_default=None,
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


def defaults_of(config: Mapping[str, Any]) -> FamilyDefaults:
    """The :class:`FamilyDefaults` of a ``config.json`` dict, by its ``model_type``."""
    return family_defaults(str(config.get("model_type")))


def naming_of(config: Mapping[str, Any]) -> Naming:
    """The :class:`Naming` of a ``config.json`` dict, by its ``model_type``."""
    return defaults_of(config).rules


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
    n = d.rules
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {[_DTYPE_NAMES[t] for t in WEIGHT_DTYPES]}, got {dtype}")
    dense = n.default_dense_layers if dense_layers is None else dense_layers
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
    if not n.dense_mlp and dense:
        raise ValueError(f"{family} has no dense layers: dense_layers must be 0")
    experts_sized_by_intermediate = n.expert_size_key == "intermediate_size"
    if experts_sized_by_intermediate and intermediate_size not in (None, moe_intermediate_size):
        raise ValueError(
            f"{family}'s intermediate_size is its experts' size: pass moe_intermediate_size only"
        )
    if n.shared_kind is None and shared:
        raise ValueError(f"{family} has no shared experts: shared must be None")
    if n.shared_kind is not None and shared is not None and shared < 1:
        raise ValueError(f"shared must be >= 1 for {family}, got {shared}")

    cfg: dict[str, Any] = {**_COMMON_CONFIG, **d.config}
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
    cfg[n.expert_count_key] = num_experts
    if experts_sized_by_intermediate:
        cfg["intermediate_size"] = moe_intermediate_size
    else:
        dense_size = 3 * moe_intermediate_size if intermediate_size is None else intermediate_size
        cfg.update(moe_intermediate_size=moe_intermediate_size, intermediate_size=dense_size)
    if n.moe_layers == "first_k_dense":
        cfg["first_k_dense_replace"] = dense
    elif n.moe_layers == "sparse_step":
        cfg["mlp_only_layers"] = list(range(dense))
    if n.shared_kind == "count":
        cfg["n_shared_experts"] = d.shared_default if shared is None else shared
    elif n.shared_kind == "size":
        default = int(d.shared_default or 0) * moe_intermediate_size
        cfg["shared_expert_intermediate_size"] = default if shared is None else shared
    if n.grouped_topk:
        cfg["n_group"], cfg["topk_group"] = _grouping(num_experts, top_k, int(d.config["n_group"]))
    if n.layer_types == "full":
        cfg["layer_types"] = ["full_attention"] * num_layers
    elif n.layer_types == "hybrid":
        # Full attention closes every block of 4 layers, and a short model still gets one.
        interval = min(4, num_layers)
        cfg["full_attention_interval"] = interval
        cfg["layer_types"] = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)
        ]
    if config_overrides:
        cfg.update(config_overrides)
    if n.attention == "mla":
        # transformers derives and writes these two from the MLA dimensions.
        cfg["qk_head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        cfg["head_dim"] = cfg["qk_rope_head_dim"]
    return cfg


def flagship_arguments(family: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(dims, config_overrides)`` of the family's flagship model: :func:`make_checkpoint` keyword
    arguments and the config values beyond them (attention geometry). Copies, free to edit."""
    d = family_defaults(family)
    return dict(d.flagship_dims), dict(d.flagship_config)
