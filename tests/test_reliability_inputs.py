"""Corrupt or contradictory inputs are refused with one line naming file, tensor and block — never
passed through, never a hang, never an internal error.

- Corrupt FP8 sources (DeepSeek-V3-style block FP8): a scale that is NaN, ±infinity, zero or negative,
  an FP8 byte that is e4m3's NaN (0x7f, 0xff), a scale of the wrong dtype or grid, a missing scale —
  in routed experts, packed experts and a non-expert Linear, through both layouts and a requantizing
  ``--scale-fmt ue8m0``, as a NaN in a BF16 weight is.
- Config keys that make a layer holding experts dense (``first_k_dense_replace``, ``moe_layer_freq``,
  ``decoder_sparse_step``, ``mlp_only_layers``, fewer ``num_hidden_layers``, a false MTP layer): refused
  naming the layer, for quantize, fuse-shared and inspect alike.
- Anything that is not a regular file where moetool reads one (FIFO, socket, device, a link to
  ``/dev/zero``) as config, index, shard, copied file, manifest or state file: refused in bounded time
  and memory.
- Loops of links, OUT=/ and malformed fused-slot entries: one clean line, never "internal error".
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    DIMS,
    FAMILY,
    INDEX,
    MANIFEST,
    TIME_LIMIT_S,
    hf_checkpoint,
    read_raw,
    refused,
    rewrite_tensors,
    run_cli,
    set_config,
    shards_of,
    weight_map,
    write_raw,
)

from moetool.testing.factory import make_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_checkpoint(FAMILY, tmp_path_factory.mktemp("base") / "model", **DIMS)


@pytest.fixture
def model(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "model"))


# -- 5. corrupt FP8 inputs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DeepSeek-V3-style block FP8 (every Linear but routers and lm_head), per-expert and packed."""
    root = tmp_path_factory.mktemp("fp8")
    return {
        "per_expert": make_checkpoint(FAMILY, root / "per_expert", fp8=True, max_shard_bytes=300_000, **DIMS),
        "packed": make_checkpoint(FAMILY, root / "packed", fp8=True, packed_experts=True, **DIMS),
    }


EXPERT = "model.layers.1.mlp.experts.2.down_proj.weight"  # [H=256, I=128]: 2 x 1 blocks
ATTN = "model.layers.0.self_attn.q_proj.weight"
PACKED = "model.layers.1.mlp.experts.gate_up_proj"  # [E, 2I=256, H=256]: 2 x 2 blocks per expert


