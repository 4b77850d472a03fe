"""DeepSeek-V4's family file and MoE semantics: ``configs/deepseek_v4.toml`` resolved against the
release's config and transformers' (hash layers, swiglu_limit, expert_dtype, MTP), and moetool's MoE
reference (``sqrtsoftplus`` scores with correction bias, top-k, renormalisation, routed_scaling_factor,
the SwiGLU clamp, hash layers routed by ``tid2eid[token id]``) against transformers 5.24's own
``DeepseekV4SparseMoeBlock`` in float32, on learned and hash layers."""

from __future__ import annotations

import pytest
import torch

from moetool.arch import get_arch
from moetool.errors import InputError
from moetool.moe import MoeLayerWeights, moe_forward, route

# DeepSeek-V4-Flash's config.json as released (the keys the family file reads)
FLASH = {
    "model_type": "deepseek_v4",
    "hidden_size": 4096,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 43,
    "num_hash_layers": 3,
    "num_nextn_predict_layers": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "swiglu_limit": 10.0,
    "topk_method": "noaux_tc",
    "expert_dtype": "fp4",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    },
}


def test_family_file_reads_the_release_config() -> None:
    info = get_arch("deepseek_v4").model(FLASH)
    assert info.moe_layers == tuple(range(43)) and info.hash_layers == (0, 1, 2)
    assert info.expert_dtype == "fp4" and info.mtp_layers == 1 and info.swiglu_limit == 10.0
    r = info.routing
    assert (r.scoring, r.topk_method, r.top_k, r.num_experts) == ("sqrtsoftplus", "noaux_tc", 6, 256)
    assert (r.n_group, r.topk_group, r.norm_topk_prob, r.routed_scaling_factor) == (1, 1, True, 1.5)
    assert info.shared_intermediate_size == 2048 and info.shared_slots == 1


def test_family_file_reads_transformers_config_and_v41_expert_dtype() -> None:
    from transformers import DeepseekV4Config

    cfg = DeepseekV4Config(num_hidden_layers=5, mlp_layer_types=["hash_moe", "moe", "hash_moe", "moe", "moe"])
    info = get_arch("deepseek_v4").model(cfg.to_dict())
    assert info.hash_layers == (0, 2) and info.expert_dtype is None
    v41 = {**FLASH, "quantization_config": {**FLASH["quantization_config"], "expert_dtype": "fp8"}}
    v41.pop("expert_dtype")
    assert get_arch("deepseek_v4").model(v41).expert_dtype == "fp8"
    with pytest.raises(InputError, match="expert_dtype"):
        get_arch("deepseek_v4").model({**v41, "expert_dtype": "fp4"})  # the two places disagree
    with pytest.raises(InputError, match="expert_dtype"):
        get_arch("deepseek_v4").model({**FLASH, "expert_dtype": "int4"})
    with pytest.raises(InputError, match="mlp_layer_types"):
        get_arch("deepseek_v4").model({**FLASH, "mlp_layer_types": ["moe"] * 5})


def _block(hash_layer: bool, seed: int):
    """transformers' V4 MoE block, float32, weights seeded; router bias and tid2eid random."""
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    cfg = DeepseekV4Config(
        vocab_size=97,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        n_routed_experts=8,
        num_experts_per_tok=3,
        mlp_layer_types=["hash_moe", "moe"],
        swiglu_limit=0.75,
        routed_scaling_factor=2.5,
    )
    gen = torch.Generator().manual_seed(seed)
    block = DeepseekV4SparseMoeBlock(cfg, 0 if hash_layer else 1).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if hash_layer:
            ids = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(97)])
            block.gate.tid2eid.copy_(ids)
        else:
            block.gate.e_score_correction_bias.copy_(torch.randn(8, generator=gen))
    return cfg, block


