"""``moetool inspect`` on tiny checkpoints of every family, written both by transformers' own classes
and by the factory: the facts it reports are checked against what the files themselves hold, read
with the reference safetensors library (names, shapes, dtypes), never against moetool's own reader."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from moetool.cli.main import cli
from moetool.testing.factory import FAMILIES, family_defaults, make_checkpoint
from moetool.testing.hf_models import make_hf_checkpoint

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I32": 4, "I64": 8}
EXPERT_NAME = re.compile(
    r"^model\.layers\.(\d+)\.\w+\.experts\.(?:(\d+)\.(\w+)\.weight|gate_up_proj|down_proj)$"
)
SHARED_GATE_PROJ = re.compile(r"^model\.layers\.(\d+)\.mlp\.shared_experts?\.gate_proj\.weight$")

MAKERS: dict[str, Callable[..., Path]] = {"factory": make_checkpoint, "transformers": make_hf_checkpoint}


def _dims(family: str, **extra: Any) -> dict[str, Any]:
    """Three layers (one dense where the family has dense layers), six experts, default shared sizes."""
    dims: dict[str, Any] = {
        "num_layers": 3,
        "hidden_size": 128,
        "moe_intermediate_size": 128,
        "num_experts": 6,
    }
    if family_defaults(family).naming != "mixtral":
        dims["dense_layers"] = 1
    return {**dims, **extra}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per module) a checkpoint by ``maker`` for ``family`` with extra options."""
    cache: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("inspect")

    def get(maker: str, family: str, **opts: Any) -> Path:
        key = f"{maker}-{family}-" + "-".join(f"{k}={v}" for k, v in sorted(opts.items()))
        if key not in cache:
            cache[key] = MAKERS[maker](family, base / re.sub(r"[^\w.=-]", "_", key), **_dims(family, **opts))
        return cache[key]

    return get