def _poke(root: Path, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """Apply ``fn`` to tensor ``name`` in place in its shard; returns the shard's file name."""
    rewrite_tensors(root, lambda n, t: fn(t.clone()) if n == name else None)
    return _shard_of(root, name)


def _shard_of(root: Path, name: str) -> str:
    return weight_map(root)[name] if (root / INDEX).exists() else shards_of(root)[0]


def _set_scale(name: str, value: float, at: tuple[int, ...]) -> Callable[[Path], list[str]]:
    def corrupt(root: Path) -> list[str]:
        def fn(s: torch.Tensor) -> torch.Tensor:
            s[at] = value
            return s

        shard = _poke(root, name + "_scale_inv", fn)
        block = f"row block {at[-2]}, column block {at[-1]}"
        return [shard, name, block] + ([f"expert {at[0]}"] if len(at) == 3 else [])

    return corrupt


def _set_byte(name: str, byte: int, at: tuple[int, ...]) -> Callable[[Path], list[str]]:
    def corrupt(root: Path) -> list[str]:
        def fn(q: torch.Tensor) -> torch.Tensor:
            u = q.view(torch.uint8)
            u[at] = byte
            return u.view(torch.float8_e4m3fn)

        shard = _poke(root, name, fn)
        where = [f"row block {at[-2] // 128}, column block {at[-1] // 128}"]
        return [shard, name, "NaN", *where] + ([f"expert {at[0]}"] if len(at) == 3 else [])

    return corrupt


def _retype_scale(name: str, dtype: torch.dtype) -> Callable[[Path], list[str]]:
    def corrupt(root: Path) -> list[str]:
        shard = _poke(root, name + "_scale_inv", lambda s: s.to(dtype))
        return [shard, name + "_scale_inv", "F32"]

    return corrupt


def _reshape_scale(
    name: str, shape_of: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[Path], list[str]]:
    def corrupt(root: Path) -> list[str]:
        shard = _poke(root, name + "_scale_inv", lambda s: shape_of(s).contiguous())
        return [shard, name + "_scale_inv", "one per 128x128 block"]

    return corrupt


def _drop_scale(name: str) -> Callable[[Path], list[str]]:
    def corrupt(root: Path) -> list[str]:
        sname = name + "_scale_inv"
        shard = _shard_of(root, sname)
        header, data = read_raw(root / shard)
        del header[sname]  # its bytes stay as unreferenced padding: only the entry goes
        write_raw(root / shard, header, data)
        if (root / INDEX).exists():
            index = json.loads((root / INDEX).read_text())
            del index["weight_map"][sname]
            (root / INDEX).write_text(json.dumps(index))
        return [name, "weight_scale_inv"]

    return corrupt


FP8_CORRUPT: dict[str, tuple[str, Callable[[Path], list[str]]]] = {
    "scale_nan": ("per_expert", _set_scale(EXPERT, float("nan"), (1, 0))),
    "scale_inf": ("per_expert", _set_scale(EXPERT, float("inf"), (0, 0))),
    "scale_minus_inf": ("per_expert", _set_scale(EXPERT, float("-inf"), (1, 0))),
    "scale_zero": ("per_expert", _set_scale(EXPERT, 0.0, (1, 0))),
    "scale_negative": ("per_expert", _set_scale(EXPERT, -0.01, (0, 0))),
    "byte_0x7f": ("per_expert", _set_byte(EXPERT, 0x7F, (200, 70))),
    "byte_0xff": ("per_expert", _set_byte(EXPERT, 0xFF, (3, 127))),
    "attention_scale_nan": ("per_expert", _set_scale(ATTN, float("nan"), (0, 1))),
    "attention_byte_0xff": ("per_expert", _set_byte(ATTN, 0xFF, (100, 200))),
    "packed_scale_negative": ("packed", _set_scale(PACKED, -1.0, (3, 1, 1))),
    "packed_byte_0x7f": ("packed", _set_byte(PACKED, 0x7F, (2, 129, 255))),
    "scale_in_bf16": ("per_expert", _retype_scale(EXPERT, torch.bfloat16)),
    "scale_in_f64": ("per_expert", _retype_scale(EXPERT, torch.float64)),
    "scale_grid_one_row_short": ("per_expert", _reshape_scale(EXPERT, lambda s: s[:1])),
    "scale_grid_one_column_more": ("per_expert", _reshape_scale(EXPERT, lambda s: torch.cat([s, s], 1))),
    "scale_grid_transposed": ("per_expert", _reshape_scale(EXPERT, lambda s: s.t())),
    "scale_grid_flat": ("per_expert", _reshape_scale(EXPERT, lambda s: s.reshape(-1))),
    "packed_scale_grid_short": ("packed", _reshape_scale(PACKED, lambda s: s[:, :1])),
    "scale_missing": ("per_expert", _drop_scale(EXPERT)),
}
LAYOUTS = {
    "hf": ["--layout", "hf"],
    "deepgemm": ["--layout", "deepgemm"],
    "ue8m0": ["--layout", "hf", "--scale-fmt", "ue8m0"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(FP8_CORRUPT))
def test_corrupt_fp8_input_is_refused_naming_file_tensor_and_block(
    fp8_sources: dict[str, Path], tmp_path: Path, case: str, layout: str
) -> None:
    kind, corrupt = FP8_CORRUPT[case]
    src = Path(shutil.copytree(fp8_sources[kind], tmp_path / "src"))
    names = corrupt(src)
    out = tmp_path / "out"
    refused(["quantize", src, out, "-q", *LAYOUTS[layout]], names, inputs=[src], out=out)


def test_sound_fp8_input_is_the_control(fp8_sources: dict[str, Path], tmp_path: Path, untouched) -> None:
    """The same sources, untouched, convert in every layout (so each refusal above is the defect's)."""
    for kind, src in fp8_sources.items():
        untouched(src)
        for layout, flags in LAYOUTS.items():
            code, _, err = run_cli("quantize", src, tmp_path / f"{kind}-{layout}", "-q", *flags)
            assert code == 0, f"{kind} {layout}: {err}"


@pytest.fixture(scope="module")
def fp8_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("qwen2_moe", tmp_path_factory.mktemp("fp8_shared") / "src", fp8=True, **DIMS)


@pytest.mark.parametrize(
    ("tensor", "how"),
    [
        ("model.layers.0.mlp.shared_expert.gate_proj.weight", "short_grid"),
        ("model.layers.1.mlp.experts.3.up_proj.weight", "bf16"),
    ],
)
def test_fuse_shared_refuses_fp8_scales_it_cannot_slice(
    fp8_shared: Path, tmp_path: Path, tensor: str, how: str
) -> None:
    """fuse-shared slices FP8 experts by 128-row scale blocks: scales off the block grid are refused."""
    src = Path(shutil.copytree(fp8_shared, tmp_path / "src"))
    corrupt = (
        _reshape_scale(tensor, lambda s: s[:-1])
        if how == "short_grid"
        else _retype_scale(tensor, torch.bfloat16)
    )
    names = corrupt(src)
    out = tmp_path / "out"
    refused(["fuse-shared", src, out, "-q"], names, inputs=[src], out=out)


SHARED_GATE = "model.layers.0.mlp.shared_expert.gate_proj.weight"  # [I=128, H=256]: 1 x 2 blocks
ROUTED_UP = "model.layers.1.mlp.experts.3.up_proj.weight"
FUSE_CORRUPT: dict[str, Callable[[Path], list[str]]] = {
    "shared_scale_nan": _set_scale(SHARED_GATE, float("nan"), (0, 1)),
    "shared_byte_0x7f": _set_byte(SHARED_GATE, 0x7F, (3, 200)),
    "routed_scale_zero": _set_scale(ROUTED_UP, 0.0, (0, 0)),
    "routed_byte_0xff": _set_byte(ROUTED_UP, 0xFF, (100, 5)),
    "attention_scale_negative": _set_scale(ATTN, -0.5, (1, 1)),
}


@pytest.mark.parametrize("case", list(FUSE_CORRUPT))
def test_fuse_shared_refuses_a_corrupt_fp8_input(fp8_shared: Path, tmp_path: Path, case: str) -> None:
    """fuse-shared copies FP8 tensors as they are (the shared expert sliced into slots, routed experts
    and attention file to file): a corrupt one is refused as quantize refuses it, naming the file, the
    tensor and the block, never copied into an output that declares FP8."""
    src = Path(shutil.copytree(fp8_shared, tmp_path / "src"))
    names = FUSE_CORRUPT[case](src)
    out = tmp_path / "out"
    refused(["fuse-shared", src, out, "-q"], names, inputs=[src], out=out)


@pytest.mark.parametrize("layout", ["hf", "deepgemm"])
def test_a_nan_in_a_bf16_weight_names_the_file(model: Path, tmp_path: Path, layout: str) -> None:
    name = "model.layers.1.mlp.experts.3.gate_proj.weight"
    rewrite_tensors(
        model,
        lambda n, t: (
            torch.where(torch.arange(t.numel()).view(t.shape) == 77, float("nan"), t) if n == name else None
        ),
    )
    out = tmp_path / "out"
    refused(
        ["quantize", model, out, "--layout", layout, "-q"],
        [str(model / weight_map(model)[name]), name, "NaN", "row block 0, column block 0"],
        inputs=[model],
        out=out,
    )


# -- 7. every expert tensor is covered by the plan -----------------------------------------------------
@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        f: hf_checkpoint(f, root / f, **{**DIMS, "num_layers": 3})
        for f in ("deepseek_v3", "qwen2_moe", "qwen3_moe")
    }


COVERAGE: dict[str, tuple[str, dict, str]] = {
    # family, config change, the layer whose experts the change would leave unconverted
    "first_k_dense_replace": ("deepseek_v3", {"first_k_dense_replace": 2}, "model.layers.1.mlp."),
    "moe_layer_freq": ("deepseek_v3", {"moe_layer_freq": 2}, "model.layers.1.mlp."),
    "first_k_dense_all": ("deepseek_v3", {"first_k_dense_replace": 3}, "model.layers.1.mlp."),
    "decoder_sparse_step": ("qwen3_moe", {"decoder_sparse_step": 2}, "model.layers.0.mlp."),
    "mlp_only_layers": ("qwen3_moe", {"mlp_only_layers": [2]}, "model.layers.2.mlp."),
    "mlp_only_layers_shared": ("qwen2_moe", {"mlp_only_layers": [1]}, "model.layers.1.mlp."),
    "fewer_layers": ("qwen2_moe", {"num_hidden_layers": 2}, "model.layers.2."),
    "false_mtp_layer": (
        "deepseek_v3",
        {"num_hidden_layers": 2, "num_nextn_predict_layers": 1},
        "model.layers.2.",
    ),
}


@pytest.mark.parametrize(
    ("case", "command"),
    # qwen3_moe has no shared expert for fuse-shared to fold: quantize and inspect cover it
    [
        (c, cmd)
        for c in COVERAGE
        for cmd in ("quantize", "fuse-shared", "inspect")
        if not (cmd == "fuse-shared" and COVERAGE[c][0] == "qwen3_moe")
    ],
)
def test_experts_the_config_leaves_out_are_refused(
    families: dict[str, Path], tmp_path: Path, case: str, command: str
) -> None:
    family, change, layer = COVERAGE[case]
    src = Path(shutil.copytree(families[family], tmp_path / "src"))
    set_config(src, **change)
    out = tmp_path / "out"
    args = [command, src] + ([out, "-q"] if command != "inspect" else [])
    refused(args, ["config.json", layer], inputs=[src], out=out)


# -- 11. only regular files are read, with a byte limit ----------------------------------------------
def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _socket(path: Path) -> None:
    path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def _dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def _first_shard(root: Path) -> Path:
    return root / shards_of(root)[0]


NOT_REGULAR: dict[str, tuple[Callable[[Path], Path], Callable[[Path], None], str]] = {
    # what becomes it, how, the word the line must carry
    "config_fifo": (lambda r: r / "config.json", _fifo, "FIFO"),
    "config_socket": (lambda r: r / "config.json", _socket, "socket"),
    "config_dev_zero": (lambda r: r / "config.json", _dev_zero, "device"),
    "index_fifo": (lambda r: r / INDEX, _fifo, "FIFO"),
    "index_dev_zero": (lambda r: r / INDEX, _dev_zero, "device"),
    "shard_fifo": (_first_shard, _fifo, "FIFO"),
    "tokenizer_fifo": (lambda r: r / "tokenizer.json", _fifo, "FIFO"),
}


@pytest.mark.parametrize(
    ("case", "command"),
    # inspect reads no tokenizer file; quantize copies it; capture-ssm hands the folder to transformers
    [
        (c, cmd)
        for c in NOT_REGULAR
        for cmd in ("inspect", "quantize", "capture-ssm")
        if (c, cmd) != ("tokenizer_fifo", "inspect")
    ],
)
def test_what_is_not_a_regular_file_is_refused_in_bounded_time(
    model: Path, tmp_path: Path, case: str, command: str
) -> None:
    where, make, word = NOT_REGULAR[case]
    target = where(model)
    make(target)
    out = tmp_path / "out"
    args = {
        "inspect": [command, model],
        "quantize": [command, model, out, "-q"],
        "capture-ssm": [command, model, out, "--prompt", "hello", "-q"],
    }[command]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(args, [target.name, word], inputs=[model], out=out, time_limit_s=TIME_LIMIT_S)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grew_mb < 256, f"memory grew by {grew_mb:.0f} MB"


def test_an_unindexed_shard_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    src = make_checkpoint(FAMILY, tmp_path / "src", **DIMS)
    _fifo(src / "model.safetensors")
    refused(["inspect", src], ["model.safetensors", "FIFO"], inputs=[src], time_limit_s=TIME_LIMIT_S)


def _link_outside(path: Path) -> None:
    """The file moved out of its checkpoint, whole, and linked back: read, it would be taken as the
    checkpoint's own."""
    away = path.parent.parent / f"elsewhere-{path.name}"
    shutil.move(path, away)
    path.symlink_to(away)


@pytest.mark.parametrize("how", ["fifo", "dev_zero", "link_outside"])
def test_a_manifest_that_is_not_a_regular_file_is_refused(base: Path, tmp_path: Path, how: str) -> None:
    conv = tmp_path / "conv"
    code, _, err = run_cli("quantize", base, conv, "-q")
    assert code == 0, err
    {"fifo": _fifo, "dev_zero": _dev_zero, "link_outside": _link_outside}[how](conv / MANIFEST)
    refused(
        ["inspect", conv],
        [MANIFEST, *(["outside"] if how == "link_outside" else [])],
        inputs=[conv],
        time_limit_s=TIME_LIMIT_S,
    )


@pytest.mark.parametrize("how", ["fifo", "dev_zero"])
def test_a_state_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, how: str) -> None:
    src = tmp_path / "state.safetensors"
    (_fifo if how == "fifo" else _dev_zero)(src)
    dst = tmp_path / "out.safetensors"
    word = "FIFO" if how == "fifo" else "device"
    refused(["convert-ssm", src, dst, "-q"], [str(src), word], inputs=[src], time_limit_s=TIME_LIMIT_S)
    # validate given two of them takes them for checkpoints: still refused, saying what they are
    refused(["validate", src, src, "-q"], [str(src), word], inputs=[src], time_limit_s=TIME_LIMIT_S)
    assert not dst.exists()


