"""Exit codes of the error funnel: a bug in moetool (an ``InternalError``, or any exception that is not a
``MoetoolError``) exits 3 with one line asking for a report, never 2 as if the input were bad; the input
is left as it was and no OUT appears."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

import moetool.cli.main as cli_main
import moetool.quantize
from moetool.cli.main import main
from moetool.errors import InputError, InternalError
from moetool.testing.factory import make_checkpoint


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "error, code, words",
    [
        (
            InternalError("a plan lost a tensor", tensor="model.layers.1.mlp.experts"),
            3,
            ["internal: a plan lost"],
        ),
        (ZeroDivisionError("division by zero"), 3, ["internal error: ZeroDivisionError"]),
        (InputError("not a checkpoint", file="config.json"), 2, ["config.json", "not a checkpoint"]),
    ],
    ids=["internal", "unexpected", "input"],
)
def test_exit_code_and_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    code: int,
    words: list[str],
) -> None:
    monkeypatch.setattr(cli_main, "ENV", dataclasses.replace(cli_main.ENV, debug=False))
    src = make_checkpoint("qwen3_moe", tmp_path / "src", num_layers=2, hidden_size=128, num_experts=4, seed=3)
    before = _tree_digest(src)

    def broken(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(moetool.quantize, "plan_quantize", broken)
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(src), str(tmp_path / "out"), "-q"])
    assert exc.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]
    asks_for_report = "please report it" in err[0]
    assert asks_for_report == (code == 3), err[0]
    assert "Traceback" not in err[0]
    assert _tree_digest(src) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
