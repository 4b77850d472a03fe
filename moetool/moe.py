"""MoE layer semantics of every supported family: the torch reference that ``validate`` checks against.

``route`` turns router logits into top-k expert ids and weights exactly as each family's transformers
implementation does (``models/<family>/modeling_<family>.py``, transformers 5.x), in float32:

==========================  ==========  ======================  ==========================================
family                      scoring     topk_method             weights
==========================  ==========  ======================  ==========================================
deepseek_v2                 softmax     greedy or               top-k probabilities · routed_scaling_factor
                                        group_limited_greedy    (transformers ignores norm_topk_prob here;
                                                                V2/V2-Lite configs set it false)
deepseek_v3, kimi_k2,       sigmoid     noaux_tc                unbiased sigmoid scores of the experts
deepseek_v32, glm4_moe,                                         chosen on ``score + e_score_correction_bias``,
glm_moe_dsa, kimi_k25                                           ``/ (sum + 1e-20)`` if norm_topk_prob,
                                                                then · routed_scaling_factor
qwen2_moe, qwen3_moe,       softmax     greedy                  top-k probabilities, ``/ sum`` if
qwen3_next, qwen3_5_moe                                         norm_topk_prob (no epsilon; always for
                                                                qwen3_5_moe)
mixtral                     softmax     greedy                  top-k probabilities ``/ sum`` (equal to a
                                                                softmax over the top-k logits)
minimax_m2                  sigmoid     greedy (biased)         unbiased sigmoid scores of the experts
                                                                chosen on ``score + e_score_correction_bias``,
                                                                ``/ sum`` (no epsilon, no scaling factor)
deepseek_v4                 sqrt(       noaux_tc, one group;    as deepseek_v3 (``/ (sum + 1e-20)`` always);
                            softplus)   hash layers:            hash layers weigh the experts
                                        ``tid2eid[token]``      ``tid2eid[token]`` names, without bias
==========================  ==========  ======================  ==========================================

DeepSeek-V4 clamps every expert's SwiGLU, the shared expert's too: ``gate(x) <= swiglu_limit``,
``|up(x)| <= swiglu_limit`` (``expert_mlp(limit=...)``).

A routing variant is a name in ``SCORING`` (and ``moetool.arch.schema.SCORINGS``) or a branch of
``route`` (and ``TOPK_METHODS``); a family file picks them by name.

Routing is computed from float32 logits. transformers' Qwen and Mixtral routers form the logits in
the model's dtype; for float32 weights both agree, for bf16 weights a near-tie may resolve differently,
and the float32 choice is the reference. Within the routing rules the fill values of masked groups
(0.0 for ``group_limited_greedy``, -inf for ``noaux_tc``) and every epsilon are transformers'.

The layer output is the routed experts' weighted sum plus the shared expert: weight 1 for
DeepSeek/GLM/Kimi (it is added after ``routed_scaling_factor``), ``sigmoid(x · shared_expert_gate)`` for
Qwen2-MoE/Qwen3-Next/Qwen3.5-MoE. After ``moetool fuse-shared`` the shared expert lives on as ``m · R`` extra expert
slots (docs/contract.md §7, ``FusedSlots``); ``moe_forward`` runs either form, and both must agree.

Expert weights use DeepGEMM's stacking: ``w13 [E, 2I, H]`` with gate_proj rows ``[0, I)`` and up_proj
rows ``[I, 2I)``, ``w2 [E, H, I]`` (the same as transformers v5's packed ``gate_up_proj``/``down_proj``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moetool.arch import SLOT_WEIGHTS, Routing
from moetool.errors import InputError

FUSED_KEY = "moetool_fused_shared_experts"

# transformers' DeepSeek-V3/GLM routers add this to the top-k sum before renormalising; the softmax
# families (Qwen, Mixtral) divide by the bare sum.
NOAUX_TC_NORM_EPS = 1e-20

#: Router scoring by name (``configs/*.toml`` routing.scoring): float32 logits ``[T, E]`` -> scores.
SCORING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda logits: logits.softmax(dim=-1, dtype=torch.float32),
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda logits: F.softplus(logits).sqrt(),  # DeepSeek-V4
}
#: Top-k rules that choose on ``score + e_score_correction_bias`` and weigh by the unbiased score.
BIASED_TOPK = ("greedy", "noaux_tc")

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``experts_fn(x [T, H], ids [T, k'] int64, weights [T, k'] float32) -> [T, H] float32``: the weighted
sum over each token's experts ``Σ_c weights[t, c] · expert_{ids[t, c]}(x[t])``."""


