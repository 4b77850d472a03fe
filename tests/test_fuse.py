"""``moetool fuse-shared`` end to end (docs/contract.md §7) on tiny real-named checkpoints of every family with
shared experts: exact slot slices (BF16 values, FP8 bytes and 128×128 scale blocks), routed experts
and every other tensor unchanged, config, commutation with ``quantize``, the MoE layer's output through
``moetool.moe``, and the refusals.

Families: DeepSeek-V3 and GLM-4.5 (1 shared slot, weight 1), DeepSeek-V2-Lite-like (n_shared_experts=2:
2 slots), Qwen1.5-MoE-like (shared 4·I, gated: 4 slots) and Qwen3-Next (shared 4·I, gated, with Gated
DeltaNet layers); BF16 per-expert and packed inputs, FP8 in both layouts, replicas 1 and 3.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoint_asserts import assert_bytes, read_dir
from click.testing import CliRunner

from moetool.cli.main import cli, main
from moetool.io import Checkpoint
from moetool.model import analyze
from moetool.moe import FUSED_KEY, FusedSlots, MoeLayerWeights, moe_forward
from moetool.testing.factory import (
    DEEPGEMM_LEAVES,
    expert_intermediate_size,
    expert_proj_names,
    experts_prefix,
    make_checkpoint,
    moe_layers,
    num_routed_experts,
    router_bias_name,
    router_weight_name,
    shared_expert_gate_name,
    shared_expert_prefix,
    shared_intermediate_size,
)

W13, W13S, W2, W2S = DEEPGEMM_LEAVES.values()  # the deepgemm layout's stacked tensors under P

BLOCK = 128
FP8 = torch.float8_e4m3fn
INDEX = "model.safetensors.index.json"
GATED = ("qwen2_moe", "qwen3_next")

# moe_forward, fused against unfused, relative to max |reference| (float32): the shared expert's down
# projection is summed slot by slot and added among the routed terms instead of in one product.
FUSED_TOL = 1e-5


def tree_digest(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()
    }


def moetool_ok(*args: str) -> dict:
    result = CliRunner().invoke(cli, [*args, "--json", "-q"])
    assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return json.loads(result.stdout)


def moetool_fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    assert exc.value.code == 2, f"exit {exc.value.code}, stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_same_weights(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == sorted(p.name for p in b.glob("*.safetensors"))
    for rel in [*files, INDEX, "config.json"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), (
            f"{rel} differs between {a.name} and {b.name}"
        )


# -- sources ----------------------------------------------------------------------------------------
SOURCES: dict[str, tuple[str, dict]] = {
    "deepseek_v3": ("deepseek_v3", dict(num_layers=3)),
    "deepseek_v2_lite": ("deepseek_v2", dict(num_layers=3, shared=2)),
    "qwen1.5_moe": ("qwen2_moe", dict(num_layers=2, shared=4 * 128)),
    "qwen3_next": ("qwen3_next", dict(num_layers=2)),
    "glm4_moe": ("glm4_moe", dict(num_layers=3)),
    # BF16 slices need no 128 alignment: I = 96, S = 192
    "deepseek_v2_i96": ("deepseek_v2", dict(num_layers=2, shared=2, moe_intermediate_size=96)),
}


class Sources:
    """Session-wide inputs, made on first use: ``get(name, fmt)`` for fmt in bf16, bf16-packed,
    fp8-hf, fp8-deepgemm (``quantize`` of the BF16 source) and fp8-factory (official-style FP8)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.made: dict[tuple[str, str], Path] = {}
        self.digests: dict[Path, dict[str, bytes]] = {}

    def get(self, name: str, fmt: str) -> Path:
        key = (name, fmt)
        if key not in self.made:
            family, dims = SOURCES[name]
            dims = {"hidden_size": 256, "moe_intermediate_size": 128, "num_experts": 4, "seed": 17, **dims}
            path = self.base / f"{name}-{fmt}"
            if fmt in ("bf16", "bf16-packed", "fp8-factory"):
                make_checkpoint(
                    family, path, packed_experts=fmt == "bf16-packed", fp8=fmt == "fp8-factory", **dims
                )
            else:
                layout = fmt.split("-")[1]
                moetool_ok("quantize", str(self.get(name, "bf16")), str(path), "--layout", layout)
            self.made[key] = path
            self.digests[path] = tree_digest(path)
        return self.made[key]

    def assert_unchanged(self, path: Path) -> None:
        assert tree_digest(path) == self.digests[path], f"input {path} was modified"


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return Sources(tmp_path_factory.mktemp("fuse_src"))


