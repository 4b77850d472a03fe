"""``validate`` judges the right side, at any dimension, and what is declared as well as what is stored.

- Dimensions that are not multiples of 128 (I = H = 200; H = 192, I = 320; H = 200, I = 256 in the
  deepgemm layout): correct output passes every check, and a flipped byte still fails.
- Attribution: a defect in the converted checkpoint (an FP8 NaN byte, a NaN, zero or huge scale, a
  swapped expert) is exit 1 with a failed check naming the tensor or expert; only a corrupt original (a
  NaN, a weight so large its own layer overflows, an FP8 NaN byte) is exit 2, naming the original's
  tensor and file.
- Declarations: the refusal marker, ``weight_block_size``, ``quant_method``, ``fmt``,
  ``activation_scheme``, ``modules_to_not_convert``/``ignored_layers``, ``scale_fmt``, each shard's
  ``moetool.layout`` and moetool.json's ``layout`` must be true of the stored tensors (every case with
  the manifest's hashes recomputed, so only the declaration is wrong).
- moetool.json: malformed (not an object, ``files`` not a mapping, a record that is not one, a path out
  of the checkpoint, ``tensors`` not a mapping) is a failed check naming it, never an internal error; a
  checkpoint re-sharded by another tool is "not described" by it, and the tensors decide.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from reliability_helpers import (
    DIMS,
    FAMILY,
    INDEX,
    MANIFEST,
    hf_checkpoint,
    one_error_line,
    read_raw,
    run_cli,
    shards_of,
    weight_map,
    write_raw,
)
from safetensors.torch import load_file, save_file

from moetool.testing.factory import make_checkpoint

FAST = ["--device", "cpu", "--tokens", "16", "--json"]


def validate(orig: Path, conv: Path, *extra: str) -> tuple[int, list[dict[str, Any]], str]:
    """``validate --json``: exit code, the checks (empty when it exits with an error), stderr."""
    code, out, err = run_cli("validate", orig, conv, *FAST, *extra)
    body = json.loads(out) if out.strip() else {}
    return code, body.get("checks", []), err


def failed(checks: list[dict[str, Any]]) -> list[str]:
    return [f"{c['group']} {c['scope']}: {c['detail']}" for c in checks if not c["passed"]]


def refresh_manifest(conv: Path) -> None:
    """Record every file's current sha256 and size, as if moetool had written what is there now."""
    m = json.loads((conv / MANIFEST).read_text())
    for rel, rec in m["files"].items():
        p = conv / rel
        rec["sha256"], rec["size"] = hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size
    (conv / MANIFEST).write_text(json.dumps(m))


def quantized(orig: Path, out: Path, *flags: str) -> Path:
    code, _, err = run_cli("quantize", orig, out, "-q", *flags)
    assert code == 0, err
    return out


def edit_tensor(
    root: Path, pick: Callable[[str, torch.Tensor], bool], fn: Callable[[torch.Tensor], torch.Tensor]
) -> str:
    """Apply ``fn`` to the first tensor ``pick`` chooses (in name order); returns its name."""
    for shard in shards_of(root):
        tensors = load_file(root / shard)
        names = [n for n in sorted(tensors) if pick(n, tensors[n])]
        if names:
            meta = _metadata(root / shard)
            tensors[names[0]] = fn(tensors[names[0]].clone())
            save_file(tensors, root / shard, metadata=meta)
            return names[0]
    raise AssertionError("no tensor to edit")


def _metadata(path: Path) -> dict[str, str]:
    header, _ = read_raw(path)
    return header.get("__metadata__", {})


# -- 8. dimensions that are not multiples of 128 ---------------------------------------------------------
# (hf: dimensions whose ceil grids transformers refuses on CPU rather than misreads, which moetool refuses
# to write in the hf layout; see moetool.engines.transformers_cpu_reading)
ODD = {
    "I320_H320": (320, 320, "hf"),
    "H200_I256_deepgemm": (200, 256, "deepgemm"),
    "H192_I384_deepgemm": (192, 384, "deepgemm"),
}


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("odd")
    out = {}
    for case, (h, i, layout) in ODD.items():
        orig = hf_checkpoint(
            FAMILY, root / f"{case}-orig", **{**DIMS, "hidden_size": h, "moe_intermediate_size": i}
        )
        out[case] = (orig, quantized(orig, root / f"{case}-conv", "--layout", layout))
    return out


