"""Bad checkpoints, faults and hostile files never cost the user data (docs/contract.md §3, §4).

Every refusal here is checked the same way, through the real command line (``moetool.cli.main.main``,
the one error funnel) or a real ``python -m moetool`` process: the exit code, one line on stderr naming
the culprit (file and/or tensor), the input tree byte-identical before and after, and neither OUT nor
``OUT.partial`` left behind. The cases and their expected behaviour are tabled in docs/reliability.md.

Faults that need a real process (SIGKILL at three moments, a full disk through ``RLIMIT_FSIZE``, two runs
racing for one OUT, the Hub offline) are started together by one module fixture, so their interpreter
start-ups overlap, and supervised from one polling loop; each test then judges one of them.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from reliability_helpers import (
    DELETE,
    INDEX,
    MANIFEST,
    TIME_LIMIT_S,
    last_tensor,
    one_error_line,
    partial_of,
    read_raw,
    refused,
    rewrite_tensors,
    run_cli,
    set_config,
    tree_digest,
    weight_map,
    write_raw,
)
from safetensors.torch import load_file, save_file

from moetool.pipeline import PROGRESS_NAME
from moetool.ssm import StateMeta, write_state_file
from moetool.testing.factory import DEEPGEMM_LEAVES, make_checkpoint

FAMILY = "qwen3_moe"
DIMS: dict[str, Any] = {"num_layers": 2, "hidden_size": 256, "moe_intermediate_size": 128, "num_experts": 4}
SHARD_BYTES = 400_000  # the base checkpoint comes in 7 shards with an index
PROC_TIMEOUT_S = 420.0


class Tripwire:
    """Unpickling this creates ``marker``: proof that something ran pickle on the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


# -- checkpoints ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded qwen3_moe checkpoint (index, 7 shards, tokenizer and license files)."""
    return make_checkpoint(
        FAMILY, tmp_path_factory.mktemp("base") / "src", max_shard_bytes=SHARD_BYTES, **DIMS
    )


@pytest.fixture
def model(base: Path, tmp_path: Path) -> Path:
    """A fresh copy of ``base`` for one test to damage."""
    return Path(shutil.copytree(base, tmp_path / "model"))


# -- corrupt input ----------------------------------------------------------------------------------
def _expert_shard(root: Path, layer: int = 1, expert: int = 2, proj: str = "down_proj") -> tuple[str, str]:
    name = f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
    return name, weight_map(root)[name]


def corrupt_truncated_shard(root: Path) -> list[str]:
    _, shard = _expert_shard(root)
    header, _ = read_raw(root / shard)
    with open(root / shard, "r+b") as f:
        f.truncate((root / shard).stat().st_size - 100)
    return [shard, last_tensor(header), "truncated"]


def corrupt_truncated_in_header(root: Path) -> list[str]:
    _, shard = _expert_shard(root)
    with open(root / shard, "r+b") as f:
        f.truncate(8 + 20)
    return [shard]


def corrupt_garbage_header(root: Path) -> list[str]:
    _, shard = _expert_shard(root)
    raw = bytearray((root / shard).read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 : 8 + n] = bytes((i * 151 + 7) % 256 for i in range(n))
    (root / shard).write_bytes(bytes(raw))
    return [shard, "JSON"]


def corrupt_oversized_header_length(root: Path) -> list[str]:
    _, shard = _expert_shard(root)
    raw = (root / shard).read_bytes()
    (root / shard).write_bytes(struct.pack("<Q", (1 << 64) - 1) + raw[8:])
    return [shard, "header length"]


def corrupt_header_length_over_limit(root: Path) -> list[str]:
    """A length under the file size is impossible to fake cheaply; 200 MB over safetensors' limit is
    refused before a byte of it is read."""
    _, shard = _expert_shard(root)
    raw = (root / shard).read_bytes()
    (root / shard).write_bytes(struct.pack("<Q", 200 << 20) + raw[8:])
    return [shard, "header length"]


def corrupt_overlapping_offsets(root: Path) -> list[str]:
    name, shard = _expert_shard(root, proj="gate_proj")
    header, data = read_raw(root / shard)
    up = name.replace("gate_proj", "up_proj")
    assert up in header, "gate and up of one expert are expected in one shard"
    header[up]["data_offsets"] = list(header[name]["data_offsets"])
    write_raw(root / shard, header, data)
    return [shard, name, up, "overlap"]


def corrupt_offsets_past_file(root: Path) -> list[str]:
    _, shard = _expert_shard(root)
    header, data = read_raw(root / shard)
    victim = last_tensor(header)
    begin, end = header[victim]["data_offsets"]
    header[victim]["data_offsets"] = [len(data), len(data) + end - begin]
    write_raw(root / shard, header, data)
    return [shard, victim]


def corrupt_index_names_missing_shard(root: Path) -> list[str]:
    _, shard = _expert_shard(root)
    (root / shard).unlink()
    return [INDEX, shard, "missing"]


def corrupt_index_names_absent_tensor(root: Path) -> list[str]:
    index = json.loads((root / INDEX).read_text())
    ghost = "model.layers.0.mlp.experts.7.gate_proj.weight"
    index["weight_map"][ghost] = sorted(set(index["weight_map"].values()))[0]
    (root / INDEX).write_text(json.dumps(index))
    return [INDEX, ghost]