@pytest.fixture(scope="session")
def fused(tmp_path_factory: pytest.TempPathFactory, sources: Sources) -> Callable[[str, str, int], Path]:
    base = tmp_path_factory.mktemp("fuse_out")
    done: dict[tuple[str, str, int], Path] = {}

    def run(name: str, fmt: str, replicas: int) -> Path:
        key = (name, fmt, replicas)
        if key not in done:
            src = sources.get(name, fmt)
            out = base / f"{name}-{fmt}-r{replicas}"
            moetool_ok("fuse-shared", str(src), str(out), "--replicas", str(replicas))
            sources.assert_unchanged(src)
            done[key] = out
        return done[key]

    return run


# -- exact slices -----------------------------------------------------------------------------------
def check_fused(src_dir: Path, out_dir: Path, replicas: int) -> None:
    """Every slot is the exact slice of the shared expert; everything else is the input's bytes."""
    src, out = read_dir(src_dir), read_dir(out_dir)
    cfg = json.loads((src_dir / "config.json").read_text())
    num, inter, size = num_routed_experts(cfg), expert_intermediate_size(cfg), shared_intermediate_size(cfg)
    m = size // inter
    assert m * inter == size and m >= 1
    proj = expert_proj_names(cfg)
    changed: set[str] = set()  # source tensors the fusion replaces
    added: set[str] = set()  # new per-expert names
    for layer in moe_layers(cfg):
        sp = shared_expert_prefix(cfg, layer)
        assert sp is not None
        sh = {p: src[f"{sp}.{p}_proj.weight"] for p in ("gate", "up", "down")}
        fp8 = sh["gate"].dtype == FP8
        sh_s = {p: src[f"{sp}.{p}_proj.weight_scale_inv"] for p in sh} if fp8 else {}
        shared_names = {n for n in src if n.startswith(sp + ".")}
        assert not [n for n in out if n.startswith(sp + ".")], "shared expert tensors must be removed"
        changed |= shared_names
        gate_name = shared_expert_gate_name(cfg, layer)
        if gate_name:
            assert_bytes(out[gate_name], src[gate_name], gate_name)
        p = experts_prefix(cfg, layer)
        ib = inter // BLOCK
        for idx in range(m * replicas):
            j, e = idx % m, num + idx
            rows, blocks = slice(j * inter, (j + 1) * inter), slice(j * ib, (j + 1) * ib)
            want = {"gate": sh["gate"][rows], "up": sh["up"][rows], "down": sh["down"][:, rows]}
            want_s = (
                {"gate": sh_s["gate"][blocks], "up": sh_s["up"][blocks], "down": sh_s["down"][:, blocks]}
                if fp8
                else {}
            )
            what = f"layer {layer} slot {idx} (expert {e})"
            if f"{p}.{W13S}" in src:  # FP8 stacked (deepgemm layout)
                w13, w2 = out[f"{p}.{W13}"], out[f"{p}.{W2}"]
                assert w13.shape[0] == w2.shape[0] == num + m * replicas
                assert_bytes(w13[e, :inter], want["gate"], f"{what} gate")
                assert_bytes(w13[e, inter:], want["up"], f"{what} up")
                assert_bytes(w2[e], want["down"], f"{what} down")
                s13, s2 = out[f"{p}.{W13S}"], out[f"{p}.{W2S}"]
                assert_bytes(s13[e, :ib], want_s["gate"], f"{what} gate scales")
                assert_bytes(s13[e, ib:], want_s["up"], f"{what} up scales")
                assert_bytes(s2[e], want_s["down"], f"{what} down scales")
            elif f"{p}.gate_up_proj" in src:
                gu, dn = out[f"{p}.gate_up_proj"], out[f"{p}.down_proj"]
                assert gu.shape[0] == dn.shape[0] == num + m * replicas
                assert_bytes(gu[e, :inter], want["gate"], f"{what} gate")
                assert_bytes(gu[e, inter:], want["up"], f"{what} up")
                assert_bytes(dn[e], want["down"], f"{what} down")
            else:
                for key in ("gate", "up", "down"):
                    name = f"{p}.{e}.{proj[key]}.weight"
                    assert_bytes(out[name], want[key], f"{what} {name}")
                    added.add(name)
                    if fp8:
                        assert_bytes(out[name + "_scale_inv"], want_s[key], f"{what} {name}_scale_inv")
                        added.add(name + "_scale_inv")
        # routed experts unchanged: the first E rows of stacked tensors, or the per-expert tensors
        for stacked in (
            *DEEPGEMM_LEAVES.values(),
            "w13_weight",  # read from outputs of moetool 0.1
            "w13_weight_scale_inv",
            "w2_weight",
            "w2_weight_scale_inv",
        ):
            name = f"{p}.{stacked}"
            if name in src:
                assert_bytes(out[name][:num], src[name], f"{name} routed experts")
                changed.add(name)
    assert set(out) == (set(src) - {n for n in changed if n not in out}) | added
    for name in set(src) - changed:
        assert_bytes(out[name], src[name], name)

    out_cfg = json.loads((out_dir / "config.json").read_text())
    slot_weight = "sigmoid_gate" if cfg["model_type"] in GATED else "one"
    want_cfg = dict(cfg)
    want_cfg[FUSED_KEY] = {
        "first_slot": num,
        "num_slots": m,
        "replicas": replicas,
        "slot_weight": slot_weight,
    }
    # every engine refuses the fused checkpoint at config time (BF16 ones gain a bare marker)
    scheme = out_cfg["quantization_config"].pop("activation_scheme")
    assert "fuse-shared output, not an engine checkpoint" in scheme and scheme == scheme.lower()
    if "quantization_config" in cfg:
        want_cfg["quantization_config"] = {
            k: v for k, v in cfg["quantization_config"].items() if k != "activation_scheme"
        }
    else:
        want_cfg["quantization_config"] = {"quant_method": "fp8"}
    assert out_cfg == want_cfg