@pytest.mark.parametrize("case", list(ODD))
def test_correct_output_at_odd_dimensions_passes(
    odd: dict[str, tuple[Path, Path]], case: str, untouched
) -> None:
    orig, conv = odd[case]
    untouched(orig, conv)
    code, checks, err = validate(orig, conv, "--tokens", "64")
    assert code == 0, (err, failed(checks))
    assert {c["group"] for c in checks} >= {"structure", "tensors", "kernels", "moe"}


@pytest.mark.parametrize("case", list(ODD))
def test_a_flipped_byte_at_odd_dimensions_still_fails(
    odd: dict[str, tuple[Path, Path]], tmp_path: Path, case: str
) -> None:
    orig, conv = odd[case]
    conv = Path(shutil.copytree(conv, tmp_path / "conv"))

    def flip(q: torch.Tensor) -> torch.Tensor:
        u = q.view(torch.uint8)
        u.view(-1)[7] ^= 0x08
        return u.view(torch.float8_e4m3fn)

    name = edit_tensor(conv, lambda n, t: ".experts." in n and t.dtype == torch.float8_e4m3fn, flip)
    refresh_manifest(conv)
    code, checks, err = validate(orig, conv)
    assert code == 1, err
    assert any(name.split(".experts.")[0] in f and "tensors" in f for f in failed(checks)), failed(checks)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("case", list(ODD))
def test_correct_output_at_odd_dimensions_passes_on_the_gpu(
    odd: dict[str, tuple[Path, Path]], case: str, backend: str
) -> None:
    """The same on the GPU kernels (``auto`` is DeepGEMM on an SM90 card where it is installed)."""
    orig, conv = odd[case]
    code, out, err = run_cli("validate", orig, conv, "--device", "cuda", "--backend", backend, "--json")
    checks = json.loads(out).get("checks", []) if out.strip() else []
    assert code == 0, (err, failed(checks))


# -- 9. a converted defect is exit 1, a corrupt original exit 2 ------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair")
    orig = hf_checkpoint(FAMILY, root / "orig", **DIMS)
    return {
        "orig": orig,
        "hf": quantized(orig, root / "hf", "--layout", "hf"),
        "deepgemm": quantized(orig, root / "deepgemm", "--layout", "deepgemm"),
        "ue8m0": quantized(orig, root / "ue8m0", "--layout", "hf", "--scale-fmt", "ue8m0"),
    }


def _is_expert_weight(n: str, t: torch.Tensor) -> bool:
    return ".experts." in n and t.dtype == torch.float8_e4m3fn


def _is_expert_scale(n: str, t: torch.Tensor) -> bool:
    return ".experts." in n and n.endswith("_scale_inv")


