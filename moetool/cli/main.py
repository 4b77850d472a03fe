"""The ``moetool`` command group and the one place that turns errors into exit codes (docs/contract.md §3)."""

from __future__ import annotations

import json
import sys
import traceback

import click

from moetool import __version__
from moetool.cli.common import INVOCATION, error_object
from moetool.env import ENV
from moetool.errors import EnvironmentError_, InternalError, MoetoolError

COMMANDS = (
    ("moetool.cli.inspect", "inspect"),
    ("moetool.cli.quantize", "quantize"),
    ("moetool.cli.fuse_shared", "fuse_shared"),
    ("moetool.cli.convert_ssm", "convert_ssm"),
    ("moetool.cli.capture_ssm", "capture_ssm"),
    ("moetool.cli.validate", "validate"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="moetool")
def cli() -> None:
    """Prepare Mixture-of-Experts checkpoints for fast GPU inference, offline and once.

    \b
    Examples:
      moetool inspect deepseek-ai/DeepSeek-V2-Lite
      moetool quantize ./Qwen3-30B-A3B ./Qwen3-30B-A3B-fp8 --layout hf
      moetool fuse-shared ./DeepSeek-V3-fp8 ./DeepSeek-V3-fp8-fused
      moetool validate ./DeepSeek-V3 ./DeepSeek-V3-fp8-fused

    Set MOETOOL_DEBUG=1 for a traceback instead of the one-line error.
    """


def _register() -> None:
    import importlib

    for module, attr in COMMANDS:
        cli.add_command(getattr(importlib.import_module(module), attr))


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear line and an exit code for every failure (0 ok, 1 mismatch, 2 bad input,
    usage or environment, 3 a bug in moetool, 130 interrupted)."""
    if argv is None:
        # Importing torch allocates a few hundred thousand objects that live as long as the process;
        # with the default thresholds the collector runs hundreds of times over them (measured 0.4 to
        # 0.6 s of CPU). Young-generation collections every 20000 allocations keep cycles collected.
        import gc

        gc.set_threshold(20000, 50, 50)
    INVOCATION.json = False
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        rv = cli.main(args=argv, prog_name="moetool", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        # click turns Ctrl-C into Abort; a writing command has kept OUT.partial for --resume
        click.echo("moetool: interrupted; an OUT.partial left behind continues with --resume", err=True)
        _json_error(error_object("interrupted", 130, kind="interrupted"), args)
        sys.exit(130)
    except click.exceptions.ClickException as e:
        e.show()
        # the command's options were not parsed: look for the flag itself
        _json_error(error_object(e.format_message(), 2, kind="usage"), args, parsed=False)
        sys.exit(2)
    except MoetoolError as e:
        if ENV.debug:
            traceback.print_exc()
        click.echo(f"moetool: error: {e.line()}", err=True)
        _json_error(error_object(e.line(), e.exit_code, err=e, kind=type(e).__name__), args)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug: still one line unless debugging
        if ENV.debug:
            traceback.print_exc()
        if _out_of_memory(e):  # the machine, not a bug: say so, and what asks for less
            err = EnvironmentError_(
                "out of memory",
                fix="ask for less (fewer --tokens or --experts, --layers, --device cpu) or free memory",
            )
            click.echo(f"moetool: error: {err.line()}", err=True)
            _json_error(error_object(err.line(), err.exit_code, err=err, kind="EnvironmentError_"), args)
            sys.exit(err.exit_code)
        first = str(e).splitlines()[0] if str(e) else ""
        line = f"internal error: {type(e).__name__}: {first}"
        click.echo(f"moetool: {line} ({InternalError.REPORT})", err=True)
        _json_error(error_object(line, InternalError.exit_code, kind="internal"), args)
        sys.exit(InternalError.exit_code)
    code = rv if isinstance(rv, int) else 0
    if argv is None:
        _exit_now(code)
    sys.exit(code)


def _out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA), or the CPU allocator's refusal."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _json_error(obj: dict, args: list[str], *, parsed: bool = True) -> None:
    """With ``--json`` a failure is also an object on stdout, so a caller parsing stdout gets one."""
    if INVOCATION.json or (not parsed and "--json" in args):
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _exit_now(code: int) -> None:
    """End the process without tearing the interpreter down: with torch loaded that teardown costs
    about a second of CPU and does nothing a finished command needs (every output is written, renamed
    and closed). Only for a real process (``main()`` from the command line), never in-process callers."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 2  # the output did not arrive: not a success
    os._exit(code)
