"""``moetool validate`` can pass and can fail (docs/contract.md §9), on the torch references (``--device cpu``).

Clean conversions (quantize in both layouts and scale formats, quantize then fuse-shared with 1 and 2
replicas, fuse-shared on BF16) of six families pass with every check PASS. Then each planted defect —
a flipped FP8 byte, two swapped experts, a scale one ulp off, a dropped fused slot, a mixed-up
shared-expert weight, a missing tensor, a changed non-expert tensor, an unrelated original, a
manifest that does not match its files, a k-first SSM state labelled k-last — makes ``validate`` exit 1
with the output and the ``--report`` JSON naming the culprit. Defects are planted in copies of the
converted folder at byte offsets read from the safetensors header; where only the content checks may
catch a defect, ``moetool.json``'s recorded sha256 is re-computed after the edit.

Checkpoints are tiny (hidden 256, moe_intermediate 128: the smallest that DeepGEMM's 128-blocks
allow, 4 routed experts) and built once per session: Qwen2-MoE (Qwen1.5-like, a 4·I gated shared
expert) by transformers' own classes, the other families by ``moetool.testing.factory``.
``tests/test_validate_gpu.py`` reuses these helpers with ``--device cuda``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import struct
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moetool.cli.main import main
from moetool.io import read_header
from moetool.ssm import StateMeta, conv_state_name, recurrent_state_name, slot_ids_name, write_state_file
from moetool.testing.factory import DEEPGEMM_LEAVES, experts_prefix, make_checkpoint, moe_layers

W13, W13S, W2, W2S = DEEPGEMM_LEAVES.values()  # the deepgemm layout's stacked tensors under P

HIDDEN = 256
INTER = 128
EXPERTS = 4
TOKENS = 8
MANIFEST = "moetool.json"
INDEX = "model.safetensors.index.json"
SHARD = "model.safetensors"
CHECK_KEYS = {"group", "scope", "metric", "value", "threshold", "passed", "detail"}


# -- models and conversions -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One source model: its family, maker and the dimensions beyond HIDDEN/INTER/EXPERTS."""

    family: str
    num_layers: int
    shared: int | None  # n_shared_experts (DeepSeek/GLM) or shared_expert_intermediate_size (Qwen)
    has_shared: bool


MODELS: dict[str, ModelSpec] = {
    # three layers: dense layer 0, MoE layers 1 and 2 (the --layers tests need two MoE layers)
    "deepseek_v3": ModelSpec("deepseek_v3", 3, None, True),
    # DeepSeek-V2-Lite-like: two shared experts, two fused slots
    "deepseek_v2": ModelSpec("deepseek_v2", 2, 2, True),
    # Qwen1.5-MoE-like: shared expert of 4·I, gated by sigmoid(x · shared_expert_gate)
    "qwen2_moe": ModelSpec("qwen2_moe", 2, 4 * INTER, True),
    "qwen3_moe": ModelSpec("qwen3_moe", 2, None, False),
    "mixtral": ModelSpec("mixtral", 2, None, False),
    "glm4_moe": ModelSpec("glm4_moe", 2, None, True),
}
#: Families built by transformers' ``from_config`` + ``save_pretrained`` rather than the factory.
HF_MADE = ("qwen2_moe",)

Step = tuple[str, ...]
QUANTIZE: dict[str, Step] = {
    f"{layout}-{fmt}": ("quantize", "--layout", layout, "--scale-fmt", fmt)
    for layout in ("deepgemm", "hf")
    for fmt in ("float", "ue8m0")
}
CONVERSIONS: dict[str, tuple[Step, ...]] = {name: (step,) for name, step in QUANTIZE.items()}
FUSIONS: dict[str, tuple[Step, ...]] = {
    "deepgemm-float+fuse-r1": (QUANTIZE["deepgemm-float"], ("fuse-shared", "--replicas", "1")),
    "deepgemm-ue8m0+fuse-r2": (QUANTIZE["deepgemm-ue8m0"], ("fuse-shared", "--replicas", "2")),
    "hf-float+fuse-r2": (QUANTIZE["hf-float"], ("fuse-shared", "--replicas", "2")),
    "hf-ue8m0+fuse-r1": (QUANTIZE["hf-ue8m0"], ("fuse-shared", "--replicas", "1")),
    "bf16+fuse-r1": (("fuse-shared", "--replicas", "1"),),
}
CONVERSIONS.update(FUSIONS)


def clean_cases() -> list[tuple[str, str]]:
    """(family, conversion) pairs: every quantization for every family, every fusion where there is a
    shared expert to fuse."""
    return [
        (family, conv)
        for family, spec in MODELS.items()
        for conv in CONVERSIONS
        if spec.has_shared or conv not in FUSIONS
    ]


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    report: dict[str, Any] | None


