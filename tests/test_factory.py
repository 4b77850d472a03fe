"""The checkpoint factory writes what transformers writes.

The reference is transformers itself (``make_hf_checkpoint``: the family's model class built from the
same config and saved with ``save_pretrained``); these tests need the ``test`` extra (transformers,
accelerate) and are never skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from moetool.testing.factory import (
    FAMILIES,
    FP8_MAX,
    SPECIAL_TOKENS,
    experts_prefix,
    family_config,
    family_defaults,
    flagship_arguments,
    make_checkpoint,
    moe_layers,
    packed_expert_names,
    router_weight_name,
    scale_grid,
    scale_name,
    tensor_specs,
)
from moetool.testing.hf_models import hf_available, hf_config, load_hf_model, make_hf_checkpoint

# Irregular on purpose: hidden and intermediate sizes are not multiples of 128, 3 experts.
BASE_DIMS: dict[str, Any] = {
    "num_layers": 2,
    "hidden_size": 200,
    "moe_intermediate_size": 72,
    "num_experts": 3,
    "top_k": 2,
    "vocab_size": 300,
}
# Per family: enough layers to hold each layer kind the family has (dense MLP, MoE, linear attention).
FAMILY_DIMS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"num_layers": 3, "dense_layers": 1},
    "deepseek_v3": {"num_layers": 3, "dense_layers": 1, "num_experts": 4},
    "kimi_k2": {},
    "glm4_moe": {"num_layers": 3, "dense_layers": 2},
    "qwen2_moe": {"num_layers": 3, "dense_layers": 1},
    "qwen3_moe": {},
    "qwen3_next": {"num_layers": 4, "dense_layers": 1},
    "mixtral": {},
}
EXPERT_COUNT_KEYS = {"n_routed_experts", "num_experts", "num_local_experts"}


def dims_of(family: str) -> dict[str, Any]:
    return {**BASE_DIMS, **FAMILY_DIMS[family]}


def layout(ckpt: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) over every shard, from headers."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            names = h.keys()
            for k in names:
                assert k not in out, f"{k} stored twice"
                sl = h.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            names = h.keys()
            out.update({k: h.get_tensor(k) for k in names})
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def read_config(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "config.json").read_text())


@pytest.mark.parametrize("packed", [False, True], ids=["per_expert", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_equals_transformers(family: str, packed: bool, tmp_path: Path) -> None:
    """Names, shapes and dtypes equal those transformers saves for the same config; config.json holds
    every key transformers writes with the values it writes; transformers loads the factory's files
    with no missing, unexpected or mis-shaped tensor."""
    assert hf_available()
    dims = dims_of(family)
    hf_dir = make_hf_checkpoint(family, tmp_path / "hf", packed_experts=packed, seed=3, **dims)
    expected = layout(hf_dir)
    # transformers < 5.2x saves a from_config model's e_score_correction_bias in the model dtype
    # although it loads it as float32 (_keep_in_fp32_modules_strict); checkpoints and later versions
    # store it F32, as the factory does.
    expected = {
        k: (v[0], "F32") if k.endswith(".e_score_correction_bias") else v for k, v in expected.items()
    }
    config = read_config(hf_dir)
    # The router's dtype is the one thing transformers changed across 5.x (float32 since 5.2x for the
    # DeepSeek/GLM families); take the installed version's and hold everything else exact.
    router = router_weight_name(config, moe_layers(config)[0], packed=packed)
    hf_router_dtype = {"F32": torch.float32, "BF16": torch.bfloat16}[expected[router][1]]
    ours = make_checkpoint(
        family, tmp_path / "ours", packed_experts=packed, router_dtype=hf_router_dtype, **dims
    )
    got = layout(ours)

    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}

    ours_config = read_config(ours)
    missing = set(config) - set(ours_config)
    if missing & EXPERT_COUNT_KEYS and set(ours_config) & EXPERT_COUNT_KEYS:
        missing -= EXPERT_COUNT_KEYS  # the same count under its Hub name (num_experts)
    assert sorted(missing) == []
    skip = {"transformers_version"}
    loaded_ours = {k: v for k, v in hf_config(ours_config).to_dict().items() if k not in skip}
    loaded_hf = {k: v for k, v in hf_config(config).to_dict().items() if k not in skip}
    assert loaded_ours == loaded_hf

    _, info = load_hf_model(ours, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}


def test_default_router_dtype_and_score_bias(tmp_path: Path) -> None:
    """DeepSeek/GLM routers are float32 by default (transformers >= 5.2x), the others follow dtype;
    ``e_score_correction_bias`` is float32 whatever the weight dtype."""
    for family in FAMILIES:
        cfg = family_config(family, dtype=torch.float16)
        specs = {s.name: s for s in tensor_specs(cfg)}
        layer = moe_layers(cfg)[0]
        want = torch.float32 if family_defaults(family).router_fp32 else torch.float16
        assert specs[router_weight_name(cfg, layer)].dtype == want, family
        bias = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        has_bias = family in ("deepseek_v3", "kimi_k2", "glm4_moe")
        assert (bias in specs) == has_bias, family
        if has_bias:
            assert specs[bias].dtype == torch.float32


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral", "qwen3_next"])
def test_packed_experts_hold_the_per_expert_values(family: str, tmp_path: Path) -> None:
    """Packed ``gate_up_proj [E, 2I, H]`` is gate rows then up rows of each expert and ``down_proj
    [E, H, I]`` each expert's down: the same numbers as the per-expert checkpoint of the same seed."""
    dims = dims_of(family)
    flat = tensors(make_checkpoint(family, tmp_path / "flat", seed=5, **dims))
    packed_dir = make_checkpoint(family, tmp_path / "packed", packed_experts=True, seed=5, **dims)
    packed = tensors(packed_dir)
    cfg = read_config(packed_dir)
    e, i, h = dims["num_experts"], dims["moe_intermediate_size"], dims["hidden_size"]
    proj = {"mixtral": ("w1", "w3", "w2")}.get(family, ("gate_proj", "up_proj", "down_proj"))
    for layer in moe_layers(cfg):
        gate_up, down = packed_expert_names(cfg, layer)
        assert packed[gate_up].shape == (e, 2 * i, h) and packed[down].shape == (e, h, i)
        per = experts_prefix(cfg, layer)
        assert not any(k.startswith(f"{experts_prefix(cfg, layer, packed=True)}.0.") for k in packed)
        for x in range(e):
            stacked = torch.cat([flat[f"{per}.{x}.{proj[0]}.weight"], flat[f"{per}.{x}.{proj[1]}.weight"]])
            assert same_bytes(packed[gate_up][x], stacked)
            assert same_bytes(packed[down][x], flat[f"{per}.{x}.{proj[2]}.weight"])
        assert same_bytes(
            packed[router_weight_name(cfg, layer, packed=True)], flat[router_weight_name(cfg, layer)]
        )
    others = {k for k in flat if ".experts." not in k and ".block_sparse_moe." not in k}
    assert all(same_bytes(packed[k], flat[k]) for k in others)


