"""Architecture specs: every configs/*.toml against the schema (after ``extends``), broken copies refused
by name, detection by model_type, and ``ModelInfo`` resolved from factory configs and from configs (and
module trees) that transformers' own classes make for the factory's families. The families of 2026 are
checked against transformers in tests/test_families.py."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import moetool.configs
from moetool.arch import (
    LAYER_RULES,
    SCHEMA,
    ArchSpec,
    ModelInfo,
    _spec_from_toml,
    check_schema,
    detect,
    get_arch,
    known_model_types,
    registry,
    resolved_file,
)
from moetool.errors import InputError
from moetool.testing import hf_models as hf
from moetool.testing.factory import FAMILIES, family_config, family_defaults, flagship_arguments

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(moetool.configs.__file__).parent
TOML_FILES = sorted(CONFIG_DIR.glob("*.toml"))
FAMILY_FILES = (
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "deepseek_v4",
    "glm4_moe",
    "glm_moe_dsa",
    "kimi_k25",
    "minimax_m2",
    "mixtral",
    "qwen2_moe",
    "qwen3_5_moe",
    "qwen3_moe",
    "qwen3_next",
)


def _load(path: Path) -> dict[str, Any]:
    """A family file as the schema sees it: its ``extends`` chain applied."""
    return resolved_file(path.stem)


def _raw(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _family_of(factory_family: str) -> str:
    """The moetool family a factory family (or model_type) belongs to; Kimi-K2 is DeepSeek-V3's."""
    return "deepseek_v3" if factory_family == "kimi_k2" else factory_family


# -- schema -------------------------------------------------------------------------------------


def test_every_family_has_exactly_one_config_file() -> None:
    assert sorted(p.stem for p in TOML_FILES) == sorted(FAMILY_FILES)
    assert sorted(registry()) == sorted(FAMILY_FILES)


@pytest.mark.parametrize("path", TOML_FILES, ids=lambda p: p.stem)
def test_config_file_passes_the_schema(path: Path) -> None:
    data = _load(path)
    check_schema(data, f"configs/{path.name}")
    assert data["family"] == path.stem
    spec = _spec_from_toml(data, path.name, extends=_raw(path).get("extends"))
    assert spec == registry()[path.stem]
    assert spec.model_types and all(isinstance(t, str) and t for t in spec.model_types)
    # the tensor name templates must format for a layer and name a module under model.layers.{L}
    assert spec.moe_prefix(7).startswith("model.layers.7.")
    assert spec.expert_weight(3, 5, "down").startswith(spec.experts_prefix(3) + ".5.")


def _drop(section: str, key: str):
    def f(d: dict[str, Any]) -> str:
        del (d[section] if section else d)[key]
        return key

    return f


def _set(section: str, key: str, value: Any):
    def f(d: dict[str, Any]) -> str:
        (d[section] if section else d)[key] = value
        return key

    return f


BREAKAGES = {
    "missing_top_level_key": _drop("", "model_types"),
    "missing_required_key": _drop("config_keys", "top_k"),
    "missing_tensor_key": _drop("tensors", "router"),
    "missing_section": _drop("", "routing"),
    "wrong_type_bool": _set("routing", "norm_topk_prob", "yes"),
    "wrong_type_str": _set("tensors", "experts", 3),
    "wrong_type_list": _set("", "model_types", "deepseek_v3"),
    "wrong_type_float": _set("routing", "routed_scaling_factor", "2.5"),
    "unknown_key": _set("routing", "temperature", 1.0),
    "unknown_top_level_key": _set("", "aliases", ["x"]),
    "bad_rule": _set("layers", "rule", "every_other"),
    "bad_scoring": _set("routing", "scoring", "relu"),
    "bad_topk_method": _set("routing", "topk_method", "beam"),
}