def route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    routing: Routing,
    score_bias: torch.Tensor | None = None,
    *,
    hash_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert selection of one MoE layer, as the family's transformers router computes it.

    x: ``[T, H]`` any float dtype; router_weight: ``[E, H]`` (``mlp.gate.weight``); score_bias: ``[E]``
    (``e_score_correction_bias``), used by ``noaux_tc`` only (absent means zeros, as transformers
    initialises the buffer). Logits are ``x.float() @ router_weight.float().T``.

    hash_ids: ``[T, k]`` expert ids of a hash-routed layer (DeepSeek-V4: ``tid2eid[token_id]``). They
    replace the top-k choice; the scores of those experts weigh them as the top-k weights would be
    (``/ (sum + 1e-20)`` when ``norm_topk_prob``, then ``· routed_scaling_factor``), no bias taken.

    Returns ``topk_ids [T, k]`` int64 and ``topk_weights [T, k]`` float32. Within a row the ids are in
    descending order of the score they were selected on (``torch.topk(sorted=True)``); transformers'
    DeepSeek/GLM routers use ``sorted=False``, so compare rows as sets. The selected set and the weights
    are transformers' own (same ops, same order of operations, same masking fill values).
    """
    if x.dim() != 2 or router_weight.dim() != 2 or x.shape[1] != router_weight.shape[1]:
        raise InputError(
            f"route: x must be [T, H] and router_weight [E, H], got {list(x.shape)} and "
            f"{list(router_weight.shape)}"
        )
    num_experts, top_k = routing.num_experts, routing.top_k
    if router_weight.shape[0] != num_experts:
        raise InputError(
            f"route: router_weight has {router_weight.shape[0]} rows, the config says "
            f"{num_experts} routed experts"
        )
    if not 1 <= top_k <= num_experts:
        raise InputError(f"route: top_k={top_k} must lie in [1, {num_experts}]")
    if score_bias is not None:
        if routing.topk_method not in BIASED_TOPK:
            raise InputError(
                f"route: a score correction bias is only defined for {' and '.join(BIASED_TOPK)} routing, "
                f"not {routing.topk_method}"
            )
        if tuple(score_bias.shape) != (num_experts,):
            raise InputError(f"route: score_bias must be [{num_experts}], got {list(score_bias.shape)}")

    logits = F.linear(x.to(torch.float32), router_weight.to(torch.float32))
    scoring = SCORING.get(routing.scoring)
    if scoring is None:
        raise InputError(f"route: unknown scoring {routing.scoring!r} (known: {', '.join(SCORING)})")
    scores = scoring(logits)

    method = routing.topk_method
    if hash_ids is not None:
        if score_bias is not None:
            raise InputError("route: a hash-routed layer takes no score correction bias")
        if tuple(hash_ids.shape) != (x.shape[0], top_k):
            raise InputError(f"route: hash_ids must be [T={x.shape[0]}, {top_k}], got {list(hash_ids.shape)}")
        topk_ids = hash_ids.to(device=scores.device, dtype=torch.int64)
        if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= num_experts):
            raise InputError(f"route: hash-routed expert ids must lie in [0, {num_experts})")
        topk_weights = scores.gather(1, topk_ids)
        if routing.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + NOAUX_TC_NORM_EPS)
    elif method == "greedy":
        if score_bias is None:
            topk_weights, topk_ids = torch.topk(scores, k=top_k, dim=-1)
        else:
            # MiniMax-M2: chosen on the biased score, weighted by the unbiased one
            bias = score_bias.to(device=scores.device, dtype=torch.float32)
            topk_ids = torch.topk(scores + bias, k=top_k, dim=-1)[1]
            topk_weights = scores.gather(1, topk_ids)
        if routing.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    elif method == "group_limited_greedy":
        # Groups ranked by their best expert; experts of dropped groups are filled with 0.0 (not -inf),
        # as DeepseekV2TopkRouter does.
        _check_groups(routing)
        group_mask = _group_mask(scores.view(scores.shape[0], routing.n_group, -1).amax(dim=-1), routing)
        masked = scores.masked_fill(~group_mask, 0.0)
        topk_weights, topk_ids = torch.topk(masked, k=top_k, dim=-1)
        if routing.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    elif method == "noaux_tc":
        bias = torch.zeros(num_experts, dtype=torch.float32, device=scores.device)
        if score_bias is not None:
            bias = score_bias.to(device=scores.device, dtype=torch.float32)
        choice = scores + bias
        _check_groups(routing)
        group_size = num_experts // routing.n_group
        if group_size < 2:
            raise InputError(
                f"route: noaux_tc scores a group by its top-2 experts; n_group={routing.n_group} "
                f"leaves {group_size} per group"
            )
        # Groups ranked by the sum of their top-2 biased scores; dropped groups become -inf.
        group_scores = (
            choice.view(choice.shape[0], routing.n_group, group_size).topk(2, dim=-1)[0].sum(dim=-1)
        )
        group_mask = _group_mask(group_scores, routing)
        topk_ids = torch.topk(choice.masked_fill(~group_mask, float("-inf")), k=top_k, dim=-1)[1]
        topk_weights = scores.gather(1, topk_ids)
        if routing.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + NOAUX_TC_NORM_EPS)
    else:
        raise InputError(f"route: unknown topk_method {method!r}")

    topk_weights = topk_weights * routing.routed_scaling_factor
    return topk_ids.to(torch.int64), topk_weights.to(torch.float32)


def _check_groups(routing: Routing) -> None:
    n_group, topk_group, num_experts = routing.n_group, routing.topk_group, routing.num_experts
    if n_group < 1 or num_experts % n_group:
        raise InputError(f"route: n_group={n_group} does not divide {num_experts} routed experts")
    if not 1 <= topk_group <= n_group or routing.top_k > topk_group * (num_experts // n_group):
        # Fewer candidates than top_k would make topk pick masked (0.0 / -inf) experts.
        raise InputError(
            f"route: topk_group={topk_group} of n_group={n_group} groups cannot hold "
            f"top_k={routing.top_k} of {num_experts} experts"
        )


def _group_mask(group_scores: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``group_scores [T, G]`` -> bool ``[T, E]``: True for experts of the ``topk_group`` best groups."""
    n_group, topk_group, num_experts = routing.n_group, routing.topk_group, routing.num_experts
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return keep.repeat_interleave(num_experts // n_group, dim=1)


def expert_mlp(
    x: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    *,
    limit: float | None = None,
) -> torch.Tensor:
    """One SwiGLU expert in float32: ``down(silu(gate(x)) * up(x))``; with ``limit`` (DeepSeek-V4's
    ``swiglu_limit``) ``gate(x)`` is clamped to at most ``limit`` and ``up(x)`` to ``[-limit, limit]``
    first, as transformers' DeepseekV4Experts and DeepseekV4MLP do.

    x ``[T, H]``; gate_w, up_w ``[I, H]``; down_w ``[H, I]``; any float dtypes. Returns ``[T, H]`` float32.
    """
    xf = x.to(torch.float32)
    gate = F.linear(xf, gate_w.to(torch.float32))
    up = F.linear(xf, up_w.to(torch.float32))
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.linear(F.silu(gate) * up, down_w.to(torch.float32))


def experts_reference(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    limit: float | None = None,
) -> torch.Tensor:
    """The float32 torch ``ExpertsFn``: ``out[t] = Σ_c weights[t, c] · expert_{ids[t, c]}(x[t])``.

    x ``[T, H]``; ids ``[T, k]`` int (each < ``w13.shape[0]``); weights ``[T, k]``; w13 ``[E_total, 2I, H]``
    (gate rows ``[0, I)``, up rows ``[I, 2I)``); w2 ``[E_total, H, I]``; ``limit``: ``expert_mlp``'s
    SwiGLU clamp. Only experts that received tokens are computed; contributions are accumulated in
    ascending expert id. Returns ``[T, H]`` float32.
    """
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise InputError(
            f"experts: ids {list(ids.shape)} and weights {list(weights.shape)} must both be "
            f"[T={x.shape[0]}, k]"
        )
    num, two_i, hidden = w13.shape
    inter = two_i // 2
    if two_i % 2 or tuple(w2.shape) != (num, hidden, inter) or x.shape[1] != hidden:
        raise InputError(
            f"experts: w13 {list(w13.shape)} and w2 {list(w2.shape)} do not make "
            f"[E, 2I, H] / [E, H, I] experts for H={x.shape[1]}"
        )
    out = torch.zeros(x.shape[0], hidden, dtype=torch.float32, device=x.device)
    if ids.numel() == 0:
        return out
    if int(ids.min()) < 0 or int(ids.max()) >= num:
        raise InputError(
            f"experts: expert ids must lie in [0, {num}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    experts_reference_into(out, x, ids, weights, w13, w2, limit=limit)
    return out


def experts_reference_into(
    out: torch.Tensor,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    first: int = 0,
    *,
    limit: float | None = None,
) -> None:
    """Add to ``out [T, H]`` (float32) the contributions of experts ``first .. first + len(w13) - 1``, whose
    weights are ``w13``/``w2`` (``w13[i]`` is expert ``first + i``), in ascending expert id; ids outside
    that range are left out. Called on consecutive ranges in ascending order it performs, operation for
    operation, what ``experts_reference`` does on the whole stack, so a layer read in parts gives the same
    bits."""
    inter = w13.shape[1] // 2
    inside = (ids >= first) & (ids < first + w13.shape[0])
    for e in torch.unique(ids[inside]).tolist():
        token_idx, col = torch.where(ids == e)
        k = e - first
        h = expert_mlp(x[token_idx], w13[k, :inter], w13[k, inter:], w2[k], limit=limit)
        out.index_add_(0, token_idx, h * weights[token_idx, col, None].to(torch.float32))


@dataclass(frozen=True)
class FusedSlots:
    """Where a fused shared expert lives in the routed-expert tensors (docs/contract.md §7).

    The shared expert was split into ``num_slots`` (m) slots of ``moe_intermediate_size`` each, repeated
    ``replicas`` (R) times, and appended after the E routed experts. Order is replica-major: slot j of
    replica r is expert ``first_slot + r·m + j`` (``moetool.transforms.shared_fusion.replicate``). A
    consumer adds, for one replica r of its choice per token, ``weight · expert_{first_slot + r·m + j}(x)``
    for every j, with weight 1 (``"one"``) or ``sigmoid(x · shared_expert_gate)`` (``"sigmoid_gate"``).
    """

    first_slot: int
    num_slots: int
    replicas: int
    slot_weight: str

    def __post_init__(self) -> None:
        for name in ("first_slot", "num_slots", "replicas"):
            value = getattr(self, name)
            low = 0 if name == "first_slot" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"{FUSED_KEY}.{name} must be an integer >= {low}, got {value!r}")
        if self.slot_weight not in SLOT_WEIGHTS:
            raise InputError(
                f"{FUSED_KEY}.slot_weight must be one of {', '.join(SLOT_WEIGHTS)}, got {self.slot_weight!r}"
            )

    @property
    def total_slots(self) -> int:
        """``m · R``: the experts appended after the routed ones."""
        return self.num_slots * self.replicas

    def slot_id(self, replica: int, slot: int) -> int:
        """Expert index of slot ``slot`` (j) of replica ``replica`` (r): ``first_slot + r·m + j``."""
        return self.first_slot + replica * self.num_slots + slot

    def to_config(self) -> dict[str, Any]:
        """The ``config.json`` value of ``moetool_fused_shared_experts``."""
        return {
            "first_slot": self.first_slot,
            "num_slots": self.num_slots,
            "replicas": self.replicas,
            "slot_weight": self.slot_weight,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, file: str = "config.json") -> FusedSlots | None:
        """Read ``config["moetool_fused_shared_experts"]``; ``None`` when the checkpoint is not fused.
        Defects are an ``InputError`` naming ``file``."""
        entry = config.get(FUSED_KEY)
        if entry is None:
            return None
        if not isinstance(entry, Mapping):
            raise InputError(f"{FUSED_KEY} must be an object, got {type(entry).__name__}", file=file)
        keys = ("first_slot", "num_slots", "replicas", "slot_weight")
        missing = [k for k in keys if k not in entry]
        unknown = sorted(set(entry) - set(keys))
        if missing or unknown:
            raise InputError(
                f"{FUSED_KEY} must have exactly the keys {', '.join(keys)} "
                f"(missing {missing}, unknown {unknown})",
                file=file,
            )
        for k in ("first_slot", "num_slots", "replicas"):
            v = entry[k]
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or not 0 <= v <= 1_000_000
                or (k != "first_slot" and v < 1)
            ):
                raise InputError(f"{FUSED_KEY}.{k} must be a positive integer, got {v!r:.40}", file=file)
        if entry["slot_weight"] not in SLOT_WEIGHTS:
            raise InputError(f"{FUSED_KEY}.slot_weight must be one of {', '.join(SLOT_WEIGHTS)}", file=file)
        return cls(**{k: entry[k] for k in keys})


