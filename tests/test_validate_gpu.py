"""``moetool validate --device cuda`` (Triton kernels) passes and fails like the CPU path, and GPU
quantization writes the CPU's bytes. Needs a CUDA GPU: ``pytest -m gpu tests/test_validate_gpu.py``.

The clean conversions and planted defects of ``tests/test_validate.py`` run again, every conversion
itself made with ``--device cuda``; all models are factory-made here (transformers is not needed on the
GPU machine). The byte-equality test quantizes a DeepSeek-V3-shaped checkpoint scaled down from
hidden 7168 / moe_intermediate 2048 / 256 experts to 1024 / 512 / 8, on the GPU and on the CPU, in both
layouts and both scale formats (``--targets linear`` adds the attention projections, whose MLA
dimensions leave ragged 128-blocks), and compares every output shard, the index and config.json.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_validate as tv
import test_validate_io as tio
import torch

from moetool.ssm import StateMeta, recurrent_state_name, write_state_file
from moetool.testing.factory import DEEPGEMM_LEAVES, experts_prefix, make_checkpoint

W13, W13S, W2, W2S = DEEPGEMM_LEAVES.values()  # the deepgemm layout's stacked tensors under P

pytestmark = pytest.mark.gpu

GPU_TOKENS = 64  # more tokens than on the CPU: every expert gets a group of several rows
MIB = 1 << 20
HEADROOM = 256 * MIB  # the checks' working tensors beside the chunks on the device


@pytest.fixture(scope="session")
def ws_cuda(tmp_path_factory: pytest.TempPathFactory) -> tv.Workspace:
    assert torch.cuda.is_available(), "these tests need a CUDA GPU (run them on the GPU machine)"
    return tv.Workspace(tmp_path_factory.mktemp("validate-cuda"), "cuda", hf_made=(), tokens=GPU_TOKENS)


# -- clean conversions pass on the Triton path ------------------------------------------------------
@pytest.mark.parametrize(("family", "conversion"), tv.clean_cases())
def test_clean_conversion_passes_on_cuda(ws_cuda: tv.Workspace, family: str, conversion: str) -> None:
    tv.test_clean_conversion_passes(ws_cuda, family, conversion)


@pytest.mark.parametrize("dtype", list(tv.DTYPES))
@pytest.mark.parametrize("pool", [False, True], ids=["dense", "pooled"])
def test_converted_state_passes_on_cuda(ws_cuda: tv.Workspace, dtype: str, pool: bool) -> None:
    tv.test_converted_state_passes(ws_cuda, dtype, pool)


# -- planted defects fail on the Triton path --------------------------------------------------------
@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
def test_flipped_expert_byte_fails_on_cuda(ws_cuda: tv.Workspace, layout: str) -> None:
    tv.test_flipped_expert_byte_fails(ws_cuda, layout)


@pytest.mark.parametrize(
    ("source", "conversion", "defect"),
    [
        ("bf16", "deepgemm-float", None),
        ("bf16", "hf-float", "flip"),
        ("bf16", "deepgemm-float+fuse-r1", None),
        ("fp8", "deepgemm-float", None),
        ("fp8", "deepgemm-ue8m0", "flip"),
        ("fp8", "deepgemm-float", "nan-scale"),
    ],
)
def test_stacked_experts_are_proven_at_once_with_the_same_report_on_cuda(
    ws_cuda: tv.Workspace, monkeypatch: pytest.MonkeyPatch, source: str, conversion: str, defect: str | None
) -> None:
    tv.test_stacked_experts_are_proven_at_once_with_the_same_report(
        ws_cuda, monkeypatch, source, conversion, defect
    )


@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
def test_swapped_experts_fail_on_cuda(ws_cuda: tv.Workspace, layout: str) -> None:
    tv.test_swapped_experts_fail(ws_cuda, layout)


@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
def test_scale_one_ulp_off_fails_on_cuda(ws_cuda: tv.Workspace, layout: str) -> None:
    tv.test_scale_one_ulp_off_fails(ws_cuda, layout)


def test_dropped_fused_slot_fails_on_cuda(ws_cuda: tv.Workspace) -> None:
    tv.test_dropped_fused_slot_fails(ws_cuda)


def test_mixed_up_shared_expert_weight_fails_on_cuda(ws_cuda: tv.Workspace) -> None:
    tv.test_mixed_up_shared_expert_weight_fails(ws_cuda)


def test_unrelated_checkpoints_fail_on_cuda(ws_cuda: tv.Workspace) -> None:
    tv.test_unrelated_checkpoints_fail(ws_cuda)


@pytest.mark.parametrize("dtype", list(tv.DTYPES))
@pytest.mark.parametrize("pooled", [False, True], ids=["dense", "pooled"])
def test_k_first_state_labelled_k_last_fails_on_cuda(ws_cuda: tv.Workspace, dtype: str, pooled: bool) -> None:
    tv.test_k_first_state_labelled_k_last_fails(ws_cuda, dtype, pooled)


def test_swapped_experts_seen_by_the_triton_gemm_alone(ws_cuda: tv.Workspace) -> None:
    """Experts 0 and 2 swapped whole in the second MoE layer and sha256 re-recorded: the Triton grouped
    GEMM and the MoE layer (0 and 2 sit in different routing groups) each name the layer."""
    orig = ws_cuda.source("deepseek_v3")
    conv = ws_cuda.copy(ws_cuda.converted("deepseek_v3", "deepgemm-ue8m0"))
    tv.swap_whole_experts(conv, 2, "deepgemm", 0, 2)
    tv.refresh_manifest(conv)
    res = ws_cuda.validate(orig, conv, "--layers", "2")
    prefix = experts_prefix(tv.config_of(conv), 2)
    tv.assert_fails(res, prefix, groups=("tensors", "kernels", "moe"))


def test_mislabelled_state_of_qwen3_next_size_fails_on_cuda(ws_cuda: tv.Workspace) -> None:
    """Qwen3-Next's real head dims (K = V = 128, 32 value heads over 16 key heads), one layer."""
    gen = torch.Generator().manual_seed(5)
    meta = StateMeta(layout="k-first", num_key_heads=16, num_value_heads=32, head_k_dim=128, head_v_dim=128)
    state = {recurrent_state_name(0): torch.randn(2, 32, 128, 128, generator=gen) * 0.3}
    orig, good, bad = (ws_cuda.scratch(f"{n}.safetensors") for n in ("orig", "good", "bad"))
    write_state_file(orig, state, meta)
    write_state_file(bad, state, meta.replace(layout="k-last"))
    tv.run_ok("convert-ssm", orig, good, "--to", "k-last", "--pool")
    ok = ws_cuda.validate(orig, good)
    assert ok.code == 0, ok.out
    tv.assert_fails(ws_cuda.validate(orig, bad), recurrent_state_name(0), groups=("ssm",))


