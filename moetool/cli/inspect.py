"""``moetool inspect MODEL``."""

from __future__ import annotations

from typing import Any

import click

from moetool.cli.common import Output, common_options, family_option, human_bytes, say_note, table


@click.command("inspect")
@click.argument("model")
@family_option
@common_options
def inspect(model: str, family: str | None, out: Output) -> None:
    """What a checkpoint holds and what `quantize` would change (headers only; reads no weights).

    MODEL is a local directory or a Hub repo id (org/name[@revision]).

    \b
    Examples:
      moetool inspect ./DeepSeek-V2-Lite
      moetool inspect Qwen/Qwen3-30B-A3B --json | jq .quantize_would
      moetool inspect ./my-deepseek-v3-finetune --family deepseek_v3
    """
    from moetool.hub import resolve
    from moetool.inspection import inspect_checkpoint
    from moetool.io import Checkpoint
    from moetool.model import analyze

    source = resolve(model)
    with Checkpoint(source.path) as ckpt:
        view = analyze(ckpt, family=family)
        say_note(out, view)
        report = inspect_checkpoint(view)
    out.result(report, lambda: render(report))


def render(r: dict[str, Any]) -> str:
    rows = [
        ["family", f"{r['family']} (model_type {r['model_type']})"],
        [
            "layers",
            f"{r['layers']}: {len(r['moe_layers'])} MoE, {len(r['dense_layers'])} dense"
            + (f", {len(r['gdn_layers'])} GDN" if r["gdn_layers"] else ""),
        ],
        [
            "experts",
            f"{r['routed_experts']} routed, top-{r['top_k']}, intermediate {r['moe_intermediate_size']}",
        ],
        ["routing", ", ".join(f"{k}={v}" for k, v in r["routing"].items())],
        [
            "shared experts",
            (
                f"intermediate {r['shared_expert_intermediate_size']} -> {r['fused_slots_if_fused']} "
                f"fused slot(s), weight {r['shared_expert_weight']}"
            )
            if r["shared_expert_intermediate_size"]
            else "none",
        ],
        ["fused", str(r["fused_shared_experts"]) if r["fused_shared_experts"] else "no"],
        [
            "expert formats",
            (", ".join(f"{k} in {v} layer(s)" for k, v in r["expert_formats"].items()) or "none")
            + (f" (config: expert_dtype {r['expert_dtype']})" if r["expert_dtype"] else ""),
        ],
        ["layout", f"{r['layout']} ({', '.join(r['expert_storage']) or 'no experts'})"],
        [
            "quantization",
            (
                f"fp8 {r['quantization']['scale_fmt']} scales, {r['quantization']['fp8_tensors']} FP8 tensors"
                if r["quantization"]["config"] or r["quantization"]["fp8_tensors"]
                else "none"
            ),
        ],
        ["size", f"{human_bytes(r['total_bytes'])} in {r['tensors']} tensors, {r['shards']} shard(s)"],
        ["by dtype", ", ".join(f"{k} {human_bytes(v)}" for k, v in r["bytes_by_dtype"].items())],
        ["by kind", ", ".join(f"{k} {human_bytes(v)}" for k, v in r["bytes_by_kind"].items())],
    ]
    if r["hash_layers"]:
        rows.append(["hash layers", f"{r['hash_layers']} routed by token id (tid2eid)"])
    if r["mtp_layers"]:
        rows.append(["mtp layers", ", ".join(r["mtp_layers"])])
    if r["swiglu_limit"] is not None:
        rows.append(["swiglu limit", str(r["swiglu_limit"])])
    lossy = r["fp4_lossy_blocks"]
    if lossy is not None:
        first = lossy["listed"][0] if lossy["listed"] else None
        rows.append(
            [
                "FP4 -> FP8",
                "lossless"
                if not lossy["blocks"]
                else f"{lossy['blocks']} lossy block(s), {lossy['elements']} values changed, e.g. "
                f"{first['tensor']} block {tuple(first['block'])}",
            ]
        )
    if r["ssm"]:
        rows.append(["ssm state", ", ".join(f"{k}={v}" for k, v in r["ssm"].items())])
    n = r["not_divisible_by_128"]
    rows.append(["not /128", f"{len(n)} weight(s)" + (f", e.g. {n[0]}" if n else "")])
    for layout, w in r["quantize_would"].items():
        if "error" in w:
            rows.append([f"quantize {layout}", f"refused: {w['error']}"])
        else:
            rows.append(
                [
                    f"quantize {layout}",
                    f"{w['quantized_tensors']} tensors ({human_bytes(w['quantized_bytes'])})"
                    f" -> output {human_bytes(w['output_bytes'])}",
                ]
            )
            rows += [["", f"note: {note}"] for note in w["notes"]]
    return table(rows)
