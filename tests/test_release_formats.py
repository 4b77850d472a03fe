"""Release-format writers (moetool.testing.release_formats): DeepSeek-V4's FP4 experts and E8M0-scaled FP8
Linears as the release stores them (names, dtypes, shapes, config), read back by transformers as the
weights we meant, under both naming schemes and both places V4 declares ``expert_dtype``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moetool.kernels.fp4_cast_ref import dequant_fp4_ref, fp4_cast_ref
from moetool.testing.release_formats import (
    fp4_quantize,
    plant_lossy_block,
    write_deepseek_v4_release,
)

E8M0 = torch.float8_e8m0fnu


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def releases(v4_float: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("v4rel")
    return {
        "native": write_deepseek_v4_release(v4_float, root / "native", mtp_layers=1),
        "hf41": write_deepseek_v4_release(
            v4_float, root / "hf41", native_names=False, expert_dtype_in="quantization_config", num_shards=3
        ),
    }


def test_fp4_quantize_is_nearest_with_the_smallest_scale(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=gen) * torch.exp(torch.randn(64, 1, generator=gen) * 3)
    w[3, 32:64] = 0.0  # a zero group
    packed, scale = fp4_quantize(w)
    assert packed.dtype == torch.int8 and packed.shape == (64, 128) and scale.dtype == E8M0
    back = dequant_fp4_ref(packed, scale)
    s = scale.float().repeat_interleave(32, dim=-1)
    amax = w.abs().view(64, 8, 32).amax(-1).repeat_interleave(32, dim=-1)
    nonzero = amax > 0
    assert (amax[nonzero] / s[nonzero] <= 6).all() and (amax[nonzero] / s[nonzero] > 3).all()
    grid = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6])
    dist = ((w / s).abs()[..., None] - grid).abs().amin(-1)
    assert torch.equal(((back - w) / s).abs(), dist)  # the nearest e2m1 value, nothing else
    assert int(scale.view(torch.uint8)[3, 1]) == 0 and (back[3, 32:64] == 0).all()
    assert torch.equal(dequant_fp4_ref(*fp4_quantize(back)), back)  # FP4 values come back as they are


def test_release_layout_names_dtypes_and_config(releases: dict[str, Path], v4_float: Path) -> None:
    cfg = json.loads((v4_float / "config.json").read_text())
    h, i, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    t = tensors(releases["native"])
    for layer in (0, 1):
        for proj, (n, k) in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
            w, s = (
                t[f"layers.{layer}.ffn.experts.{e - 1}.{proj}.weight"],
                t[f"layers.{layer}.ffn.experts.0.{proj}.scale"],
            )
            assert (w.dtype, tuple(w.shape)) == (torch.int8, (n, k // 2))
            assert (s.dtype, tuple(s.shape)) == (E8M0, (n, k // 32))
        sw, ss = (
            t[f"layers.{layer}.ffn.shared_experts.w2.weight"],
            t[f"layers.{layer}.ffn.shared_experts.w2.scale"],
        )
        assert (
            sw.dtype == torch.float8_e4m3fn and ss.dtype == E8M0 and ss.shape == (-(-h // 128), -(-i // 128))
        )
        assert t[f"layers.{layer}.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert t["layers.0.ffn.gate.tid2eid"].dtype == torch.int64 and "layers.0.ffn.gate.bias" not in t
    assert t["layers.1.ffn.gate.bias"].dtype == torch.float32
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn"} <= set(t)
    assert not any(n.startswith("model.") for n in t)
    assert t["mtp.0.ffn.experts.0.w1.weight"].dtype == torch.int8 and "mtp.0.ffn.gate.bias" in t
    assert t["mtp.0.e_proj.scale"].dtype == E8M0 and "mtp.0.ffn.gate.tid2eid" not in t
    native_cfg = json.loads((releases["native"] / "config.json").read_text())
    assert native_cfg["expert_dtype"] == "fp4" and native_cfg["num_nextn_predict_layers"] == 1
    assert native_cfg["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    }
    hf = tensors(releases["hf41"])
    assert "model.layers.1.ffn.experts.0.w1.scale" in hf and "model.embed_tokens.weight" in hf
    hf_cfg = json.loads((releases["hf41"] / "config.json").read_text())
    assert hf_cfg["quantization_config"]["expert_dtype"] == "fp4" and "expert_dtype" not in hf_cfg
    assert len(list(releases["hf41"].glob("*.safetensors"))) == 3


def test_transformers_reads_the_release_as_we_mean_it(releases: dict[str, Path]) -> None:
    """transformers 5.24 loads both releases without a missing or unexpected key (MTP layers ignored),
    gives the same logits for both, and its dequantized experts are our decoding of the FP4 bytes."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    logits = {}
    for kind, path in releases.items():
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not any(info.values()), info
        with torch.no_grad():
            logits[kind] = model(ids).logits
        if kind == "native":
            t = tensors(path)
            experts = model.model.layers[1].mlp.experts
            for e in range(experts.gate_up_proj.shape[0]):
                w1, w3, w2 = (
                    dequant_fp4_ref(
                        t[f"layers.1.ffn.experts.{e}.{p}.weight"], t[f"layers.1.ffn.experts.{e}.{p}.scale"]
                    )
                    for p in ("w1", "w3", "w2")
                )
                assert torch.equal(
                    experts.gate_up_proj[e], torch.cat([w1, w3]).to(experts.gate_up_proj.dtype)
                )
                assert torch.equal(experts.down_proj[e], w2.to(experts.down_proj.dtype))
    assert torch.equal(logits["native"], logits["hf41"])


def test_planted_lossy_block_loses_exactly_its_elements(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    packed, scale = fp4_quantize(torch.randn(256, 512, generator=gen))
    assert int(fp4_cast_ref(packed, scale)[2].sum()) == 0  # a normal weight casts exactly
    for elements in (1, 5, 32):
        p, s = plant_lossy_block(packed, scale, 1, 2, elements=elements)
        changed = fp4_cast_ref(p, s)[2]
        assert int(changed[1, 2]) == elements and int(changed.sum()) == elements


def test_synthetic_v4_flash_has_the_release_layout_and_casts_exactly(tmp_path: Path) -> None:
    """scripts/make_synthetic.py's V4: V4-Flash's dimensions (transformers' DeepseekV4Config defaults), the
    release's names and dtypes, read by moetool as V4 with FP4 experts, every block exact in the cast."""
    from transformers import DeepseekV4Config

    from moetool.io import Checkpoint
    from moetool.model import analyze
    from moetool.testing.release_formats import V4_FLASH, write_v4_synthetic

    cfg = DeepseekV4Config()
    assert {k: getattr(cfg, k) for k in V4_FLASH} == V4_FLASH
    out = tmp_path / "syn"
    written = write_v4_synthetic(out, num_layers=1, num_experts=2, vocab=256, max_shard_bytes=50 * 10**6)
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    with Checkpoint(out) as ck:
        view = analyze(ck)
        assert sum(t.nbytes for t in ck.tensors.values()) == written
    assert view.info.hash_layers == (0,) and view.stores[0].fp4 and view.stores[0].num_experts == 2
    t = tensors(out)
    w, s = t["layers.0.ffn.experts.1.w2.weight"], t["layers.0.ffn.experts.1.w2.scale"]
    assert w.shape == (4096, 1024) and s.shape == (4096, 64)
    assert int(fp4_cast_ref(w, s)[2].sum()) == 0
    ids = t["layers.0.ffn.gate.tid2eid"]
    assert ids.shape == (256, 2) and all(len(set(r)) == 2 for r in ids.tolist())