# -- one pass on the GPU: each byte read once (the sha256 from the same reads), time per stage, shared
# experts, read errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("conversion", "sample"), [("deepgemm-ue8m0", None), ("hf-float+fuse-r2", "2")])
def test_validate_reads_each_tensor_byte_once_on_cuda(
    ws_cuda: tv.Workspace, monkeypatch: pytest.MonkeyPatch, conversion: str, sample: str | None
) -> None:
    tio.test_validate_reads_each_tensor_byte_once(ws_cuda, monkeypatch, conversion, sample)


def test_report_has_seconds_per_stage_on_cuda(ws_cuda: tv.Workspace) -> None:
    tio.test_report_has_seconds_per_stage(ws_cuda)


@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
def test_flipped_byte_in_unfused_shared_expert_fails_on_cuda(ws_cuda: tv.Workspace, layout: str) -> None:
    tio.test_flipped_byte_in_unfused_shared_expert_fails(ws_cuda, layout)


def test_failing_read_is_one_line_naming_the_file_on_cuda(
    ws_cuda: tv.Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    tio.test_failing_read_is_one_line_naming_the_file(ws_cuda, monkeypatch)


@pytest.mark.parametrize(
    ("conversion", "opts"),
    [("deepgemm-ue8m0+fuse-r2", {}), ("hf-float", {"experts": 1}), ("deepgemm-float", {"read_budget": 1})],
)
def test_validate_hashes_the_converted_files_from_its_reads_on_cuda(
    ws_cuda: tv.Workspace, monkeypatch: pytest.MonkeyPatch, conversion: str, opts: dict
) -> None:
    tio.test_validate_hashes_the_converted_files_from_its_reads(ws_cuda, monkeypatch, conversion, opts)


@pytest.mark.parametrize("hash_source", ["reads", "files"])
@pytest.mark.parametrize("where", ["read", "skipped"])
def test_flipped_byte_fails_structure_where_checks_read_and_where_they_skip_on_cuda(
    ws_cuda: tv.Workspace, monkeypatch: pytest.MonkeyPatch, where: str, hash_source: str
) -> None:
    tio.test_flipped_byte_fails_structure_where_checks_read_and_where_they_skip(
        ws_cuda, monkeypatch, where, hash_source
    )


@pytest.mark.parametrize("flipped", [False, True])
def test_validate_takes_over_hashes_started_ahead_on_cuda(ws_cuda: tv.Workspace, flipped: bool) -> None:
    tio.test_validate_takes_over_hashes_started_ahead(ws_cuda, flipped)


def test_hashes_ahead_of_a_file_changed_since_are_not_taken_on_cuda(ws_cuda: tv.Workspace) -> None:
    tio.test_hashes_ahead_of_a_file_changed_since_are_not_taken(ws_cuda)


def test_validate_command_on_cuda_hashes_each_file_from_before_torch_by_default(
    ws_cuda: tv.Workspace,
) -> None:
    """``--hash-source auto`` on CUDA: the command starts the files' hashes before torch is imported and
    validate takes them over."""
    orig, conv = ws_cuda.source("deepseek_v3"), ws_cuda.converted("deepseek_v3", "deepgemm-float")
    res = ws_cuda.validate(orig, conv, "-v")
    assert res.code == 0, res.err
    tl = res.report["timeline"]
    assert tl["hashes_from_reads"] is False and tl["hashes_ahead"] is True, tl
    assert "before torch was imported" in res.err, res.err


# -- GPU quantization writes the CPU's bytes --------------------------------------------------------
@pytest.fixture(scope="session")
def dsv3_scaled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        "deepseek_v3",
        tmp_path_factory.mktemp("dsv3-scaled") / "src",
        num_layers=3,
        hidden_size=1024,
        moe_intermediate_size=512,
        num_experts=8,
        top_k=2,
        seed=3,
    )


