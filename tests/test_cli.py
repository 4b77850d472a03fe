"""The command line: help and version, the one error funnel of ``main()`` (exit codes, one line, a
traceback only with MOETOOL_DEBUG=1), machine output with ``--json``, the progress bar on a terminal
and ``-q``, and a Hub repo id that is not in an empty offline cache.

Exit codes are checked on ``main()`` itself (in this process, for speed) and, where the environment
matters, on ``python -m moetool`` in a subprocess."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import moetool.cli.main as cli_main
from moetool import __version__
from moetool.arch import known_model_types
from moetool.cli.main import cli, main
from moetool.testing.factory import make_checkpoint

SPEC_COMMANDS = ("inspect", "quantize", "fuse-shared", "convert-ssm", "capture-ssm", "validate")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        "qwen3_moe",
        tmp_path_factory.mktemp("cli") / "src",
        num_layers=2,
        hidden_size=128,
        moe_intermediate_size=128,
        num_experts=4,
        seed=5,
    )


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs follow the default (no traceback) whatever the developer's environment says."""
    monkeypatch.setattr(cli_main, "ENV", dataclasses.replace(cli_main.ENV, debug=False))


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("moetool: error:"), lines[0]
    return lines[0]


# -- subprocesses, started together so their interpreter start-ups overlap ------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOETOOL_", "HF_", "HUGGINGFACE_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    base = tmp_path_factory.mktemp("procs")
    hf_home = base / "empty_hf_home"
    hf_home.mkdir()
    missing = str(base / "no" / "such" / "checkpoint")
    cases = {
        "version": (["--version"], _clean_env()),
        "missing_dir": (["inspect", missing], _clean_env()),
        "missing_dir_debug": (["inspect", missing], _clean_env(MOETOOL_DEBUG="1")),
        "hub_offline": (
            ["inspect", "moetool-test-org/tiny-moe-that-is-not-cached"],
            _clean_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1"),
        ),
    }
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "moetool", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, (argv, env) in cases.items()
    }
    done = {}
    try:
        for name, p in running.items():
            out, err = p.communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    finally:
        for p in running.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    yield done