def _headers(root: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for p in sorted(root.glob("*.safetensors")):
        with safe_open(p, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                s = f.get_slice(name)
                out[name] = (s.get_dtype(), tuple(s.get_shape()))
    return out


def _layer(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _facts(root: Path, family: str) -> dict[str, Any]:
    """What the checkpoint holds, from config.json and the safetensors headers alone."""
    cfg = json.loads((root / "config.json").read_text())
    headers = _headers(root)
    n_layers = cfg["num_hidden_layers"]
    experts: dict[int, set[int]] = {}
    packed = stacked_fp8 = False
    inter = None
    for name, (_, shape) in headers.items():
        m = EXPERT_NAME.match(name)
        if not m:
            continue
        layer = int(m.group(1))
        if m.group(2) is not None:
            experts.setdefault(layer, set()).add(int(m.group(2)))
            if m.group(3) in ("down_proj", "w2"):
                inter = shape[1]
        else:
            packed = True
            stacked_fp8 = stacked_fp8 or headers[name][0] == "F8_E4M3"
            if name.endswith("down_proj"):
                experts.setdefault(layer, set()).update(range(shape[0]))
                inter = shape[2]
    counts = {len(v) for v in experts.values()}
    assert len(counts) == 1, counts
    shared = [shape[0] for name, (_, shape) in headers.items() if SHARED_GATE_PROJ.match(name)]
    moe = sorted(experts)
    return {
        "family": "deepseek_v3" if family == "kimi_k2" else family,
        "model_type": cfg["model_type"],
        "layers": n_layers,
        "moe_layers": moe,
        "dense_layers": [i for i in range(n_layers) if i not in moe],
        "gdn_layers": sorted({_layer(n) for n in headers if ".linear_attn." in n}),
        "routed_experts": counts.pop(),
        "moe_intermediate_size": inter,
        "shared_expert_intermediate_size": shared[0] if shared else 0,
        "fused_slots_if_fused": shared[0] // inter if shared else 0,
        # stacked FP8 experts with their scales are the deepgemm layout (transformers' FP8Experts names)
        "layout": ("deepgemm" if stacked_fp8 else "packed") if packed else "hf",
        "expert_storage": [("deepgemm" if stacked_fp8 else "packed") if packed else "per_expert"],
        "fp8_tensors": sum(1 for d, _ in headers.values() if d == "F8_E4M3"),
        "quantization_config": cfg.get("quantization_config"),
        "tensors": len(headers),
        "shards": len(list(root.glob("*.safetensors"))),
        "total_bytes": sum(ITEMSIZE[d] * _numel(s) for d, s in headers.values()),
        "top_k": cfg["num_experts_per_tok"],
        "hidden_size": cfg["hidden_size"],
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _inspect(root: Path) -> tuple[dict[str, Any], str]:
    runner = CliRunner()
    as_json = runner.invoke(cli, ["inspect", str(root), "--json"])
    assert as_json.exit_code == 0, as_json.output
    text = runner.invoke(cli, ["inspect", str(root)])
    assert text.exit_code == 0, text.output
    return json.loads(as_json.stdout), text.stdout


def _check(report: dict[str, Any], text: str, facts: dict[str, Any]) -> None:
    for key in (
        "family",
        "model_type",
        "layers",
        "moe_layers",
        "dense_layers",
        "gdn_layers",
        "routed_experts",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "fused_slots_if_fused",
        "layout",
        "expert_storage",
        "tensors",
        "shards",
        "total_bytes",
        "top_k",
        "hidden_size",
    ):
        assert report[key] == facts[key], (
            f"{key}: inspect says {report[key]!r}, the files hold {facts[key]!r}"
        )
    q = report["quantization"]
    assert q["fp8_tensors"] == facts["fp8_tensors"]
    assert q["config"] == facts["quantization_config"]
    if facts["quantization_config"]:
        assert q["scale_fmt"] == facts["quantization_config"].get("scale_fmt", "float")
    else:
        assert q["scale_fmt"] is None
    # the table says the same things
    assert f"{facts['family']} (model_type {facts['model_type']})" in text
    layers_line = f"{facts['layers']}: {len(facts['moe_layers'])} MoE, {len(facts['dense_layers'])} dense"
    assert layers_line in text
    assert (f"{len(facts['gdn_layers'])} GDN" in text) == bool(facts["gdn_layers"])
    assert f"{facts['routed_experts']} routed, top-{facts['top_k']}" in text
    assert f"{facts['layout']} ({facts['expert_storage'][0]})" in text
    if facts["shared_expert_intermediate_size"]:
        assert (
            f"intermediate {facts['shared_expert_intermediate_size']} -> {facts['fused_slots_if_fused']}"
            in text
        )
    if facts["fp8_tensors"]:
        assert f"{facts['fp8_tensors']} FP8 tensors" in text
    assert f"{facts['tensors']} tensors, {facts['shards']} shard(s)" in text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_inspect_reports_what_the_checkpoint_holds(
    build: Callable[..., Path], maker: str, family: str
) -> None:
    root = build(maker, family)
    facts = _facts(root, family)
    report, text = _inspect(root)
    _check(report, text, facts)
    assert facts["layout"] == "hf" and facts["fp8_tensors"] == 0
    # per-expert BF16 experts (+ a shared expert) are exactly what quantize would touch
    expert_weights = [n for n in _headers(root) if EXPERT_NAME.match(n)]
    shared_weights = [n for n in _headers(root) if re.search(r"\.shared_experts?\.\w+_proj\.weight$", n)]
    for layout in ("hf", "deepgemm"):
        would = report["quantize_would"][layout]
        assert "error" not in would, would
        assert would["quantized_tensors"] == len(expert_weights) + len(shared_weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_packed_experts(build: Callable[..., Path], family: str) -> None:
    """transformers-v5 packed ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]``."""
    root = build("factory", family, packed_experts=True)
    facts = _facts(root, family)
    assert facts["layout"] == "packed"
    report, text = _inspect(root)
    _check(report, text, facts)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_inspect_packed_experts_saved_by_transformers(build: Callable[..., Path], family: str) -> None:
    root = build("transformers", family, packed_experts=True)
    facts = _facts(root, family)
    assert facts["layout"] == "packed"
    report, text = _inspect(root)
    _check(report, text, facts)


@pytest.mark.parametrize(
    ("family", "opts"),
    [
        ("deepseek_v3", {"fp8": True}),
        ("deepseek_v3", {"fp8": True, "packed_experts": True}),
        ("kimi_k2", {"fp8": True, "max_shard_bytes": 200_000}),
        ("qwen3_next", {"fp8": True}),
        ("mixtral", {"fp8": True}),
    ],
    ids=["dsv3", "dsv3-packed", "kimi-sharded", "qwen3_next", "mixtral"],
)
def test_inspect_fp8_checkpoints(build: Callable[..., Path], family: str, opts: dict[str, Any]) -> None:
    """DeepSeek-V3-style block FP8 (F8_E4M3 weights + F32 weight_scale_inv, quantization_config)."""
    root = build("factory", family, **opts)
    facts = _facts(root, family)
    assert facts["fp8_tensors"] > 0 and facts["quantization_config"]["quant_method"] == "fp8"
    report, text = _inspect(root)
    _check(report, text, facts)
    assert "fp8 float scales" in text
    if opts.get("max_shard_bytes"):
        assert facts["shards"] > 1


def test_inspect_lists_weights_not_divisible_by_128(build: Callable[..., Path]) -> None:
    """I = 96: every expert weight has a dimension that is not a multiple of 128; the shared expert
    (S = 4·96 = 384) and the router are not listed (the router is never quantized)."""
    root = build("factory", "qwen2_moe", moe_intermediate_size=96, hidden_size=256)
    headers = _headers(root)
    report, text = _inspect(root)
    listed = report["not_divisible_by_128"]
    expert_weights = {n for n in headers if EXPERT_NAME.match(n)}
    assert expert_weights and expert_weights <= set(listed)
    for name in listed:
        assert any(d % 128 for d in headers[name][1]), name
        assert ".mlp.gate." not in name and not name.endswith("shared_expert_gate.weight"), name
    assert not any(".shared_expert." in n for n in listed)
    assert f"{len(listed)} weight(s)" in text
    assert "error" in report["quantize_would"]["deepgemm"]
    assert "128" in report["quantize_would"]["deepgemm"]["error"]
    hf = report["quantize_would"]["hf"]
    assert "error" not in hf and any("128" in n for n in hf["notes"])


def test_inspect_lists_packed_experts_not_divisible_by_128(build: Callable[..., Path]) -> None:
    """The same experts stored packed must be flagged too: quantize cuts them into [96, 256] matrices."""
    root = build("factory", "qwen3_moe", moe_intermediate_size=96, hidden_size=256, packed_experts=True)
    report, _ = _inspect(root)
    listed = report["not_divisible_by_128"]
    for layer in report["moe_layers"]:
        assert any(n.startswith(f"model.layers.{layer}.mlp.experts.") for n in listed), (layer, listed)


def test_inspect_divisible_checkpoint_lists_no_expert(build: Callable[..., Path]) -> None:
    root = build("factory", "deepseek_v3")
    report, _ = _inspect(root)
    assert not [n for n in report["not_divisible_by_128"] if EXPERT_NAME.match(n) or "shared_experts" in n]
