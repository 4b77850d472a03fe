"""``moetool inspect MODEL``."""

from __future__ import annotations

import click

from moetool.cli.common import Output, common_options


@click.command("inspect")
@click.argument("model")
@common_options
def inspect(model: str, out: Output) -> None:
    """What a checkpoint holds and what `quantize` would change (headers only; reads no weights).

    MODEL is a local directory or a Hub repo id (org/name[@revision]).

    \b
    Examples:
      moetool inspect ./DeepSeek-V2-Lite
      moetool inspect Qwen/Qwen3-30B-A3B --json | jq .quantize_would
    """
    from moetool.hub import resolve
    from moetool.inspection import inspect_checkpoint, render
    from moetool.io import Checkpoint
    from moetool.model import analyze

    source = resolve(model)
    with Checkpoint(source.path) as ckpt:
        report = inspect_checkpoint(analyze(ckpt))
    out.result(report, lambda: render(report))