def moetool(*args: str) -> Outcome:
    """The real entry point (its one error funnel and exit codes), stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return Outcome(code, out.getvalue(), err.getvalue(), None)


def run_ok(*args: str) -> None:
    res = moetool(*args, "-q")
    assert res.code == 0, f"moetool {' '.join(map(str, args))}: exit {res.code}\n{res.out}\n{res.err}"


class Workspace:
    """Session store of source checkpoints and their conversions, each built once on first use."""

    def __init__(
        self, root: Path, device: str, hf_made: tuple[str, ...] = HF_MADE, tokens: int = TOKENS
    ) -> None:
        self.root, self.device, self.hf_made, self.tokens = root, device, hf_made, tokens
        self._n = 0

    def source(self, family: str, seed: int = 0) -> Path:
        path = self.root / f"{family}-seed{seed}"
        if not path.exists():
            spec = MODELS[family]
            dims = {
                "num_layers": spec.num_layers,
                "hidden_size": HIDDEN,
                "moe_intermediate_size": INTER,
                "num_experts": EXPERTS,
                "top_k": 2,
                "shared": spec.shared,
                "seed": seed,
            }
            if family in self.hf_made:
                from moetool.testing.hf_models import make_hf_checkpoint

                make_hf_checkpoint(family, path, **dims)
            else:
                make_checkpoint(family, path, **dims)
        return path

    def converted(self, family: str, conversion: str, seed: int = 0) -> Path:
        path = self.source(family, seed)
        for step in CONVERSIONS[conversion]:
            out = path.with_name(path.name + "." + "_".join(s.lstrip("-") for s in step))
            if not out.exists():
                run_ok(*step, path, out, "--device", self.device)
            path = out
        return path

    def scratch(self, name: str) -> Path:
        self._n += 1
        return self.root / f"scratch-{self._n}-{name}"

    def copy(self, path: Path) -> Path:
        dst = self.scratch(path.name)
        shutil.copytree(path, dst)
        return dst

    def validate(self, original: Path, converted: Path, *opts: str) -> Outcome:
        """``moetool validate`` with ``--report``; the report is loaded (JSON) unless it exited 2."""
        report = self.scratch("report.json")
        # on CUDA the Triton path (``--backend auto`` may pick DeepGEMM: tests/test_deepgemm_gpu.py)
        backend = () if self.device == "cpu" else ("--backend", "triton")
        res = moetool(
            "validate", original, converted, "--device", self.device, "--tokens", str(self.tokens),
            "--report", report, *backend, *opts,
        )  # fmt: skip
        if res.code in (0, 1):
            assert report.is_file(), f"exit {res.code} but no --report file\n{res.out}\n{res.err}"
            res.report = json.loads(report.read_text())
            # the checks ran where they were asked to: torch references on the CPU, Triton on CUDA
            assert res.report["device"].split(":")[0] == self.device.split(":")[0], res.report["device"]
            assert res.report["backend"] == ("torch" if self.device == "cpu" else "triton")
        return res


@pytest.fixture(scope="session")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("validate"), "cpu")


# -- reading the result -----------------------------------------------------------------------------
def table_rows(stdout: str) -> list[list[str]]:
    """The rows of the printed check table (cells split on runs of 2+ spaces)."""
    lines = stdout.splitlines()
    sep = next(i for i, line in enumerate(lines) if line.startswith("---"))
    rows = []
    for line in lines[sep + 1 :]:
        if line.startswith(("FAIL ", "PASSED", "FAILED")):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def assert_consistent(res: Outcome) -> None:
    """The --report JSON lists every check with its metric, value, threshold and verdict, and agrees
    with the printed table, the summary line and the exit code."""
    rep = res.report
    assert rep is not None
    assert isinstance(rep["checks"], list) and rep["checks"], rep
    for c in rep["checks"]:
        assert set(c) >= CHECK_KEYS, c
        assert isinstance(c["passed"], bool), c
        assert isinstance(c["metric"], str) and c["metric"], c
        assert isinstance(c["threshold"], str) and c["threshold"], c
        assert c["value"] is not None and str(c["value"]) != "", c
        if not c["passed"]:
            assert c["detail"], f"a failed check names nothing: {c}"
    assert rep["passed"] == all(c["passed"] for c in rep["checks"])
    assert rep["passed"] == (res.code == 0), (res.code, rep["passed"])
    rows = table_rows(res.out)
    assert len(rows) == len(rep["checks"]), res.out
    for row, c in zip(rows, rep["checks"]):
        assert row[0] == c["group"] and row[1] == c["scope"], (row, c)
        assert row[-1] == ("PASS" if c["passed"] else "FAIL"), (row, c)
    n_ok = sum(c["passed"] for c in rep["checks"])
    summary = res.out.strip().splitlines()[-1]
    assert summary.startswith(f"{'PASSED' if rep['passed'] else 'FAILED'}: {n_ok}/{len(rep['checks'])}")


def checks(res: Outcome, group: str | None = None) -> list[dict[str, Any]]:
    assert res.report is not None
    return [c for c in res.report["checks"] if group is None or c["group"] == group]


def layer_scopes(res: Outcome, group: str) -> set[str]:
    return {c["scope"] for c in checks(res, group) if c["scope"].startswith("layer ")}


def assert_passes(res: Outcome, layers: list[int], *, fp8: bool) -> None:
    assert res.code == 0, f"exit {res.code}\n{res.out}\n{res.err}"
    assert_consistent(res)
    failed = [c for c in checks(res) if not c["passed"]]
    assert not failed, failed
    groups = {c["group"] for c in checks(res)}
    assert groups == {"structure", "tensors", "moe"} | ({"kernels"} if fp8 else set()), groups
    want = {f"layer {n}" for n in layers}
    for group in ("tensors", "moe", *(("kernels",) if fp8 else ())):
        assert layer_scopes(res, group) == want, (group, layer_scopes(res, group))
    assert any(c["scope"] == "files" for c in checks(res, "structure")), "no sha256 check ran"


def assert_fails(res: Outcome, culprit: str, groups: tuple[str, ...] = ()) -> None:
    """Exit 1; a failed check, a FAIL line on stdout and the --report name ``culprit``; each group in
    ``groups`` has a failed check naming it."""
    assert res.code == 1, f"exit {res.code}, expected 1\n{res.out}\n{res.err}"
    assert_consistent(res)
    failed = [c for c in checks(res) if not c["passed"]]
    assert any(culprit in c["detail"] for c in failed), f"no failed check names {culprit}: {failed}"
    fail_lines = [line for line in res.out.splitlines() if line.startswith("FAIL ")]
    assert any(culprit in line for line in fail_lines), f"no FAIL line names {culprit}:\n{res.out}"
    for group in groups:
        assert any(c["group"] == group and culprit in c["detail"] for c in failed), (
            f"no failed {group} check names {culprit}: {failed}"
        )


def passed(res: Outcome, group: str, scope: str | None = None) -> bool:
    sel = [c for c in checks(res, group) if scope is None or c["scope"] == scope]
    assert sel, f"no {group} {scope or ''} check in the report"
    return all(c["passed"] for c in sel)


# -- planting defects -------------------------------------------------------------------------------
def config_of(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def tensor_at(folder: Path, name: str) -> tuple[Path, int, int, str, tuple[int, ...]]:
    """(shard, absolute byte offset, nbytes, dtype, shape) of ``name``, from the safetensors header."""
    for shard in sorted(folder.glob("*.safetensors")):
        info = read_header(shard).tensors.get(name)
        if info is not None:
            return shard, info.offset, info.nbytes, info.dtype, info.shape
    raise AssertionError(f"{name} is in no shard of {folder}")


def element_offset(shape: tuple[int, ...], index: tuple[int, ...], itemsize: int) -> int:
    flat = 0
    for dim, i in zip(shape, index):
        assert 0 <= i < dim
        flat = flat * dim + i
    return flat * itemsize


def read_bytes(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def write_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_fp8_byte(folder: Path, name: str, index: tuple[int, ...]) -> None:
    """Flip the lowest mantissa bit of one F8_E4M3 element (the next bit when that would make NaN)."""
    shard, off, _, dtype, shape = tensor_at(folder, name)
    assert dtype == "F8_E4M3", dtype
    pos = off + element_offset(shape, index, 1)
    (b,) = read_bytes(shard, pos, 1)
    nb = b ^ 0x01 if (b ^ 0x01) & 0x7F != 0x7F else b ^ 0x02
    write_bytes(shard, pos, bytes([nb]))


def swap_experts(folder: Path, name: str, a: int, b: int) -> None:
    """Exchange experts ``a`` and ``b`` (dim 0) of a stacked tensor in place. Weights must differ, or
    the swap would be invisible; scales may be equal (UE8M0 scales of like experts usually are)."""
    shard, off, nbytes, dtype, shape = tensor_at(folder, name)
    per = nbytes // shape[0]
    xa, xb = read_bytes(shard, off + a * per, per), read_bytes(shard, off + b * per, per)
    assert dtype == "F32" or xa != xb, f"{name}: experts {a} and {b} are identical"
    write_bytes(shard, off + a * per, xb)
    write_bytes(shard, off + b * per, xa)


def swap_tensors(folder: Path, x: str, y: str) -> None:
    """Exchange the bytes of two tensors of one dtype and shape."""
    sx, ox, nx, dx, shx = tensor_at(folder, x)
    sy, oy, ny, dy, shy = tensor_at(folder, y)
    assert (nx, dx, shx) == (ny, dy, shy)
    bx, by = read_bytes(sx, ox, nx), read_bytes(sy, oy, ny)
    assert dx == "F32" or bx != by, f"{x} and {y} are identical"
    write_bytes(sx, ox, by)
    write_bytes(sy, oy, bx)


def bump_scale(folder: Path, name: str, index: tuple[int, ...]) -> None:
    """One F32 scale up by one ulp (its bit pattern + 1)."""
    shard, off, _, dtype, shape = tensor_at(folder, name)
    assert dtype == "F32", dtype
    pos = off + element_offset(shape, index, 4)
    (bits,) = struct.unpack("<I", read_bytes(shard, pos, 4))
    write_bytes(shard, pos, struct.pack("<I", bits + 1))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refresh_manifest(folder: Path) -> None:
    """Re-record every listed file's sha256 and size, so that only the content checks can see an edit."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for rel in manifest["files"]:
        p = folder / rel
        manifest["files"][rel] = {"sha256": sha256(p), "size": p.stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def rewrite_shard(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply ``edit`` to the tensors of a single-shard checkpoint, keep its header metadata, and make
    the index list what the shard now holds."""
    path = folder / SHARD
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    index_path = folder / INDEX
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = dict.fromkeys(sorted(tensors), SHARD)
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    cfg = config_of(folder)
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def down_proj_name(cfg: dict[str, Any], layer: int, layout: str, e: int) -> str:
    """The converted tensor holding expert ``e``'s down_proj: stacked ``down_proj`` or per-expert."""
    prefix = experts_prefix(cfg, layer)
    return f"{prefix}.{W2}" if layout == "deepgemm" else f"{prefix}.{e}.down_proj.weight"


# -- clean conversions pass -------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "conversion"), clean_cases())
def test_clean_conversion_passes(ws: Workspace, family: str, conversion: str) -> None:
    orig = ws.source(family)
    conv = ws.converted(family, conversion)
    res = ws.validate(orig, conv)
    assert_passes(res, moe_layers(config_of(orig)), fp8=not conversion.startswith("bf16"))
    fused = config_of(conv).get("moetool_fused_shared_experts")
    assert (fused is not None) == ("fuse" in conversion)
    if fused:
        total = EXPERTS + fused["num_slots"] * fused["replicas"]
        for c in checks(res, "tensors"):
            if c["scope"].startswith("layer "):
                assert c["metric"].startswith(f"{total} experts"), c  # the fused slots were compared too


# -- every check can fail ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
def test_flipped_expert_byte_fails(ws: Workspace, layout: str) -> None:
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", f"{layout}-float"))
    cfg = config_of(conv)
    name = down_proj_name(cfg, 2, layout, e=2)
    flip_fp8_byte(conv, name, (2, 100, 50) if layout == "deepgemm" else (100, 50))
    res = ws.validate(orig, conv)
    assert_fails(res, name, groups=("tensors",))
    assert_fails(res, SHARD, groups=("structure",))  # the recorded sha256 no longer matches
    assert passed(res, "tensors", "layer 1")  # the other layer is untouched


@pytest.mark.parametrize(
    ("source", "conversion", "defect"),
    [
        ("bf16", "deepgemm-float", None),
        ("bf16", "hf-float", None),
        ("bf16", "deepgemm-float", "flip"),
        ("bf16", "hf-float", "flip"),
        ("bf16", "deepgemm-float+fuse-r1", None),
        ("fp8", "deepgemm-float", None),  # the original's bytes kept
        ("fp8", "deepgemm-ue8m0", None),  # requantized to power-of-two scales
        ("fp8", "deepgemm-ue8m0", "flip"),
        ("fp8", "deepgemm-float", "nan-scale"),  # a corrupt original: refused, exit 2
    ],
)
def test_stacked_experts_are_proven_at_once_with_the_same_report(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, source: str, conversion: str, defect: str | None
) -> None:
    """The tensors check applies the recipe to a layer's stacked originals at once and compares the
    stacks; only the first expert (its error statistics) and whatever that cannot prove (a fused slot,
    a mismatch, a corrupt original) go region by region. Whatever it proves, the outcome is the one
    the region-by-region path makes: the whole report, or the one-line error and exit 2."""
    from moetool.validate import tensors
    from moetool.validate.tensors import TensorsCheck

    layout = conversion.split("-")[0]
    if source == "bf16":
        orig = ws.source("deepseek_v3")
        conv = ws.converted("deepseek_v3", conversion)
    else:  # a block-FP8 original (as released), converted again
        orig = ws.converted("deepseek_v3", "hf-float")
        conv = ws.scratch(f"from-fp8-{conversion}")
        run_ok(*QUANTIZE[conversion], orig, conv, "--device", ws.device)
    if defect == "flip":
        conv = ws.copy(conv)
        name = down_proj_name(config_of(conv), 2, layout, e=2)
        flip_fp8_byte(conv, name, (2, 100, 50) if layout == "deepgemm" else (100, 50))
    elif defect == "nan-scale":
        orig = ws.copy(orig)
        shard, off, _, dtype, shape = tensor_at(
            orig, down_proj_name(config_of(orig), 2, "hf", e=2) + "_scale_inv"
        )
        assert dtype == "F32", dtype
        write_bytes(shard, off + element_offset(shape, (1, 0), 4), struct.pack("<f", float("nan")))
    proven = spy_on_stack_proofs(monkeypatch)
    if defect:  # one expert per stack: the proof stops at the stack holding the defect
        monkeypatch.setattr(tensors, "STACK_BYTES", 1)
    fast = ws.validate(orig, conv)
    monkeypatch.setattr(TensorsCheck, "_stacks_equal", lambda *args: set())
    slow = ws.validate(orig, conv)
    want_code = {None: 0, "flip": 1, "nan-scale": 2}[defect]
    assert fast.code == slow.code == want_code, (fast.out, fast.err)
    if want_code == 2:
        assert fast.err == slow.err and "experts.2.down_proj" in fast.err and "is NaN" in fast.err, fast.err
    else:
        assert checks(fast) == checks(slow)
    # layers 1 and 2: experts 1-3 proven (never the fused slots); in the layer with the defect (expert
    # 2) only what came before it
    assert proven == [{1, 2, 3}, {1} if defect else {1, 2, 3}], proven


def spy_on_stack_proofs(monkeypatch: pytest.MonkeyPatch) -> list[set[int]]:
    """The experts the tensors check proves stack against stack, one set per call, as validate runs."""
    from moetool.validate.tensors import TensorsCheck

    proven: list[set[int]] = []
    stacks_equal = TensorsCheck._stacks_equal

    def spy(self: TensorsCheck, *args: Any) -> set[int]:
        proven.append(stacks_equal(self, *args))
        return proven[-1]

    monkeypatch.setattr(TensorsCheck, "_stacks_equal", spy)
    return proven


def swap_whole_experts(folder: Path, layer: int, layout: str, a: int, b: int) -> str:
    """Exchange experts ``a`` and ``b`` of one layer (every weight and scale); returns the tensor a
    report must name first (expert a's gate/up weights)."""
    prefix = experts_prefix(config_of(folder), layer)
    if layout == "deepgemm":
        for name in DEEPGEMM_LEAVES.values():
            swap_experts(folder, f"{prefix}.{name}", a, b)
        return f"{prefix}.{W13}"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for suffix in ("weight", "weight_scale_inv"):
            swap_tensors(folder, f"{prefix}.{a}.{proj}.{suffix}", f"{prefix}.{b}.{proj}.{suffix}")
    return f"{prefix}.{a}.gate_proj.weight"


@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
def test_swapped_experts_fail(ws: Workspace, layout: str) -> None:
    """Experts 0 and 1 exchanged whole (weights with their scales), sha256 re-recorded. (The MoE check
    is not required to see it: with DeepSeek-V3's grouped top-k over 4 experts, 0 and 1 form one group
    and are always picked together, so an exact swap only moves their near-equal routing weights.)"""
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", f"{layout}-float"))
    culprit = swap_whole_experts(conv, 1, layout, 0, 1)
    refresh_manifest(conv)
    res = ws.validate(orig, conv)
    assert passed(res, "structure"), checks(res, "structure")  # only the content checks can see it
    assert_fails(res, culprit, groups=("tensors",))
    assert_fails(res, experts_prefix(config_of(conv), 1), groups=("kernels",))
    (kernels,) = [c for c in checks(res, "kernels") if c["scope"] == "layer 1"]
    named = set(re.findall(r"expert (\d+) \(", kernels["detail"]))
    assert named == {"0", "1"}, kernels  # the kernels check names the two experts, and only them
    assert passed(res, "tensors", "layer 2") and passed(res, "kernels", "layer 2")


@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
def test_scale_one_ulp_off_fails(ws: Workspace, layout: str) -> None:
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", f"{layout}-float"))
    cfg = config_of(conv)
    prefix = experts_prefix(cfg, 1)
    if layout == "deepgemm":
        culprit = f"{prefix}.{W13S}"
        bump_scale(conv, culprit, (1, 1, 0))  # expert 1, first up block
    else:
        culprit = f"{prefix}.1.up_proj.weight_scale_inv"
        bump_scale(conv, culprit, (0, 1))
    refresh_manifest(conv)
    res = ws.validate(orig, conv)
    assert passed(res, "structure"), checks(res, "structure")
    assert_fails(res, culprit, groups=("tensors",))


def _drop_last_slot(conv: Path, layer: int) -> None:
    cfg = config_of(conv)
    prefix = experts_prefix(cfg, layer)

    def drop(t: dict[str, torch.Tensor]) -> None:
        for name in DEEPGEMM_LEAVES.values():
            t[f"{prefix}.{name}"] = t[f"{prefix}.{name}"][:-1].clone()

    rewrite_shard(conv, drop)


def test_dropped_fused_slot_fails(ws: Workspace) -> None:
    """DeepSeek-V2-Lite-like: 2 shared experts make 2 slots; one is dropped and the config made to
    agree (1 slot), so the checkpoint is self-consistent but no longer holds the whole shared expert."""
    orig = ws.source("deepseek_v2")
    conv = ws.copy(ws.converted("deepseek_v2", "deepgemm-float+fuse-r1"))
    fused = config_of(conv)["moetool_fused_shared_experts"]
    assert fused["num_slots"] == 2 and fused["first_slot"] == EXPERTS
    _drop_last_slot(conv, 1)
    edit_config(conv, lambda c: c["moetool_fused_shared_experts"].update(num_slots=1))
    refresh_manifest(conv)
    res = ws.validate(orig, conv)
    assert res.code == 1, f"exit {res.code}\n{res.out}\n{res.err}"
    structure = [c for c in checks(res, "structure") if not c["passed"]]
    assert structure, "the structure check did not see the dropped slot"
    prefix = experts_prefix(config_of(conv), 1)
    assert any("moetool_fused_shared_experts" in c["detail"] or prefix in c["detail"] for c in structure), (
        structure
    )
    assert_fails(res, prefix, groups=("moe",))


def test_dropped_fused_slot_with_stale_config_fails(ws: Workspace) -> None:
    """A slot dropped and the config left saying 2 slots: a mismatch validate must report (exit 1,
    naming the experts tensor), not refuse as unreadable input."""
    orig = ws.source("deepseek_v2")
    conv = ws.copy(ws.converted("deepseek_v2", "deepgemm-float+fuse-r1"))
    _drop_last_slot(conv, 1)
    refresh_manifest(conv)
    res = ws.validate(orig, conv)
    assert_fails(res, experts_prefix(config_of(conv), 1))


def test_mixed_up_shared_expert_weight_fails(ws: Workspace) -> None:
    """Qwen2-MoE's fused slots weigh sigmoid(x · shared_expert_gate); a config saying "one" makes every
    consumer add the shared expert at the wrong weight."""
    orig = ws.source("qwen2_moe")
    conv = ws.copy(ws.converted("qwen2_moe", "deepgemm-float+fuse-r1"))
    fused = config_of(conv)["moetool_fused_shared_experts"]
    assert fused["slot_weight"] == "sigmoid_gate" and fused["num_slots"] == 4
    edit_config(conv, lambda c: c["moetool_fused_shared_experts"].update(slot_weight="one"))
    refresh_manifest(conv)
    res = ws.validate(orig, conv)
    assert_fails(res, "slot_weight", groups=("structure",))
    for layer in moe_layers(config_of(orig)):
        assert_fails(res, experts_prefix(config_of(orig), layer), groups=("moe",))


def test_missing_tensor_fails(ws: Workspace) -> None:
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", "deepgemm-float"))
    name = "model.layers.0.self_attn.o_proj.weight"
    rewrite_shard(conv, lambda t: t.pop(name))
    refresh_manifest(conv)
    res = ws.validate(orig, conv)
    assert_fails(res, name, groups=("structure",))


def test_changed_non_expert_tensor_fails(ws: Workspace) -> None:
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", "deepgemm-ue8m0"))
    name = "model.layers.0.self_attn.o_proj.weight"
    shard, off, _, dtype, shape = tensor_at(conv, name)
    assert dtype == "BF16"
    pos = off + element_offset(shape, (3, 17), 2)  # low byte of a little-endian bf16: a mantissa bit
    (b,) = read_bytes(shard, pos, 1)
    write_bytes(shard, pos, bytes([b ^ 0x01]))
    refresh_manifest(conv)
    res = ws.validate(orig, conv)
    assert passed(res, "structure")
    assert_fails(res, name, groups=("tensors",))
    assert all(passed(res, g, f"layer {n}") for g in ("tensors", "kernels", "moe") for n in (1, 2))


def test_unrelated_checkpoints_fail(ws: Workspace) -> None:
    """A conversion of another seed's checkpoint is no conversion of this one."""
    orig = ws.source("deepseek_v3", seed=0)
    conv = ws.converted("deepseek_v3", "deepgemm-float", seed=1)
    res = ws.validate(orig, conv)
    cfg = config_of(orig)
    for layer in moe_layers(cfg):
        assert_fails(res, experts_prefix(cfg, layer), groups=("tensors", "kernels", "moe"))
    assert not passed(res, "tensors", "other tensors")


@pytest.mark.parametrize("how", ["sha256", "tensor-list", "other-conversion"])
def test_manifest_not_matching_files_fails(ws: Workspace, how: str) -> None:
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", "deepgemm-float"))
    manifest = json.loads((conv / MANIFEST).read_text())
    culprit = SHARD
    if how == "sha256":
        manifest["files"][SHARD]["sha256"] = hashlib.sha256(b"another file").hexdigest()
    elif how == "tensor-list":
        culprit = f"{experts_prefix(config_of(conv), 2)}.{W2}"
        del manifest["tensors"][culprit]
    else:  # the shard of another conversion (ue8m0 scales) under this manifest
        shutil.copyfile(ws.converted("deepseek_v3", "deepgemm-ue8m0") / SHARD, conv / SHARD)
    (conv / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    res = ws.validate(orig, conv)
    assert_fails(res, culprit, groups=("structure",))


def test_unconverted_folder_has_no_manifest(ws: Workspace) -> None:
    """The original validated against a copy of itself: no moetool.json, so nothing says how it was made."""
    orig = ws.source("qwen3_moe")
    res = ws.validate(orig, ws.copy(orig))
    assert_fails(res, MANIFEST, groups=("structure",))


# -- sampling ---------------------------------------------------------------------------------------
def test_layers_restricts_the_checked_layers(ws: Workspace) -> None:
    orig = ws.source("deepseek_v3")
    conv = ws.copy(ws.converted("deepseek_v3", "deepgemm-float"))
    culprit = swap_whole_experts(conv, 1, "deepgemm", 0, 1)
    refresh_manifest(conv)

    outside = ws.validate(orig, conv, "--layers", "2")
    assert outside.code == 0, outside.out  # the defect lies outside the sampled layer
    assert_consistent(outside)
    for group in ("tensors", "kernels", "moe"):
        assert layer_scopes(outside, group) == {"layer 2"}, group

    inside = ws.validate(orig, conv, "--layers", "1")
    assert_fails(inside, culprit, groups=("tensors",))
    for group in ("tensors", "kernels", "moe"):
        assert layer_scopes(inside, group) == {"layer 1"}, group


def test_experts_and_tokens_sample(ws: Workspace) -> None:
    orig = ws.source("deepseek_v3")
    conv = ws.converted("deepseek_v3", "deepgemm-ue8m0+fuse-r2")  # 4 routed experts + 2 fused slots
    full = ws.validate(orig, conv)
    sampled = ws.validate(orig, conv, "--experts", "2", "--tokens", "5")
    assert full.code == 0 and sampled.code == 0, (full.out, sampled.out)
    assert_consistent(sampled)
    for c in checks(full, "tensors") + checks(full, "kernels"):
        if c["scope"].startswith("layer "):
            assert re.search(r"\b6 experts\b", c["metric"]), c
    for c in checks(sampled, "tensors") + checks(sampled, "kernels"):
        if c["scope"].startswith("layer "):
            assert re.search(r"\b4 experts\b", c["metric"]), c  # 2 sampled + both fused slots
    for group in ("kernels", "moe"):
        for c in checks(sampled, group):
            assert re.search(r"\b5 tokens\b", c["metric"]), c
        for c in checks(full, group):
            assert re.search(rf"\b{ws.tokens} tokens\b", c["metric"]), c


# -- usage errors: exit 2, one line -----------------------------------------------------------------
def _one_line_error(res: Outcome) -> str:
    assert res.code == 2, f"exit {res.code}, expected 2\n{res.out}\n{res.err}"
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.err, res.err
    assert res.report is None
    return lines[0]


@pytest.mark.parametrize("which", ["original", "converted"])
def test_missing_folder_is_a_usage_error(ws: Workspace, which: str) -> None:
    missing = ws.scratch("does-not-exist")
    orig, conv = ws.source("qwen3_moe"), ws.converted("qwen3_moe", "hf-float")
    res = ws.validate(missing, conv) if which == "original" else ws.validate(orig, missing)
    assert str(missing) in _one_line_error(res)


def test_different_families_are_a_mismatch(ws: Workspace) -> None:
    # not a conversion of that original: validate's finding (exit 1), naming both families
    res = ws.validate(ws.source("deepseek_v3"), ws.converted("qwen3_moe", "deepgemm-float"))
    assert res.code == 1, res.err
    assert "deepseek_v3" in res.out and "qwen3_moe" in res.out, res.out


def test_layers_that_are_not_moe_are_a_usage_error(ws: Workspace) -> None:
    orig = ws.source("deepseek_v3")
    res = ws.validate(orig, ws.converted("deepseek_v3", "deepgemm-float"), "--layers", "0")
    assert "0" in _one_line_error(res)


# -- SSM state files --------------------------------------------------------------------------------
SSM_H, SSM_HV, SSM_K = 2, 4, 32  # K = V: a mislabelled state has the right shape
SSM_LAYERS = (0, 2)
SSM_SEQ = 3
SSM_CONV_W = 4


def ssm_meta(layout: str = "k-first", pooled: bool = False) -> StateMeta:
    return StateMeta(
        layout=layout,  # type: ignore[arg-type]
        num_key_heads=SSM_H,
        num_value_heads=SSM_HV,
        head_k_dim=SSM_K,
        head_v_dim=SSM_K,
        pooled=pooled,
        model_type="qwen3_next",
    )


def k_first_state(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Recurrent states ``[N, HV, K, V]`` (k-first) and conv states ``[N, 2·H·K + HV·V, W]``."""
    gen = torch.Generator().manual_seed(seed)
    conv_dim = 2 * SSM_H * SSM_K + SSM_HV * SSM_K
    out = {}
    for layer in SSM_LAYERS:
        out[recurrent_state_name(layer)] = (
            torch.randn(SSM_SEQ, SSM_HV, SSM_K, SSM_K, generator=gen) * 0.5
        ).to(dtype)
        out[conv_state_name(layer)] = torch.randn(SSM_SEQ, conv_dim, SSM_CONV_W, generator=gen).to(dtype)
    return out


def mislabelled(tensors: dict[str, torch.Tensor], pooled: bool) -> dict[str, torch.Tensor]:
    """The same k-first bytes, as a k-last file would hold them (pooled: behind a zero null slot)."""
    if not pooled:
        return dict(tensors)
    out = {}
    for name, t in tensors.items():
        out[name] = torch.cat([torch.zeros_like(t[:1]), t])
    for layer in SSM_LAYERS:
        out[slot_ids_name(layer)] = torch.arange(1, SSM_SEQ + 1, dtype=torch.int32)
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pooled", [False, True], ids=["dense", "pooled"])
def test_k_first_state_labelled_k_last_fails(ws: Workspace, dtype: str, pooled: bool) -> None:
    orig, conv = ws.scratch("orig.safetensors"), ws.scratch("conv.safetensors")
    tensors = k_first_state(DTYPES[dtype])
    write_state_file(orig, tensors, ssm_meta("k-first"))
    write_state_file(conv, mislabelled(tensors, pooled), ssm_meta("k-last", pooled=pooled))
    res = ws.validate(orig, conv)
    for layer in SSM_LAYERS:
        assert_fails(res, recurrent_state_name(layer), groups=("ssm",))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pool", [False, True], ids=["dense", "pooled"])
def test_converted_state_passes(ws: Workspace, dtype: str, pool: bool) -> None:
    orig, conv = ws.scratch("orig.safetensors"), ws.scratch("conv.safetensors")
    write_state_file(orig, k_first_state(DTYPES[dtype], seed=1), ssm_meta("k-first"))
    run_ok("convert-ssm", orig, conv, "--to", "k-last", *(["--pool"] if pool else []))
    res = ws.validate(orig, conv)
    assert res.code == 0, f"exit {res.code}\n{res.out}\n{res.err}"
    assert_consistent(res)
    assert {c["scope"] for c in checks(res, "ssm")} == {f"layer {n}" for n in SSM_LAYERS}
    assert all(c["passed"] for c in checks(res))


def test_state_of_another_sequence_fails(ws: Workspace) -> None:
    """A correctly laid out k-last state that is not the original's state."""
    orig, other, conv = (ws.scratch(f"{n}.safetensors") for n in ("orig", "other", "conv"))
    write_state_file(orig, k_first_state(torch.float32, seed=2), ssm_meta("k-first"))
    write_state_file(other, k_first_state(torch.float32, seed=3), ssm_meta("k-first"))
    run_ok("convert-ssm", other, conv, "--to", "k-last", "--pool")
    res = ws.validate(orig, conv)
    assert_fails(res, recurrent_state_name(SSM_LAYERS[0]), groups=("ssm",))