# -- 12. clean one-line errors -----------------------------------------------------------------------
def _loop(path: Path) -> None:
    """``path`` and a sibling point at each other."""
    path.unlink(missing_ok=True)
    other = path.with_name(path.name + ".loop")
    path.symlink_to(other.name)
    other.symlink_to(path.name)


LOOPS: dict[str, Callable[[Path], Path]] = {
    "config": lambda r: r / "config.json",
    "index": lambda r: r / INDEX,
    "indexed_shard": _first_shard,
    "tokenizer": lambda r: r / "tokenizer.json",
}


@pytest.mark.parametrize("case", list(LOOPS))
def test_a_loop_of_links_in_the_input_is_a_clean_error(model: Path, tmp_path: Path, case: str) -> None:
    target = LOOPS[case](model)
    _loop(target)
    out = tmp_path / "out"
    refused(["quantize", model, out, "-q"], [target.name], inputs=[model], out=out)


@pytest.mark.parametrize("where", ["model", "out", "out_parent"])
def test_a_loop_of_links_as_model_or_out_is_a_clean_error(model: Path, tmp_path: Path, where: str) -> None:
    area = tmp_path / "area"
    area.mkdir()
    _loop(area / "x")
    args = {
        "model": ["quantize", area / "x", tmp_path / "out"],
        "out": ["quantize", model, area / "x", "--overwrite"],
        "out_parent": ["quantize", model, area / "x" / "out"],
    }[where]
    refused([*args, "-q"], [str(area / "x")], inputs=[model, area])