@dataclass(kw_only=True)
class MoeLayerWeights:
    """One MoE layer's weights as float tensors (any float dtype; the reference computes in float32).

    - router_weight ``[E, H]``; score_bias ``[E]`` (``e_score_correction_bias``) or None.
    - w13 ``[E_total, 2I, H]``: per expert, gate_proj rows ``[0, I)`` then up_proj rows ``[I, 2I)``;
      w2 ``[E_total, H, I]``. ``E_total = E`` unfused, ``E + m·R`` with fused shared slots.
    - shared_w13 ``[2S, H]`` (gate rows ``[0, S)``, up rows ``[S, 2S)``) and shared_w2 ``[H, S]``: the
      unfused shared expert, or None.
    - shared_gate ``[1, H]`` (``shared_expert_gate.weight``, Qwen) or None.
    - fused: where the fused shared slots are, or None.
    """

    router_weight: torch.Tensor
    score_bias: torch.Tensor | None = None
    w13: torch.Tensor
    w2: torch.Tensor
    shared_w13: torch.Tensor | None = None
    shared_w2: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None
    fused: FusedSlots | None = field(default=None)

    @property
    def moe_intermediate_size(self) -> int:
        return self.w13.shape[1] // 2

    @property
    def shared_intermediate_size(self) -> int:
        """S, or 0 without an unfused shared expert."""
        return 0 if self.shared_w2 is None else self.shared_w2.shape[1]

    @classmethod
    def from_experts(
        cls,
        router_weight: torch.Tensor,
        experts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        *,
        score_bias: torch.Tensor | None = None,
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        shared_gate: torch.Tensor | None = None,
    ) -> MoeLayerWeights:
        """Stack per-expert ``(gate [I, H], up [I, H], down [H, I])`` tensors (checkpoint names
        ``experts.{e}.{gate,up,down}_proj.weight``); ``shared`` is ``(gate [S, H], up [S, H], down [H, S])``."""
        if not experts:
            raise InputError("an MoE layer needs at least one routed expert")
        w13 = torch.stack([torch.cat([g, u], dim=0) for g, u, _ in experts])
        w2 = torch.stack([d for _, _, d in experts])
        shared_w13 = shared_w2 = None
        if shared is not None:
            shared_w13 = torch.cat([shared[0], shared[1]], dim=0)
            shared_w2 = shared[2]
        return cls(
            router_weight=router_weight,
            score_bias=score_bias,
            w13=w13,
            w2=w2,
            shared_w13=shared_w13,
            shared_w2=shared_w2,
            shared_gate=shared_gate,
        )