def _byte(value: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(q: torch.Tensor) -> torch.Tensor:
        u = q.view(torch.uint8)
        u.view(-1)[300] = value
        return u.view(torch.float8_e4m3fn)

    return fn


def _scale(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(s: torch.Tensor) -> torch.Tensor:
        s.view(-1)[0] = value
        return s

    return fn


def _swap_experts(q: torch.Tensor) -> torch.Tensor:
    """Experts 0 and 1 of a stacked tensor swapped (per-expert tensors: rows reversed)."""
    if q.dim() == 3:
        return q[[1, 0, *range(2, q.shape[0])]].contiguous()
    return q.flip(0).contiguous()


CONVERTED_DEFECTS: dict[str, tuple[Callable, Callable]] = {
    "fp8_nan_byte_0x7f": (_is_expert_weight, _byte(0x7F)),
    "fp8_nan_byte_0xff": (_is_expert_weight, _byte(0xFF)),
    "scale_nan": (_is_expert_scale, _scale(float("nan"))),
    "scale_zero": (_is_expert_scale, _scale(0.0)),
    "scale_huge_but_finite": (_is_expert_scale, _scale(3.0e38)),
    "experts_swapped": (_is_expert_weight, _swap_experts),
}


@pytest.mark.parametrize("layout", ["hf", "deepgemm"])
@pytest.mark.parametrize("case", list(CONVERTED_DEFECTS))
def test_a_defect_in_the_converted_checkpoint_is_exit_1_naming_it(
    pair: dict[str, Path], tmp_path: Path, case: str, layout: str, untouched
) -> None:
    conv = Path(shutil.copytree(pair[layout], tmp_path / "conv"))
    pick, fn = CONVERTED_DEFECTS[case]
    name = edit_tensor(conv, pick, fn)
    refresh_manifest(conv)
    untouched(pair["orig"], conv)
    code, checks, err = validate(pair["orig"], conv)
    assert code == 1 and not err.strip(), (code, err)
    fails = failed(checks)
    container = name.split(".experts.")[0] + ".experts"
    assert any(container in f for f in fails), fails
    assert not any("source checkpoint" in f for f in fails), fails


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fp8_nan_byte_0x7f", "scale_huge_but_finite"])
def test_a_defect_in_the_converted_checkpoint_is_exit_1_on_the_gpu(
    pair: dict[str, Path], tmp_path: Path, case: str
) -> None:
    """The Triton activation quantizer raises on NaN; what a converted expert makes NaN is reported
    against the converted side there too."""
    conv = Path(shutil.copytree(pair["deepgemm"], tmp_path / "conv"))
    pick, fn = CONVERTED_DEFECTS[case]
    edit_tensor(conv, pick, fn)
    refresh_manifest(conv)
    code, out, err = run_cli("validate", pair["orig"], conv, "--device", "cuda", "--json")
    assert code == 1 and not err.strip(), (code, err)
    assert not any("source checkpoint" in f for f in failed(json.loads(out)["checks"]))


def _orig_nan(root: Path) -> str:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[11] = float("nan")
        return t

    return edit_tensor(root, lambda n, t: ".experts." in n and "down_proj" in n, fn)


def _orig_overflowing_expert(root: Path) -> str:
    """Finite, but the largest bf16 values: the original's own float32 layer overflows."""
    return edit_tensor(
        root,
        lambda n, t: ".experts.1.gate_proj" in n,
        lambda t: torch.full_like(t, torch.finfo(torch.bfloat16).max),
    )


ORIGINAL_DEFECTS: dict[str, Callable[[Path], str]] = {
    "nan_in_an_expert": _orig_nan,
    "an_expert_that_overflows": _orig_overflowing_expert,
}


@pytest.mark.parametrize("case", list(ORIGINAL_DEFECTS))
def test_a_corrupt_original_is_exit_2_naming_its_tensor(
    pair: dict[str, Path], tmp_path: Path, case: str
) -> None:
    orig = Path(shutil.copytree(pair["orig"], tmp_path / "orig"))
    name = ORIGINAL_DEFECTS[case](orig)
    code, _, err = validate(orig, pair["hf"])
    line = one_error_line(err)
    assert code == 2, line
    layer_experts = name.split(".experts.")[0]
    assert layer_experts in line and str(orig) in line, line


def test_a_corrupt_fp8_original_is_exit_2(tmp_path: Path) -> None:
    orig = make_checkpoint(FAMILY, tmp_path / "orig", fp8=True, **DIMS)
    conv = quantized(orig, tmp_path / "conv", "--layout", "hf")
    name = edit_tensor(orig, _is_expert_weight, _byte(0x7F))
    code, _, err = validate(orig, conv)
    line = one_error_line(err)
    assert code == 2 and name in line and "NaN" in line, line


# -- 10. what is declared must be true of what is stored ------------------------------------------------
def _qc(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(conv: Path) -> None:
        cfg = json.loads((conv / "config.json").read_text())
        fn(cfg["quantization_config"])
        (conv / "config.json").write_text(json.dumps(cfg))

    return edit


def _shard_layout(value: str) -> Callable[[Path], None]:
    def edit(conv: Path) -> None:
        shard = shards_of(conv)[0]
        header, data = read_raw(conv / shard)
        header["__metadata__"]["moetool.layout"] = value
        write_raw(conv / shard, header, data)

    return edit


def _manifest_layout(value: str) -> Callable[[Path], None]:
    def edit(conv: Path) -> None:
        m = json.loads((conv / MANIFEST).read_text())
        m["layout"] = value
        (conv / MANIFEST).write_text(json.dumps(m))

    return edit


def _list(key: str, how: str) -> Callable[[dict], None]:
    def fn(qc: dict) -> None:
        if how == "fp8_module":
            qc[key] = [*qc[key], "model.layers.0.mlp.experts.0.gate_proj"]
        else:
            qc[key] = [m for m in qc[key] if "lm_head" not in m]

    return fn


DECLARED: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # which output, the edit, what the failed check must say
    "refusal_marker_removed": ("deepgemm", _qc(lambda q: q.update(activation_scheme="dynamic")), "refusal"),
    "refusal_marker_added": (
        "hf",
        _qc(lambda q: q.update(activation_scheme="moetool deepgemm layout, not an engine checkpoint")),
        "refusal marker",
    ),
    "weight_block_size_64": ("hf", _qc(lambda q: q.update(weight_block_size=[64, 64])), "weight_block_size"),
    "weight_block_size_one_number": (
        "hf",
        _qc(lambda q: q.update(weight_block_size=128)),
        "weight_block_size",
    ),
    "quant_method": ("hf", _qc(lambda q: q.update(quant_method="fbgemm_fp8")), "quant_method"),
    "fmt": ("hf", _qc(lambda q: q.update(fmt="e5m2")), "fmt"),
    "activation_scheme_static": (
        "hf",
        _qc(lambda q: q.update(activation_scheme="static")),
        "activation_scheme",
    ),
    "modules_to_not_convert_names_fp8": (
        "hf",
        _qc(_list("modules_to_not_convert", "fp8_module")),
        "modules_to_not_convert",
    ),
    "ignored_layers_leaves_out_lm_head": ("hf", _qc(_list("ignored_layers", "drop")), "ignored_layers"),
    "scale_fmt_added": ("hf", _qc(lambda q: q.update(scale_fmt="ue8m0")), "tensors"),
    "scale_fmt_removed": ("ue8m0", _qc(lambda q: q.pop("scale_fmt")), "tensors"),
    "shard_layout_deepgemm_says_hf": ("deepgemm", _shard_layout("hf"), "moetool.layout"),
    "shard_layout_hf_says_deepgemm": ("hf", _shard_layout("deepgemm"), "moetool.layout"),
    "manifest_layout": ("deepgemm", _manifest_layout("hf"), "declares layout"),
}


@pytest.mark.parametrize("case", list(DECLARED))
def test_what_is_declared_must_be_true_of_what_is_stored(
    pair: dict[str, Path], tmp_path: Path, case: str, untouched
) -> None:
    which, edit, says = DECLARED[case]
    conv = Path(shutil.copytree(pair[which], tmp_path / "conv"))
    edit(conv)
    refresh_manifest(conv)
    untouched(pair["orig"], conv)
    code, checks, err = validate(pair["orig"], conv)
    assert code == 1 and not err.strip(), (code, err)
    assert any(says in f for f in failed(checks)), failed(checks)


@pytest.mark.parametrize("which", ["hf", "deepgemm", "ue8m0"])
def test_the_outputs_as_written_declare_what_they_store(pair: dict[str, Path], which: str) -> None:
    """The control: nothing edited, nothing failed."""
    code, checks, err = validate(pair["orig"], pair[which])
    assert code == 0, (err, failed(checks))


# -- the manifest ----------------------------------------------------------------------------------------
def _manifest(fn: Callable[[Any], Any]) -> Callable[[Path], None]:
    def edit(conv: Path) -> None:
        m = json.loads((conv / MANIFEST).read_text())
        (conv / MANIFEST).write_text(json.dumps(fn(m)))

    return edit


MALFORMED: dict[str, Callable[[Path], None]] = {
    "not_an_object": _manifest(lambda m: [m]),
    "files_a_list": _manifest(lambda m: {**m, "files": sorted(m["files"])}),
    "files_a_string": _manifest(lambda m: {**m, "files": "all of them"}),
    "a_record_not_an_object": _manifest(lambda m: {**m, "files": {k: 1 for k in m["files"]}}),
    "a_record_without_size": _manifest(
        lambda m: {**m, "files": {k: {"sha256": v["sha256"]} for k, v in m["files"].items()}}
    ),
    "a_path_out_of_the_checkpoint": _manifest(
        lambda m: {**m, "files": {**m["files"], "../orig/config.json": {"sha256": "0" * 64, "size": 1}}}
    ),
    "tensors_a_list": _manifest(lambda m: {**m, "tensors": sorted(m["tensors"])}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_a_failed_check_naming_it(
    pair: dict[str, Path], tmp_path: Path, case: str
) -> None:
    conv = Path(shutil.copytree(pair["hf"], tmp_path / "conv"))
    MALFORMED[case](conv)
    code, checks, err = validate(pair["orig"], conv)
    assert code == 1 and not err.strip(), (code, err)
    assert any(str(conv / MANIFEST) in f for f in failed(checks)), failed(checks)
    code, _, err = run_cli("inspect", conv)
    assert code == 0, err


def reshard(conv: Path, out: Path, per_shard: int, *, same_names: bool = False) -> Path:
    """What another tool does: the same tensors, in other shards with a new index; the files named anew,
    or (``same_names``) as many files as before under the old names, holding other tensors."""
    shutil.copytree(conv, out, ignore=shutil.ignore_patterns("*.safetensors", INDEX))
    old = shards_of(conv)
    tensors = {k: v for s in old for k, v in load_file(conv / s).items()}
    names = sorted(tensors)
    if same_names:
        per_shard = -(-len(names) // len(old))  # as many shards, cut by count rather than by bytes
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    assert not same_names or len(groups) == len(old)
    wm = {}
    for j, group in enumerate(groups):
        fname = old[j] if same_names else f"resharded-{j:03d}.safetensors"
        save_file({n: tensors[n] for n in group}, out / fname, metadata={"format": "pt"})
        wm.update(dict.fromkeys(group, fname))
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return out


@pytest.mark.parametrize("names", ["new_names", "same_names"])
@pytest.mark.parametrize("which", ["hf", "deepgemm"])
def test_a_resharded_checkpoint_is_not_described_and_the_tensors_decide(
    pair: dict[str, Path], tmp_path: Path, which: str, names: str, untouched
) -> None:
    """Re-sharded by another tool (safetensors' own writer, a new index), under new file names or
    under the old ones with other tensors in them: not described by the manifest, and every tensor
    checked against the original decides."""
    src = pair[which]
    if names == "same_names":  # several shards, so that tensors can move between them
        src = quantized(pair["orig"], tmp_path / "sharded", "--layout", which, "--max-shard-size", "200KB")
    conv = reshard(src, tmp_path / "resharded", per_shard=9, same_names=names == "same_names")
    if names == "same_names":
        assert shards_of(conv) == shards_of(src) and len(shards_of(src)) > 1
        assert weight_map(conv) != weight_map(src), "no tensor moved: not re-sharded"
    untouched(pair["orig"])
    code, checks, err = validate(pair["orig"], conv)
    assert code == 0, (err, failed(checks))
    files = [c for c in checks if c["metric"] == "described by moetool.json"]
    assert files and "manifest does not describe these files" in files[0]["detail"], checks
    # sampled, the tensors cannot prove the rest: not passed
    code, checks, _ = validate(pair["orig"], conv, "--experts", "1")
    assert code == 1 and any("manifest does not describe these files" in f for f in failed(checks))
    # a re-sharded checkpoint with a wrong tensor fails on the tensor
    name = edit_tensor(conv, _is_expert_weight, _byte(0x11))
    code, checks, _ = validate(pair["orig"], conv)
    assert code == 1 and any(name.split(".experts.")[0] in f for f in failed(checks)), failed(checks)


# -- a checkpoint changed while validate reads it -------------------------------------------------------
@pytest.mark.parametrize("side", ["orig", "hf"])
def test_a_shard_replaced_while_validate_reads_it_is_exit_2_naming_it(
    pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    """Each side's headers are read before its data: a shard replaced in between (here by a
    byte-identical copy, so the result would otherwise pass) is not the file whose header was read, and
    the report would describe no one checkpoint. Exit 2 naming the file, whichever side it is on."""
    from moetool.validate import run

    orig = Path(shutil.copytree(pair["orig"], tmp_path / "orig"))
    conv = Path(shutil.copytree(pair["hf"], tmp_path / "conv"))
    victim = (orig if side == "orig" else conv) / shards_of(orig if side == "orig" else conv)[0]
    real_run = run.Validator.run

    def replace_then_run(self: Any) -> Any:
        shutil.copyfile(victim, tmp_path / "copy")
        shutil.move(tmp_path / "copy", victim)
        return real_run(self)

    monkeypatch.setattr(run.Validator, "run", replace_then_run)
    code, _, err = run_cli("validate", orig, conv, *FAST, guard_inputs=False)
    line = one_error_line(err)
    assert code == 2 and str(victim) in line and "changed since its header was read" in line, line
