"""What every command that writes a checkpoint shares: its options, running a plan, reporting."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from moetool.cli.common import Output, family_option, human_bytes, say_note, table


def shared_write_options(fn):
    """--overwrite, --resume, --fsync, --max-shard-size, --device, --family: every command that writes a
    checkpoint."""
    fn = click.option(
        "--devices",
        default=None,
        help="Comma-separated devices, one worker each over disjoint shards (e.g. cuda:0,cuda:1).",
    )(fn)
    fn = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")(fn)
    fn = click.option(
        "--max-shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 5GB, 500MB)."
    )(fn)
    fn = click.option(
        "--fsync",
        is_flag=True,
        help="Put every output file on disk (fsync) before OUT appears, so that OUT survives a power loss "
        "or a system crash; slower. Without it OUT is complete and checked, and reaches the disk when the "
        "system writes it back (as after cp).",
    )(fn)
    fn = click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT.partial/.")(fn)
    fn = click.option(
        "--overwrite", is_flag=True, help="Replace an existing OUT (only once the new one is complete)."
    )(fn)
    fn = click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")(fn)
    return family_option(fn)


def report_run(out: Output, plan, result) -> None:
    data = {
        "out": str(result.out),
        "files": result.files,
        "reused_shards": result.reused,
        "bytes_written": result.bytes_written,
        "layout": plan.layout,
        "notes": list(plan.notes),
    }
    lossy = getattr(result, "lossy", None)
    if lossy is not None:
        data["fp4_lossy_blocks"] = lossy

    def text() -> str:
        rows = [
            ["out", str(result.out)],
            ["layout", plan.layout],
            ["shards", f"{len(plan.shards)} ({len(result.reused)} reused)"],
            ["written", human_bytes(result.bytes_written)],
        ]
        if lossy is not None:
            rows.append(["FP4 -> FP8", _lossy_line(lossy)])
        rows += [["note", n] for n in plan.notes]
        return table(rows)

    out.result(data, text)


def _lossy_line(lossy: dict) -> str:
    if not lossy["blocks"]:
        return "lossless (every dequantized weight equals the FP4 original)"
    first = lossy["listed"][0]
    plural = "s" if lossy["blocks"] != 1 else ""
    return (
        f"{lossy['blocks']} lossy FP4 block{plural} ({lossy['elements']} values changed), e.g. {first['tensor']} "
        f"block {tuple(first['block'])}: {first['changed']}; listed in moetool.json"
    )


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


def parse_shard_size(text: str) -> int:
    from moetool.plan import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None


def run_plan(
    out: Output,
    model: str,
    out_dir: str,
    make_plan: Callable,
    label: str,
    *,
    dry_run: bool,
    device: str,
    devices: str | None,
    overwrite: bool,
    resume: bool,
    fsync: bool = False,
    family: str | None = None,
) -> None:
    """Resolve MODEL, plan from its headers, then print the plan (``--dry-run``) or execute it."""
    from moetool.hub import resolve
    from moetool.io import Checkpoint
    from moetool.model import analyze
    from moetool.pipeline import execute

    source = resolve(model)
    with Checkpoint(source.path) as ckpt:
        view = analyze(ckpt, family=family)
        say_note(out, view)
        plan = make_plan(view)
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
            fsync=fsync,
            argv=sys.argv[1:],
            progress_factory=lambda n: out.progress(n, label),
        )
    report_run(out, plan, result)