def shared_weight(x: torch.Tensor, slot_weight: str, shared_gate: torch.Tensor | None) -> torch.Tensor:
    """The shared expert's per-token weight ``[T, 1]`` float32: 1, or ``sigmoid(x · shared_gate)``."""
    if slot_weight == "one":
        return torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
    if slot_weight == "sigmoid_gate":
        if shared_gate is None:
            raise InputError("slot weight sigmoid_gate needs shared_expert_gate.weight [1, H]")
        return torch.sigmoid(F.linear(x.to(torch.float32), shared_gate.to(torch.float32).reshape(1, -1)))
    raise InputError(f"unknown shared-expert weight {slot_weight!r} (known: {', '.join(SLOT_WEIGHTS)})")


def moe_forward(
    x: torch.Tensor,
    w: MoeLayerWeights,
    routing: Routing,
    slot_weight: str | None,
    *,
    experts_fn: ExpertsFn | None = None,
    replica_of_token: torch.Tensor | None = None,
    swiglu_limit: float | None = None,
    hash_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoE layer: routed experts plus the shared expert, unfused or as fused slots.

    DeepSeek-V4: ``swiglu_limit`` clamps every expert's SwiGLU, the shared expert's too (the default
    ``experts_fn`` and the unfused shared expert; a given ``experts_fn`` applies it itself);
    ``hash_ids`` ``[T, k]`` (``tid2eid[token_ids]``) routes a hash layer (``route``).

    x ``[T, H]`` any float dtype. ``slot_weight`` (the ArchSpec's, ``"one"`` | ``"sigmoid_gate"``)
    weighs an unfused shared expert; fused slots take theirs from ``w.fused.slot_weight``, as a consumer
    reading ``config.json`` would. ``experts_fn`` (default ``experts_reference`` on ``w.w13``/``w.w2``)
    computes the routed experts and, with fused slots, the slots too: for token t it gets the k routed
    columns followed by m slot columns ``first_slot + r·m + j`` of replica ``r = replica_of_token[t]``
    (default ``t % R``), each slot weighted like the shared expert.

    Returns ``out [T, H]`` float32 and the routed ``topk_ids [T, k]`` int64 (slot columns excluded).
    """
    if x.dim() != 2:
        raise InputError(f"moe_forward: x must be [T, H], got {list(x.shape)}")
    topk_ids, topk_weights = route(x, w.router_weight, routing, w.score_bias, hash_ids=hash_ids)
    if experts_fn is None:

        def experts_fn(xx: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
            return experts_reference(xx, ids, wts, w.w13, w.w2, limit=swiglu_limit)

    fused = w.fused
    if fused is None:
        out = experts_fn(x, topk_ids, topk_weights).to(torch.float32)
        if w.shared_w13 is not None or w.shared_w2 is not None:
            if w.shared_w13 is None or w.shared_w2 is None:
                raise InputError("moe_forward: shared_w13 and shared_w2 must be given together")
            if slot_weight is None:
                raise InputError("moe_forward: the layer has a shared expert but no slot_weight was given")
            s = w.shared_intermediate_size
            shared_out = expert_mlp(x, w.shared_w13[:s], w.shared_w13[s:], w.shared_w2, limit=swiglu_limit)
            out = out + shared_weight(x, slot_weight, w.shared_gate) * shared_out
        return out, topk_ids

    if w.shared_w13 is not None or w.shared_w2 is not None:
        raise InputError(
            "moe_forward: a layer with fused shared slots cannot also hold an unfused shared expert"
        )
    if fused.first_slot != routing.num_experts:
        raise InputError(
            f"moe_forward: fused slots start at {fused.first_slot}, after "
            f"{routing.num_experts} routed experts they must start at {routing.num_experts}"
        )
    if w.w13.shape[0] < fused.first_slot + fused.total_slots:
        raise InputError(
            f"moe_forward: w13 holds {w.w13.shape[0]} experts, fewer than "
            f"{fused.first_slot} routed + {fused.total_slots} fused slots"
        )
    num_tokens = x.shape[0]
    if replica_of_token is None:
        replica = torch.arange(num_tokens, device=x.device) % fused.replicas
    else:
        replica = replica_of_token.to(device=x.device, dtype=torch.int64).reshape(-1)
        if replica.shape[0] != num_tokens or (
            num_tokens and (int(replica.min()) < 0 or int(replica.max()) >= fused.replicas)
        ):
            raise InputError(
                f"moe_forward: replica_of_token must be [{num_tokens}] with values in [0, {fused.replicas})"
            )
    slot_ids = (
        fused.first_slot
        + replica[:, None] * fused.num_slots
        + torch.arange(fused.num_slots, device=x.device)[None, :]
    )
    slot_w = shared_weight(x, fused.slot_weight, w.shared_gate).expand(num_tokens, fused.num_slots)
    ids = torch.cat([topk_ids, slot_ids], dim=1)
    weights = torch.cat([topk_weights, slot_w], dim=1)
    return experts_fn(x, ids, weights).to(torch.float32), topk_ids
