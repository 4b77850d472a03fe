"""``moetool validate ORIGINAL CONVERTED``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from moetool.cli.common import Output, common_options, family_option, human_bytes, table

MAX_TOKENS = 65536


def _layers(text: str | None) -> tuple[int, ...] | None:
    if not text or text == "all":
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(
            "a comma-separated list of layer numbers, or 'all'", param_hint="--layers"
        ) from None


def render(report) -> str:
    rows = [
        [c.group, c.scope, c.metric, str(c.value), c.threshold, "PASS" if c.passed else "FAIL"]
        for c in report.checks
    ]
    lines = [table(rows, ["check", "scope", "metric", "value", "threshold", "result"])]
    fails = report.failures()
    for c in fails:
        lines.append(f"FAIL {c.group} {c.scope}: {c.detail}")
    lines.append(
        f"{'PASSED' if not fails else 'FAILED'}: {len(report.checks) - len(fails)}/{len(report.checks)} "
        f"checks on {report.device} ({report.backend})"
    )
    return "\n".join(lines)


def timing_line(report) -> str:
    """Where the time went (``--report`` JSON ``timings``/``io``), for ``-v`` on stderr."""
    t = report.timings
    parts = [
        f"{k} {t[k]:.2f}" for k in ("structure", "tensors", "kernels", "moe", "ssm", "transfer") if t.get(k)
    ]
    line = f"timings (s, overlapping): {', '.join(parts)}; waited for reads {t.get('read_wait', 0):.2f}"
    line += f"; total {t.get('total', 0):.2f}"
    io = report.io
    if io:
        line += "; read " + ", ".join(
            f"{side} {human_bytes(io[f'{side}_read'])} of {human_bytes(io[f'{side}_bytes'])}"
            for side in ("original", "converted")
        )
        if "hash_read" in io:
            line += (
                f"; sha256 {human_bytes(io['converted_hashed_from_reads'])} from those reads, "
                f"{human_bytes(io['hash_read'])} read for it alone"
            )
    return "\n".join([line, *timeline_lines(report.timeline)])


def timeline_lines(tl: dict) -> list[str]:
    """``-v``'s view of the report's ``timeline``: start-up, the reader's waits, each file's sha256."""
    if not tl:
        return []

    def secs(v: object) -> str:
        return "?" if v is None else f"{v:.2f}"

    lines = [
        f"start-up (s after the process started): validate called {secs(tl.get('called'))}, "
        f"one pass began {secs(tl.get('pass_started'))}"
    ]
    if "reader_blocked" in tl:
        lines.append(
            f"reader waited for a free buffer {tl['reader_blocked']:.2f} s; buffers kept by the sha256 alone "
            f"after their checks {tl['held_by_hashes']:.2f} s; buffers {'pinned' if tl.get('pinned') else 'pageable'}"
        )
    if "hashes_from_reads" in tl:
        if tl["hashes_from_reads"]:
            source = "the checks' read buffers"
        elif tl.get("hashes_by") == "threads":  # no hashing process could start
            source = "each file, read by threads of this process"
        else:
            source = "each file, read in a process of its own"
        line = f"sha256 of the converted files from {source} (--hash-source)"
        if tl.get("hashes_ahead"):
            line += f", begun {secs(tl.get('hashes_began'))} s after the process started, before torch was imported"
        lines.append(line)
    for r in tl.get("hashes", []):
        lines.append(
            f"sha256 {r['file']}: {r['start']:.2f}-{r['end']:.2f} s, waited for reads {r['wait']:.2f}, "
            f"hashed from them {r['hash']:.2f} ({human_bytes(r['from_buffers'])}), "
            f"read itself {r['read']:.2f} ({human_bytes(r['read_itself'])})"
        )
    return lines


@click.command("validate")
@click.argument("original")
@click.argument("converted")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu (torch references, slower) or cuda[:N] (Triton kernels).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "triton", "deepgemm"]),
    default="auto",
    show_default=True,
    help="GEMM used for the kernel and MoE checks on CUDA. auto: DeepGEMM where deep_gemm is importable "
    "on an SM90 card, else Triton; the report names the one used.",
)
@click.option(
    "--layers",
    default=None,
    help="Comma-separated MoE layers (or state-file layers) to check; all by default.",
)
@click.option(
    "--experts",
    type=click.IntRange(min=1),
    default=None,
    help="Sample this many routed experts per layer (fused slots are always checked).",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1, max=MAX_TOKENS),
    default=128,
    show_default=True,
    help=f"Random tokens per layer for the kernel and MoE checks (at most {MAX_TOKENS}: more decide nothing "
    "a few hundred do not, and the activations grow with them).",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=4, show_default=True, help="Decode steps (state files)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--hash-source",
    type=click.Choice(["auto", "reads", "files"]),  # options.HASH_SOURCES; that package imports torch
    default="auto",
    show_default=True,
    help="Where the sha256 of the converted files takes their bytes: reads (the other checks' read "
    "buffers: each byte read once, for a disk or CPU that is the limit), files (a thread per file reading "
    "it itself, in a process of their own, for idle cores and a warm page cache). auto: reads on the CPU, "
    "files on CUDA.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the full report as JSON to this file (checks, seconds per stage, bytes read).",
)
@family_option
@common_options
def validate(
    original: str,
    converted: str,
    device: str,
    backend: str,
    layers: str | None,
    experts: int | None,
    tokens: int,
    steps: int,
    seed: int,
    hash_source: str,
    report_path: str | None,
    family: str | None,
    out: Output,
) -> int:
    """Prove CONVERTED right against ORIGINAL on GPU kernels, or name what is wrong (exit 1).

    Checks: structure (every tensor accounted for, sha256 as recorded), tensors (FP8 bytes equal the
    recipe applied to the original), kernels (FP8 grouped GEMM on the stored layout), MoE layers
    (routing + experts + fused slots against the original layer). Given two SSM state files, runs
    decode steps from both states instead.

    \b
    Examples:
      moetool validate ./DeepSeek-V3 ./dsv3-fp8-fused
      moetool validate ./Qwen3-30B-A3B ./q3-fp8 --layers 0,47 --experts 8 --report report.json
      moetool validate ./Mixtral-8x7B ./mixtral-fp8 --device cpu
      moetool validate state-kfirst.safetensors state-klast-pool.safetensors
    """
    from moetool.errors import MoetoolError
    from moetool.hub import resolve

    states = Path(original).is_file() and Path(converted).is_file()
    paths = (Path(original), Path(converted)) if states else (resolve(original).path, resolve(converted).path)
    target = report_target(report_path, paths) if report_path else None  # refused before any work
    ahead = None
    if not states and hashes_likely_from_files(hash_source, device):
        # torch is not imported yet: the converted files' sha256 runs while it is (and while CUDA starts)
        from moetool.io.process_hashes import HashesAhead

        ahead = HashesAhead(paths[1])
    try:
        from moetool.io.writer import write_file_atomic
        from moetool.validate import ValidateOptions, validate_checkpoints, validate_states

        opts = ValidateOptions(
            device=device,
            backend=backend,
            layers=_layers(layers),
            experts=experts,
            tokens=tokens,
            seed=seed,
            ssm_steps=steps,
            family=family,
            hash_source=hash_source,
        )
        if states:
            report = validate_states(original, converted, opts)
        else:
            report = validate_checkpoints(paths[0], paths[1], opts, hashes_ahead=ahead)
    finally:
        if ahead is not None:
            ahead.close()
    data = report.to_dict()
    if out.verbosity >= 2:
        out.log(timing_line(report), level=2)
    if target is None:
        out.result(data, lambda: render(report))
        return 0 if report.passed else 1
    try:
        written = write_file_atomic(target, (json.dumps(data, indent=2, default=str) + "\n").encode())
    except MoetoolError:
        out.result(data, lambda: render(report))  # the result is printed even when the file fails
        raise
    out.result({**data, "report_file": str(written)}, lambda: render(report))
    out.log(f"moetool: report written to {written}")
    return 0 if report.passed else 1


def hashes_likely_from_files(hash_source: str, device: str) -> bool:
    """Whether validate will hash the converted files each by itself (``hash_source`` files, or auto on
    CUDA), guessed before torch is imported: auto counts on CUDA unless ``--device cpu`` or the machine
    has no NVIDIA device node. Only a guess: hashes started on it are dropped where validate then
    hashes from its reads (``moetool.validate.options.hashes_from_reads``)."""
    if hash_source != "auto":
        return hash_source == "files"
    return device != "cpu" and (device.startswith("cuda") or os.path.exists("/dev/nvidiactl"))


def report_target(path: str, inputs: tuple[Path, Path]) -> Path:
    """Where ``--report`` will write, checked before validating: its folder exists and is writable, and
    neither the file nor the folder it lands in resolves into either checkpoint (or equals a state
    file) — a report never replaces a file of what it checks."""
    from moetool.errors import UsageError
    from moetool.io.fs import input_inodes, input_roots, real_path, refuse_into_input, refuse_other_names

    p = Path(path).absolute()
    if not p.name or p.name in (".", ".."):
        raise UsageError("--report must name a file", file=path)
    folder = p.parent
    if not folder.is_dir():
        raise UsageError(
            "the folder for --report does not exist", file=path, fix="create it or choose another path"
        )
    roots = [r for q in inputs for r in (input_roots(q) if q.is_dir() else [real_path(q)])]
    for follow in (True, False):  # where a link at p points, and where the entry p itself lies
        refuse_into_input(p, roots, what="--report", shown=path, follow_last=follow)
    refuse_other_names(p, input_inodes(roots), what="--report")  # nor another name of one of their files
    if p.is_dir():
        raise UsageError("--report is a folder", file=path, fix="name a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError("cannot write the --report file here", file=path, fix="choose a writable folder")
    return p
