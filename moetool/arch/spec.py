"""``ArchSpec``: one family's tensor names and semantics; ``ArchSpec.model(config)`` resolves them against
one checkpoint's ``config.json`` into a ``ModelInfo`` of plain numbers.

Tensor patterns are written for the text model at the root ``model`` (``model.layers.{layer}.mlp``). A
checkpoint that wraps the text model (a vision-language release: ``model.language_model.layers.*``,
``language_model.model.layers.*``) is read through ``ArchSpec.rooted(root)``, and its config keys are read
from ``text_config`` (``language_config``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from moetool.arch.schema import CANONICAL_ROOT, EXPERT_DTYPES, SCORINGS, TOPK_METHODS
from moetool.errors import InputError

MAX_LAYERS = 100_000
MAX_EXPERTS = 1_000_000
MAX_DIM = 10_000_000


def language_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config dict that holds the text model's keys: ``config["text_config"]`` when the checkpoint
    wraps a text model (Qwen3.5-MoE, Kimi-K2.5), else ``config`` itself."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _reroot(pattern: str, old: str, new: str) -> str:
    if pattern.startswith(old + "."):
        return new + pattern[len(old) :]
    return pattern


@dataclass(frozen=True)
class Routing:
    """How a family's router turns logits into top-k expert ids and weights, resolved for one config."""

    scoring: str  # "softmax" | "sigmoid" | "sqrtsoftplus"
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
    hash_layers: tuple[int, ...] = ()  # MoE layers routed by a token-id table (DeepSeek-V4's tid2eid)
    swiglu_limit: float | None = None  # experts clamp gate <= limit and |up| <= limit before SwiGLU
    expert_dtype: str | None = None  # "fp4" | "fp8" where the config declares the experts' format
    mtp_layers: int = 0  # multi-token-prediction layers the config declares (the weights may omit them)

    @property
    def shared_slots(self) -> int:
        """Fused slots a shared expert would make (docs/contract.md §7); 0 without shared experts or when S % I != 0."""
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
    extends: str | None = None  # the family this file was laid over, if any
    root: str = CANONICAL_ROOT  # where this checkpoint stores the text model (``rooted``)
    hash_spec: dict[str, str] | None = field(default=None, hash=False)
    fp4_spec: dict[str, str] | None = field(default=None, hash=False)
    mtp_spec: dict[str, str] | None = field(default=None, hash=False)
    # Layer numbers from here on name MTP layers (``mtp_spec["moe"]``, index ``layer - mtp_base``); set
    # per checkpoint by ``with_mtp``.
    mtp_base: int | None = None

    def rooted(self, root: str) -> ArchSpec:
        """This spec for a checkpoint that stores the text model under ``root`` instead of ``model``
        (``model.language_model`` for Qwen3.5-MoE, ``language_model.model`` for Kimi-K2.5)."""
        if root == self.root:
            return self
        tensors = {
            k: _reroot(v, self.root, root) if k in ("moe", "moe_alt") else v for k, v in self.tensors.items()
        }
        gdn = None
        if self.gdn_spec is not None:
            gdn = {**self.gdn_spec, "prefix": _reroot(self.gdn_spec["prefix"], self.root, root)}
        return dataclasses.replace(self, tensors=tensors, gdn_spec=gdn, root=root)

    def layer_prefix(self, layer: int) -> str:
        """``model.layers.{L}`` under this spec's root."""
        return f"{self.root}.layers.{layer}"

    def with_mtp(self, num_layers: int) -> ArchSpec:
        """This spec numbering MTP layers after the ``num_layers`` decoder layers: MoE layer
        ``num_layers + m`` is MTP layer m (DeepSeek-V4 ``mtp.{m}.ffn``)."""
        return dataclasses.replace(self, mtp_base=num_layers) if self.mtp_spec else self

    # -- tensor names -------------------------------------------------------------------------
    def moe_prefix(self, layer: int) -> str:
        """``model.layers.{L}.mlp`` (or ``.block_sparse_moe``): the MoE block of a layer; from
        ``mtp_base`` on, the block of an MTP layer (``with_mtp``)."""
        if self.mtp_base is not None and self.mtp_spec and layer >= self.mtp_base:
            return self.mtp_spec["moe"].format(layer=layer - self.mtp_base)
        return self.tensors["moe"].format(layer=layer)

    def scale_of(self, weight: str) -> str:
        """The block scales of quantized ``weight`` in this family's convention: ``X.weight_scale_inv``
        (F32, DeepSeek-V3) or ``X.scale`` (E8M0, DeepSeek-V4, for ``X.weight``)."""
        if self.tensors.get("scale") == "scale" and weight.endswith(".weight"):
            return weight.removesuffix("weight") + "scale"
        return weight + "_scale_inv"

    def hash_table(self, layer: int) -> str | None:
        """The token-id → expert-ids table of a hash-routed layer (DeepSeek-V4 ``ffn.gate.tid2eid``)."""
        return f"{self.moe_prefix(layer)}.{self.hash_spec['table']}" if self.hash_spec else None

    def experts_prefix(self, layer: int) -> str:
        """The expert container, ``P`` in docs/contract.md §6 (``model.layers.{L}.mlp.experts``)."""
        return f"{self.moe_prefix(layer)}.{self.tensors['experts']}"

    def expert_weight(self, layer: int, expert: int, proj: str) -> str:
        """Per-expert weight name; ``proj`` is ``gate``, ``up`` or ``down``."""
        return f"{self.experts_prefix(layer)}.{expert}.{self.tensors[proj + '_proj']}.weight"

    def packed_names(self, layer: int) -> tuple[str, str]:
        """transformers v5 packed experts: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
        p = self.experts_prefix(layer)
        return f"{p}.gate_up_proj", f"{p}.down_proj"

    def deepgemm_names(self, layer: int) -> dict[str, str]:
        """The deepgemm layout's stacked tensors by role: ``w13_weight`` is ``P.gate_up_proj`` (F8_E4M3
        ``[E, 2I, H]``, gate rows first), ``w2_weight`` is ``P.down_proj`` (``[E, H, I]``), each with its
        ``_scale_inv``. These are the names transformers' ``FP8Experts`` and vLLM's stacked-expert loader
        hold; whether an engine may load such a checkpoint is decided by its config (``moetool.engines``)."""
        gu, d = self.packed_names(layer)
        return {
            "w13_weight": gu,
            "w13_weight_scale_inv": gu + "_scale_inv",
            "w2_weight": d,
            "w2_weight_scale_inv": d + "_scale_inv",
        }

    def legacy_deepgemm_names(self, layer: int) -> dict[str, str]:
        """The names moetool 0.1 wrote the deepgemm layout under (``P.w13_weight`` ...): still read, never
        written, because engines load them as something else."""
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
        """The shared expert's ``proj`` weight, its modules named as the routed experts' are
        (``gate_proj`` ...; DeepSeek-V4 ``w1``, ``w3``, ``w2``)."""
        s = self.tensors["shared"]
        return f"{self.moe_prefix(layer)}.{s}.{self.tensors[proj + '_proj']}.weight" if s else None

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
        """Resolve this spec against a checkpoint's config (its ``text_config`` when it wraps a text
        model); missing keys are an ``InputError``."""
        top_model_type = str(config.get("model_type", ""))
        config = language_config(config)

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
        types_key = ls.get("mlp_types_key")
        mlp_types = config.get(types_key) if types_key else None
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
        if mlp_types is not None:
            moe_layers = _moe_layers_from_types(types_key, mlp_types, num_layers, moe_layers, file)

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
        hash_layers: tuple[int, ...] = ()
        if self.hash_spec:
            h = self.hash_spec
            types = config.get(h["layer_types_key"])
            if types is not None:
                if not isinstance(types, list) or len(types) != num_layers:
                    raise InputError(
                        f"{h['layer_types_key']} must list one entry per layer ({num_layers})", file=file
                    )
                hash_layers = tuple(i for i, t in enumerate(types) if t == h["hash_value"])
            elif h.get("count_key") and config.get(h["count_key"]) is not None:
                hash_layers = tuple(range(as_int(h["count_key"], config[h["count_key"]], 0, num_layers)))
        limit_key = rs.get("swiglu_limit_key")
        swiglu_limit = None
        if limit_key and config.get(limit_key) is not None:
            swiglu_limit = as_float(limit_key, config[limit_key])
        expert_dtype = None
        if self.fp4_spec:
            key = self.fp4_spec["expert_dtype_key"]
            q = config.get("quantization_config")
            declared = [
                v for v in (config.get(key), q.get(key) if isinstance(q, dict) else None) if v is not None
            ]
            if any(v not in EXPERT_DTYPES for v in declared) or len(set(declared)) > 1:
                raise InputError(
                    f"{key} must be one of {', '.join(EXPERT_DTYPES)} (the same where given twice), "
                    f"got {declared}",
                    file=file,
                )
            expert_dtype = declared[0] if declared else None
        mtp = 0
        if self.mtp_spec:
            mtp = as_int(self.mtp_spec["count_key"], opt(self.mtp_spec["count_key"], 0) or 0, 0, 16)
        return ModelInfo(
            family=self.family,
            model_type=top_model_type,
            num_layers=num_layers,
            hidden_size=hidden,
            num_experts=num_experts,
            moe_intermediate_size=moe_i,
            shared_intermediate_size=shared_i,
            moe_layers=moe_layers,
            routing=routing,
            gdn=gdn,
            hash_layers=hash_layers,
            swiglu_limit=swiglu_limit,
            expert_dtype=expert_dtype,
            mtp_layers=mtp,
        )


def _moe_layers_from_types(
    key: str, types: Any, num_layers: int, by_rule: tuple[int, ...], file: str
) -> tuple[int, ...]:
    """MoE layers from a per-layer ``"dense" | "sparse"`` list (what transformers builds from for
    DeepSeek-V3.2 and GLM-5). SGLang and vLLM build from ``first_k_dense_replace`` instead, so a list that
    disagrees with it would make engines run different models: refused."""
    if (
        not isinstance(types, list)
        or len(types) != num_layers
        or not all(t in ("dense", "sparse") for t in types)
    ):
        raise InputError(
            f"{key} must list 'dense' or 'sparse' for each of the {num_layers} layers",
            file=file,
            fix="use the config.json that came with the checkpoint",
        )
    layers = tuple(i for i, t in enumerate(types) if t == "sparse")
    if layers != by_rule:
        raise InputError(
            f"{key} makes layers {list(layers)} MoE but the config's other keys make {list(by_rule)}: "
            "transformers reads the list, SGLang and vLLM the other keys",
            file=file,
            fix="make the two agree in config.json",
        )
    return layers