OUT_OF_MEMORY: dict[str, Callable[[], BaseException]] = {
    "python": MemoryError,
    "cpu_allocator": lambda: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 800000000000 bytes. Error code 12 (Cannot allocate memory)"
    ),
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
}


@pytest.mark.parametrize("command", ["inspect", "quantize", "validate"])
@pytest.mark.parametrize("kind", list(OUT_OF_MEMORY))
def test_running_out_of_memory_is_a_clean_error(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, command: str
) -> None:
    """Memory the machine does not have is the machine's limit, not a bug: exit 2, one line saying so
    and what asks for less, never "internal error"."""
    from moetool import model as model_module

    def exhausted(*args: object, **kwargs: object) -> None:
        raise OUT_OF_MEMORY[kind]()

    monkeypatch.setattr(model_module, "_check_experts_covered", exhausted)
    out = tmp_path / "out"
    args = {
        "inspect": ["inspect", model],
        "quantize": ["quantize", model, out, "-q"],
        "validate": ["validate", model, model, "--device", "cpu"],
    }[command]
    line = refused(args, ["out of memory", "--tokens"], inputs=[model], out=out)
    assert "internal" not in line, line


def test_validate_tokens_are_bounded(model: Path) -> None:
    """--tokens past what any check needs is refused before anything is allocated."""
    code, stdout, err = run_cli("validate", model, model, "--tokens", 100_000_000)
    assert code == 2 and "--tokens" in err and "65536" in err and "internal" not in err, err
    assert not stdout.strip()


