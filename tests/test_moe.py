"""moetool.moe against transformers' own MoE blocks, and fused shared slots against the unfused layer.

Every family is built with transformers' config class and ``AutoModelForCausalLM.from_config`` (one
layer, tiny irregular dims, float32), its MoE block's weights replaced by seeded random ones of
realistic scale, and run on random hidden states. transformers' routing is captured at the input of
its experts module, so the test does not depend on how a given transformers version returns it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    DeepseekV32Config,
    Glm4MoeConfig,
    GlmMoeDsaConfig,
    MiniMaxM2Config,
    MixtralConfig,
    Qwen2MoeConfig,
    Qwen3_5MoeTextConfig,
    Qwen3MoeConfig,
    Qwen3NextConfig,
)

from moetool.arch import ArchSpec, Routing, detect
from moetool.errors import InputError
from moetool.moe import (
    FUSED_KEY,
    FusedSlots,
    MoeLayerWeights,
    expert_mlp,
    experts_reference,
    moe_forward,
    route,
)
from moetool.transforms.shared_fusion import fuse_layer

# Tolerances, each relative to max |reference| (float32 throughout):
# transformers vs moe_forward: the same float32 products, summed in another order (grouped_mm or a
# per-expert loop, gate/up as one [2I, H] product or two, shared expert added in the model dtype).
LAYER_TOL = 2e-6
# the same on CUDA, where cuBLAS may split the reductions differently for each operand shape.
LAYER_TOL_CUDA = 1e-5
# routing weights: the same ops; only the order of the top-k sum before renormalising differs.
ROUTE_TOL = 1e-6
# fused vs unfused: the shared down projection is summed slot by slot instead of in one product.
FUSED_TOL = 2e-6
# a broken fusion (dropped slot, wrong weight) must miss by far more than any rounding.
BROKEN_MIN = 1e-2

HIDDEN = 44
TOKENS = (3, 13)  # [batch, seq]: 39 tokens
_COMMON = dict(
    vocab_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
_MLA = dict(kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)


def _deepseek_v3() -> DeepseekV3Config:
    return DeepseekV3Config(
        hidden_size=HIDDEN,
        intermediate_size=16,
        moe_intermediate_size=24,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=0,
        **_MLA,
        **_COMMON,
    )


def _deepseek_v2_lite() -> DeepseekV2Config:
    return DeepseekV2Config(
        hidden_size=HIDDEN,
        intermediate_size=16,
        moe_intermediate_size=12,
        n_routed_experts=14,
        num_experts_per_tok=4,
        n_shared_experts=2,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        first_k_dense_replace=0,
        **_MLA,
        **_COMMON,
    )


def _deepseek_v2_grouped() -> DeepseekV2Config:
    return DeepseekV2Config(
        hidden_size=HIDDEN,
        intermediate_size=16,
        moe_intermediate_size=12,
        n_routed_experts=15,
        n_group=5,
        topk_group=2,
        num_experts_per_tok=3,
        n_shared_experts=2,
        topk_method="group_limited_greedy",
        routed_scaling_factor=16.0,
        first_k_dense_replace=0,
        **_MLA,
        **_COMMON,
    )


def _qwen2_moe() -> Qwen2MoeConfig:
    # Qwen1.5-MoE's ratio: shared intermediate = 4 x moe_intermediate (5632 = 4 x 1408).
    return Qwen2MoeConfig(
        hidden_size=HIDDEN,
        intermediate_size=16,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=48,
        num_experts=10,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        **_COMMON,
    )


def _qwen3_moe() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        hidden_size=HIDDEN,
        intermediate_size=16,
        moe_intermediate_size=20,
        num_experts=12,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        head_dim=8,
        **_COMMON,
    )


def _qwen3_next() -> Qwen3NextConfig:
    return Qwen3NextConfig(
        hidden_size=HIDDEN,
        intermediate_size=16,
        moe_intermediate_size=20,
        shared_expert_intermediate_size=20,
        num_experts=10,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        head_dim=8,
        layer_types=["full_attention"],
        **_COMMON,
    )


def _glm4_moe() -> Glm4MoeConfig:
    return Glm4MoeConfig(
        hidden_size=HIDDEN,
        intermediate_size=16,
        moe_intermediate_size=24,
        n_routed_experts=12,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=3,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=0,
        head_dim=8,
        **_COMMON,
    )


def _mixtral() -> MixtralConfig:
    return MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=20,
        num_local_experts=6,
        num_experts_per_tok=2,
        head_dim=8,
        **_COMMON,
    )


_DSA = dict(
    q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, index_n_heads=2
)


def _deepseek_v32() -> DeepseekV32Config:
    return DeepseekV32Config(
        hidden_size=HIDDEN,
        intermediate_size=16,
        moe_intermediate_size=24,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        first_k_dense_replace=0,
        index_head_dim=8,
        **_DSA,
        **_COMMON,
    )


def _glm_moe_dsa() -> GlmMoeDsaConfig:
    return GlmMoeDsaConfig(
        hidden_size=HIDDEN,
        intermediate_size=16,
        moe_intermediate_size=12,
        n_routed_experts=10,
        num_experts_per_tok=3,
        n_shared_experts=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=0,
        index_head_dim=8,
        **_DSA,
        **_COMMON,
    )


def _minimax_m2() -> MiniMaxM2Config:
    return MiniMaxM2Config(
        hidden_size=HIDDEN,
        intermediate_size=20,
        num_local_experts=10,
        num_experts_per_tok=3,
        head_dim=8,
        **_COMMON,
    )


def _qwen3_5_moe() -> Qwen3_5MoeTextConfig:
    return Qwen3_5MoeTextConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=20,
        shared_expert_intermediate_size=40,
        num_experts=10,
        num_experts_per_tok=3,
        head_dim=8,
        layer_types=["full_attention"],
        **_COMMON,
    )


FAMILIES = {
    "deepseek_v3": _deepseek_v3,
    "deepseek_v32": _deepseek_v32,
    "glm_moe_dsa": _glm_moe_dsa,
    "minimax_m2": _minimax_m2,
    "qwen3_5_moe": _qwen3_5_moe,
    "deepseek_v2_lite": _deepseek_v2_lite,
    "deepseek_v2_grouped": _deepseek_v2_grouped,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "qwen3_next": _qwen3_next,
    "glm4_moe": _glm4_moe,
    "mixtral": _mixtral,
}
SHARED = [name for name in FAMILIES if name not in ("qwen3_moe", "mixtral", "minimax_m2")]


@dataclasses.dataclass
class Layer:
    spec: ArchSpec
    config: object  # the model's transformers config
    routing: Routing
    block: torch.nn.Module
    weights: MoeLayerWeights


def _config_dict(cfg) -> dict:
    """config.json as the Hub ships it. transformers 5.x writes attribute-mapped keys under their target
    name (Qwen3-MoE saves ``num_local_experts``, Hub checkpoints say ``num_experts``); add the aliases."""
    d = cfg.to_dict()
    for alias in getattr(type(cfg), "attribute_map", {}):
        d.setdefault(alias, getattr(cfg, alias))
    return d


def _build(family: str, seed: int, *, tie: bool = False) -> Layer:
    """A transformers MoE block with seeded random weights, and the same layer as ``MoeLayerWeights``.

    ``tie`` gives experts 0 and 1 identical router rows (and bias), so their scores tie exactly."""
    cfg = FAMILIES[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    block = model.model.layers[0].mlp
    config = _config_dict(model.config)
    spec = detect(config)
    info = spec.model(config)
    assert info.moe_layers == (0,)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            assert t.dtype == torch.float32, name
            if name == spec.tensors["router_bias"]:
                # Comparable to the spread of the sigmoid scores, so the bias changes the selection.
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
            elif name == f"{spec.tensors['router']}.weight":
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / t.shape[-1] ** 0.5))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) / t.shape[-1] ** 0.5)
        if tie:
            sd = block.state_dict(keep_vars=True)
            sd[f"{spec.tensors['router']}.weight"][1] = sd[f"{spec.tensors['router']}.weight"][0]
            if spec.tensors["router_bias"]:
                sd[spec.tensors["router_bias"]][1] = sd[spec.tensors["router_bias"]][0]
    sd = {k: v.detach().clone() for k, v in block.state_dict().items()}
    shared = spec.tensors["shared"]
    weights = MoeLayerWeights(
        router_weight=sd[f"{spec.tensors['router']}.weight"],
        score_bias=sd[spec.tensors["router_bias"]] if spec.tensors["router_bias"] else None,
        w13=sd["experts.gate_up_proj"],
        w2=sd["experts.down_proj"],
        shared_w13=torch.cat([sd[f"{shared}.gate_proj.weight"], sd[f"{shared}.up_proj.weight"]])
        if shared
        else None,
        shared_w2=sd[f"{shared}.down_proj.weight"] if shared else None,
        shared_gate=sd[f"{spec.tensors['shared_gate']}.weight"] if spec.tensors["shared_gate"] else None,
    )
    assert weights.w13.shape == (info.num_experts, 2 * info.moe_intermediate_size, HIDDEN)
    assert weights.shared_intermediate_size == info.shared_intermediate_size
    return Layer(spec, model.config, info.routing, block, weights)


def _run_transformers(
    block: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' block on ``x [B, S, H]`` -> (out [T, H], topk ids [T, k], topk weights [T, k])."""
    seen: dict[str, torch.Tensor] = {}

    def grab(_module, args, kwargs):
        seen["ids"] = args[1] if len(args) > 1 else kwargs["top_k_index"]
        seen["weights"] = args[2] if len(args) > 2 else kwargs["top_k_weights"]

    handle = block.experts.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = block(x)
    finally:
        handle.remove()
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(-1, x.shape[-1]), seen["ids"], seen["weights"]


