"""What tensors a factory checkpoint holds: one :class:`TensorSpec` (name, shape, dtype, kind) per tensor,
in transformers' module order, as the family's transformers model class creates them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from moetool.testing.families import naming_of
from moetool.testing.names import (
    expert_intermediate_size,
    expert_weight_name,
    is_moe_layer,
    layer_prefix,
    layer_type,
    num_routed_experts,
    packed_expert_names,
    router_bias_name,
    router_weight_name,
    shared_expert_gate_name,
    shared_expert_prefix,
    shared_intermediate_size,
)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the BF16 (or F16/F32) checkpoint, before any FP8 quantization.

    ``group``: ``embedding``, ``lm_head``, ``norm``, ``attention``, ``linear_attention``,
    ``dense_mlp``, ``expert``, ``shared_expert``, ``router`` (router weight and correction bias) or
    ``gate`` (``shared_expert_gate``). ``linear``: an ``nn.Linear``-style ``[out, in]`` weight (or a
    stack of them, ``[E, out, in]``). ``init``: the value distribution (see :data:`moetool.testing.tensors.INITS`).
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
        return self.numel * self.dtype.itemsize

    @property
    def module(self) -> str:
        """The owning module's name (``...q_proj`` for ``...q_proj.weight``)."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def fp8_target(self) -> bool:
        """Quantized by the DeepSeek-V3 official recipe: every Linear but router, gates and lm_head."""
        return self.linear and self.group not in ("router", "gate", "lm_head", "embedding")


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
    n = naming_of(cfg)
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    p = f"{layer_prefix(layer)}.self_attn"
    specs: list[TensorSpec] = []
    if n.attention == "mla":
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
    q_out = heads * head_dim * (2 if n.gated_q else 1)  # Qwen3-Next gates its output by q
    qkv_bias = bool(cfg.get(*n.qkv_bias)) if n.qkv_bias else False
    o_bias = bool(cfg.get(*n.o_bias)) if n.o_bias else False
    specs += _linear(f"{p}.q_proj", q_out, h, dtype, "attention", layer, qkv_bias)
    specs += _linear(f"{p}.k_proj", kv_heads * head_dim, h, dtype, "attention", layer, qkv_bias)
    specs += _linear(f"{p}.v_proj", kv_heads * head_dim, h, dtype, "attention", layer, qkv_bias)
    specs += _linear(f"{p}.o_proj", h, heads * head_dim, dtype, "attention", layer, o_bias)
    if n.qk_norm is True or (isinstance(n.qk_norm, str) and cfg.get(n.qk_norm)):
        zero = n.zero_centred_norms
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
    n = naming_of(config)
    if dtype is None:
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"))
    if router_dtype is None:
        router_dtype = torch.float32 if n.router_fp32 else dtype
    h, v = int(config["hidden_size"]), int(config["vocab_size"])
    zero_norm = n.zero_centred_norms
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), dtype, "embedding", "weight")]
    for layer in range(int(config["num_hidden_layers"])):
        if layer_type(config, layer) == "linear_attention":
            specs += _linear_attention_specs(config, layer, dtype)
        else:
            specs += _attention_specs(config, layer, dtype)
        if is_moe_layer(config, layer):
            specs += _moe_specs(config, layer, dtype, packed_experts, router_dtype)
        elif n.dense_mlp:
            specs += _mlp(
                f"{layer_prefix(layer)}.mlp", int(config["intermediate_size"]), h, dtype, "dense_mlp", layer
            )
        specs.append(_norm(f"{layer_prefix(layer)}.input_layernorm", h, dtype, layer, zero_norm))
        specs.append(_norm(f"{layer_prefix(layer)}.post_attention_layernorm", h, dtype, layer, zero_norm))
    specs.append(_norm("model.norm", h, dtype, None, zero_norm))
    specs.append(TensorSpec("lm_head.weight", (v, h), dtype, "lm_head", "weight", linear=True))
    return specs