def corrupt_same_tensor_in_two_shards(root: Path) -> list[str]:
    wm = weight_map(root)
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    home = wm[name]
    other = next(s for s in sorted(set(wm.values())) if s != home)
    tensors = load_file(root / other)
    tensors[name] = load_file(root / home)[name]
    save_file(tensors, root / other, metadata={"format": "pt"})
    return [name, home, other]


def corrupt_unsupported_dtype_in_header(root: Path) -> list[str]:
    name, shard = _expert_shard(root)
    header, data = read_raw(root / shard)
    header[name]["dtype"] = "C64"
    write_raw(root / shard, header, data)
    return [shard, name, "C64"]


def corrupt_experts_in_f8_e5m2(root: Path) -> list[str]:
    def to_e5m2(name: str, t: torch.Tensor) -> torch.Tensor | None:
        return t.to(torch.float8_e5m2) if name.startswith("model.layers.0.mlp.experts.") else None

    rewrite_tensors(root, to_e5m2)
    return ["F8_E5M2", "model.layers.0.mlp.experts."]


def corrupt_one_expert_in_f64(root: Path) -> list[str]:
    victim = "model.layers.1.mlp.experts.1.up_proj.weight"
    rewrite_tensors(root, lambda n, t: t.double() if n == victim else None)
    return [victim, "F64"]


def corrupt_config_missing_key(root: Path) -> list[str]:
    set_config(root, moe_intermediate_size=DELETE)
    return ["config.json", "moe_intermediate_size"]


def corrupt_config_wrong_intermediate(root: Path) -> list[str]:
    set_config(root, moe_intermediate_size=64)
    return ["config.json", "model.layers.0.mlp.experts.0.", "[128, 256]", "[64, 256]"]


def corrupt_config_wrong_hidden(root: Path) -> list[str]:
    set_config(root, hidden_size=384)
    return ["config.json", "model.layers.0.mlp.experts.0."]


def corrupt_config_fewer_experts(root: Path) -> list[str]:
    set_config(root, num_experts=3)
    return ["config.json", "model.layers.0.mlp.experts", "4", "3"]


def corrupt_config_fewer_layers(root: Path) -> list[str]:
    """The weights hold layer 1; a config that says one layer would leave its experts unconverted."""
    set_config(root, num_hidden_layers=1)
    return ["config.json", "model.layers.1."]


def corrupt_config_not_an_integer(root: Path) -> list[str]:
    set_config(root, num_hidden_layers="two")
    return ["config.json", "num_hidden_layers"]


def corrupt_config_not_an_object(root: Path) -> list[str]:
    (root / "config.json").write_text("[1, 2, 3]")
    return ["config.json"]


def corrupt_config_is_a_directory(root: Path) -> list[str]:
    (root / "config.json").unlink()
    (root / "config.json").mkdir()
    return ["config.json"]


CORRUPT: dict[str, Callable[[Path], list[str]]] = {
    "truncated_shard": corrupt_truncated_shard,
    "truncated_in_header": corrupt_truncated_in_header,
    "garbage_header": corrupt_garbage_header,
    "oversized_header_length": corrupt_oversized_header_length,
    "header_length_over_limit": corrupt_header_length_over_limit,
    "overlapping_offsets": corrupt_overlapping_offsets,
    "offsets_past_file": corrupt_offsets_past_file,
    "index_names_missing_shard": corrupt_index_names_missing_shard,
    "index_names_absent_tensor": corrupt_index_names_absent_tensor,
    "same_tensor_in_two_shards": corrupt_same_tensor_in_two_shards,
    "unsupported_dtype_in_header": corrupt_unsupported_dtype_in_header,
    "experts_in_f8_e5m2": corrupt_experts_in_f8_e5m2,
    "one_expert_in_f64": corrupt_one_expert_in_f64,
    "config_missing_key": corrupt_config_missing_key,
    "config_wrong_intermediate": corrupt_config_wrong_intermediate,
    "config_wrong_hidden": corrupt_config_wrong_hidden,
    "config_fewer_experts": corrupt_config_fewer_experts,
    "config_fewer_layers": corrupt_config_fewer_layers,
    "config_not_an_integer": corrupt_config_not_an_integer,
    "config_not_an_object": corrupt_config_not_an_object,
    "config_is_a_directory": corrupt_config_is_a_directory,
}


@pytest.mark.parametrize("command", ["inspect", "quantize"])
@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_checkpoint_is_refused(model: Path, tmp_path: Path, case: str, command: str) -> None:
    names = CORRUPT[case](model)
    out = tmp_path / "out"
    args = [command, model] + ([out, "-q"] if command == "quantize" else [])
    refused(args, names, inputs=[model], out=out)


@pytest.mark.parametrize(
    ("value", "where", "kind", "block"),
    [
        (float("nan"), ("model.layers.1.mlp.experts.2.down_proj.weight", 200, 70), "NaN", (1, 0)),
        (float("inf"), ("model.layers.0.mlp.experts.3.gate_proj.weight", 5, 130), "infinity", (0, 1)),
        (float("-inf"), ("model.layers.1.mlp.experts.0.up_proj.weight", 127, 255), "infinity", (0, 1)),
    ],
    ids=["nan", "inf", "minus_inf_at_block_corner"],
)
@pytest.mark.parametrize("layout", ["deepgemm", "hf"])
def test_non_finite_weight_names_tensor_and_block(
    model: Path,
    tmp_path: Path,
    value: float,
    where: tuple[str, int, int],
    kind: str,
    block: tuple[int, int],
    layout: str,
) -> None:
    name, row, col = where

    def poison(n: str, t: torch.Tensor) -> torch.Tensor | None:
        if n != name:
            return None
        t = t.clone()
        t[row, col] = value
        return t

    rewrite_tensors(model, poison)
    out = tmp_path / "out"
    refused(
        ["quantize", model, out, "--layout", layout, "-q"],
        [name, kind, f"row block {block[0]}, column block {block[1]}"],
        inputs=[model],
        out=out,
    )


