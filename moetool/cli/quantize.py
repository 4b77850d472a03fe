"""``moetool quantize MODEL OUT``."""

from __future__ import annotations

import sys

import click

from moetool.cli.common import Output, common_options, human_bytes, table


def shared_write_options(fn):
    """--overwrite, --resume, --max-shard-size, --device: every command that writes a checkpoint."""
    fn = click.option(
        "--devices",
        default=None,
        help="Comma-separated devices, one worker each over disjoint shards (e.g. cuda:0,cuda:1).",
    )(fn)
    fn = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")(fn)
    fn = click.option(
        "--max-shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 5GB, 500MB)."
    )(fn)
    fn = click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT.partial/.")(fn)
    fn = click.option(
        "--overwrite", is_flag=True, help="Replace an existing OUT (only once the new one is complete)."
    )(fn)
    fn = click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")(fn)
    return fn


def report_run(out: Output, plan, result) -> None:
    data = {
        "out": str(result.out),
        "files": result.files,
        "reused_shards": result.reused,
        "bytes_written": result.bytes_written,
        "layout": plan.layout,
        "notes": list(plan.notes),
    }

    def text() -> str:
        rows = [
            ["out", str(result.out)],
            ["layout", plan.layout],
            ["shards", f"{len(plan.shards)} ({len(result.reused)} reused)"],
            ["written", human_bytes(result.bytes_written)],
        ]
        rows += [["note", n] for n in plan.notes]
        return table(rows)

    out.result(data, text)


def report_plan(out: Output, plan) -> None:
    d = plan.describe()

    def text() -> str:
        rows = [[s["file"], human_bytes(s["bytes"]), str(s["tensors"]), str(s["jobs"])] for s in d["shards"]]
        body = table(rows, ["shard", "bytes", "tensors", "jobs"])
        extra = [
            f"layout {d['layout']}; output {human_bytes(d['output_bytes'])}; jobs {d['jobs_by_transform']}",
            f"copied files: {', '.join(d['copied_files']) or 'none'}",
        ]
        extra += [f"note: {n}" for n in d["notes"]]
        return body + "\n" + "\n".join(extra)

    out.result(d, text)


@click.command("quantize")
@click.argument("model")
@click.argument("out_dir", metavar="OUT")
@click.option(
    "--layout",
    type=click.Choice(["deepgemm", "hf"]),
    default="deepgemm",
    show_default=True,
    help="deepgemm: stacked w13/w2 [E, N, K] as DeepGEMM's grouped GEMM reads them; "
    "hf: per-expert tensors that SGLang, vLLM and transformers load unchanged.",
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
@shared_write_options
@common_options
def quantize(
    model: str,
    out_dir: str,
    layout: str,
    scale_fmt: str,
    scale_layout: str,
    targets: str,
    dry_run: bool,
    overwrite: bool,
    resume: bool,
    max_shard_size: str,
    device: str,
    devices: str | None,
    out: Output,
) -> None:
    """Quantize expert weights to block FP8 (128x128, DeepGEMM's recipe), byte-exact on CPU and GPU.

    \b
    Examples:
      moetool quantize ./DeepSeek-V2-Lite ./dsv2-lite-fp8
      moetool quantize ./Qwen3-30B-A3B ./q3-fp8-hf --layout hf --targets linear
      moetool quantize ./DeepSeek-V3 ./dsv3-ue8m0 --scale-fmt ue8m0 --device cuda:0
      moetool quantize ./Mixtral-8x7B ./mixtral-fp8 --dry-run
    """
    from moetool.hub import resolve
    from moetool.io import Checkpoint
    from moetool.model import analyze
    from moetool.pipeline import execute
    from moetool.plan import parse_size
    from moetool.quantize import QuantizeOptions, plan_quantize

    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    opts = QuantizeOptions(
        layout=layout,
        scale_fmt=scale_fmt,
        scale_layout=scale_layout,
        targets=targets,
        max_shard_size=shard_bytes,
    )
    source = resolve(model)
    with Checkpoint(source.path) as ckpt:
        plan = plan_quantize(analyze(ckpt), opts)
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
            progress_factory=lambda n: out.progress(n, "quantize"),
        )
    report_run(out, plan, result)
