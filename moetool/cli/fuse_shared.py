"""``moetool fuse-shared MODEL OUT``."""

from __future__ import annotations

import click

from moetool.cli.common import Output, common_options
from moetool.cli.writing import parse_shard_size, run_plan, shared_write_options


@click.command("fuse-shared")
@click.argument("model")
@click.argument("out_dir", metavar="OUT")
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Store the shared-expert slots R times (a consumer picks one replica per token to spread "
    "expert-parallel load); at most the number of routed experts.",
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
    fsync: bool,
    max_shard_size: str,
    device: str,
    devices: str | None,
    family: str | None,
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

    opts = FuseOptions(replicas=replicas, max_shard_size=parse_shard_size(max_shard_size))
    run_plan(
        out,
        model,
        out_dir,
        lambda view: plan_fuse(view, opts),
        "fuse-shared",
        dry_run=dry_run,
        device=device,
        devices=devices,
        overwrite=overwrite,
        resume=resume,
        fsync=fsync,
        family=family,
    )
