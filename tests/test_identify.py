"""Which family a checkpoint is (``moetool.arch.identify``): by model_type, by a wrapper's text_config, by
``--family`` when the tensor names match; the text model's root from the names; unknown model_types
refused naming the families whose names match. End-to-end cases on transformers-made checkpoints of every
family are in tests/test_families.py."""

from __future__ import annotations

import pytest

from moetool.arch import get_arch, known_model_types, registry
from moetool.arch.identify import ROOTS, find_root, identify, matching_families, matching_root
from moetool.errors import InputError, UsageError


def _names(
    family: str, root: str = "model", *, layers: int = 2, experts: int = 3, packed: bool = False
) -> list[str]:
    """Tensor names a checkpoint of ``family`` holds (as its spec names them), layer 0 dense."""
    spec = get_arch(family).rooted(root)
    names = [f"{root}.embed_tokens.weight", f"{root}.norm.weight", "lm_head.weight"]
    for layer in range(layers):
        names.append(f"{spec.layer_prefix(layer)}.input_layernorm.weight")
        if layer == 0:
            names.append(f"{spec.layer_prefix(layer)}.mlp.gate_proj.weight")
            continue
        names.append(spec.router_weight(layer))
        if spec.router_bias(layer):
            names.append(spec.router_bias(layer))
        if packed:
            names += list(spec.packed_names(layer))
        else:
            names += [spec.expert_weight(layer, e, p) for e in range(experts) for p in ("gate", "up", "down")]
        if spec.has_shared:
            names += [spec.shared_weight(layer, p) for p in ("gate", "up", "down")]
        if spec.shared_gate_weight(layer):
            names.append(spec.shared_gate_weight(layer))
        if spec.gdn_spec:
            names.append(spec.gdn_spec["prefix"].format(layer=layer) + ".A_log")
    return names


@pytest.mark.parametrize("family", sorted(registry()))
def test_every_family_is_found_by_its_model_types(family: str) -> None:
    for model_type in get_arch(family).model_types:
        ident = identify({"model_type": model_type}, _names(family))
        assert (ident.arch.family, ident.how, ident.note, ident.root) == (family, "model_type", None, "model")


@pytest.mark.parametrize("family", sorted(registry()))
def test_every_family_matches_its_own_names_in_any_root(family: str) -> None:
    for root in ROOTS:
        for packed in (False, True):
            names = _names(family, root, packed=packed)
            assert matching_root(get_arch(family), names) == root
            assert family in matching_families(names)


def test_families_that_share_names_are_told_apart_by_bias_shared_and_gdn() -> None:
    # DeepSeek-V3's names carry a score bias, DeepSeek-V2's do not; Qwen3-Next's carry GDN tensors;
    # Qwen3-MoE has no shared expert; MiniMax-M2 is Mixtral's naming plus the bias
    v3_like = {"deepseek_v3", "deepseek_v32", "glm4_moe", "glm_moe_dsa", "kimi_k25"}
    assert set(matching_families(_names("deepseek_v3"))) == v3_like
    assert matching_families(_names("deepseek_v2")) == ["deepseek_v2"]
    assert set(matching_families(_names("qwen3_next"))) == {"qwen3_next", "qwen3_5_moe"}
    assert matching_families(_names("qwen2_moe")) == ["qwen2_moe"]
    assert matching_families(_names("qwen3_moe")) == ["qwen3_moe"]
    assert matching_families(_names("mixtral")) == ["mixtral"]
    assert matching_families(_names("minimax_m2")) == ["minimax_m2"]


def test_a_fused_checkpoint_matches_without_its_shared_expert() -> None:
    names = [n for n in _names("deepseek_v3") if ".shared_experts." not in n]
    assert "deepseek_v3" not in matching_families(names)
    assert "deepseek_v3" in matching_families(names, fused=True)


def test_wrapper_found_by_text_config_and_its_root() -> None:
    config = {"model_type": "some_vl", "text_config": {"model_type": "qwen3_5_moe_text"}}
    ident = identify(
        config, [*_names("qwen3_5_moe", "model.language_model"), "model.visual.blocks.0.w.weight"]
    )
    assert (ident.arch.family, ident.how, ident.root) == (
        "qwen3_5_moe",
        "text_config",
        "model.language_model",
    )
    assert "'some_vl' wraps a 'qwen3_5_moe_text' text model" in ident.note
    assert ident.arch.expert_weight(1, 2, "gate").startswith("model.language_model.layers.1.mlp.experts.2.")


def test_kimi_k25_release_layout() -> None:
    config = {"model_type": "kimi_k25", "text_config": {"model_type": "kimi_k2"}}
    names = [*_names("kimi_k25", "language_model.model"), "vision_tower.encoder.blocks.0.wqkv.weight"]
    ident = identify(config, names)
    assert (ident.arch.family, ident.root, ident.note) == ("kimi_k25", "language_model.model", None)


def test_root_is_the_first_that_holds_layers() -> None:
    assert find_root(["model.layers.0.x", "model.language_model.layers.0.x"]) == "model"
    assert find_root(["language_model.model.layers.3.x"]) == "language_model.model"
    assert find_root(["mtp.layers.0.x", "lm_head.weight"]) == "model"


def test_unknown_model_type_suggests_the_matching_families() -> None:
    with pytest.raises(InputError) as err:
        identify({"model_type": "my_finetune"}, _names("minimax_m2"), file="/m/config.json")
    msg = str(err.value)
    assert "/m/config.json" in msg and "'my_finetune'" in msg
    assert "match minimax_m2: rerun with --family minimax_m2" in msg
    with pytest.raises(InputError) as err:
        identify({"model_type": "llama"}, ["model.layers.0.mlp.gate_proj.weight"])
    for known in known_model_types():
        assert known in str(err.value)


def test_family_option_reads_an_unknown_model_type_when_names_match() -> None:
    ident = identify({"model_type": "my_v3"}, _names("deepseek_v3"), family="glm_moe_dsa")
    assert (ident.arch.family, ident.how) == ("glm_moe_dsa", "family_option")
    assert (
        ident.note == "reading model_type 'my_v3' as family glm_moe_dsa: its tensor names match glm_moe_dsa's"
    )


def test_family_option_refuses_names_that_do_not_match() -> None:
    with pytest.raises(InputError) as err:
        identify({"model_type": "my_v3"}, _names("deepseek_v3"), family="mixtral", file="/m/config.json")
    msg = str(err.value)
    assert "--family mixtral: the tensor names do not match mixtral's" in msg
    assert "block_sparse_moe.experts.0.w1.weight" in msg
    assert "rerun with --family deepseek_v3" in msg


def test_family_option_must_agree_with_a_known_model_type() -> None:
    assert identify({"model_type": "mixtral"}, _names("mixtral"), family="mixtral").note is None
    with pytest.raises(UsageError, match="'deepseek_v3' is family deepseek_v3; --family mixtral contradicts"):
        identify({"model_type": "deepseek_v3"}, _names("deepseek_v3"), family="mixtral")
    with pytest.raises(InputError, match="unknown family 'nope'"):
        identify({"model_type": "x"}, _names("mixtral"), family="nope")