def _by_id(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert id (transformers' DeepSeek/GLM routers return them unordered)."""
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


def _hidden(seed: int) -> torch.Tensor:
    return torch.randn(*TOKENS, HIDDEN, generator=torch.Generator().manual_seed(seed + 2))


@pytest.mark.parametrize("tie", [False, True], ids=["random", "tied-scores"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_matches_transformers(family: str, tie: bool, seed: int) -> None:
    layer = _build(family, seed, tie=tie)
    x = _hidden(seed)
    ref, ref_ids, ref_w = _run_transformers(layer.block, x)
    xt = x.reshape(-1, HIDDEN)

    out, ids = moe_forward(xt, layer.weights, layer.routing, layer.spec.slot_weight)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ids.dtype == torch.int64 and ids.shape == ref_ids.shape
    ids_r, w_r = _by_id(ref_ids, ref_w.float())
    ids_o, w_o = _by_id(*route(xt, layer.weights.router_weight, layer.routing, layer.weights.score_bias))
    assert torch.equal(ids_o, ids_r)
    assert torch.equal(_by_id(ids, ids)[0], ids_r)
    assert _rel_err(w_o, w_r) <= ROUTE_TOL
    assert _rel_err(out, ref) <= LAYER_TOL
    one_ref, one_ids, _ = _run_transformers(layer.block, x[:1, :1])
    one, one_ids_o = moe_forward(xt[:1], layer.weights, layer.routing, layer.spec.slot_weight)
    assert torch.equal(one_ids_o.sort(-1).values, one_ids.sort(-1).values)
    assert _rel_err(one, one_ref) <= LAYER_TOL
    if tie:
        # Tied experts straddle the top-k boundary for some token, so tie-breaking was exercised.
        has0, has1 = (ids_r == 0).any(-1), (ids_r == 1).any(-1)
        assert bool((has0 ^ has1).any())


def _compare_on(device: str, family: str, tie: bool, seed: int, tol: float) -> None:
    layer = _build(family, seed, tie=tie)
    dev = torch.device(device)
    # The eager experts loop: float32 grouped_mm need not exist on every torch/transformers pairing.
    layer.config._experts_implementation = "eager"
    block = layer.block.to(dev)
    tensors = {f.name: getattr(layer.weights, f.name) for f in dataclasses.fields(MoeLayerWeights)}
    w = dataclasses.replace(
        layer.weights, **{k: v.to(dev) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    )
    x = _hidden(seed).to(dev)
    ref, ref_ids, _ = _run_transformers(block, x)
    out, ids = moe_forward(x.reshape(-1, HIDDEN), w, layer.routing, layer.spec.slot_weight)
    assert out.device.type == dev.type
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    assert _rel_err(out, ref) <= tol
    if w.shared_w13 is not None:
        out_f, ids_f = moe_forward(
            x.reshape(-1, HIDDEN), fuse_layer(w, 2, layer.spec.slot_weight), layer.routing, None
        )
        assert torch.equal(ids_f, ids)
        assert _rel_err(out_f, out) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("tie", [False, True], ids=["random", "tied-scores"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_matches_transformers_cuda(family: str, tie: bool, seed: int) -> None:
    """The same comparison on CUDA, where topk and the float32 GEMMs run other kernels (ties included)."""
    assert not torch.backends.cuda.matmul.allow_tf32, "TF32 would round the float32 reference"
    _compare_on("cuda", family, tie, seed, LAYER_TOL_CUDA)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_score_bias_drives_selection_not_weights(family: str, seed: int) -> None:
    layer = _build(family, seed)
    xt = _hidden(seed).reshape(-1, HIDDEN)
    w = layer.weights
    ids, weights = route(xt, w.router_weight, layer.routing, w.score_bias)
    ids0, _ = route(xt, w.router_weight, layer.routing, None)
    assert not torch.equal(ids.sort(-1).values, ids0.sort(-1).values)
    scores = torch.sigmoid(xt @ w.router_weight.T).gather(1, ids)
    expected = scores / scores.sum(-1, keepdim=True) * layer.routing.routed_scaling_factor
    assert _rel_err(weights, expected) <= ROUTE_TOL


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2_grouped"])
def test_group_limit_changes_selection(family: str, seed: int) -> None:
    layer = _build(family, seed)
    xt = _hidden(seed).reshape(-1, HIDDEN)
    w, routing = layer.weights, layer.routing
    ids, _ = route(xt, w.router_weight, routing, w.score_bias)
    ungrouped = dataclasses.replace(routing, n_group=1, topk_group=1)
    ids1, _ = route(xt, w.router_weight, ungrouped, w.score_bias)
    assert not torch.equal(ids.sort(-1).values, ids1.sort(-1).values)
    group = ids // (routing.num_experts // routing.n_group)
    assert all(len(set(row)) <= routing.topk_group for row in group.tolist())


def test_mixtral_weights_are_softmax_over_selected_logits(seed: int) -> None:
    layer = _build("mixtral", seed)
    xt = _hidden(seed).reshape(-1, HIDDEN)
    ids, weights = route(xt, layer.weights.router_weight, layer.routing)
    logits = xt @ layer.weights.router_weight.T
    top_logits, top_ids = logits.topk(layer.routing.top_k, dim=-1)
    assert torch.equal(ids, top_ids)
    assert _rel_err(weights, top_logits.softmax(-1)) <= ROUTE_TOL


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("family", SHARED)
def test_fused_slots_equal_unfused_layer(family: str, replicas: int, seed: int) -> None:
    layer = _build(family, seed)
    xt = _hidden(seed).reshape(-1, HIDDEN)
    out, ids = moe_forward(xt, layer.weights, layer.routing, layer.spec.slot_weight)
    fused = fuse_layer(layer.weights, replicas, layer.spec.slot_weight)
    m = layer.weights.shared_intermediate_size // layer.weights.moe_intermediate_size
    assert fused.fused == FusedSlots(layer.routing.num_experts, m, replicas, layer.spec.slot_weight)
    assert fused.w13.shape[0] == layer.routing.num_experts + m * replicas
    assert fused.shared_w13 is None and fused.shared_w2 is None

    out_f, ids_f = moe_forward(xt, fused, layer.routing, layer.spec.slot_weight)
    assert torch.equal(ids_f, ids)
    assert _rel_err(out_f, out) <= FUSED_TOL
    picks = torch.randint(0, replicas, (xt.shape[0],), generator=torch.Generator().manual_seed(seed))
    out_p, _ = moe_forward(xt, fused, layer.routing, None, replica_of_token=picks)
    assert _rel_err(out_p, out) <= FUSED_TOL


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2_lite"])
def test_slots_reach_experts_fn_as_extra_columns(family: str, seed: int) -> None:
    layer = _build(family, seed)
    xt = _hidden(seed).reshape(-1, HIDDEN)
    fused = fuse_layer(layer.weights, 3, layer.spec.slot_weight)
    f, k = fused.fused, layer.routing.top_k
    calls = []

    def recording(x, ids, weights):
        calls.append((ids, weights))
        return experts_reference(x, ids, weights, fused.w13, fused.w2)

    picks = torch.arange(xt.shape[0]) * 7 % 3
    out, ids = moe_forward(xt, fused, layer.routing, None, experts_fn=recording, replica_of_token=picks)
    assert (
        _rel_err(out, moe_forward(xt, layer.weights, layer.routing, layer.spec.slot_weight)[0]) <= FUSED_TOL
    )
    assert len(calls) == 1
    got_ids, got_w = calls[0]
    assert got_ids.shape == (xt.shape[0], k + f.num_slots)
    assert torch.equal(got_ids[:, :k], ids)
    want = torch.tensor([[f.slot_id(int(r), j) for j in range(f.num_slots)] for r in picks])
    assert torch.equal(got_ids[:, k:], want)
    if f.slot_weight == "sigmoid_gate":
        gate = torch.sigmoid(xt @ fused.shared_gate.T)
        assert _rel_err(got_w[:, k:], gate.expand(-1, f.num_slots)) <= ROUTE_TOL
    else:
        assert torch.equal(got_w[:, k:], torch.ones(xt.shape[0], f.num_slots))


def test_dropped_slot_is_detected(seed: int) -> None:
    layer = _build("qwen2_moe", seed)
    xt = _hidden(seed).reshape(-1, HIDDEN)
    out, _ = moe_forward(xt, layer.weights, layer.routing, layer.spec.slot_weight)
    fused = fuse_layer(layer.weights, 1, layer.spec.slot_weight)
    f = fused.fused
    short = dataclasses.replace(fused, fused=dataclasses.replace(f, num_slots=f.num_slots - 1))
    assert _rel_err(moe_forward(xt, short, layer.routing, None)[0], out) > BROKEN_MIN

    def drop_last(x, ids, weights):
        return experts_reference(x, ids[:, :-1], weights[:, :-1], fused.w13, fused.w2)

    assert _rel_err(moe_forward(xt, fused, layer.routing, None, experts_fn=drop_last)[0], out) > BROKEN_MIN


def test_single_slot_dropped_is_detected(seed: int) -> None:
    layer = _build("deepseek_v3", seed)
    xt = _hidden(seed).reshape(-1, HIDDEN)
    out, _ = moe_forward(xt, layer.weights, layer.routing, layer.spec.slot_weight)
    fused = fuse_layer(layer.weights, 1, layer.spec.slot_weight)
    fused.w13[layer.routing.num_experts :] = 0
    assert _rel_err(moe_forward(xt, fused, layer.routing, None)[0], out) > BROKEN_MIN


def test_wrong_slot_weight_is_detected(seed: int) -> None:
    layer = _build("qwen3_next", seed)
    xt = _hidden(seed).reshape(-1, HIDDEN)
    out, _ = moe_forward(xt, layer.weights, layer.routing, layer.spec.slot_weight)
    wrong = fuse_layer(layer.weights, 1, "one")
    assert _rel_err(moe_forward(xt, wrong, layer.routing, layer.spec.slot_weight)[0], out) > BROKEN_MIN


def test_replica_choice_is_honoured(seed: int) -> None:
    layer = _build("deepseek_v2_lite", seed)
    xt = _hidden(seed).reshape(-1, HIDDEN)
    out, _ = moe_forward(xt, layer.weights, layer.routing, layer.spec.slot_weight)
    fused = fuse_layer(layer.weights, 2, layer.spec.slot_weight)
    f = fused.fused
    fused.w2[f.slot_id(1, 1)] *= 2.0
    got, _ = moe_forward(xt, fused, layer.routing, None)
    err = (got - out).abs().amax(-1) / out.abs().max()
    even, odd = err[0::2], err[1::2]
    assert float(even.max()) <= FUSED_TOL
    assert float(odd.min()) > BROKEN_MIN * 1e-2


def test_expert_mlp_is_float32_swiglu(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 33, generator=g).to(torch.bfloat16)
    gate, up, down = (
        torch.randn(7, 33, generator=g),
        torch.randn(7, 33, generator=g),
        torch.randn(33, 7, generator=g),
    )
    y = expert_mlp(x, gate.to(torch.bfloat16), up, down)
    assert y.dtype == torch.float32
    xf, gf = x.double(), gate.to(torch.bfloat16).double()
    want = (torch.nn.functional.silu(xf @ gf.T) * (xf @ up.double().T)) @ down.double().T
    assert _rel_err(y, want) <= 1e-5


def test_fused_slots_config_round_trip() -> None:
    f = FusedSlots(first_slot=64, num_slots=2, replicas=3, slot_weight="one")
    assert FusedSlots.from_config({"model_type": "x", FUSED_KEY: f.to_config()}) == f
    assert FusedSlots.from_config({"model_type": "x"}) is None
    assert [f.slot_id(r, j) for r in range(3) for j in range(2)] == list(range(64, 70))
    assert f.total_slots == 6


@pytest.mark.parametrize(
    "entry",
    [
        {"first_slot": 8, "num_slots": 1, "replicas": 1},
        {"first_slot": 8, "num_slots": 1, "replicas": 0, "slot_weight": "one"},
        {"first_slot": 8, "num_slots": 1, "replicas": 1, "slot_weight": "gate"},
        {"first_slot": 8, "num_slots": 1.5, "replicas": 1, "slot_weight": "one"},
        {"first_slot": 8, "num_slots": 1, "replicas": 1, "slot_weight": "one", "extra": 1},
        [8, 1, 1, "one"],
    ],
)
def test_fused_slots_config_rejects_malformed(entry) -> None:
    with pytest.raises(InputError, match=FUSED_KEY):
        FusedSlots.from_config({FUSED_KEY: entry})


def test_route_rejects_inconsistent_routing(seed: int) -> None:
    layer = _build("deepseek_v3", seed)
    xt = _hidden(seed).reshape(-1, HIDDEN)
    w, routing = layer.weights, layer.routing
    with pytest.raises(InputError, match="n_group"):
        route(xt, w.router_weight, dataclasses.replace(routing, n_group=3), w.score_bias)
    with pytest.raises(InputError, match="top_k"):
        route(xt, w.router_weight, dataclasses.replace(routing, topk_group=1, top_k=5), w.score_bias)
    with pytest.raises(InputError, match="rows"):
        route(xt, w.router_weight[:-1], routing, w.score_bias)
    with pytest.raises(InputError, match="greedy and noaux_tc"):
        route(
            xt,
            w.router_weight,
            dataclasses.replace(routing, topk_method="group_limited_greedy"),
            w.score_bias,
        )
    fused = fuse_layer(w, 1, "one")
    with pytest.raises(InputError, match="replica_of_token"):
        moe_forward(xt, fused, routing, None, replica_of_token=torch.ones(xt.shape[0], dtype=torch.int64))
