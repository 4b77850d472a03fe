"""``moetool fuse-shared MODEL OUT``."""

from __future__ import annotations

import sys

import click

from moetool.cli.common import Output, common_options
from moetool.cli.quantize import report_plan, report_run, shared_write_options


@click.command("fuse-shared")
@click.argument("model")
@click.argument("out_dir", metavar="OUT")
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Store the shared-expert slots R times (a consumer picks one replica per token to spread "
    "expert-parallel load).",
)
@shared_write_options
@common_options
def fuse_shared(
    model: str,
    out_dir: str,
    replicas: int,
    dry_run: bool,
    overwrite: bool,
    resume: bool,
    max_shard_size: str,
    device: str,
    devices: str | None,
    out: Output,
) -> None:
    """Fold shared experts into the routed-expert tensors as extra expert slots (exact; BF16 or FP8, any layout).

    A shared expert of intermediate S becomes S / moe_intermediate_size slots numbered after the routed
    experts; config.json records them under moetool_fused_shared_experts.

    \b
    Examples:
      moetool fuse-shared ./DeepSeek-V2-Lite ./dsv2-lite-fused
      moetool fuse-shared ./dsv3-fp8 ./dsv3-fp8-fused --replicas 4
      moetool fuse-shared ./Qwen1.5-MoE-A2.7B ./qwen15-fused --dry-run
    """
    from moetool.fuse import FuseOptions, plan_fuse
    from moetool.hub import resolve
    from moetool.io import Checkpoint
    from moetool.model import analyze
    from moetool.pipeline import execute
    from moetool.plan import parse_size

    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    source = resolve(model)
    with Checkpoint(source.path) as ckpt:
        plan = plan_fuse(analyze(ckpt), FuseOptions(replicas=replicas, max_shard_size=shard_bytes))
        if dry_run:
            report_plan(out, plan)
            return
        result = execute(
            plan,
            ckpt,
            source,
            out_dir,
            device=device,
            devices=devices.split(",") if devices else None,
            overwrite=overwrite,
            resume=resume,
            argv=sys.argv[1:],
            progress_factory=lambda n: out.progress(n, "fuse-shared"),
        )
    report_run(out, plan, result)