# -- hostile input ----------------------------------------------------------------------------------
def _move_shard_out(root: Path, outside: Path) -> tuple[str, Path]:
    _, shard = _expert_shard(root)
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / shard
    shutil.move(root / shard, target)
    return shard, target


def _point_index(root: Path, shard: str, new: str) -> None:
    index = json.loads((root / INDEX).read_text())
    index["weight_map"] = {k: (new if v == shard else v) for k, v in index["weight_map"].items()}
    (root / INDEX).write_text(json.dumps(index))


def hostile_index_dotdot(root: Path, outside: Path) -> list[str]:
    shard, _ = _move_shard_out(root, outside)
    rel = f"../{outside.name}/{shard}"
    _point_index(root, shard, rel)
    return [INDEX, rel]


def hostile_index_absolute(root: Path, outside: Path) -> list[str]:
    shard, target = _move_shard_out(root, outside)
    _point_index(root, shard, str(target))
    return [INDEX, str(target)]


def hostile_shard_symlink_outside(root: Path, outside: Path) -> list[str]:
    shard, target = _move_shard_out(root, outside)
    (root / shard).symlink_to(target)
    return [shard, "outside"]


def hostile_index_hides_dotdot_in_the_middle(root: Path, outside: Path) -> list[str]:
    shard, _ = _move_shard_out(root, outside)
    rel = f"sub/../../{outside.name}/{shard}"
    _point_index(root, shard, rel)
    return [INDEX, outside.name]


def hostile_index_names_pickle(root: Path, outside: Path) -> list[str]:
    """A weight_map entry pointing at a pickle: read as safetensors (and refused), never unpickled."""
    _, shard = _expert_shard(root)
    (root / shard).unlink()
    (root / "pytorch_model.bin").write_bytes(pickle.dumps(Tripwire(outside / "unpickled")))
    _point_index(root, shard, "pytorch_model.bin")
    return ["pytorch_model.bin"]


def _link_out(root: Path, outside: Path, name: str) -> list[str]:
    """``name`` moved out of the checkpoint (whole and valid) and linked back from where it was."""
    outside.mkdir(parents=True, exist_ok=True)
    shutil.move(root / name, outside / name)
    (root / name).symlink_to(outside / name)
    return [str(root / name), "outside the checkpoint"]


def hostile_config_symlink_outside(root: Path, outside: Path) -> list[str]:
    """A config.json elsewhere would be read, and copied into OUT, as this checkpoint's."""
    return _link_out(root, outside, "config.json")


def hostile_index_symlink_outside(root: Path, outside: Path) -> list[str]:
    return _link_out(root, outside, INDEX)


HOSTILE: dict[str, Callable[[Path, Path], list[str]]] = {
    "index_path_dotdot": hostile_index_dotdot,
    "index_path_absolute": hostile_index_absolute,
    "index_path_dotdot_inside": hostile_index_hides_dotdot_in_the_middle,
    "shard_symlink_outside": hostile_shard_symlink_outside,
    "index_names_pickle": hostile_index_names_pickle,
    "config_symlink_outside": hostile_config_symlink_outside,
    "index_symlink_outside": hostile_index_symlink_outside,
}