@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
@pytest.mark.parametrize(("layout", "targets"), [("deepgemm", "experts"), ("hf", "linear")])
def test_cuda_quantize_equals_cpu_bytes(
    dsv3_scaled: Path, tmp_path: Path, fmt: str, layout: str, targets: str
) -> None:
    assert torch.cuda.is_available(), "this test needs a CUDA GPU"
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        tv.run_ok(
            "quantize", dsv3_scaled, outs[device], "--device", device,
            "--layout", layout, "--scale-fmt", fmt, "--targets", targets,
        )  # fmt: skip
    cpu, cuda = outs["cpu"], outs["cuda"]
    shards = sorted(p.name for p in cpu.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in cuda.glob("*.safetensors"))
    for rel in [*shards, tv.INDEX, "config.json"]:
        a, b = (cpu / rel).read_bytes(), (cuda / rel).read_bytes()
        if a != b:
            first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if len(a) == len(b) else -1
            raise AssertionError(f"{rel}: GPU bytes differ from the CPU's (first at byte {first})")
    # the comparison covered real FP8 data, not an empty plan
    cfg = tv.config_of(cpu)
    name = (
        f"{experts_prefix(cfg, 1)}.{W13}"
        if layout == "deepgemm"
        else f"{experts_prefix(cfg, 1)}.7.up_proj.weight"
    )
    _, _, nbytes, dtype, _ = tv.tensor_at(cpu, name)
    assert dtype == "F8_E4M3" and nbytes >= 512 * 1024
    # and the GPU output validates on the GPU
    res = tv.Workspace(tmp_path, "cuda", hf_made=(), tokens=GPU_TOKENS).validate(dsv3_scaled, cuda)
    tv.assert_passes(res, [1, 2], fp8=True)


def test_non_finite_original_stops_with_one_line_on_cuda(ws_cuda: tv.Workspace) -> None:
    tio.test_non_finite_original_stops_with_one_line(ws_cuda)