@pytest.mark.parametrize("out", ["/", "/.", "/..", "/tmp/.."])
def test_out_that_names_no_new_folder_is_a_clean_error(model: Path, out: str, tmp_path: Path) -> None:
    """The filesystem root, however spelled: refused, with or without --overwrite."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for extra in ([], ["--overwrite"]):
            refused(["quantize", model, out, "-q", *extra], [out], inputs=[model])
    finally:
        os.chdir(cwd)


GOOD_SLOTS = {"first_slot": 4, "num_slots": 4, "replicas": 1, "slot_weight": "sigmoid_gate"}
FUSED_BAD: dict[str, tuple[object, str]] = {
    # the entry, and what the refusal says besides config.json
    "not_an_object": ([1, 2], "moetool_fused_shared_experts must be an object"),
    "first_slot_not_after_the_routed": ({**GOOD_SLOTS, "first_slot": 2}, "first_slot is 2"),
    "num_slots_not_what_is_stored": ({**GOOD_SLOTS, "num_slots": 3}, "+ 3 fused slots"),
    "replicas_not_an_integer": ({**GOOD_SLOTS, "replicas": "2"}, "moetool_fused_shared_experts.replicas"),
    "unknown_key": ({**GOOD_SLOTS, "x": 0}, "unknown ['x']"),
}


@pytest.fixture(scope="module")
def fused(families: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """qwen2_moe (a shared expert of 4 slots) and its fuse-shared output."""
    src = families["qwen2_moe"]
    out = tmp_path_factory.mktemp("fused") / "out"
    code, _, err = run_cli("fuse-shared", src, out, "-q")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["moetool_fused_shared_experts"]["num_slots"] == 4
    return src, out


@pytest.mark.parametrize("command", ["inspect", "quantize", "validate"])
@pytest.mark.parametrize("case", list(FUSED_BAD))
def test_a_bad_fused_slot_entry_names_config_json(
    fused: tuple[Path, Path], tmp_path: Path, case: str, command: str, untouched
) -> None:
    """inspect and quantize refuse the entry (exit 2); validate reports the converted checkpoint's
    config as a failed check (exit 1, the converted side is what it judges). Never ``moe_forward: …``."""
    src, out = fused
    entry, says = FUSED_BAD[case]
    conv = Path(shutil.copytree(out, tmp_path / "conv"))
    set_config(conv, moetool_fused_shared_experts=entry)
    names = [str(conv / "config.json"), says]
    if command == "validate":
        untouched(src, conv)
        code, stdout, err = run_cli("validate", src, conv, "--device", "cpu", "--tokens", "4", "--json")
        assert code == 1 and not err.strip(), err
        fails = [c["detail"] for c in json.loads(stdout)["checks"] if not c["passed"]]
        assert any(all(n in d for n in names) for d in fails), fails
        assert not any("moe_forward" in d for d in fails), fails
        return
    args = ["inspect", conv] if command == "inspect" else ["quantize", conv, tmp_path / "q", "-q"]
    line = refused(args, names, inputs=[src, conv])
    assert "moe_forward" not in line, line