@pytest.mark.parametrize("hash_layer", [False, True], ids=["learned", "hash"])
def test_moe_reference_equals_transformers_v4_block(hash_layer: bool, seed: int) -> None:
    cfg, block = _block(hash_layer, seed)
    info = get_arch("deepseek_v4").model(cfg.to_dict())
    layer = 0 if hash_layer else 1
    assert (layer in info.hash_layers) == hash_layer
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 7, 64, generator=gen) * 2.0  # large enough that the SwiGLU clamp bites
    token_ids = torch.randint(0, 97, (3, 7), generator=gen)
    with torch.no_grad():
        want = block(x, input_ids=token_ids).reshape(-1, 64)
    w = MoeLayerWeights(
        router_weight=block.gate.weight,
        score_bias=None if hash_layer else block.gate.e_score_correction_bias,
        w13=block.experts.gate_up_proj,
        w2=block.experts.down_proj,
        shared_w13=torch.cat([block.shared_experts.gate_proj.weight, block.shared_experts.up_proj.weight]),
        shared_w2=block.shared_experts.down_proj.weight,
    )
    hash_ids = block.gate.tid2eid[token_ids.reshape(-1)] if hash_layer else None
    with torch.no_grad():
        got, ids = moe_forward(
            x.reshape(-1, 64), w, info.routing, "one", swiglu_limit=info.swiglu_limit, hash_ids=hash_ids
        )
        unclamped, _ = moe_forward(x.reshape(-1, 64), w, info.routing, "one", hash_ids=hash_ids)
    rel = float((got - want).norm() / want.norm())
    assert rel <= 1e-5, f"relative error {rel:.3g}"
    assert float((unclamped - want).norm() / want.norm()) > 1e-2, "the clamp never mattered"
    with torch.no_grad():
        _, _, want_ids = block.gate(x, token_ids) if hash_layer else block.gate(x)
    assert [set(r) for r in ids.tolist()] == [set(r) for r in want_ids.tolist()]


def test_hash_routing_refuses_bad_tables() -> None:
    cfg, block = _block(True, 3)
    info = get_arch("deepseek_v4").model(cfg.to_dict())
    x = torch.randn(4, 64)
    with pytest.raises(InputError, match=r"\[0, 8\)"):
        route(x, block.gate.weight, info.routing, hash_ids=torch.full((4, 3), 8))
    with pytest.raises(InputError, match="hash_ids must be"):
        route(x, block.gate.weight, info.routing, hash_ids=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(InputError, match="no score correction bias"):
        route(
            x, block.gate.weight, info.routing, torch.zeros(8), hash_ids=torch.zeros(4, 3, dtype=torch.long)
        )


def test_validate_backend_clamps_like_the_reference(seed: int) -> None:
    """validate's FP8 expert rows apply swiglu_limit as moetool.moe does (and it matters here)."""
    from moetool.kernels.fp8_quant_ref import block_quant_ref, dequant_ref
    from moetool.moe import experts_reference
    from moetool.validate.backend import Backend, calc_diff

    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(3, 256, 128, generator=gen) * 0.3
    w2 = torch.randn(3, 128, 128, generator=gen) * 0.3
    (q13, s13), (q2, s2) = block_quant_ref(w13), block_quant_ref(w2)
    x = torch.randn(40, 128, generator=gen) * 3
    ids = torch.randint(0, 3, (40,), generator=gen)
    be = Backend(torch.device("cpu"), "auto")
    got = be.expert_rows(x, ids, q13, s13, q2, s2, limit=0.75)
    want = experts_reference(
        x, ids[:, None], torch.ones(40, 1), dequant_ref(q13, s13), dequant_ref(q2, s2), limit=0.75
    )
    clamped = calc_diff(got, want)  # FP8 activations on both GEMMs: a few 1e-3
    unclamped = calc_diff(be.expert_rows(x, ids, q13, s13, q2, s2), want)
    assert clamped < 2e-2 and unclamped > 10 * clamped, (clamped, unclamped)