def test_version(procs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = procs["version"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"moetool, version {__version__}"


def test_missing_directory_exits_2_with_one_line(procs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = procs["missing_dir"]
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "no/such/checkpoint" in line
    assert r.stdout == ""


def test_debug_env_shows_the_traceback(procs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = procs["missing_dir_debug"]
    assert r.returncode == 2
    assert "Traceback (most recent call last)" in r.stderr
    assert "InputError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("moetool: error:")


def test_hub_repo_not_in_an_empty_offline_cache(procs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    r = procs["hub_offline"]
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert "moetool-test-org/tiny-moe-that-is-not-cached" in line
    assert "not in the Hub cache" in line


# -- help ---------------------------------------------------------------------------------------


def test_every_spec_command_is_registered() -> None:
    assert set(SPEC_COMMANDS) <= set(cli.commands)


@pytest.mark.parametrize("command", [None, *SPEC_COMMANDS])
def test_help_has_examples_and_the_common_options(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Examples" in result.output
    if command is not None:
        for opt in ("--json", "-q, --quiet", "-v, --verbose"):
            assert opt in result.output, f"{command} --help lacks {opt}"
        assert f"moetool {command}" in result.output, "examples show the command itself"


# -- the error funnel ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llama") / "llama"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 8)}, root / "model.safetensors")
    return root


def test_missing_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _main(["inspect", str(tmp_path / "absent")], capsys)
    assert code == 2 and out == ""
    assert str(tmp_path / "absent") in _one_error_line(err)


@pytest.mark.parametrize("model", ["not a repo id!", "a/b/c", "org/", "/org/name", "~nobody/x"])
def test_not_a_repo_id(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: str
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(["inspect", model], capsys)
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert "repo id" in line


def test_unknown_architecture_names_the_known_ones(capsys: pytest.CaptureFixture[str], llama: Path) -> None:
    code, _, err = _main(["inspect", str(llama)], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "llama" in line
    for known in known_model_types():
        assert known in line


def test_existing_out_is_refused(capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    code, stdout, err = _main(["quantize", str(src), str(out), "--layout", "hf"], capsys)
    assert code == 2 and stdout == ""
    line = _one_error_line(err)
    assert str(out) in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["inside", "equal"])
def test_out_inside_model_is_refused(
    capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path, where: str
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for p in src.iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    before = sorted(p.name for p in model.iterdir())
    out = model / "fp8" if where == "inside" else model
    code, _, err = _main(["quantize", str(model), str(out), "--layout", "hf", "--overwrite"], capsys)
    assert code == 2
    assert "inside" in _one_error_line(err)
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["quantize"], "MODEL"),
        (["quantize", "SRC", "OUT", "--layout", "diagonal"], "--layout"),
        (["quantize", "SRC", "OUT", "--max-shard-size", "lots"], "--max-shard-size"),
        (["inspect", "SRC", "--no-such-flag"], "--no-such-flag"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], src: Path, argv: list[str], named: str
) -> None:
    argv = [str(src) if a == "SRC" else a for a in argv]
    code, out, err = _main(argv, capsys)
    assert code == 2 and out == ""
    assert named in err and "Traceback" not in err


def test_success_exits_0_and_json_is_valid(
    capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path
) -> None:
    code, out, err = _main(["inspect", str(src), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["family"] == "qwen3_moe" and report["path"] == str(src)

    dest = tmp_path / "q"
    code, out, err = _main(["quantize", str(src), str(dest), "--layout", "hf", "--json"], capsys)
    assert code == 0, err
    run = json.loads(out)
    assert Path(run["out"]) == dest and dest.is_dir()
    on_disk = {p.name for p in dest.iterdir()}
    assert set(run["files"]) <= on_disk and "model.safetensors" in run["files"]
    assert run["reused_shards"] == [] and run["layout"] == "hf"


def test_text_output_is_not_json(capsys: pytest.CaptureFixture[str], src: Path) -> None:
    code, out, _ = _main(["inspect", str(src)], capsys)
    assert code == 0
    assert "qwen3_moe" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


# -- progress bar -------------------------------------------------------------------------------


def _run_on_a_terminal(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``main(argv)`` with stderr on a pseudo-terminal; returns the exit code and what the terminal got."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    tty = os.fdopen(slave, "w", buffering=1, encoding="utf-8")
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with monkeypatch.context() as m:
            m.setattr(sys, "stderr", tty)
            with pytest.raises(SystemExit) as exc:
                main(argv)
            tty.flush()
    finally:
        tty.close()
        reader.join(timeout=10)
        os.close(master)
    return int(exc.value.code or 0), b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_and_quiet(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["quantize", str(src), str(tmp_path / "loud"), "--layout", "hf"]
    code, shown = _run_on_a_terminal(argv, monkeypatch)
    assert code == 0
    assert "quantize" in shown and "%|" in shown, f"no progress bar on a terminal: {shown!r}"

    argv[2] = str(tmp_path / "quiet")
    code, shown = _run_on_a_terminal([*argv, "-q"], monkeypatch)
    assert code == 0
    assert shown.strip() == "", f"-q still wrote to the terminal: {shown!r}"
    assert (tmp_path / "quiet").is_dir()


def test_no_progress_bar_when_stderr_is_not_a_terminal(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _main(["quantize", str(src), str(tmp_path / "o"), "--layout", "hf"], capsys)
    assert code == 0
    assert "%|" not in err and "\r" not in err


@pytest.fixture(scope="module")
def relabelled(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The qwen3_moe checkpoint with a model_type moetool does not know (a fine-tune's own label)."""
    import shutil

    out = tmp_path_factory.mktemp("relabelled") / "m"
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "acme_moe"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_unknown_model_type_names_the_families_its_tensors_match(
    capsys: pytest.CaptureFixture[str], relabelled: Path
) -> None:
    code, out, err = _main(["inspect", str(relabelled)], capsys)
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert "'acme_moe'" in line and "its tensor names match qwen3_moe: rerun with --family qwen3_moe" in line


def test_family_option_on_every_checkpoint_command(
    capsys: pytest.CaptureFixture[str], relabelled: Path, tmp_path: Path
) -> None:
    note = "reading model_type 'acme_moe' as family qwen3_moe: its tensor names match qwen3_moe's"
    code, out, err = _main(["inspect", str(relabelled), "--family", "qwen3_moe", "--json"], capsys)
    assert code == 0 and note in err
    report = json.loads(out)
    assert (report["family"], report["model_type"], report["routed_experts"]) == ("qwen3_moe", "acme_moe", 4)
    q = tmp_path / "q"
    code, _, err = _main(["quantize", str(relabelled), str(q), "--family", "qwen3_moe"], capsys)
    assert code == 0 and note in err
    assert json.loads((q / "config.json").read_text())["model_type"] == "acme_moe"
    code, _, err = _main(["fuse-shared", str(relabelled), str(tmp_path / "f"), "--family", "mixtral"], capsys)
    assert code == 2 and "--family mixtral: the tensor names do not match mixtral's" in _one_error_line(err)
    code, out, _ = _main(
        ["validate", str(relabelled), str(q), "--family", "qwen3_moe", "--device", "cpu", "--json"], capsys
    )
    assert code == 0 and json.loads(out)["passed"] is True
    code, _, err = _main(["validate", str(relabelled), str(q), "--device", "cpu"], capsys)
    assert code == 2 and "--family qwen3_moe" in _one_error_line(err)