CASES = [
    *[(name, "bf16", r) for name in SOURCES for r in (1, 3)],
    *[(name, "fp8-deepgemm", r) for name in SOURCES if name != "deepseek_v2_i96" for r in (1, 3)],
    *[(name, "fp8-hf", r) for name in ("deepseek_v2_lite", "qwen1.5_moe", "qwen3_next") for r in (1, 3)],
    *[(name, "bf16-packed", 3) for name in ("deepseek_v3", "qwen1.5_moe")],
    *[(name, "fp8-factory", r) for name, r in (("deepseek_v3", 3), ("glm4_moe", 1), ("deepseek_v2_lite", 3))],
]


@pytest.mark.parametrize(("name", "fmt", "replicas"), CASES)
def test_slots_are_exact_slices(
    sources: Sources, fused: Callable[[str, str, int], Path], name: str, fmt: str, replicas: int
) -> None:
    check_fused(sources.get(name, fmt), fused(name, fmt, replicas), replicas)


def test_slot_counts_of_real_ratios(sources: Sources, fused: Callable[[str, str, int], Path]) -> None:
    """DeepSeek-V3 and GLM 1 slot, DeepSeek-V2-Lite 2, Qwen1.5-MoE 4 (5632 = 4·1408)."""
    for name, m in (("deepseek_v3", 1), ("glm4_moe", 1), ("deepseek_v2_lite", 2), ("qwen1.5_moe", 4)):
        cfg = json.loads((fused(name, "bf16", 3) / "config.json").read_text())
        assert cfg[FUSED_KEY]["num_slots"] == m and cfg[FUSED_KEY]["first_slot"] == 4


# -- the MoE layer: fused slots give the original output ---------------------------------------------
def _layer_weights(t: dict[str, torch.Tensor], cfg: dict, layer: int, *, fused: bool) -> MoeLayerWeights:
    p, proj = experts_prefix(cfg, layer), expert_proj_names(cfg)
    total = num_routed_experts(cfg) + (
        cfg[FUSED_KEY]["num_slots"] * cfg[FUSED_KEY]["replicas"] if fused else 0
    )
    w13 = torch.stack(
        [
            torch.cat([t[f"{p}.{e}.{proj['gate']}.weight"], t[f"{p}.{e}.{proj['up']}.weight"]])
            for e in range(total)
        ]
    )
    w2 = torch.stack([t[f"{p}.{e}.{proj['down']}.weight"] for e in range(total)])
    bias = router_bias_name(cfg, layer)
    gate = shared_expert_gate_name(cfg, layer)
    kw: dict = {}
    if not fused:
        sp = shared_expert_prefix(cfg, layer)
        kw = dict(
            shared_w13=torch.cat([t[f"{sp}.gate_proj.weight"], t[f"{sp}.up_proj.weight"]]),
            shared_w2=t[f"{sp}.down_proj.weight"],
        )
    return MoeLayerWeights(
        router_weight=t[router_weight_name(cfg, layer)],
        score_bias=t[bias] if bias else None,
        w13=w13,
        w2=w2,
        shared_gate=t[gate] if gate else None,
        fused=FusedSlots.from_config(cfg) if fused else None,
        **kw,
    )


