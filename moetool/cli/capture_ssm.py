"""``moetool capture-ssm MODEL OUT``."""

from __future__ import annotations

import click

from moetool.cli.common import Output, common_options


@click.command("capture-ssm")
@click.argument("model")
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--prompt", default=None, help="Text to run through the model (uses its tokenizer).")
@click.option("--token-ids", default=None, help="Comma-separated token ids, for models without a tokenizer.")
@click.option("--device", default="cpu", show_default=True, help="Where transformers runs the model.")
@click.option(
    "--conv-layout",
    type=click.Choice(["dim-first", "dim-last"]),
    default="dim-first",
    show_default=True,
    help="conv_state as [N, conv_dim, W] (transformers, SGLang) or [N, W, conv_dim] (vLLM's default).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@common_options
def capture_ssm(
    model: str,
    dst: str,
    prompt: str | None,
    token_ids: str | None,
    device: str,
    conv_layout: str,
    overwrite: bool,
    out: Output,
) -> None:
    """Run a Gated DeltaNet model (Qwen3-Next) on a prompt and save its linear-attention state (k-first).

    Needs transformers (pip install 'moetool[hf]').

    \b
    Examples:
      moetool capture-ssm Qwen/Qwen3-Next-80B-A3B-Instruct state.safetensors --prompt "Hello" --device cuda
      moetool capture-ssm ./tiny-qwen3-next state.safetensors --token-ids 1,2,3,4
    """
    import os

    from moetool.capture import capture_state
    from moetool.errors import UsageError
    from moetool.hub import resolve
    from moetool.io.fs import input_inodes, input_roots, refuse_into_input, refuse_other_names
    from moetool.ssm import write_state_file
    from moetool.transforms.ssm_layout import convert_conv_layout

    if os.path.lexists(dst) and not overwrite:  # before loading a model that may take minutes
        raise UsageError("exists already", file=dst, fix="pass --overwrite or choose another OUT")

    ids = None
    if token_ids:
        try:
            ids = [int(x) for x in token_ids.split(",")]
        except ValueError:
            raise click.BadParameter("comma-separated integers", param_hint="--token-ids") from None
    source = resolve(model).path
    roots = input_roots(source)
    for follow in (True, False):  # where a link at OUT points (written through), and the entry itself
        refuse_into_input(dst, roots, what="OUT", follow_last=follow)  # (replaced by the new file)
    refuse_other_names(dst, input_inodes(roots), what="OUT")
    tensors, meta = capture_state(source, prompt=prompt, token_ids=ids, device=device)
    tensors, meta = convert_conv_layout(tensors, meta, conv_layout)  # type: ignore[arg-type]
    write_state_file(dst, tensors, meta, overwrite=overwrite)
    out.result(
        {"out": dst, "layers": len(tensors), "layout": meta.layout, "conv_layout": meta.conv_layout},
        f"wrote {dst}: {len(tensors)} tensors ({meta.layout}, conv {meta.conv_layout})",
    )