@pytest.mark.parametrize(
    ("family", "packed", "hidden", "inter"),
    [("deepseek_v3", False, 200, 136), ("qwen3_next", False, 256, 128), ("mixtral", True, 136, 200)],
)
def test_fp8_variant(family: str, packed: bool, hidden: int, inter: int, tmp_path: Path) -> None:
    """Every Linear but routers, gates and lm_head is F8_E4M3 with an F32 scale on the ceil grid; each
    128x128 block's largest |q| is 448 (scale = amax/448) and q·s is within e4m3 rounding of the
    BF16 checkpoint of the same seed; everything else keeps its bytes."""
    dims = {**dims_of(family), "hidden_size": hidden, "moe_intermediate_size": inter}
    ref = tensors(make_checkpoint(family, tmp_path / "bf16", packed_experts=packed, seed=9, **dims))
    out = make_checkpoint(family, tmp_path / "fp8", packed_experts=packed, fp8=True, seed=9, **dims)
    got = tensors(out)
    cfg = read_config(out)
    specs = tensor_specs(cfg, packed_experts=packed)
    targets = {s.name for s in specs if s.fp8_target}
    assert {s.group for s in specs if s.name in targets} >= {"attention", "expert"}
    assert set(got) == set(ref) | {scale_name(n) for n in targets}
    for name, w in ref.items():
        if name not in targets:
            assert same_bytes(got[name], w), name
            continue
        q, s = got[name], got[scale_name(name)]
        assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape, name
        assert s.dtype == torch.float32 and tuple(s.shape) == scale_grid(w.shape), name
        qf = q.float()
        lead = qf.shape[:-2]
        nb, kb = s.shape[-2:]
        padded = torch.zeros(*lead, nb * 128, kb * 128)
        padded[..., : qf.shape[-2], : qf.shape[-1]] = qf.abs()
        block_max = padded.view(*lead, nb, 128, kb, 128).amax(dim=(-3, -1))
        assert torch.equal(block_max, torch.full_like(block_max, FP8_MAX)), name
        expanded = s.repeat_interleave(128, dim=-2).repeat_interleave(128, dim=-1)[
            ..., : w.shape[-2], : w.shape[-1]
        ]
        wf = w.float()
        err = (qf * expanded - wf).abs()
        bound = wf.abs() * 2.0**-4 + expanded * 2.0**-9  # half an e4m3 step, normal and subnormal range
        assert bool((err <= bound).all()), name
    kept = sorted({s.module for s in specs if s.linear and not s.fp8_target})
    assert "lm_head" in kept and any(".gate" in m for m in kept)
    assert cfg["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "ignored_layers": kept,
        "modules_to_not_convert": kept,
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }


