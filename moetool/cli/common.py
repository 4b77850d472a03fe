"""What every command shares: --json/-q/-v, the progress bar, and printing results."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click


class Output:
    """Data to stdout (JSON with --json), logs and progress to stderr."""

    def __init__(self, as_json: bool, verbosity: int) -> None:
        self.as_json = as_json
        self.verbosity = verbosity

    def log(self, msg: str, level: int = 1) -> None:
        if self.verbosity >= level:
            click.echo(msg, err=True)

    def result(self, data: Any, text: str | Callable[[], str]) -> None:
        if os.environ.get("RANK", "0") != "0":
            return  # under torchrun, rank 0 reports for the run
        if self.verbosity == 0 and not self.as_json:
            return  # -q: the exit code says it
        if self.as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        else:
            click.echo(text() if callable(text) else text)

    def progress(self, total: int, desc: str):
        from tqdm import tqdm

        disable = self.verbosity < 1 or not sys.stderr.isatty()
        return tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=disable,
            file=sys.stderr,
            dynamic_ncols=True,
        )


class _Invocation:
    """What the error funnel needs to know about the running command: whether it asked for --json."""

    json = False


INVOCATION = _Invocation()


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --json, -q and -v; the command receives ``out: Output``."""

    @click.option(
        "--json", "as_json", is_flag=True, help="Machine-readable result (or error object) on stdout."
    )
    @click.option("-q", "--quiet", is_flag=True, help="Print only errors (the exit code tells the result).")
    @click.option("-v", "--verbose", count=True, help="More detail on stderr (repeatable).")
    @functools.wraps(fn)
    def wrapper(*args: Any, as_json: bool, quiet: bool, verbose: int, **kwargs: Any) -> Any:
        INVOCATION.json = as_json
        return fn(*args, out=Output(as_json, 0 if quiet else 1 + verbose), **kwargs)

    return wrapper


def family_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--family NAME``: read a checkpoint whose model_type moetool does not know as family NAME."""
    return click.option(
        "--family",
        default=None,
        metavar="NAME",
        help="Read a checkpoint whose model_type is unknown as this family (configs/NAME.toml), when its "
        "tensor names match the family's; `moetool inspect` names the families that match.",
    )(fn)


def say_note(out: Output, view: Any) -> None:
    """How the family was recognised, when not by model_type (``--family``, a wrapper's text_config)."""
    if getattr(view, "note", None):
        out.log(view.note)


def error_object(line: str, exit_code: int, *, err: Any = None, kind: str = "error") -> dict[str, Any]:
    """The ``--json`` form of a failure: ``{"error": {...}}`` with the one-line message and its parts."""
    body: dict[str, Any] = {"kind": kind, "exit_code": exit_code, "line": line}
    if err is not None:
        body.update(message=err.message, file=err.file, tensor=err.tensor, fix=err.fix)
    return {"error": body}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def table(rows: list[list[str]], header: list[str] | None = None) -> str:
    allrows = ([header] if header else []) + rows
    if not allrows:
        return ""
    widths = [max(len(str(r[i])) for r in allrows) for i in range(len(allrows[0]))]
    lines = []
    for j, r in enumerate(allrows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if header and j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