@pytest.mark.parametrize("conversion", ["deepgemm-ue8m0+fuse-r2", "hf-float"])
def test_layer_in_chunks_on_cuda_reports_what_the_whole_layer_does(
    ws_cuda: tv.Workspace, conversion: str
) -> None:
    """A read budget of one expert: each layer reaches the GPU chunk by chunk and is checked chunk by
    chunk, and the report (tensors, Triton kernels, MoE layers) is the one-read-per-layer report, on a
    clean conversion and with experts 1 and 2 exchanged across a chunk boundary."""
    orig = ws_cuda.source("deepseek_v3")
    clean = ws_cuda.converted("deepseek_v3", conversion)
    swapped = ws_cuda.copy(clean)
    layout = "deepgemm" if conversion.startswith("deepgemm") else "hf"
    culprit = tv.swap_whole_experts(swapped, 1, layout, 1, 2)
    tv.refresh_manifest(swapped)
    for conv, clean_run in ((clean, True), (swapped, False)):
        budget = tio.expert_bytes(conv) + tio.expert_bytes(conv) // 2
        chunked, whole, oversized = tio.reports_chunked_and_whole(ws_cuda, orig, conv, budget)
        assert chunked["device"].startswith("cuda") and chunked["backend"] == "triton"
        tio.assert_same_report(chunked, whole)
        assert chunked["io"]["buffer_bytes"] <= 2 * max(budget, oversized), (chunked["io"], budget)
        assert chunked["io"]["buffer_bytes"] < whole["io"]["buffer_bytes"]  # it was read in chunks
        assert chunked["timings"]["transfer"] > 0
        assert chunked["passed"] == clean_run
    tensors = next(c for c in chunked["checks"] if c["group"] == "tensors" and c["scope"] == "layer 1")
    assert not tensors["passed"] and culprit in tensors["detail"], tensors


@pytest.mark.parametrize("family", sorted(tv.MODELS))
def test_every_family_in_chunks_keeps_no_expert_stack_on_cuda(
    ws_cuda: tv.Workspace, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    tio.test_every_family_in_chunks_keeps_no_expert_stack(ws_cuda, monkeypatch, family)


def test_validate_on_cuda_holds_chunks_not_a_layer(tmp_path: Path) -> None:
    """A MoE layer of 1.8 GB (original and converted) read in 256 MiB chunks: the device's peak
    allocation stays within two chunks plus headroom, well under one layer, and the report is the
    one of one read per layer."""
    from test_memory import _large_checkpoint

    from moetool.io import Checkpoint
    from moetool.validate import ValidateOptions, validate_checkpoints

    src = _large_checkpoint(tmp_path / "src", num_layers=2, seed=6)
    fp8 = tmp_path / "fp8"
    tv.run_ok("quantize", src, fp8, "--layout", "deepgemm", "--device", "cuda")
    with Checkpoint(src) as o, Checkpoint(fp8) as c:
        layer = sum(t.nbytes for ck in (o, c) for n, t in ck.tensors.items() if ".experts." in n)
    budget = 256 << 20
    reports = {}
    for b in (budget, 1 << 60):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        r = validate_checkpoints(src, fp8, ValidateOptions(device="cuda", tokens=GPU_TOKENS, read_budget=b))
        peak = torch.cuda.max_memory_allocated() - before
        reports[b] = (r.to_dict(), peak)
    (chunked, peak), (whole, whole_peak) = reports[budget], reports[1 << 60]
    assert chunked["passed"], chunked["checks"]
    tio.assert_same_report(chunked, whole)
    chunk_bytes = chunked["io"]["buffer_bytes"]
    assert layer > 3 * chunk_bytes, "the layer must dwarf the chunks for the test to mean anything"
    assert whole_peak > layer  # read whole, the layer is on the device at once
    assert peak <= chunk_bytes + HEADROOM, (
        f"device peak {peak / MIB:.0f} MiB; two chunks {chunk_bytes / MIB:.0f} MiB, layer {layer / MIB:.0f} MiB"
    )


@pytest.mark.parametrize("targets", ["experts", "linear"])
@pytest.mark.parametrize("flip", [False, True], ids=["clean", "flipped"])
def test_other_tensors_larger_than_a_step_are_read_in_runs_of_rows_on_cuda(
    ws_cuda: tv.Workspace, monkeypatch: pytest.MonkeyPatch, targets: str, flip: bool
) -> None:
    tio.test_other_tensors_larger_than_a_step_are_read_in_runs_of_rows(ws_cuda, monkeypatch, targets, flip)