@pytest.mark.parametrize("name", [n for n in SOURCES if n != "deepseek_v2_i96"])
@pytest.mark.parametrize("replicas", [1, 3])
def test_moe_forward_unchanged(
    sources: Sources, fused: Callable[[str, str, int], Path], name: str, replicas: int
) -> None:
    src_dir, out_dir = sources.get(name, "bf16"), fused(name, "bf16", replicas)
    with Checkpoint(src_dir) as ckpt:
        view = analyze(ckpt)
        routing, slot_weight = view.info.routing, view.arch.slot_weight
    src, out = read_dir(src_dir), read_dir(out_dir)
    cfg = json.loads((src_dir / "config.json").read_text())
    out_cfg = json.loads((out_dir / "config.json").read_text())
    g = torch.Generator().manual_seed(99)
    x = torch.randn(37, cfg["hidden_size"], generator=g).bfloat16()
    for layer in moe_layers(cfg):
        orig = _layer_weights(src, cfg, layer, fused=False)
        ref, ids = moe_forward(x, orig, routing, slot_weight)
        scale = ref.abs().max()
        routed_only = moe_forward(
            x,
            MoeLayerWeights(
                router_weight=orig.router_weight, score_bias=orig.score_bias, w13=orig.w13, w2=orig.w2
            ),
            routing,
            None,
        )[0]
        assert (ref - routed_only).abs().max() > 100 * FUSED_TOL * scale, "the shared expert must matter here"
        fw = _layer_weights(out, out_cfg, layer, fused=True)
        for r in range(replicas):
            got, got_ids = moe_forward(x, fw, routing, None, replica_of_token=torch.full((x.shape[0],), r))
            assert torch.equal(got_ids, ids)
            err = float((got - ref).abs().max())
            assert err <= FUSED_TOL * float(scale), (
                f"layer {layer} replica {r}: {err:.3g} vs {float(scale):.3g}"
            )
        got, _ = moe_forward(x, fw, routing, None)  # default: replica t % R
        assert float((got - ref).abs().max()) <= FUSED_TOL * float(scale)


# -- quantize and fuse-shared commute -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "replicas", "opts"),
    [
        ("deepseek_v2_lite", 2, ()),
        ("deepseek_v2_lite", 2, ("--scale-fmt", "ue8m0")),
        ("deepseek_v2_lite", 2, ("--layout", "hf")),
        ("deepseek_v2_lite", 2, ("--layout", "hf", "--scale-fmt", "ue8m0")),
        ("qwen1.5_moe", 3, ("--scale-fmt", "ue8m0")),
        ("glm4_moe", 1, ("--layout", "hf")),
    ],
)
def test_quantize_and_fuse_commute(
    sources: Sources, tmp_path: Path, name: str, replicas: int, opts: tuple[str, ...]
) -> None:
    src = sources.get(name, "bf16")
    rep = ("--replicas", str(replicas))
    moetool_ok("fuse-shared", str(src), str(tmp_path / "f"), *rep)
    moetool_ok("quantize", str(tmp_path / "f"), str(tmp_path / "fq"), *opts)
    moetool_ok("quantize", str(src), str(tmp_path / "q"), *opts)
    moetool_ok("fuse-shared", str(tmp_path / "q"), str(tmp_path / "qf"), *rep)
    assert_same_weights(tmp_path / "fq", tmp_path / "qf")
    cfg = json.loads((tmp_path / "qf" / "config.json").read_text())
    assert cfg[FUSED_KEY]["replicas"] == replicas and cfg["quantization_config"]["quant_method"] == "fp8"
    sources.assert_unchanged(src)


# -- refusals -----------------------------------------------------------------------------------------
def _refused(capsys: pytest.CaptureFixture[str], src: Path, out: Path) -> str:
    before = tree_digest(src)
    line = moetool_fails(capsys, "fuse-shared", str(src), str(out))
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert tree_digest(src) == before
    return line


def test_refuses_shared_size_not_a_multiple(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_checkpoint(
        "qwen2_moe",
        tmp_path / "src",
        num_layers=1,
        hidden_size=256,
        moe_intermediate_size=128,
        num_experts=4,
        shared=192,
    )
    line = _refused(capsys, src, tmp_path / "out")
    assert "192" in line and "128" in line and "multiple" in line


def test_refuses_fp8_with_unaligned_intermediate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_checkpoint(
        "deepseek_v2",
        tmp_path / "src",
        num_layers=2,
        hidden_size=256,
        moe_intermediate_size=96,
        num_experts=4,
        shared=2,
        fp8=True,
    )
    line = _refused(capsys, src, tmp_path / "out")
    assert "128" in line and "96" in line


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_refuses_family_without_shared_experts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], family: str
) -> None:
    src = make_checkpoint(
        family, tmp_path / "src", num_layers=1, hidden_size=256, moe_intermediate_size=128, num_experts=4
    )
    line = _refused(capsys, src, tmp_path / "out")
    assert "shared" in line


@pytest.mark.parametrize("fmt", ["bf16", "fp8-deepgemm"])
def test_refuses_already_fused(
    fused: Callable[[str, str, int], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    line = _refused(capsys, fused("deepseek_v3", fmt, 1), tmp_path / "out")
    assert "fused" in line
