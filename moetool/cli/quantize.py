"""``moetool quantize MODEL OUT``."""

from __future__ import annotations

import click

from moetool.cli.common import Output, common_options
from moetool.cli.writing import parse_shard_size, run_plan, shared_write_options


@click.command("quantize")
@click.argument("model")
@click.argument("out_dir", metavar="OUT")
@click.option(
    "--layout",
    type=click.Choice(["hf", "deepgemm"]),
    default="hf",
    show_default=True,
    help="hf: per-expert tensors that SGLang, vLLM and transformers load; deepgemm: stacked "
    "gate_up_proj/down_proj [E, N, K] as DeepGEMM's grouped GEMM reads them, for moetool.layout and "
    "DeepGEMM runtimes (engines refuse it at load, naming this flag).",
)
@click.option(
    "--scale-fmt",
    type=click.Choice(["float", "ue8m0"]),
    default="float",
    show_default=True,
    help="float32 block scales, or power-of-two (UE8M0) scales rounded once from the original weights.",
)
@click.option(
    "--scale-layout",
    type=click.Choice(["sm90", "sm100"]),
    default="sm90",
    show_default=True,
    help="sm100: UE8M0 scales packed 4 per int32 as DeepGEMM's SM100 kernels read them (deepgemm layout).",
)
@click.option(
    "--targets",
    type=click.Choice(["experts", "linear"]),
    default="experts",
    show_default=True,
    help="experts: routed + shared experts; linear: every Linear but router, embeddings, lm_head.",
)
@click.option(
    "--require-lossless",
    is_flag=True,
    help="FP4 experts (DeepSeek-V4): refuse a block the cast to FP8 would change, instead of counting it "
    "in moetool.json.",
)
@shared_write_options
@common_options
def quantize(
    model: str,
    out_dir: str,
    layout: str,
    scale_fmt: str,
    scale_layout: str,
    targets: str,
    require_lossless: bool,
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
    """Quantize expert weights to block FP8 (128x128, DeepGEMM's recipe), byte-exact on CPU and GPU.

    \b
    Examples:
      moetool quantize ./DeepSeek-V2-Lite ./dsv2-lite-fp8           # vllm serve / sglang load it
      moetool quantize ./Qwen3-30B-A3B ./q3-fp8 --targets linear
      moetool quantize ./DeepSeek-V3 ./dsv3-dg --layout deepgemm --scale-fmt ue8m0 --device cuda:0
      moetool quantize ./Mixtral-8x7B ./mixtral-fp8 --dry-run
      moetool quantize ./DeepSeek-V4-Flash ./dsv4-fp8 --require-lossless

    FP4 experts (DeepSeek-V4) become FP8 by DeepSeek's own cast, exact wherever a block's FP4 scales span
    at most 14 binades; a block it changes is counted and named in moetool.json.
    """
    from moetool.quantize import QuantizeOptions, plan_quantize

    opts = QuantizeOptions(
        layout=layout,
        scale_fmt=scale_fmt,
        scale_layout=scale_layout,
        targets=targets,
        max_shard_size=parse_shard_size(max_shard_size),
        require_lossless=require_lossless,
    )
    run_plan(
        out,
        model,
        out_dir,
        lambda view: plan_quantize(view, opts),
        "quantize",
        dry_run=dry_run,
        device=device,
        devices=devices,
        overwrite=overwrite,
        resume=resume,
        fsync=fsync,
        family=family,
    )