def test_sharded_index_covers_every_tensor_once(tmp_path: Path) -> None:
    """Several shards and an index whose weight_map names every stored tensor exactly once, in the
    shard that holds it; no shard exceeds the limit unless one tensor does; same values as unsharded."""
    limit = 60_000
    dims = dims_of("qwen2_moe")
    out = make_checkpoint("qwen2_moe", tmp_path / "sharded", max_shard_bytes=limit, fp8=True, seed=2, **dims)
    whole = tensors(make_checkpoint("qwen2_moe", tmp_path / "whole", fp8=True, seed=2, **dims))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    assert not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as h:
            keys = list(h.keys())
            sizes = {k: math.prod(h.get_slice(k).get_shape()) * h.get_tensor(k).element_size() for k in keys}
            for k in keys:
                assert k not in seen, f"{k} in {seen.get(k)} and {shard.name}"
                seen[k] = shard.name
                assert same_bytes(h.get_tensor(k), whole[k]), k
        assert sum(sizes.values()) <= limit or len(keys) == 1, shard.name
        total += sum(sizes.values())
    assert seen == index["weight_map"]
    assert set(seen) == set(whole)
    assert index["metadata"]["total_size"] == total


def test_rerun_is_byte_identical_and_seed_changes_values(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {**dims_of("deepseek_v3"), "fp8": True, "max_shard_bytes": 200_000}
    a = make_checkpoint("deepseek_v3", tmp_path / "a", seed=4, **kwargs)
    b = make_checkpoint("deepseek_v3", tmp_path / "b", seed=4, **kwargs)
    c = make_checkpoint("deepseek_v3", tmp_path / "c", seed=5, **kwargs)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) == sorted(p.name for p in c.iterdir())
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "LICENSE"} <= set(files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ta, tc = tensors(a), tensors(c)
    assert set(ta) == set(tc)
    assert all(
        not torch.equal(ta[k].view(torch.uint8), tc[k].view(torch.uint8)) for k in ta if ta[k].numel() > 8
    )


def test_values_have_realistic_spread(tmp_path: Path) -> None:
    """Weights ~N(0, 0.02); RMSNorm weights near 1 (Qwen3-Next's zero-centred ones near 0, its gated
    GDN norm near 1); GDN ``A_log`` = log U(1, 16); nothing constant."""
    out = make_checkpoint("qwen3_next", tmp_path / "q", hidden_size=256, num_experts=8, seed=1)
    t = {k: v.float() for k, v in tensors(out).items()}
    w = t["model.layers.0.mlp.experts.5.down_proj.weight"]
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert abs(t["model.layers.1.self_attn.q_norm.weight"].mean().item()) < 0.02
    assert abs(t["model.layers.0.linear_attn.norm.weight"].mean().item() - 1) < 0.02
    a_log = t["model.layers.0.linear_attn.A_log"]
    assert bool(((a_log >= 0) & (a_log <= math.log(16) + 0.02)).all())
    assert all(v.numel() < 2 or v.std().item() > 0 for v in t.values())
    glm = tensors(make_checkpoint("glm4_moe", tmp_path / "g", hidden_size=256, seed=1))
    assert abs(glm["model.layers.0.input_layernorm.weight"].float().mean().item() - 1) < 0.02


def test_extra_files(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = make_checkpoint("mixtral", tmp_path / "m", vocab_size=300)
    cfg = read_config(out)
    tok = AutoTokenizer.from_pretrained(out)
    text = "Mixture of experts, ölçü 🙂"
    ids = tok(text)["input_ids"]
    assert max(ids) < cfg["vocab_size"] and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS[:2])) == [cfg["bos_token_id"], cfg["eos_token_id"]]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in chat and chat.startswith(SPECIAL_TOKENS[0])
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])
    assert (out / "LICENSE").read_text().strip()
    small = make_checkpoint("mixtral", tmp_path / "small", vocab_size=200)
    assert not (small / "tokenizer.json").exists() and (small / "generation_config.json").exists()
    bare = make_checkpoint("mixtral", tmp_path / "bare", extra_files=False)
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors"]


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="deepseek_v3"):
        make_checkpoint("llama", tmp_path / "x")
    with pytest.raises(ValueError, match="no shared experts"):
        make_checkpoint("qwen3_moe", tmp_path / "x", shared=2)
    with pytest.raises(ValueError, match="top_k"):
        make_checkpoint("mixtral", tmp_path / "x", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="dense"):
        make_checkpoint("mixtral", tmp_path / "x", dense_layers=1)
    with pytest.raises(ValueError, match="dense_layers"):
        make_checkpoint("deepseek_v3", tmp_path / "x", num_layers=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        make_checkpoint("mixtral", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"


def _load_script() -> Any:
    path = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic.py"
    spec = importlib.util.spec_from_file_location("make_synthetic", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_synthetic_streams_the_factory_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The script's checkpoint is the factory's (same config, same tensor bytes), sharded under the
    limit, sized near the target; contradictory sizing arguments exit 2."""
    script = _load_script()
    out = tmp_path / "syn"
    argv = ["--family", "deepseek_v3", "--preset", "tiny", "--size-gb", "0.004", "--out", str(out),
            "--max-shard-size", "1MB", "--workers", "2", "--seed", "7", "-q"]  # fmt: skip
    assert script.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    cfg = read_config(out)
    assert summary["experts"] == cfg["n_routed_experts"] > 2
    per_expert = 3 * 128 * 256 * 2 * summary["moe_layers"]
    assert abs(summary["bytes"] - 0.004e9) < per_expert
    assert not out.with_name("syn.partial").exists()
    ref = make_checkpoint(
        "deepseek_v3", tmp_path / "ref", num_layers=cfg["num_hidden_layers"], num_experts=cfg["n_routed_experts"],
        top_k=cfg["num_experts_per_tok"], dense_layers=0, vocab_size=cfg["vocab_size"], seed=7,
    )  # fmt: skip
    assert read_config(ref) == cfg
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got, want = tensors(out), tensors(ref)
    assert set(index["weight_map"]) == set(got) == set(want)
    assert all(same_bytes(got[k], want[k]) for k in want)
    assert all(p.stat().st_size <= 1_000_000 + 4096 for p in out.glob("*.safetensors"))
    assert script.main([*argv[:-1], "--layers", "2", "--experts", "4"]) == 2


def test_make_synthetic_plans_real_deepseek_v3_dimensions() -> None:
    """At 2.5 GB the plan keeps DeepSeek-V3's real expert and attention shapes and lands within one
    expert step of the target."""
    script = _load_script()
    args = script.build_parser().parse_args(
        ["--family", "deepseek_v3", "--size-gb", "2.5", "--out", "unused"]
    )
    cfg = script.plan(args)
    dims, overrides = flagship_arguments("deepseek_v3")
    specs = {s.name: s for s in tensor_specs(cfg)}
    layer = moe_layers(cfg)[0]
    assert specs[f"model.layers.{layer}.mlp.experts.0.gate_proj.weight"].shape == (2048, 7168)
    assert specs[f"model.layers.{layer}.mlp.experts.0.down_proj.weight"].shape == (7168, 2048)
    assert specs[f"model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight"].shape == (576, 7168)
    assert specs[f"model.layers.{layer}.self_attn.q_b_proj.weight"].shape == (
        128 * 192,
        overrides["q_lora_rank"],
    )
    total = sum(s.nbytes for s in specs.values())
    step = 3 * 2048 * 7168 * 2 * len(moe_layers(cfg))
    assert abs(total - 2.5e9) <= step / 2 + 1
    assert (
        cfg["n_routed_experts"] <= dims["num_experts"]
        and cfg["num_experts_per_tok"] <= cfg["n_routed_experts"]
    )
