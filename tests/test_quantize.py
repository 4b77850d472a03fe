"""``moetool quantize`` end to end on tiny real-named checkpoints: every FP8 byte against the recipe of docs/contract.md §6
(computed here by a plain implementation of its five steps), both layouts, both scale formats, SM100
scale packing, config and manifest, sharding, resume, FP8 and packed inputs, and the error paths.

Sources come from ``moetool.testing.factory`` (seeded, transformers' names). The main source is a
DeepSeek-V3 with hidden 576 (4.5 blocks, so every expert matrix has a ragged 64-wide block and a ceil
scale grid), moe_intermediate 128, two MoE layers, and hand-placed adversarial blocks: all zeros, below
the 1e-4 amax floor, a subnormal, an amax whose scale is an exact power of two, values near bf16's
maximum and a large ragged row block.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from checkpoint_asserts import assert_bytes, read_dir
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moetool
from moetool.cli.main import cli, main
from moetool.engines import transformers_cpu_reading
from moetool.kernels.fp8_quant_ref import sm100_scales_from_storage, unpack_sm100_scales_ref
from moetool.testing.factory import DEEPGEMM_LEAVES, make_checkpoint, tensor_specs

W13, W13S, W2, W2S = DEEPGEMM_LEAVES.values()  # the deepgemm layout's stacked tensors under P

BLOCK = 128
FP8 = torch.float8_e4m3fn
HIDDEN = 576
INTER = 128
EXPERTS = 4
MOE_LAYERS = (1, 2)
INDEX = "model.safetensors.index.json"
MANIFEST = "moetool.json"
EXTRA_FILES = {"chat_template.jinja": b"{{ messages }}\n", "original/README.txt": b"kept as is\n"}


# -- the recipe of docs/contract.md §6, written out step by step ------------------------------------------------
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ue8m0_bits(s: torch.Tensor) -> torch.Tensor:
    """The UE8M0 rounding of docs/contract.md §6 on the float32 bits: exponent += (mantissa != 0), clamped to [1, 254], mantissa 0."""
    bits = s.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    exponent = (exponent + (mantissa != 0).to(torch.int32)).clamp(1, 254)
    return (exponent << 23).view(torch.float32)


def recipe(w: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 of ``w [N, K]``: q float8_e4m3fn ``[N, K]``, s float32 ``[ceil(N/128), ceil(K/128)]``."""
    n, k = w.shape
    nb, kb = cdiv(n, BLOCK), cdiv(k, BLOCK)
    wf = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32)  # step 1: float32, zero-padded
    wf[:n, :k] = w.float()
    blocks = wf.view(nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))  # step 2
    amax = torch.maximum(amax, torch.tensor(1e-4, dtype=torch.float32))
    s = amax / 448.0  # step 3
    if ue8m0:
        s = ue8m0_bits(s)
    q = (blocks * (1.0 / s)[:, None, :, None]).clamp(-448.0, 448.0).to(FP8)  # step 4
    return q.view(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous(), s


def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q * s`` per 128×128 block in float32."""
    n, k = q.shape
    full = s.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return q.float() * full


def is_pow2(s: torch.Tensor) -> bool:
    return bool(((s.view(torch.int32) & 0x7FFFFF) == 0).all())


def expected_from(src: dict[str, torch.Tensor], name: str, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What docs/contract.md §6 makes of source tensor ``name``: BF16 → recipe; FP8 whose scales satisfy the request →
    its bytes kept; other FP8 → recipe of its float32 dequantization."""
    w = src[name]
    if w.dtype != FP8:
        return recipe(w, ue8m0)
    s = src[name + "_scale_inv"]
    if not ue8m0 or is_pow2(s):
        return w, s
    return recipe(dequant(w, s), ue8m0)


# -- checkpoint helpers -----------------------------------------------------------------------------
def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def weight_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    """Weight shards, index and config.json byte-identical."""
    assert weight_files(a) == weight_files(b)
    for rel in [*weight_files(a), INDEX, "config.json"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between {a} and {b}"


def rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply ``edit`` to the tensors of a single-shard checkpoint in place."""
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, f, metadata={"format": "pt"})


def moetool_ok(*args: str) -> dict:
    """Run the CLI through click and return its --json result."""
    result = CliRunner().invoke(cli, [*args, "--json", "-q"])
    assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return json.loads(result.stdout)


def moetool_fails(capsys: pytest.CaptureFixture[str], *args: str, code: int = 2) -> str:
    """Run the real entry point (its error funnel) and return the one error line."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    assert exc.value.code == code, f"exit {exc.value.code}, stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    partial = out.with_name(out.name + ".partial")
    assert not partial.exists(), f"{partial} was left behind"


# -- sources ----------------------------------------------------------------------------------------
def _adversarial(t: dict[str, torch.Tensor]) -> None:
    g = torch.Generator().manual_seed(7)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    p = "model.layers.1.mlp.experts"
    gate0 = t[f"{p}.0.gate_proj.weight"]  # [128, 576]
    gate0[:, :128] = 0  # all-zero block: amax floor
    gate0[:, 512:] = (randn(128, 64) * 1e-6).bfloat16()  # ragged block below the floor
    gate0[:, 128:256] = (randn(128, 128) * 0.3).clamp(-1.7, 1.7).bfloat16()
    gate0[5, 200] = -1.75  # amax 448 * 2**-8: s is a power of two, ue8m0 keeps it
    up1 = t[f"{p}.1.up_proj.weight"]
    up1[:, 128:256] = (randn(128, 128) * 2e4).bfloat16()  # large block
    down2 = t[f"{p}.2.down_proj.weight"]  # [576, 128]
    down2[512:] = (randn(64, 128) * 100).bfloat16()  # ragged row block, large
    down2[:128] = 0
    down2[3, 7] = 1e-40  # a bf16 subnormal alone in its block
    gate3 = t[f"{p}.3.gate_proj.weight"]
    gate3[0, 300] = 3.0e38  # near bf16's maximum: s ~ 7e35, the rest of the block flushes to 0
    gate3[1, 301] = -2.5e38


def _add_extra_files(root: Path) -> None:
    for rel, data in EXTRA_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


class Source:
    """A source checkpoint and the digest of its folder when made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = tree_digest(path)
        self.tensors = read_dir(path)
        self.config = json.loads((path / "config.json").read_text())

    def assert_unchanged(self) -> None:
        assert tree_digest(self.path) == self.digest, f"input {self.path} was modified"


#: DeepSeek-V3 attention of 8 heads: q_b_proj [8 x 48, q_lora_rank] and kv_b_proj [8 x 64, kv_lora_rank]
#: have 128-row blocks (the factory's 4 heads make 192 rows, two blocks transformers' CPU loader reads as 96)
_EIGHT_HEADS = {"num_attention_heads": 8, "num_key_value_heads": 8}


def _dims(**kw: object) -> dict:
    return dict(
        num_layers=3, hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS, seed=11, **kw
    )


@pytest.fixture(scope="session")
def src(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """DeepSeek-V3 BF16, hidden 576, adversarial expert blocks, extra non-weight files."""
    path = make_checkpoint("deepseek_v3", tmp_path_factory.mktemp("q_src") / "ds", **_dims())
    rewrite(path, _adversarial)
    _add_extra_files(path)
    return Source(path)


@pytest.fixture(scope="session")
def fp8_src(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """DeepSeek-V3 official-style FP8 (every Linear but routers and lm_head), ceil scale grids
    (kv_a_proj_with_mqa is 201 × 576: a 2 × 5 grid, like 576 × 7168's 5 × 56; kv_b_proj is 512 × 185).
    No grid divides a dimension into blocks of other than 128 (8 heads make q_b_proj 384 rows, not 192):
    moetool refuses to write such a release's FP8 Linears into the hf layout, which transformers' CPU
    loader would read wrong (tests/test_engine_matrix.py)."""
    path = make_checkpoint(
        "deepseek_v3",
        tmp_path_factory.mktemp("q_fp8") / "ds",
        fp8=True,
        config_overrides={"kv_lora_rank": 185, **_EIGHT_HEADS},
        **_dims(),
    )
    return Source(path)


class Runs:
    """Memoised quantize runs: one output folder per (source, options)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.done: dict[tuple, tuple[Path, dict]] = {}

    def __call__(self, source: Source, *opts: str) -> Path:
        return self.run(source, *opts)[0]

    def run(self, source: Source, *opts: str) -> tuple[Path, dict]:
        key = (str(source.path), opts)
        if key not in self.done:
            out = self.base / f"out{len(self.done)}"
            report = moetool_ok("quantize", str(source.path), str(out), *opts)
            source.assert_unchanged()
            self.done[key] = (out, report)
        return self.done[key]


@pytest.fixture(scope="session")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("q_runs"))


def fmt_opts(fmt: str) -> tuple[str, ...]:
    return ("--scale-fmt", fmt)


DG = ("--layout", "deepgemm")  # the default is hf


# -- expert bytes -----------------------------------------------------------------------------------
def expert_names(prefix: str, e: int) -> tuple[str, str, str]:
    return tuple(f"{prefix}.{e}.{p}_proj.weight" for p in ("gate", "up", "down"))  # type: ignore[return-value]


@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
def test_deepgemm_experts_follow_the_recipe(src: Source, quantized: Runs, fmt: str) -> None:
    out = read_dir(quantized(src, *DG, *fmt_opts(fmt)))
    ue8m0 = fmt == "ue8m0"
    for layer in MOE_LAYERS:
        p = f"model.layers.{layer}.mlp.experts"
        w13, w13s = out[f"{p}.{W13}"], out[f"{p}.{W13S}"]
        w2, w2s = out[f"{p}.{W2}"], out[f"{p}.{W2S}"]
        assert (w13.dtype, tuple(w13.shape)) == (FP8, (EXPERTS, 2 * INTER, HIDDEN))
        assert (w2.dtype, tuple(w2.shape)) == (FP8, (EXPERTS, HIDDEN, INTER))
        assert (w13s.dtype, tuple(w13s.shape)) == (
            torch.float32,
            (EXPERTS, 2 * INTER // BLOCK, cdiv(HIDDEN, BLOCK)),
        )
        assert (w2s.dtype, tuple(w2s.shape)) == (
            torch.float32,
            (EXPERTS, cdiv(HIDDEN, BLOCK), INTER // BLOCK),
        )
        assert w13.stride(0) == 2 * INTER * HIDDEN and w2.stride(0) == HIDDEN * INTER
        ib = INTER // BLOCK
        for e in range(EXPERTS):
            gate, up, down = (expected_from(src.tensors, n, ue8m0) for n in expert_names(p, e))
            assert_bytes(w13[e, :INTER], gate[0], f"{p}.{W13}[{e}] gate rows")
            assert_bytes(w13[e, INTER:], up[0], f"{p}.{W13}[{e}] up rows")
            assert_bytes(w13s[e, :ib], gate[1], f"{p}.{W13S}[{e}] gate blocks")
            assert_bytes(w13s[e, ib:], up[1], f"{p}.{W13S}[{e}] up blocks")
            assert_bytes(w2[e], down[0], f"{p}.{W2}[{e}]")
            assert_bytes(w2s[e], down[1], f"{p}.{W2S}[{e}]")
        assert not [n for n in out if n.startswith(f"{p}.0.")], "per-expert tensors left beside w13/w2"
        if ue8m0:
            assert is_pow2(w13s) and is_pow2(w2s)
    # the hand-made block whose amax is 448 * 2**-8 keeps exactly that scale in both formats
    assert float(out[f"model.layers.1.mlp.experts.{W13S}"][0, 0, 1]) == 2.0**-8


def _check_non_expert(
    out: dict[str, torch.Tensor], source: Source, quantized_names: set[str], ue8m0: bool
) -> None:
    """Quantized names follow the recipe under their own names; every other source tensor is kept."""
    for name in sorted(quantized_names):
        q, s = expected_from(source.tensors, name, ue8m0)
        assert_bytes(out[name], q, name)
        assert_bytes(out[name + "_scale_inv"], s, name + "_scale_inv")
    kept = [
        n for n in source.tensors if n in out and n not in quantized_names and not n.endswith("_scale_inv")
    ]
    for name in kept:
        assert_bytes(out[name], source.tensors[name], name)


@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
def test_deepgemm_output_tensors(src: Source, quantized: Runs, fmt: str) -> None:
    out = read_dir(quantized(src, *DG, *fmt_opts(fmt)))
    shared = {n for n in src.tensors if ".shared_experts." in n}
    routed = {n for n in src.tensors if ".mlp.experts." in n}
    stacked = {
        f"model.layers.{layer}.mlp.experts.{t}" for layer in MOE_LAYERS for t in DEEPGEMM_LEAVES.values()
    }
    want = (set(src.tensors) - routed) | stacked | {n + "_scale_inv" for n in shared}
    assert set(out) == want
    _check_non_expert(out, src, shared, fmt == "ue8m0")
    assert {n for n, t in out.items() if t.dtype == FP8} == shared | {n for n in stacked if "scale" not in n}


@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
def test_hf_layout_names_shapes_and_bytes(src: Source, quantized: Runs, fmt: str) -> None:
    out = read_dir(quantized(src, "--layout", "hf", *fmt_opts(fmt)))
    targets = {n for n in src.tensors if ".experts." in n or ".shared_experts." in n}
    assert len(targets) == len(MOE_LAYERS) * (3 * EXPERTS + 3)
    assert set(out) == set(src.tensors) | {n + "_scale_inv" for n in targets}
    for name in targets:
        n, k = src.tensors[name].shape
        assert out[name].dtype == FP8 and tuple(out[name].shape) == (n, k), name
        assert tuple(out[name + "_scale_inv"].shape) == (cdiv(n, BLOCK), cdiv(k, BLOCK)), name
    _check_non_expert(out, src, targets, fmt == "ue8m0")


# -- config.json ------------------------------------------------------------------------------------
def expected_ignored(config: dict, quantized_groups: set[str]) -> list[str]:
    """Every Linear module (transformers' modules, per the factory's table) left in high precision."""
    return sorted({s.module for s in tensor_specs(config) if s.linear and s.group not in quantized_groups})


def check_quantization_config(
    out: Path, source: Source, *, ue8m0: bool, layout: str, ignored: list[str]
) -> None:
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    base = {k: v for k, v in source.config.items() if k != "quantization_config"}
    assert cfg == base, "config.json changed beyond quantization_config"
    assert qc["modules_to_not_convert"] == qc["ignored_layers"]
    assert len(set(qc["ignored_layers"])) == len(qc["ignored_layers"])
    assert sorted(qc.pop("ignored_layers")) == ignored
    qc.pop("modules_to_not_convert")
    want = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    if ue8m0:
        want["scale_fmt"] = "ue8m0"
    if layout == "deepgemm":
        # the stacked layout loads in no engine: every engine validates activation_scheme and refuses this
        scheme = qc.pop("activation_scheme")
        assert "not an engine checkpoint" in scheme and "--layout hf" in scheme and scheme == scheme.lower()
        want.pop("activation_scheme")
    assert qc == want


@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
def test_quantization_config(src: Source, quantized: Runs, layout: str, fmt: str) -> None:
    out = (
        quantized(src, *DG, *fmt_opts(fmt))
        if layout == "deepgemm"
        else quantized(src, "--layout", "hf", *fmt_opts(fmt))
    )
    ignored = expected_ignored(src.config, {"expert", "shared_expert"})
    assert "lm_head" in ignored and "model.layers.1.mlp.gate" in ignored
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa" in ignored
    check_quantization_config(out, src, ue8m0=fmt == "ue8m0", layout=layout, ignored=ignored)


@pytest.fixture(scope="session")
def next_src(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """Qwen3-Next: Gated DeltaNet layers (in_proj_qkvz, in_proj_ba [8, H], conv1d, A_log) and a gated
    shared expert."""
    path = make_checkpoint(
        "qwen3_next",
        tmp_path_factory.mktemp("q_next") / "qn",
        num_layers=4,
        hidden_size=256,
        moe_intermediate_size=128,
        num_experts=4,
        seed=5,
    )
    return Source(path)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_next"])
def test_targets_linear(src: Source, next_src: Source, quantized: Runs, family: str) -> None:
    source = src if family == "deepseek_v3" else next_src
    out_dir = quantized(source, "--layout", "hf", "--targets", "linear")
    out = read_dir(out_dir)
    specs = tensor_specs(source.config)
    q_groups = {"expert", "shared_expert", "attention", "dense_mlp", "linear_attention"}
    targets = {s.name for s in specs if s.linear and s.group in q_groups}
    assert {s.group for s in specs if s.name in targets} >= (
        {"attention", "expert"} | ({"dense_mlp"} if family == "deepseek_v3" else {"linear_attention"})
    )
    # routers, shared-expert gate, embeddings, lm_head, norms, and conv1d / A_log / dt_bias of GDN layers
    never = [s.name for s in specs if s.group in ("router", "gate", "embedding", "lm_head", "norm")]
    never += [s.name for s in specs if s.group == "linear_attention" and not s.linear]
    # a Linear whose 128x128 ceil grid transformers' CPU loader would read with other blocks stays in
    # its own precision (DeepSeek's q_b_proj of 192 columns: two 96-column blocks)
    misread = {
        n for n in targets if "expert" not in n and transformers_cpu_reading(out[n].shape) == "misreads"
    }
    assert bool(misread) == (family == "deepseek_v3")
    never += sorted(misread)
    targets -= misread
    for name in never:
        assert out[name].dtype != FP8 and name + "_scale_inv" not in out, f"{name} must stay unquantized"
    assert set(out) == set(source.tensors) | {n + "_scale_inv" for n in targets}
    _check_non_expert(out, source, targets, False)
    ignored = sorted(
        {*expected_ignored(source.config, q_groups), *(n.removesuffix(".weight") for n in misread)}
    )
    assert all(
        ".self_attn." not in m and ".linear_attn." not in m for m in ignored if m + ".weight" not in misread
    )
    check_quantization_config(out_dir, source, ue8m0=False, layout="hf", ignored=ignored)


# -- files, manifest, determinism -------------------------------------------------------------------
def test_output_files_and_manifest(src: Source, quantized: Runs) -> None:
    out, report = quantized.run(src, *DG, *fmt_opts("ue8m0"))
    src_files = {p.relative_to(src.path).as_posix() for p in src.path.rglob("*") if p.is_file()}
    copied = {f for f in src_files if not f.endswith(".safetensors") and f not in ("config.json", INDEX)}
    assert copied >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "LICENSE",
        *EXTRA_FILES,
    }
    for rel in copied:
        assert (out / rel).read_bytes() == (src.path / rel).read_bytes(), rel
    out_files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert out_files == copied | {"config.json", INDEX, MANIFEST, *weight_files(out)}

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["moetool_version"] == moetool.__version__
    assert manifest["command"] == "quantize" and manifest["layout"] == "deepgemm"
    assert manifest["options"]["scale_fmt"] == "ue8m0" and manifest["options"]["layout"] == "deepgemm"
    assert str(src.path) in json.dumps(manifest["source"])
    assert set(manifest["files"]) == out_files - {MANIFEST}
    for rel, rec in manifest["files"].items():
        data = (out / rel).read_bytes()
        assert rec["size"] == len(data), rel
        assert rec["sha256"] == hashlib.sha256(data).hexdigest(), rel
    assert report["files"] == manifest["files"]

    index = json.loads((out / INDEX).read_text())
    tensors = manifest["tensors"]
    assert set(tensors) == set(index["weight_map"]) == set(read_dir(out))
    transform = "fp8_block_128x128_ue8m0"
    for layer in MOE_LAYERS:
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = [n for e in range(EXPERTS) for n in expert_names(p, e)[:2]]
        down = [expert_names(p, e)[2] for e in range(EXPERTS)]
        for name, sources in ((f"{p}.{W13}", gate_up), (f"{p}.{W2}", down)):
            for t in (name, name + "_scale_inv"):
                assert tensors[t]["transform"] == transform, t
                assert tensors[t]["sources"] == sources, t
        shared = f"model.layers.{layer}.mlp.shared_experts.up_proj.weight"
        assert tensors[shared] == {
            "file": index["weight_map"][shared],
            "sources": [shared],
            "transform": transform,
        }
    for name in ("lm_head.weight", "model.layers.1.mlp.gate.weight", "model.layers.0.mlp.down_proj.weight"):
        assert tensors[name] == {"file": index["weight_map"][name], "sources": [name], "transform": "copy"}
    assert all(rec["file"] == index["weight_map"][t] for t, rec in tensors.items()), "the shard each went to"


@pytest.mark.parametrize(
    "opts", [(), ("--layout", "hf", "--scale-fmt", "ue8m0")], ids=["deepgemm-float", "hf-ue8m0"]
)
def test_rerun_is_byte_identical(src: Source, quantized: Runs, tmp_path: Path, opts: tuple[str, ...]) -> None:
    first = quantized(src, *opts)
    again = tmp_path / "again"
    moetool_ok("quantize", str(src.path), str(again), *opts)
    assert_same_weights(first, again)
    src.assert_unchanged()


SMALL_SHARD = "400KB"


def test_small_shards_and_index(src: Source, quantized: Runs) -> None:
    one = quantized(src, *fmt_opts("ue8m0"))
    many = quantized(src, *fmt_opts("ue8m0"), "--max-shard-size", SMALL_SHARD)
    files = weight_files(many)
    n = len(files)
    assert n >= 4
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((many / INDEX).read_text())
    total = 0
    seen: dict[str, str] = {}
    for f in files:
        with safe_open(many / f, "pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open is not a mapping)
                seen[name] = f
                t = h.get_tensor(name)
                total += t.numel() * t.element_size()
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total
    single = read_dir(one)
    split = read_dir(many)
    assert set(single) == set(split)
    for name in single:
        assert_bytes(split[name], single[name], name)
    assert json.loads((one / INDEX).read_text())["weight_map"] == dict.fromkeys(single, "model.safetensors")


def test_workers_give_the_same_bytes(src: Source, quantized: Runs, tmp_path: Path) -> None:
    """docs/contract.md §4: the bytes do not depend on how many workers wrote the shards."""
    opts = (*fmt_opts("ue8m0"), "--max-shard-size", SMALL_SHARD)
    out = tmp_path / "two"
    moetool_ok("quantize", str(src.path), str(out), *opts, "--devices", "cpu,cpu")
    assert_same_weights(quantized(src, *opts), out)
    src.assert_unchanged()


# -- FP8 and packed inputs --------------------------------------------------------------------------
def _fp8_weights(source: Source) -> list[str]:
    return sorted(n for n, t in source.tensors.items() if t.dtype == FP8)


def test_fp8_input_float_keeps_bytes(fp8_src: Source, quantized: Runs) -> None:
    assert tuple(fp8_src.tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape) == (
        2,
        5,
    )
    out_dir = quantized(fp8_src, *DG)
    out = read_dir(out_dir)
    for layer in MOE_LAYERS:
        p = f"model.layers.{layer}.mlp.experts"
        for e in range(EXPERTS):
            gate, up, down = expert_names(p, e)
            assert_bytes(out[f"{p}.{W13}"][e], torch.cat([fp8_src.tensors[gate], fp8_src.tensors[up]]), gate)
            assert_bytes(
                out[f"{p}.{W13S}"][e],
                torch.cat([fp8_src.tensors[gate + "_scale_inv"], fp8_src.tensors[up + "_scale_inv"]]),
                gate,
            )
            assert_bytes(out[f"{p}.{W2}"][e], fp8_src.tensors[down], down)
            assert_bytes(out[f"{p}.{W2S}"][e], fp8_src.tensors[down + "_scale_inv"], down)
    rest = [n for n in fp8_src.tensors if ".mlp.experts." not in n]
    for name in rest:
        assert_bytes(out[name], fp8_src.tensors[name], name)
    ignored = expected_ignored(fp8_src.config, {"expert", "shared_expert", "attention", "dense_mlp"})
    check_quantization_config(out_dir, fp8_src, ue8m0=False, layout="deepgemm", ignored=ignored)


def test_fp8_input_to_ue8m0_requantizes_from_float32(fp8_src: Source, quantized: Runs) -> None:
    out_dir = quantized(fp8_src, *fmt_opts("ue8m0"), "--layout", "hf")
    out = read_dir(out_dir)
    weights = _fp8_weights(fp8_src)
    requantized = 0
    for name in weights:
        q, s = fp8_src.tensors[name], fp8_src.tensors[name + "_scale_inv"]
        if not is_pow2(s):
            requantized += 1
        want_q, want_s = recipe(dequant(q, s), True) if not is_pow2(s) else (q, s)
        assert_bytes(out[name], want_q, name)
        assert_bytes(out[name + "_scale_inv"], want_s, name + "_scale_inv")
    assert requantized > len(weights) // 2, "the factory's FP8 scales should mostly not be powers of two"
    ignored = expected_ignored(fp8_src.config, {"expert", "shared_expert", "attention", "dense_mlp"})
    check_quantization_config(out_dir, fp8_src, ue8m0=True, layout="hf", ignored=ignored)
    fp8_src.assert_unchanged()


def test_fp8_input_with_fitting_ue8m0_scales_is_kept(src: Source, quantized: Runs) -> None:
    """An hf ue8m0 output fed back in: its power-of-two scales fit, so restacking keeps every byte, and
    the result equals quantizing the BF16 source straight to deepgemm ue8m0."""
    hf = Source(quantized(src, "--layout", "hf", *fmt_opts("ue8m0")))
    direct = quantized(src, *DG, *fmt_opts("ue8m0"))
    restacked = quantized(hf, *DG, *fmt_opts("ue8m0"))
    a, b = read_dir(direct), read_dir(restacked)
    assert set(a) == set(b)
    for name in a:
        assert_bytes(b[name], a[name], name)
    w13 = b[f"model.layers.2.mlp.experts.{W13}"]
    assert_bytes(w13[1, INTER:], hf.tensors["model.layers.2.mlp.experts.1.up_proj.weight"], "kept bytes")


@pytest.fixture(scope="session")
def packed_pairs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], tuple[Source, Source]]:
    made: dict[tuple[str, bool], tuple[Source, Source]] = {}

    def get(family: str, fp8: bool) -> tuple[Source, Source]:
        if (family, fp8) not in made:
            base = tmp_path_factory.mktemp(f"q_packed_{family}_{fp8}")
            dims = dict(
                num_layers=2, hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS, seed=3
            )
            if fp8 and family == "deepseek_v3":
                dims["config_overrides"] = _EIGHT_HEADS
            flat = make_checkpoint(family, base / "flat", fp8=fp8, **dims)
            packed = make_checkpoint(family, base / "packed", fp8=fp8, packed_experts=True, **dims)
            made[(family, fp8)] = (Source(flat), Source(packed))
        return made[(family, fp8)]

    return get


@pytest.mark.parametrize(
    ("family", "fp8", "opts"),
    [
        ("deepseek_v3", False, ()),
        ("deepseek_v3", False, ("--layout", "hf", "--scale-fmt", "ue8m0")),
        ("qwen3_moe", False, ("--scale-fmt", "ue8m0")),
        ("deepseek_v3", True, ("--scale-fmt", "ue8m0")),
    ],
)
def test_packed_experts_input_gives_the_same_output(
    packed_pairs: Callable, quantized: Runs, family: str, fp8: bool, opts: tuple[str, ...]
) -> None:
    flat, packed = packed_pairs(family, fp8)
    assert any(n.endswith("experts.gate_up_proj") for n in packed.tensors)
    assert_same_weights(quantized(flat, *opts), quantized(packed, *opts))


def test_packed_mixtral_is_read(packed_pairs: Callable, quantized: Runs) -> None:
    """transformers v5 saves packed Mixtral experts under ``mlp.experts`` (its in-memory block name)."""
    flat, packed = packed_pairs("mixtral", False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in packed.tensors
    a, b = read_dir(quantized(flat, *DG)), read_dir(quantized(packed, *DG))
    for layer in (0, 1):
        for t in DEEPGEMM_LEAVES.values():
            assert_bytes(
                b[f"model.layers.{layer}.mlp.experts.{t}"],
                a[f"model.layers.{layer}.block_sparse_moe.experts.{t}"],
                t,
            )


# -- SM100 scales -----------------------------------------------------------------------------------
def sm100_storage(s: torch.Tensor, mn: int) -> torch.Tensor:
    """The stored SM100 buffer int32 ``[PK, align(mn, 4)]`` for power-of-two scales ``s [ceil(mn/128), SK]``:
    byte j of word (p, r) is the exponent byte of row r's scale for K block 4p + j (zero past SK and
    for rows >= mn)."""
    assert sys.byteorder == "little"
    sk = s.shape[1]
    pk, mn4 = cdiv(sk, 4), cdiv(mn, 4) * 4
    exps = ((s.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    rows = torch.zeros(mn4, pk * 4, dtype=torch.uint8)
    rows[:mn, :sk] = exps[torch.arange(mn) // BLOCK]
    return rows.view(mn4, pk, 4).permute(1, 0, 2).contiguous().view(torch.int32).view(pk, mn4)


def test_sm100_scale_layout(src: Source, quantized: Runs) -> None:
    sm90 = read_dir(quantized(src, *DG, *fmt_opts("ue8m0")))
    sm100 = read_dir(quantized(src, *DG, *fmt_opts("ue8m0"), "--scale-layout", "sm100"))
    assert set(sm90) == set(sm100)
    for layer in MOE_LAYERS:
        p = f"model.layers.{layer}.mlp.experts"
        for tag, mn, k in (("w13", 2 * INTER, HIDDEN), ("w2", HIDDEN, INTER)):
            name = f"{p}.{DEEPGEMM_LEAVES[tag + '_weight']}"
            assert_bytes(sm100[name], sm90[name], name)
            stored, ref = (
                sm100[f"{p}.{DEEPGEMM_LEAVES[tag + '_weight_scale_inv']}"],
                sm90[f"{p}.{DEEPGEMM_LEAVES[tag + '_weight_scale_inv']}"],
            )
            sk = cdiv(k, BLOCK)
            assert stored.dtype == torch.int32
            assert tuple(stored.shape) == (EXPERTS, cdiv(sk, 4), cdiv(mn, 4) * 4)
            for e in range(EXPERTS):
                assert_bytes(
                    stored[e],
                    sm100_storage(ref[e], mn),
                    f"{p}.{DEEPGEMM_LEAVES[tag + '_weight_scale_inv']}[{e}]",
                )
                view = sm100_scales_from_storage(stored[e], mn)
                assert view.stride(-2) == 1, "DeepGEMM's SM100 scales are MN-major"
                assert_bytes(unpack_sm100_scales_ref(view, mn, k), ref[e], f"unpacked {p}.{tag}[{e}]")
    for name in sm90:
        if not name.endswith((f".experts.{W13S}", f".experts.{W2S}")):
            assert_bytes(sm100[name], sm90[name], name)


# -- resume -----------------------------------------------------------------------------------------
def test_resume_recomputes_only_missing_shards(
    src: Source,
    quantized: Runs,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opts = (*fmt_opts("ue8m0"), "--max-shard-size", SMALL_SHARD)
    reference = quantized(src, *opts)
    n = len(weight_files(reference))
    import moetool.pipeline as pipeline

    real = pipeline.write_shard
    calls = {"n": 0}

    def interrupted(*args: object, **kwargs: object) -> tuple[str, int]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "write_shard", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(src.path), str(out), *opts, "-q"])
    assert exc.value.code != 0
    capsys.readouterr()
    monkeypatch.setattr(pipeline, "write_shard", real)
    partial = tmp_path / "out.partial"
    assert not out.exists() and partial.is_dir()
    finished = weight_files(partial)
    assert len(finished) == 2 < n

    copy = tmp_path / "copy"
    shutil.copytree(partial, tmp_path / "copy.partial")
    (tmp_path / "copy.partial" / finished[0]).unlink()
    report = moetool_ok("quantize", str(src.path), str(copy), *opts, "--resume")
    assert report["reused_shards"] == [finished[1]]
    assert_same_weights(reference, copy)

    report = moetool_ok("quantize", str(src.path), str(out), *opts, "--resume")
    assert report["reused_shards"] == finished
    assert_same_weights(reference, out)
    assert not partial.exists()
    src.assert_unchanged()


# -- errors -----------------------------------------------------------------------------------------
def test_deepgemm_needs_intermediate_multiple_of_128(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = Source(
        make_checkpoint(
            "qwen3_moe",
            tmp_path / "q96",
            num_layers=1,
            hidden_size=256,
            moe_intermediate_size=96,
            num_experts=4,
            seed=2,
        )
    )
    out = tmp_path / "out"
    line = moetool_fails(capsys, "quantize", str(source.path), str(out), *DG)
    assert "moe_intermediate_size" in line and "96" in line and "--layout hf" in line
    assert_no_output(out)
    source.assert_unchanged()
    # the hf layout takes it, on ceil grids
    moetool_ok("quantize", str(source.path), str(out), "--layout", "hf")
    got = read_dir(out)
    name = "model.layers.0.mlp.experts.2.down_proj.weight"
    assert tuple(got[name + "_scale_inv"].shape) == (2, 1)
    for n in (name, "model.layers.0.mlp.experts.3.gate_proj.weight"):
        q, s = recipe(source.tensors[n], False)
        assert_bytes(got[n], q, n)
        assert_bytes(got[n + "_scale_inv"], s, n)


@pytest.mark.parametrize(("value", "layout"), [(float("nan"), "deepgemm"), (float("-inf"), "hf")])
def test_non_finite_weight_is_refused(
    src: Source, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: float, layout: str
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(src.path, bad)
    name = "model.layers.2.mlp.experts.3.down_proj.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[name][530, 100] = value  # row block 4 (the ragged one), column block 0

    rewrite(bad, poison)
    source = Source(bad)
    out = tmp_path / "out"
    line = moetool_fails(capsys, "quantize", str(bad), str(out), "--layout", layout)
    assert name in line
    assert "row block 4" in line and "column block 0" in line
    assert_no_output(out)
    source.assert_unchanged()


@pytest.mark.parametrize("opts", [("--scale-layout", "sm100"), ("--scale-layout", "sm100", "--layout", "hf")])
def test_sm100_needs_ue8m0_deepgemm(
    src: Source, tmp_path: Path, capsys: pytest.CaptureFixture[str], opts: tuple[str, ...]
) -> None:
    out = tmp_path / "out"
    line = moetool_fails(capsys, "quantize", str(src.path), str(out), *opts)
    assert "ue8m0" in line
    assert_no_output(out)
    src.assert_unchanged()


# -- GPU: the same bytes whichever device computed them (docs/contract.md §4) -----------------------------------
def _gpu_cases() -> Iterator[tuple[str, ...]]:
    yield DG
    yield (*DG, "--scale-fmt", "ue8m0")
    yield (*DG, "--scale-fmt", "ue8m0", "--scale-layout", "sm100")
    yield ("--layout", "hf", "--targets", "linear")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "opts", list(_gpu_cases()), ids=lambda o: "-".join(x.lstrip("-") for x in o) or "default"
)
def test_cuda_output_equals_cpu(src: Source, fp8_src: Source, tmp_path: Path, opts: tuple[str, ...]) -> None:
    for i, source in enumerate((src, fp8_src)):
        cpu, gpu = tmp_path / f"cpu{i}", tmp_path / f"gpu{i}"
        moetool_ok("quantize", str(source.path), str(cpu), *opts, "--device", "cpu")
        moetool_ok("quantize", str(source.path), str(gpu), *opts, "--device", "cuda")
        assert_same_weights(cpu, gpu)
