"""What the command line promises around a result: where ``validate --report`` may write, the error
object of ``--json``, and the bound on ``fuse-shared --replicas``.

- ``validate --report PATH`` never writes into either checkpoint (by real path: the file, a link to a
  file in one, a folder linked into one, a state file itself), is refused before any work when its
  folder is missing or it names a folder, writes atomically (a reader sees the old report or the new
  one), and says where it wrote.
- ``--json`` on a failure prints one error object on stdout (file, tensor, fix, exit code), beside the
  one line on stderr, for input errors, usage errors and click's own option errors.
- ``fuse-shared --replicas`` above the routed-expert count is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from reliability_helpers import (
    DIMS,
    FAMILY,
    MANIFEST,
    hf_checkpoint,
    one_error_line,
    partial_of,
    refused,
    run_cli,
    shards_of,
    tree_digest,
)

from moetool.ssm import StateMeta, write_state_file

VALIDATE = ["--device", "cpu", "--tokens", "4"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    orig = hf_checkpoint(FAMILY, root / "orig", **DIMS)
    conv = root / "conv"
    code, _, err = run_cli("quantize", orig, conv, "-q")
    assert code == 0, err
    return orig, conv


def _states(root: Path) -> tuple[Path, Path]:
    import torch

    meta = StateMeta(
        layout="k-first",
        num_value_heads=4,
        head_k_dim=8,
        head_v_dim=6,
        num_key_heads=2,
        model_type="qwen3_next",
    )
    g = torch.Generator().manual_seed(3)
    a = root / "a.safetensors"
    write_state_file(
        a, {"model.layers.0.linear_attn.recurrent_state": torch.randn(2, 4, 8, 6, generator=g)}, meta
    )
    b = root / "b.safetensors"
    code, _, err = run_cli("convert-ssm", a, b, "-q")
    assert code == 0, err
    return a, b


# -- 6. validate --report ------------------------------------------------------------------------------
REPORT_INTO_INPUT = {
    "a_shard_of_the_original": lambda o, c, t: o / "model-00001-of-00010.safetensors",
    "the_manifest_of_the_converted": lambda o, c, t: c / MANIFEST,
    "a_new_file_in_the_converted": lambda o, c, t: c / "report.json",
    "through_a_linked_folder": lambda o, c, t: _link(t / "alias", o) / "report.json",
    "a_link_to_a_file_in_the_original": lambda o, c, t: _link(t / "report.json", o / "config.json"),
    "a_dangling_link_into_the_converted": lambda o, c, t: _link(t / "report.json", c / "new.json"),
    "relative_from_inside_the_converted": lambda o, c, t: Path("report.json"),
    "relative_dotdot_into_the_original": lambda o, c, t: Path("..") / o.name / "report.json",
    "a_hard_link_of_a_file_of_the_original": lambda o, c, t: _hard_link(t / "report.json", o / "config.json"),
    "a_hard_link_of_a_shard_of_the_converted": lambda o, c, t: _hard_link(
        t / "report.json", c / shards_of(c)[0]
    ),
}


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def _hard_link(path: Path, target: Path) -> Path:
    """Another name of ``target``'s file: replacing it would change the file's link count."""
    os.link(target, path)
    return path


@pytest.mark.parametrize("case", list(REPORT_INTO_INPUT))
def test_a_report_path_inside_a_checkpoint_is_refused_before_any_work(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    orig, conv = (Path(shutil.copytree(p, tmp_path / p.name)) for p in pair)
    monkeypatch.chdir(conv)  # where a relative --report starts from
    report = REPORT_INTO_INPUT[case](orig, conv, tmp_path)
    before = tree_digest(tmp_path)
    code, stdout, err = run_cli("validate", orig, conv, *VALIDATE, "--report", report)
    line = one_error_line(err)
    assert code == 2 and "--report" in line and str(report) in line, line
    assert not stdout.strip(), "refused before validating: no result"
    assert tree_digest(tmp_path) == before


def test_a_report_path_equal_to_a_state_file_is_refused(tmp_path: Path) -> None:
    a, b = _states(tmp_path)
    for target in (a, b, _hard_link(tmp_path / "c.safetensors", a)):
        refused(["validate", a, b, "--report", target], [str(target)], inputs=[a, b])


@pytest.mark.parametrize("case", ["missing_folder", "a_folder", "folder_is_a_file"])
def test_a_report_path_that_cannot_be_written_is_refused_before_any_work(
    pair: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    orig, conv = pair
    report = {
        "missing_folder": tmp_path / "no" / "such" / "report.json",
        "a_folder": tmp_path,
        "folder_is_a_file": tmp_path / "file" / "report.json",
    }[case]
    (tmp_path / "file").write_text("x")
    code, stdout, err = run_cli("validate", orig, conv, *VALIDATE, "--report", report)
    # a folder is refused by the option parser itself (click's usage message), the others by moetool
    line = err if case == "a_folder" else one_error_line(err)
    assert code == 2 and str(report) in line and "Traceback" not in err, err
    assert not stdout.strip()


def test_the_report_is_written_atomically_and_its_place_is_said(
    pair: tuple[Path, Path], tmp_path: Path, untouched
) -> None:
    orig, conv = pair
    untouched(orig, conv)
    report = tmp_path / "report.json"
    report.write_text("an older report")
    link = tmp_path / "latest.json"
    link.symlink_to(report)
    code, stdout, err = run_cli("validate", orig, conv, *VALIDATE, "--report", link, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["report_file"] == str(link)
    written = json.loads(link.read_text())
    assert written["checks"] == data["checks"] and written["passed"] is True
    assert report.read_text() == "an older report", (
        "a link at the report path is replaced, not written through"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "report.json"], (
        "a temporary file left"
    )
    code, stdout, err = run_cli("validate", orig, conv, *VALIDATE, "--report", tmp_path / "r2.json")
    assert code == 0 and f"report written to {tmp_path / 'r2.json'}" in err, err


# -- --json errors -----------------------------------------------------------------------------------
def test_json_errors_are_an_object_on_stdout(pair: tuple[Path, Path], tmp_path: Path) -> None:
    orig, conv = pair
    cases = {
        "input": (["inspect", tmp_path / "missing", "--json"], 2),
        "usage": (["quantize", orig, conv, "--json"], 2),  # OUT exists
        "click_option": (["quantize", orig, tmp_path / "o", "--layout", "nope", "--json"], 2),
        "report_refused": (["validate", orig, conv, "--report", conv / "x.json", "--json"], 2),
    }
    for what, (args, want) in cases.items():
        code, stdout, err = run_cli(*args)
        assert code == want, (what, err)
        obj = json.loads(stdout)["error"]
        assert obj["exit_code"] == want and obj["line"], (what, obj)
        assert obj["line"].splitlines()[0] in err, (what, obj, err)
    code, stdout, _ = run_cli("inspect", tmp_path / "missing")
    assert code == 2 and not stdout.strip(), "without --json, stdout stays empty"


# -- fuse-shared --replicas ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_checkpoint("deepseek_v3", tmp_path_factory.mktemp("shared") / "model", **DIMS)


@pytest.mark.parametrize("replicas", [DIMS["num_experts"] + 1, 10_000])
def test_replicas_beyond_the_routed_experts_are_refused(
    shared_model: Path, tmp_path: Path, replicas: int
) -> None:
    out = tmp_path / "out"
    refused(
        ["fuse-shared", shared_model, out, "--replicas", replicas, "-q"],
        ["--replicas", str(replicas), str(DIMS["num_experts"])],
        inputs=[shared_model],
        out=out,
    )


def test_replicas_up_to_the_routed_experts_are_written(shared_model: Path, tmp_path: Path, untouched) -> None:
    untouched(shared_model)
    out = tmp_path / "out"
    code, _, err = run_cli("fuse-shared", shared_model, out, "--replicas", DIMS["num_experts"], "-q")
    assert code == 0, err
    fused = json.loads((out / "config.json").read_text())["moetool_fused_shared_experts"]
    assert fused["replicas"] == DIMS["num_experts"]
    assert not os.path.lexists(partial_of(out))