@pytest.mark.parametrize("path", TOML_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_config_is_refused_naming_the_key(path: Path, breakage: str) -> None:
    data = copy.deepcopy(_load(path))
    key = BREAKAGES[breakage](data)
    source = f"configs/{path.name}"
    with pytest.raises(InputError) as err:
        check_schema(data, source)
    msg = str(err.value)
    assert source in msg
    assert key in msg, f"{breakage}: {key!r} not named in {msg!r}"


def test_shared_expert_section_must_match_tensors_shared() -> None:
    with_shared = _load(CONFIG_DIR / "deepseek_v3.toml")
    broken = copy.deepcopy(with_shared)
    del broken["shared_expert"]
    with pytest.raises(InputError, match="shared_expert"):
        check_schema(broken, "x.toml")
    bad_weight = copy.deepcopy(with_shared)
    bad_weight["shared_expert"]["slot_weight"] = "half"
    with pytest.raises(InputError, match="slot_weight"):
        check_schema(bad_weight, "x.toml")
    both = copy.deepcopy(with_shared)
    both["config_keys"]["shared_intermediate_size"] = "shared_expert_intermediate_size"
    with pytest.raises(InputError, match="shared_count"):
        check_schema(both, "x.toml")
    without = _load(CONFIG_DIR / "qwen3_moe.toml")
    extra = copy.deepcopy(without)
    extra["shared_expert"] = {"slot_weight": "one"}
    with pytest.raises(InputError, match="shared_expert"):
        check_schema(extra, "x.toml")


def test_schema_lists_the_layer_rules_every_file_uses() -> None:
    used = {_load(p)["layers"]["rule"] for p in TOML_FILES}
    assert used <= set(LAYER_RULES)
    assert set(SCHEMA) - {""} >= {"config_keys", "layers", "tensors", "routing"}


def test_a_new_family_is_just_a_new_file() -> None:
    data = copy.deepcopy(_load(CONFIG_DIR / "qwen3_moe.toml"))
    data["family"], data["model_types"] = "my_moe", ["my_moe"]
    data["tensors"]["moe"] = "model.layers.{layer}.moe"
    spec = _spec_from_toml(data, "configs/my_moe.toml")
    cfg = {
        "model_type": "my_moe",
        "num_hidden_layers": 3,
        "hidden_size": 64,
        "num_experts": 5,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    }
    info = spec.model(cfg)
    assert (info.family, info.num_experts, info.moe_layers) == ("my_moe", 5, (0, 2))
    assert spec.expert_weight(2, 4, "gate") == "model.layers.2.moe.experts.4.gate_proj.weight"


# -- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_every_factory_family(family: str) -> None:
    cfg = family_config(family)
    assert detect(cfg).family == _family_of(family)


def test_detect_every_declared_model_type() -> None:
    declared = {t: _load(p)["family"] for p in TOML_FILES for t in _load(p)["model_types"]}
    assert declared["kimi_k2"] == "deepseek_v3"
    assert declared["qwen3_5_moe_text"] == "qwen3_5_moe"
    assert sorted(declared) == known_model_types()
    for model_type, family in declared.items():
        assert detect({"model_type": model_type}).family == family


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v5", "", None])
def test_unknown_model_type_is_refused_with_the_known_list(model_type: str | None) -> None:
    cfg = {"model_type": model_type} if model_type is not None else {}
    with pytest.raises(InputError) as err:
        detect(cfg, file="/ckpt/config.json")
    msg = str(err.value)
    assert "/ckpt/config.json" in msg
    for known in known_model_types():
        assert known in msg


def test_get_arch_unknown_family_lists_families() -> None:
    with pytest.raises(InputError) as err:
        get_arch("llama")
    for fam in FAMILY_FILES:
        assert fam in str(err.value)


# -- ModelInfo against transformers -------------------------------------------------------------


def _transformers_config(cfg: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The config.json transformers itself writes for ``cfg`` (its own key names and defaults)."""
    conf = hf.hf_config(cfg)
    conf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    if cfg.get("model_type") == "kimi_k2":
        written["model_type"] = "kimi_k2"
    return written


def _layer(name: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    assert m, name
    return int(m.group(1))


def _truth(cfg: dict[str, Any]) -> dict[str, Any]:
    """What transformers' own model class builds for ``cfg`` (on the meta device: shapes, no data)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf.hf_config(cfg))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    moe = sorted({_layer(k) for k in shapes if ".experts." in k})
    gdn = sorted({_layer(k) for k in shapes if ".linear_attn." in k})
    first = moe[0]
    gate_up = next(
        v
        for k, v in shapes.items()
        if k.startswith(f"model.layers.{first}.") and k.endswith("experts.gate_up_proj")
    )
    shared_gate = [
        v
        for k, v in shapes.items()
        if k.startswith(f"model.layers.{first}.") and re.search(r"\.shared_experts?\.gate_proj\.weight$", k)
    ]
    a_log = [v for k, v in shapes.items() if k.endswith("linear_attn.A_log")]
    conv = [v for k, v in shapes.items() if k.endswith("linear_attn.conv1d.weight")]
    return {
        "moe_layers": tuple(moe),
        "gdn_layers": tuple(gdn),
        "num_experts": gate_up[0],
        "moe_intermediate_size": gate_up[1] // 2,
        "hidden_size": gate_up[2],
        "shared_intermediate_size": shared_gate[0][0] if shared_gate else 0,
        "has_score_bias": any(k.endswith("e_score_correction_bias") for k in shapes),
        "num_value_heads": a_log[0][0] if a_log else None,
        "conv_kernel": conv[0][-1] if conv else None,
        "num_layers": 1 + max(_layer(k) for k in shapes if k.startswith("model.layers.")),
    }


# Each case: factory family, make_checkpoint-style dimensions, config overrides. They exercise the
# layer rules (first_k_dense_replace, decoder_sparse_step, mlp_only_layers), shared sizes (2 slots
# as DeepSeek-V2-Lite, 4 as Qwen1.5-MoE) and qwen3_next's GDN layers.
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "deepseek_v2_lite_like": ("deepseek_v2", {"num_layers": 5, "dense_layers": 2, "shared": 2}, {}),
    "deepseek_v2_grouped": (
        "deepseek_v2",
        {"num_layers": 3, "num_experts": 8, "shared": 1},
        {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 16.0},
    ),
    "deepseek_v3": ("deepseek_v3", {"num_layers": 5, "dense_layers": 3, "num_experts": 8}, {}),
    "kimi_k2": ("kimi_k2", {"num_layers": 3, "num_experts": 6}, {}),
    "glm4_moe": ("glm4_moe", {"num_layers": 4, "dense_layers": 1, "shared": 2}, {}),
    "qwen2_moe_qwen15_like": ("qwen2_moe", {"num_layers": 4}, {}),
    "qwen2_moe_sparse_step": (
        "qwen2_moe",
        {"num_layers": 6},
        {"decoder_sparse_step": 2, "mlp_only_layers": [3]},
    ),
    "qwen3_moe_mlp_only": ("qwen3_moe", {"num_layers": 5, "dense_layers": 2, "num_experts": 6}, {}),
    "qwen3_moe_sparse_step": ("qwen3_moe", {"num_layers": 6}, {"decoder_sparse_step": 3}),
    "qwen3_next_layer_types": (
        "qwen3_next",
        {"num_layers": 6, "dense_layers": 1},
        {
            "layer_types": [
                "linear_attention",
                "full_attention",
                "linear_attention",
                "linear_attention",
                "full_attention",
                "full_attention",
            ]
        },
    ),
    "qwen3_next_interval": (
        "qwen3_next",
        {"num_layers": 7},
        {"layer_types": None, "full_attention_interval": 3},
    ),
    "mixtral": ("mixtral", {"num_layers": 3, "num_experts": 5}, {}),
}


def _case_config(case: str) -> dict[str, Any]:
    family, dims, overrides = CASES[case]
    cfg = family_config(family, hidden_size=64, moe_intermediate_size=32, **dims, config_overrides=overrides)
    if cfg.get("layer_types") is None:
        cfg.pop("layer_types", None)
    return cfg


def _check_info(info: ModelInfo, cfg: dict[str, Any], truth: dict[str, Any], family: str) -> None:
    assert info.family == _family_of(family)
    assert info.model_type == cfg["model_type"]
    assert info.num_layers == truth["num_layers"]
    assert info.hidden_size == truth["hidden_size"]
    assert info.num_experts == truth["num_experts"]
    assert info.moe_intermediate_size == truth["moe_intermediate_size"]
    assert info.moe_layers == truth["moe_layers"]
    assert info.shared_intermediate_size == truth["shared_intermediate_size"]
    s, i = truth["shared_intermediate_size"], truth["moe_intermediate_size"]
    assert info.shared_slots == (s // i if s else 0)
    assert info.routing.has_score_bias == truth["has_score_bias"]
    assert info.routing.num_experts == truth["num_experts"]
    assert info.routing.top_k == cfg["num_experts_per_tok"]
    if truth["gdn_layers"]:
        assert info.gdn is not None
        assert info.gdn.layers == truth["gdn_layers"]
        assert info.gdn.num_value_heads == truth["num_value_heads"]
        assert info.gdn.num_key_heads == cfg["linear_num_key_heads"]
        assert (info.gdn.head_k_dim, info.gdn.head_v_dim) == (
            cfg["linear_key_head_dim"],
            cfg["linear_value_head_dim"],
        )
        assert info.gdn.conv_kernel == truth["conv_kernel"]
    else:
        assert info.gdn is None


def _expected_routing(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Each family's router as its modeling code defines it (docs/contract.md §10), read from the config values."""
    naming = family_defaults(family).naming
    if naming in ("deepseek", "glm"):
        sigmoid = family != "deepseek_v2"
        return {
            "scoring": "sigmoid" if sigmoid else cfg["scoring_func"],
            "topk_method": "noaux_tc" if sigmoid else cfg["topk_method"],
            "n_group": cfg["n_group"],
            "topk_group": cfg["topk_group"],
            "norm_topk_prob": cfg["norm_topk_prob"],
            "routed_scaling_factor": cfg["routed_scaling_factor"],
        }
    return {
        "scoring": "softmax",
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True if naming == "mixtral" else cfg["norm_topk_prob"],
        "routed_scaling_factor": 1.0,
    }


@pytest.fixture(scope="module")
def truths() -> dict[str, dict[str, Any]]:
    return {case: _truth(_case_config(case)) for case in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_info_from_factory_config_matches_transformers(
    case: str, truths: dict[str, dict[str, Any]]
) -> None:
    cfg = _case_config(case)
    family = CASES[case][0]
    info = detect(cfg).model(cfg)
    _check_info(info, cfg, truths[case], family)
    routing = info.routing
    got = {k: getattr(routing, k) for k in _expected_routing(family, cfg)}
    assert got == _expected_routing(family, cfg)


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_info_from_transformers_written_config(
    case: str, truths: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """transformers writes its own key names (num_local_experts for Qwen3-MoE, derived layer_types)."""
    cfg = _transformers_config(_case_config(case), tmp_path)
    family = CASES[case][0]
    info = detect(cfg).model(cfg, file=str(tmp_path / "config.json"))
    _check_info(info, cfg, truths[case], family)
    got = {k: getattr(info.routing, k) for k in _expected_routing(family, cfg)}
    assert got == _expected_routing(family, cfg)


def test_shared_slots_of_the_flagships() -> None:
    """docs/contract.md §7: DeepSeek-V2-Lite 2 slots, Qwen1.5-MoE 4 (5632 = 4·1408), DeepSeek-V3 1, none for Qwen3-MoE."""
    expected = {
        "deepseek_v2": 2,
        "qwen2_moe": 4,
        "deepseek_v3": 1,
        "kimi_k2": 1,
        "qwen3_moe": 0,
        "mixtral": 0,
    }
    for family, slots in expected.items():
        dims, overrides = flagship_arguments(family)
        cfg = family_config(family, **dims, config_overrides=overrides)
        info = detect(cfg).model(cfg)
        assert info.shared_slots == slots, family
    dims, overrides = flagship_arguments("qwen2_moe")
    cfg = family_config("qwen2_moe", **dims, config_overrides=overrides)
    assert detect(cfg).model(cfg).shared_intermediate_size == 5632


def test_shared_size_not_a_multiple_gives_no_slots() -> None:
    cfg = family_config("qwen2_moe", moe_intermediate_size=64, shared=96)
    info = detect(cfg).model(cfg)
    assert info.shared_intermediate_size == 96
    assert info.shared_slots == 0


def test_deepseek_moe_layer_freq_skips_layers() -> None:
    cfg = family_config("deepseek_v2", num_layers=7, dense_layers=1, config_overrides={"moe_layer_freq": 2})
    assert detect(cfg).model(cfg).moe_layers == (2, 4, 6)


@pytest.mark.parametrize(
    ("family", "key"),
    [
        ("deepseek_v3", "n_routed_experts"),
        ("qwen3_moe", "num_experts"),
        ("mixtral", "num_local_experts"),
        ("glm4_moe", "moe_intermediate_size"),
        ("qwen3_next", "linear_num_value_heads"),
    ],
)
def test_missing_config_key_is_named(family: str, key: str) -> None:
    cfg = family_config(family)
    for k in (key, "num_local_experts") if key == "num_experts" else (key,):
        cfg.pop(k, None)
    with pytest.raises(InputError) as err:
        detect(cfg).model(cfg, file="/m/config.json")
    assert key in str(err.value) and "/m/config.json" in str(err.value)


def test_unsupported_routing_values_are_refused() -> None:
    cfg = family_config("deepseek_v2", config_overrides={"scoring_func": "sparsemax"})
    with pytest.raises(InputError, match="sparsemax"):
        detect(cfg).model(cfg)
    cfg = family_config("deepseek_v2", config_overrides={"topk_method": "beam"})
    with pytest.raises(InputError, match="beam"):
        detect(cfg).model(cfg)


def test_arch_spec_is_frozen() -> None:
    spec = get_arch("mixtral")
    assert isinstance(spec, ArchSpec)
    with pytest.raises(AttributeError):
        spec.family = "x"  # type: ignore[misc]
    assert spec.proj_names == {"gate": "w1", "up": "w3", "down": "w2"}


# -- extends ------------------------------------------------------------------------------------


def test_extends_overlays_section_by_section() -> None:
    from moetool.arch.schema import overlay

    base = {
        "family": "a",
        "routing": {"scoring": "softmax", "topk_method": "greedy"},
        "layers": {"rule": "all"},
    }
    child = {"extends": "a", "family": "b", "routing": {"scoring": "sigmoid"}}
    merged = overlay(base, child)
    assert merged == {
        "family": "b",
        "routing": {"scoring": "sigmoid", "topk_method": "greedy"},
        "layers": {"rule": "all"},
    }
    assert base["routing"]["scoring"] == "softmax"  # the base is not touched


def test_every_extending_file_differs_from_its_base_only_where_it_says() -> None:
    for path in TOML_FILES:
        raw = _raw(path)
        if "extends" not in raw:
            continue
        base, child = resolved_file(raw["extends"]), _load(path)
        assert set(child) == set(base) | (set(raw) - {"extends"})
        for section, table in child.items():
            if not isinstance(table, dict):
                assert table == raw[section]
                continue
            for key, value in table.items():
                assert value == raw.get(section, {}).get(key, base.get(section, {}).get(key)), (path, key)


def test_extends_chain_errors_name_the_file() -> None:
    from moetool.arch.schema import resolve

    files = {
        "a": ("configs/a.toml", {"extends": "b", "family": "a"}),
        "b": ("configs/b.toml", {"extends": "a", "family": "b"}),
        "c": ("configs/c.toml", {"extends": "nope", "family": "c"}),
    }
    with pytest.raises(InputError, match=r"configs/a\.toml.*cycle"):
        resolve(files["a"][1], "configs/a.toml", files)
    with pytest.raises(InputError, match=r"configs/c\.toml.*'nope'.*known: a, b, c"):
        resolve(files["c"][1], "configs/c.toml", files)


def test_an_extending_file_must_name_its_own_model_types(monkeypatch: pytest.MonkeyPatch) -> None:
    import moetool.arch as arch_pkg
    from moetool.arch import schema

    files = dict(schema.raw_files())
    files["my_v3"] = ("configs/my_v3.toml", {"extends": "deepseek_v3", "family": "my_v3", "description": "x"})
    monkeypatch.setattr(arch_pkg, "raw_files", lambda: files)
    with pytest.raises(InputError, match=r"configs/my_v3\.toml.*model_types"):
        resolved_file("my_v3")


def test_two_families_claiming_one_model_type_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import moetool.arch as arch_pkg
    from moetool.arch import schema

    files = dict(schema.raw_files())
    files["zz_copy"] = (
        "configs/zz_copy.toml",
        {"extends": "mixtral", "family": "zz_copy", "model_types": ["mixtral"], "description": "x"},
    )
    monkeypatch.setattr(arch_pkg, "raw_files", lambda: files)
    registry.cache_clear()
    try:
        with pytest.raises(InputError, match="'mixtral' is claimed by both mixtral and zz_copy"):
            registry()
    finally:
        monkeypatch.undo()
        registry.cache_clear()


def test_a_new_family_can_be_a_few_lines_that_extend_another(monkeypatch: pytest.MonkeyPatch) -> None:
    import moetool.arch as arch_pkg
    from moetool.arch import schema

    files = dict(schema.raw_files())
    files["my_moe"] = (
        "configs/my_moe.toml",
        {
            "extends": "qwen3_moe",
            "family": "my_moe",
            "model_types": ["my_moe"],
            "description": "x",
            "tensors": {"moe": "model.layers.{layer}.moe"},
        },
    )
    monkeypatch.setattr(arch_pkg, "raw_files", lambda: files)
    registry.cache_clear()
    try:
        spec = registry()["my_moe"]
        assert spec.extends == "qwen3_moe"
        assert spec.expert_weight(2, 4, "gate") == "model.layers.2.moe.experts.4.gate_proj.weight"
        assert spec.routing_spec == registry()["qwen3_moe"].routing_spec
    finally:
        monkeypatch.undo()
        registry.cache_clear()


def test_rooted_spec_renames_every_text_model_pattern() -> None:
    spec = get_arch("qwen3_5_moe").rooted("model.language_model")
    assert spec.expert_weight(3, 1, "up") == "model.language_model.layers.3.mlp.experts.1.up_proj.weight"
    assert spec.router_weight(0) == "model.language_model.layers.0.mlp.gate.weight"
    assert spec.shared_gate_weight(2) == "model.language_model.layers.2.mlp.shared_expert_gate.weight"
    assert spec.gdn_spec["prefix"] == "model.language_model.layers.{layer}.linear_attn"
    assert spec.layer_prefix(5) == "model.language_model.layers.5"
    kimi = get_arch("kimi_k25").rooted("language_model.model")
    assert kimi.router_bias(1) == "language_model.model.layers.1.mlp.gate.e_score_correction_bias"
    # rooting again starts from the canonical names
    assert kimi.rooted("model").expert_weight(1, 0, "down") == "model.layers.1.mlp.experts.0.down_proj.weight"


def test_mlp_layer_types_must_agree_with_first_k_dense_replace() -> None:
    spec = get_arch("deepseek_v32")
    cfg = {
        "model_type": "deepseek_v32",
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
    }
    assert spec.model(cfg).moe_layers == (1, 2, 3)
    with pytest.raises(
        InputError, match=r"mlp_layer_types makes layers \[2, 3\] MoE but .* make \[1, 2, 3\]"
    ):
        spec.model({**cfg, "mlp_layer_types": ["dense", "dense", "sparse", "sparse"]}, file="/m/config.json")
    with pytest.raises(InputError, match="for each of the 4 layers"):
        spec.model({**cfg, "mlp_layer_types": ["dense", "sparse"]})


def test_a_wrapper_config_is_read_from_its_text_config() -> None:
    text = {
        "model_type": "qwen3_5_moe_text",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "layer_types": ["linear_attention", "full_attention"],
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "norm_topk_prob": False,  # not a Qwen3.5 key: its router always renormalises
    }
    info = get_arch("qwen3_5_moe").model({"model_type": "qwen3_5_moe", "text_config": text})
    assert (info.model_type, info.num_layers, info.moe_layers) == ("qwen3_5_moe", 2, (0, 1))
    assert info.gdn is not None and info.gdn.layers == (0,)
    assert info.routing.norm_topk_prob is True
