"""``moetool convert-ssm IN OUT``."""

from __future__ import annotations

import click

from moetool.cli.common import Output, common_options


@click.command("convert-ssm")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@click.option(
    "--to",
    "to",
    type=click.Choice(["k-last", "k-first"]),
    default="k-last",
    show_default=True,
    help="k-last [N, HV, V, K] (FlashInfer, SGLang, vLLM) or k-first [N, HV, K, V] (transformers, fla).",
)
@click.option(
    "--dtype",
    type=click.Choice(["keep", "float32", "bfloat16"]),
    default="keep",
    show_default=True,
    help="State dtype; float32 -> bfloat16 only when asked.",
)
@click.option(
    "--pool", is_flag=True, help="Write [P+1, HV, V, K] pools with zero slot 0 and slot_ids (k-last)."
)
@click.option(
    "--trim-conv", is_flag=True, help="Keep the last conv_kernel-1 conv_state columns, as engines store it."
)
@click.option(
    "--conv-kernel",
    type=click.IntRange(min=2),
    default=4,
    show_default=True,
    help="Short-convolution width for --trim-conv (linear_conv_kernel_dim).",
)
@click.option(
    "--conv-layout",
    type=click.Choice(["dim-first", "dim-last"]),
    default=None,
    help="conv_state as [N, conv_dim, W] (dim-first: transformers, SGLang) or [N, W, conv_dim] (dim-last: "
    "vLLM's default); default: keep.",
)
@click.option(
    "--assume-layout",
    type=click.Choice(["k-first", "k-last"]),
    default=None,
    help="Layout of an input file that carries no moetool metadata (e.g. saved by hand).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@common_options
def convert_ssm(
    src: str,
    dst: str,
    to: str,
    dtype: str,
    pool: bool,
    trim_conv: bool,
    conv_kernel: int,
    conv_layout: str | None,
    assume_layout: str | None,
    overwrite: bool,
    out: Output,
) -> None:
    """Convert a Gated DeltaNet state file between K-first and K-last layouts (exact transposes).

    \b
    Examples:
      moetool convert-ssm state.safetensors state-klast.safetensors
      moetool convert-ssm state.safetensors pool.safetensors --pool --dtype bfloat16 --trim-conv
      moetool convert-ssm state.safetensors vllm.safetensors --trim-conv --conv-layout dim-last
      moetool convert-ssm raw.safetensors state.safetensors --assume-layout k-first
    """
    import os

    from moetool.errors import UsageError
    from moetool.io.fs import real_path, refuse_other_names
    from moetool.ssm import read_state_file, write_state_file
    from moetool.transforms.ssm_layout import convert_state

    if real_path(dst) == real_path(src):
        raise UsageError(
            "OUT is the input file", file=dst, fix="write to a new file; the input is never modified"
        )
    if os.path.isfile(src):  # OUT another name (a hard link) of IN's file: replacing it changes IN
        st = os.stat(src)
        refuse_other_names(dst, {(st.st_dev, st.st_ino): real_path(src)}, what="OUT")
    if pool and to != "k-last":
        raise UsageError("--pool needs --to k-last", fix="a pool is k-last by definition")
    tensors, meta = read_state_file(src, assume_layout=assume_layout)
    tensors, meta = convert_state(
        tensors,
        meta,
        layout=to,
        dtype=dtype,
        pool=pool,
        conv_kernel_size=conv_kernel if trim_conv else None,
        conv_layout=conv_layout,
    )
    write_state_file(dst, tensors, meta, overwrite=overwrite)
    out.result(
        {
            "out": dst,
            "layout": meta.layout,
            "conv_layout": meta.conv_layout,
            "pooled": meta.pooled,
            "tensors": len(tensors),
        },
        f"wrote {dst}: {len(tensors)} tensors, {meta.layout}, conv {meta.conv_layout}"
        f"{' pooled' if meta.pooled else ''}",
    )