@pytest.mark.parametrize("command", ["inspect", "quantize"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_path_is_refused(model: Path, tmp_path: Path, case: str, command: str) -> None:
    outside = tmp_path / "outside"
    names = HOSTILE[case](model, outside)
    outside.mkdir(exist_ok=True)
    out = tmp_path / "out"
    args = [command, model] + ([out, "-q"] if command == "quantize" else [])
    refused(args, names, inputs=[model, outside], out=out)
    assert not (outside / "unpickled").exists(), "a pickle was loaded"


def test_extra_file_linked_outside_is_not_copied(model: Path, tmp_path: Path) -> None:
    """A tokenizer file that is a link to a file elsewhere would copy that file into OUT."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private key material\n")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "out"
    refused(["quantize", model, out, "-q"], ["tokenizer.json", "outside"], inputs=[model, secret], out=out)


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_only_checkpoint_is_refused_unopened(tmp_path: Path, suffix: str) -> None:
    root = tmp_path / "model"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": FAMILY}))
    marker = tmp_path / "unpickled"
    (root / f"pytorch_model{suffix}").write_bytes(pickle.dumps(Tripwire(marker)))
    out = tmp_path / "out"
    for args in (["inspect", root], ["quantize", root, out, "-q"]):
        refused(args, [f"pytorch_model{suffix}", "pickle"], inputs=[root], out=out)
    assert not marker.exists(), "the pickle was loaded"


def test_pickles_beside_safetensors_are_ignored_not_loaded_not_copied(model: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (model / name).write_bytes(pickle.dumps(Tripwire(marker)))
    before = tree_digest(model)
    out = tmp_path / "out"
    assert run_cli("inspect", model)[0] == 0
    code, _, err = run_cli("quantize", model, out, "-q")
    assert code == 0, err
    assert tree_digest(model) == before
    assert not marker.exists(), "a pickle was loaded"
    assert not [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt")], "a pickle was copied to OUT"


def test_remote_code_is_never_imported(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config with ``auto_map`` and modeling code beside it (what trust_remote_code would run): the
    code must not run, even with the checkpoint folder importable."""
    marker = tmp_path / "remote-code-ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    for mod in ("modeling_evil", "configuration_evil", "tokenization_evil"):
        (model / f"{mod}.py").write_text(code)
    set_config(
        model,
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    )
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    monkeypatch.syspath_prepend(str(model))
    before = tree_digest(model)
    out = tmp_path / "out"
    assert run_cli("inspect", model)[0] == 0
    code_, _, err = run_cli("quantize", model, out, "-q")
    assert code_ == 0, err
    assert not marker.exists(), "remote code ran"
    assert not {"modeling_evil", "configuration_evil", "tokenization_evil"} & set(sys.modules)
    assert tree_digest(model) == before


# -- JSON bombs and deep nesting: a clean InputError in bounded time ----------------------------------
def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


def bomb_config_deep(root: Path) -> list[str]:
    text = (root / "config.json").read_text().rstrip()[:-1] + f', "deep": {_nest(200_000)}}}'
    (root / "config.json").write_text(text)
    return ["config.json"]


def bomb_config_nested_below_parser_limit(root: Path) -> list[str]:
    """Parses, but deep enough to break code that walks the value recursively (deepcopy, dumps)."""
    text = (root / "config.json").read_text().rstrip()[:-1] + f', "deep": {_nest(900)}}}'
    (root / "config.json").write_text(text)
    return ["config.json", "nest"]


def bomb_config_huge_integer(root: Path) -> list[str]:
    text = (root / "config.json").read_text().rstrip()[:-1] + ', "big": ' + "9" * 200_000 + "}"
    (root / "config.json").write_text(text)
    return ["config.json"]


def bomb_config_huge_file(root: Path) -> list[str]:
    with open(root / "config.json", "r+b") as f:
        f.truncate(65 << 20)  # sparse: costs no disk, and must be refused before it is read
    return ["config.json", "larger"]


def bomb_config_huge_layer_count(root: Path) -> list[str]:
    set_config(root, num_hidden_layers=10**12)
    return ["config.json"]


def bomb_index_deep(root: Path) -> list[str]:
    index = json.loads((root / INDEX).read_text())
    text = json.dumps(index)[:-1] + f', "deep": {_nest(200_000)}}}'
    (root / INDEX).write_text(text)
    return [INDEX]


def bomb_index_nested_below_parser_limit(root: Path) -> list[str]:
    index = json.loads((root / INDEX).read_text())
    text = json.dumps(index)[:-1] + f', "metadata": {{"x": {_nest(900)}}}}}'
    (root / INDEX).write_text(text)
    return [INDEX]


def bomb_shard_header_deep(root: Path) -> list[str]:
    _, shard = _expert_shard(root)
    header, data = read_raw(root / shard)
    text = json.dumps(header)[:-1] + f', "deep": {_nest(100_000)}}}'
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    (root / shard).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return [shard]


BOMBS: dict[str, Callable[[Path], list[str]]] = {
    "config_deep_nesting": bomb_config_deep,
    "config_nesting_below_parser_limit": bomb_config_nested_below_parser_limit,
    "config_huge_integer": bomb_config_huge_integer,
    "config_over_64mb": bomb_config_huge_file,
    "config_huge_layer_count": bomb_config_huge_layer_count,
    "index_deep_nesting": bomb_index_deep,
    "index_nesting_below_parser_limit": bomb_index_nested_below_parser_limit,
    "shard_header_deep_nesting": bomb_shard_header_deep,
}


@pytest.mark.parametrize(
    ("case", "command"),
    # the layer-count bomb reaches one code path (config resolution) either way; once is enough
    [
        (c, cmd)
        for c in BOMBS
        for cmd in ("inspect", "quantize")
        if (c, cmd) != ("config_huge_layer_count", "inspect")
    ],
)
def test_json_bomb_is_a_clean_error_in_bounded_time(
    model: Path, tmp_path: Path, case: str, command: str
) -> None:
    names = BOMBS[case](model)
    out = tmp_path / "out"
    args = [command, model] + ([out, "-q"] if command == "quantize" else [])
    refused(args, names, inputs=[model], out=out, time_limit_s=TIME_LIMIT_S)


def _state_file(path: Path) -> Path:
    meta = StateMeta(
        layout="k-first",
        num_value_heads=4,
        head_k_dim=8,
        head_v_dim=6,
        num_key_heads=2,
        model_type="qwen3_next",
    )
    g = torch.Generator().manual_seed(5)
    write_state_file(
        path, {"model.layers.0.linear_attn.recurrent_state": torch.randn(3, 4, 8, 6, generator=g)}, meta
    )
    return path


def state_bomb_deep_header(path: Path) -> None:
    _, data = read_raw(path)
    raw = b'{"__metadata__": ' + _nest(200_000).encode() + b"}"
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def state_bomb_header_length(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", (1 << 64) - 1) + raw[8:])


def state_bomb_huge_metadata_integer(path: Path) -> None:
    header, data = read_raw(path)
    header["__metadata__"]["num_value_heads"] = "9" * 100_000
    write_raw(path, header, data)


def state_bomb_shape_overflow(path: Path) -> None:
    header, data = read_raw(path)
    header["model.layers.0.linear_attn.recurrent_state"]["shape"] = [2**62, 4, 8, 6]
    write_raw(path, header, data)


def state_bad_metadata_values(path: Path) -> None:
    header, data = read_raw(path)
    header["__metadata__"]["num_key_heads"] = "0"
    write_raw(path, header, data)


STATE_BOMBS: dict[str, Callable[[Path], None]] = {
    "deep_header": state_bomb_deep_header,
    "header_length": state_bomb_header_length,
    "huge_metadata_integer": state_bomb_huge_metadata_integer,
    "shape_overflow": state_bomb_shape_overflow,
    "zero_key_heads": state_bad_metadata_values,
}


@pytest.mark.parametrize("case", list(STATE_BOMBS))
def test_hostile_state_file_is_a_clean_error(tmp_path: Path, case: str) -> None:
    src = _state_file(tmp_path / "state.safetensors")
    STATE_BOMBS[case](src)
    dst = tmp_path / "out.safetensors"
    line = refused(["convert-ssm", src, dst, "-q"], [str(src)], inputs=[src], time_limit_s=TIME_LIMIT_S)
    assert len(line) < 1000, "the error line repeats the hostile value"
    assert not dst.exists() and not list(tmp_path.glob(".out.safetensors.*")), "a state file was left behind"


# -- wrong use --------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["equal", "inside", "nested_inside", "through_a_link"])
def test_out_equal_to_or_inside_model_is_refused(model: Path, tmp_path: Path, where: str) -> None:
    if where == "through_a_link":
        (tmp_path / "alias").symlink_to(model)
        out = tmp_path / "alias" / "fp8"
    else:
        out = {"equal": model, "inside": model / "fp8", "nested_inside": model / "a" / "b"}[where]
    for extra in ([], ["--overwrite"]):
        before = tree_digest(model)
        code, _, err = run_cli("quantize", model, out, "-q", *extra)
        line = one_error_line(err)
        assert code == 2, line
        assert "OUT" in line and str(out) in line, line
        assert tree_digest(model) == before, "the input was modified"


def test_model_inside_out_is_refused_even_with_overwrite(base: Path, tmp_path: Path) -> None:
    """``--overwrite`` replaces OUT at commit: with the input inside OUT that would delete the input."""
    out = tmp_path / "parent"
    model = Path(shutil.copytree(base, out / "model"))
    refused(["quantize", model, out, "--overwrite", "-q"], [str(out)], inputs=[out])


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_existing_out_is_refused_and_kept(model: Path, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    if kind == "directory":
        out.mkdir()
        (out / "precious.txt").write_text("do not touch")
    else:
        out.write_text("do not touch")
    refused(["quantize", model, out, "-q"], [str(out), "exists"], inputs=[model, out])
    assert not partial_of(out).exists()


@pytest.mark.parametrize("how", ["read_only_directory", "parent_is_a_file"])
def test_unwritable_destination(model: Path, tmp_path: Path, how: str) -> None:
    parent = tmp_path / "dest"
    parent.mkdir()
    undo: Callable[[], None] = lambda: None  # noqa: E731
    if how == "parent_is_a_file":
        parent.rmdir()
        parent.write_text("a file where a directory is needed")
    elif os.geteuid() != 0:
        parent.chmod(0o555)
        undo = lambda: parent.chmod(0o755)  # noqa: E731
    else:
        # root ignores permission bits; an immutable directory refuses even root (CAP_LINUX_IMMUTABLE)
        made = subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode == 0
        if made:
            undo = lambda: subprocess.run(["chattr", "-i", str(parent)], check=True)  # noqa: E731
        else:
            parent = Path("/sys")  # sysfs refuses new entries, also to root
    try:
        probe = parent / "probe"
        with pytest.raises(OSError):
            probe.mkdir()
        out = parent / "out"
        line = refused(["quantize", model, out, "-q"], [str(partial_of(out))], inputs=[model], out=out)
        assert "write" in line, line
    finally:
        undo()


def test_quantizing_an_fp8_checkpoint_keeps_its_bytes(tmp_path: Path) -> None:
    """DeepSeek-V3-style FP8 input, quantized again in the same format: every FP8 weight and its scale
    are copied as they are (no dequantize/requantize drift)."""
    src = make_checkpoint(FAMILY, tmp_path / "fp8", fp8=True, **DIMS)
    before = tree_digest(src)
    out = tmp_path / "out"
    code, _, err = run_cli("quantize", src, out, "--layout", "hf", "-q")
    assert code == 0, err
    assert tree_digest(src) == before
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    want = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    experts = [n for n in want if ".mlp.experts." in n]
    assert len(experts) == 2 * 2 * 3 * DIMS["num_experts"]  # layers x (weight, scale) x projections x experts
    assert all(want[n].dtype in (torch.float8_e4m3fn, torch.float32) for n in experts)
    # every tensor, FP8 experts and attention included, keeps its name, dtype and bytes
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        assert got[n].dtype == w.dtype and torch.equal(got[n].view(torch.uint8), w.view(torch.uint8)), n


@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
def test_requantizing_deepgemm_output_keeps_its_bytes(base: Path, tmp_path: Path, fmt: str) -> None:
    first, second = tmp_path / "once", tmp_path / "twice"
    assert run_cli("quantize", base, first, "--layout", "deepgemm", "--scale-fmt", fmt, "-q")[0] == 0
    before = tree_digest(first)
    code, _, err = run_cli("quantize", first, second, "--layout", "deepgemm", "--scale-fmt", fmt, "-q")
    assert code == 0, err
    assert tree_digest(first) == before
    a = {k: v for f in first.glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in second.glob("*.safetensors") for k, v in load_file(f).items()}
    stacked = [n for n in a if n.endswith(tuple(DEEPGEMM_LEAVES.values()))]
    assert len(stacked) == 4 * DIMS["num_layers"]
    for n in stacked:
        assert torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)), n


@pytest.fixture(scope="module")
def converted(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "fp8"
    code, _, err = run_cli("quantize", base, out, "-q")
    assert code == 0, err
    return out


VALIDATE_FAST = ["--device", "cpu", "--tokens", "8", "--json"]


def _validate_fails(original: Path, conv: Path, names: list[str]) -> list[str]:
    """``validate`` exits 1 and some failed check's detail names each of ``names``; returns the
    failed checks as ``group scope: detail`` lines."""
    before = (tree_digest(original), tree_digest(conv))
    code, out, err = run_cli("validate", original, conv, *VALIDATE_FAST)
    assert code == 1, f"exit {code}\n{out[-2000:]}\n{err}"
    assert "Traceback" not in err and "internal error" not in err, err
    fails = [
        f"{c['group']} {c['scope']}: {c['detail']}" for c in json.loads(out)["checks"] if not c["passed"]
    ]
    assert fails, out
    for name in names:
        assert any(name in line for line in fails), f"{name!r} not named by a failed check: {fails}"
    assert (tree_digest(original), tree_digest(conv)) == before, "validate modified a checkpoint"
    return fails


def test_validate_passes_on_the_real_pair(base: Path, converted: Path) -> None:
    """The control for the failures below: the untouched pair passes."""
    code, out, err = run_cli("validate", base, converted, *VALIDATE_FAST)
    assert code == 0, f"{out}\n{err}"


def test_validate_unrelated_checkpoints_of_one_family(converted: Path, tmp_path: Path) -> None:
    other = make_checkpoint(FAMILY, tmp_path / "other", seed=99, max_shard_bytes=SHARD_BYTES, **DIMS)
    _validate_fails(other, converted, ["model.layers.0.mlp.experts"])


def test_validate_unrelated_checkpoints_of_two_families(converted: Path, tmp_path: Path) -> None:
    other = make_checkpoint("mixtral", tmp_path / "other", **DIMS)
    _validate_fails(other, converted, ["mixtral"])


def test_validate_shard_that_no_longer_matches_the_manifest(
    base: Path, converted: Path, tmp_path: Path
) -> None:
    conv = Path(shutil.copytree(converted, tmp_path / "conv"))
    shard = sorted(set(weight_map(conv).values()))[-1]
    raw = bytearray((conv / shard).read_bytes())
    raw[-1] ^= 0x01
    (conv / shard).write_bytes(bytes(raw))
    _validate_fails(base, conv, [shard])


def test_validate_manifest_recording_another_hash(base: Path, converted: Path, tmp_path: Path) -> None:
    conv = Path(shutil.copytree(converted, tmp_path / "conv"))
    manifest = json.loads((conv / MANIFEST).read_text())
    manifest["files"]["tokenizer.json"]["sha256"] = "0" * 64
    (conv / MANIFEST).write_text(json.dumps(manifest))
    _validate_fails(base, conv, ["tokenizer.json"])


def test_validate_manifest_listing_a_tensor_not_stored(base: Path, converted: Path, tmp_path: Path) -> None:
    conv = Path(shutil.copytree(converted, tmp_path / "conv"))
    manifest = json.loads((conv / MANIFEST).read_text())
    ghost = "model.layers.1.mlp.experts.w4_weight"
    manifest["tensors"][ghost] = {"sources": [], "transform": "copy"}
    (conv / MANIFEST).write_text(json.dumps(manifest))
    _validate_fails(base, conv, [ghost])


# -- faults in real processes -----------------------------------------------------------------------
KILL_SHARD = "300KB"
KILL_POINTS = ("early", "first_shard", "near_end")
NEAR_END_LEFT = 2


def recorded_shards(partial: Path) -> int:
    """Finished shards the run has recorded for --resume (0 while none, or mid-replace)."""
    try:
        return len(
            [k for k in json.loads((partial / PROGRESS_NAME).read_text()) if k.endswith(".safetensors")]
        )
    except (OSError, ValueError):
        return 0


def quantize_argv(src: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(src), str(out), "--layout", "hf", "--max-shard-size", KILL_SHARD, "-q", *extra]


STOP_POINT = Path(__file__).with_name("stop_point.py")


def spawn(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    fsize: int | None = None,
    stop_at: str | None = None,
) -> subprocess.Popen:
    """``python -m moetool ARGS`` in a new process; with ``stop_at`` it stops itself at that point (see
    ``stop_point.py``) for the supervisor to kill it there: the kill lands where the test says even when
    the loaded machine lets the run go faster than the supervisor looks."""

    def setup() -> None:
        # Below the supervising loop's priority, so the loop is not starved by the runs it watches.
        os.nice(10)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    head = [str(STOP_POINT), stop_at] if stop_at else ["-m", "moetool"]
    return subprocess.Popen(
        [sys.executable, *head, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MOETOOL_DEBUG": "0", **(env or {})},
        preexec_fn=setup,
    )


def is_stopped(proc: subprocess.Popen) -> bool:
    """Whether the live process ``proc`` is stopped (SIGSTOP)."""
    try:
        stat_line = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rpartition(")")[2].split()[0] in ("T", "t")


@dataclass
class Run:
    """One supervised process: how it ended, what it printed, and what was seen while it ran.
    ``kill_at`` is how many shards the progress record lists when it stops for its SIGKILL (None: it
    runs to its end)."""

    proc: subprocess.Popen
    out: Path
    src: Path
    src_digest: dict[str, str]
    kill_at: int | None = None
    killed_at_recorded: int | None = None
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""


@dataclass
class Faults:
    """Every supervised run by scenario, the kill source's shard count, the second run's attempts on
    the locked OUT (how, exit code, stderr, first run still alive) and where the clean reference goes."""

    runs: dict[str, Run]
    n_shards: int
    attempts: list[tuple[str, int, str, bool]] = field(default_factory=list)
    clean: Path = Path()


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Faults:
    """Start every real-process scenario at once and supervise them from one loop.

    - ``kill/<point>``: ``quantize --layout hf`` killed with SIGKILL early (OUT.partial just made),
      after its first shard is recorded, or with all shards but the last two recorded;
    - ``kill/other_options``: a ``--scale-fmt ue8m0`` run killed with all shards but two recorded
      (resumed later with the default options);
    - ``lock``: a plain run that stops (SIGSTOP) once it has recorded a shard, still holding its lock
      as a slow run would, while a second run tries the same OUT plain, with ``--overwrite`` and with
      ``--resume``; then continued (SIGCONT) to complete;

    Each killed run stops itself at its point (``stop_point.py``) and is killed there while stopped, so
    the point is exact on any machine: a loaded one cannot let a run past it before the loop looks.
    - ``disk_full/<stage>``: RLIMIT_FSIZE below the first shard, or above every shard but below a large
      extra file copied at the end;
    - ``hub_offline``: ``inspect org/name`` with HF_HUB_OFFLINE=1 and an empty HF_HOME.
    """
    root = tmp_path_factory.mktemp("faults")
    kill_src = make_checkpoint(FAMILY, root / "kill_src", **{**DIMS, "num_experts": 16}, seed=11)
    full_src = make_checkpoint(FAMILY, root / "full_src", **DIMS, seed=13)
    (full_src / "vocab.txt").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, copied after every shard
    hf_home = root / "hf_home"
    hf_home.mkdir()

    code, plan, err = run_cli(*quantize_argv(kill_src, root / "plan"), "--dry-run", "--json")
    assert code == 0, err
    n_shards = len(json.loads(plan)["shards"])
    assert n_shards >= 8, f"{n_shards} shards: too few to kill between them"

    runs: dict[str, Run] = {}

    def add(key: str, args: list[str], src: Path, out: Path, **kw: Any) -> Run:
        kill_at = kw.pop("kill_at", None)
        if kill_at is not None:
            kw["stop_at"] = f"shards:{kill_at}" if kill_at else "lock"
        digest = tree_digest(src)
        runs[key] = Run(spawn(args, **kw), out, src, digest, kill_at=kill_at)
        return runs[key]

    # early: OUT.partial just made and locked; then after the first recorded shard; near the end: every
    # shard but the last NEAR_END_LEFT recorded. Each run stops itself there and is killed while stopped.
    kill_at = {"early": 0, "first_shard": 1, "near_end": n_shards - NEAR_END_LEFT}
    for point in KILL_POINTS:
        out = root / f"kill_{point}"
        add(f"kill/{point}", quantize_argv(kill_src, out), kill_src, out, kill_at=kill_at[point])
    out = root / "kill_other_options"
    add(
        "kill/other_options",
        quantize_argv(kill_src, out, "--scale-fmt", "ue8m0"),
        kill_src,
        out,
        kill_at=kill_at["near_end"],
    )
    # stops once its first shard is recorded, still holding its lock, and goes on when continued
    lock = add(
        "lock",
        quantize_argv(kill_src, root / "lock_out"),
        kill_src,
        root / "lock_out",
        stop_at="once:shards:1",
    )
    add(
        "disk_full/first_shard",
        quantize_argv(full_src, root / "full_a"),
        full_src,
        root / "full_a",
        fsize=64 << 10,
    )
    add(
        "disk_full/last_copy",
        quantize_argv(full_src, root / "full_b"),
        full_src,
        root / "full_b",
        fsize=700 << 10,
    )
    add(
        "hub_offline",
        ["inspect", "moetool-test-org/not-cached-model"],
        hf_home,
        root / "never",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")},
    )

    deadline = time.monotonic() + PROC_TIMEOUT_S
    attempts: list[tuple[str, int, str, bool]] = []
    try:
        while time.monotonic() < deadline and any(r.proc.poll() is None for r in runs.values()):
            for r in runs.values():
                armed = r.kill_at is not None and r.killed_at_recorded is None and r.proc.poll() is None
                if armed and is_stopped(r.proc):
                    r.killed_at_recorded = recorded_shards(partial_of(r.out))
                    os.kill(r.proc.pid, signal.SIGKILL)
                    r.proc.wait()
            if not attempts and lock.proc.poll() is None and is_stopped(lock.proc):
                # the first run is stopped after its first shard, holding OUT.partial's lock
                try:
                    for extra in ([], ["--overwrite"], ["--resume"]):
                        code, _, err = run_cli(*quantize_argv(kill_src, lock.out), *extra)
                        attempts.append((" ".join(extra) or "plain", code, err, lock.proc.poll() is None))
                finally:
                    os.kill(lock.proc.pid, signal.SIGCONT)
            time.sleep(0.01)
    finally:
        for r in runs.values():
            if r.proc.poll() is None:
                r.proc.kill()
            r.stdout, r.stderr = r.proc.communicate(timeout=60)
            r.returncode = r.proc.returncode
    return Faults(runs, n_shards, attempts, root / "kill_clean")


def assert_same_checkpoint(got: Path, want: Path) -> None:
    """Byte-identical trees; the manifest may differ only in argv (OUT path, --resume)."""
    a, b = tree_digest(got), tree_digest(want)
    assert sorted(a) == sorted(b)
    for rel in b:
        if rel != MANIFEST:
            assert a[rel] == b[rel], f"{rel} differs from a clean run"
    ma, mb = json.loads((got / MANIFEST).read_text()), json.loads((want / MANIFEST).read_text())
    ma.pop("argv")
    mb.pop("argv")
    assert ma == mb


@pytest.fixture(scope="module")
def kill_clean(faults: Faults) -> Path:
    """The same quantize as every kill/lock run, uninterrupted: the bytes they must all end with."""
    code, _, err = run_cli(*quantize_argv(faults.runs["lock"].src, faults.clean))
    assert code == 0, err
    return faults.clean


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_gives_the_clean_bytes(faults: Faults, kill_clean: Path, point: str) -> None:
    run = faults.runs[f"kill/{point}"]
    assert run.killed_at_recorded is not None, (
        f"the run ended (rc {run.returncode}) before the kill point; nothing was tested\n{run.stderr}"
    )
    assert run.returncode == -signal.SIGKILL
    assert run.killed_at_recorded == run.kill_at, f"killed with {run.killed_at_recorded} shards recorded"
    assert not run.out.exists(), "a killed run left OUT"
    assert partial_of(run.out).is_dir(), "a killed run must leave OUT.partial for --resume"
    assert tree_digest(run.src) == run.src_digest, "the input was modified"

    code, stdout, err = run_cli(*quantize_argv(run.src, run.out), "--resume", "--json")
    assert code == 0, err
    reused = json.loads(stdout)["reused_shards"]
    assert len(reused) == run.kill_at, f"--resume reused {len(reused)} of the {run.kill_at} recorded shards"
    assert run.out.is_dir() and not partial_of(run.out).exists()
    assert_same_checkpoint(run.out, kill_clean)
    assert tree_digest(run.src) == run.src_digest


def test_resume_with_other_options_never_mixes_shards(faults: Faults, kill_clean: Path) -> None:
    """Shards of a killed ``--scale-fmt ue8m0`` run (same shard names and sizes, other scale bytes) must
    not be reused by a ``--scale-fmt float`` resume: either the resume refuses (exit 2, OUT.partial
    kept) or its output equals a clean float run."""
    run = faults.runs["kill/other_options"]
    assert run.killed_at_recorded is not None, f"the run ended before its kill point\n{run.stderr}"
    assert run.killed_at_recorded == run.kill_at, f"killed with {run.killed_at_recorded} shards recorded"
    work = tree_digest(partial_of(run.out))
    code, _, err = run_cli(*quantize_argv(run.src, run.out), "--resume")
    if code == 2:
        one_error_line(err)
        assert not run.out.exists()
        assert tree_digest(partial_of(run.out)) == work, "a refused resume changed OUT.partial"
        return
    assert code == 0, err
    assert_same_checkpoint(run.out, kill_clean)


def test_second_run_on_a_busy_out_is_refused_and_the_first_completes(
    faults: Faults, kill_clean: Path
) -> None:
    run = faults.runs["lock"]
    attempts = faults.attempts
    assert attempts, (
        f"the first run ended (rc {run.returncode}) before a second could try; nothing was tested"
    )
    for how, code, err, first_alive in attempts:
        assert first_alive, f"the first run ended during the {how} attempt; nothing was tested"
        line = one_error_line(err)
        assert code == 2, f"{how}: exit {code}: {line}"
        assert "another moetool run" in line and str(run.out) in line, f"{how}: {line}"
    assert run.returncode == 0, run.stderr
    assert tree_digest(run.src) == run.src_digest
    assert_same_checkpoint(run.out, kill_clean)


@pytest.mark.parametrize("stage", ["first_shard", "last_copy"])
def test_disk_full_leaves_nothing_and_says_so(faults: Faults, stage: str) -> None:
    run = faults.runs[f"disk_full/{stage}"]
    line = one_error_line(run.stderr)
    assert run.returncode == 2, line
    assert "no space" in line, line
    assert str(partial_of(run.out)) in line, line
    if stage == "last_copy":
        assert "vocab.txt" in line, f"expected the failure at the final copy, after every shard: {line}"
    assert not run.out.exists() and not partial_of(run.out).exists(), "a failed run left files behind"
    assert tree_digest(run.src) == run.src_digest


def test_hub_offline_with_nothing_cached(faults: Faults) -> None:
    run = faults.runs["hub_offline"]
    line = one_error_line(run.stderr)
    assert run.returncode == 2, line
    assert "moetool-test-org/not-cached-model" in line and "HF_HUB_OFFLINE" in line, line
    assert not [p for p in run.src.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")]
