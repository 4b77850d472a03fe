"""Which outputs inference engines may load, and the config that makes them refuse the others.

moetool writes two kinds of checkpoint:

- engine checkpoints: ``quantize --layout hf`` (DeepSeek-V3's block-FP8 format, per-expert tensors under
  their own names), unfused. transformers, SGLang and vLLM load them and compute what the original
  computes, within FP8 error.
- moetool checkpoints: the deepgemm layout (stacked ``gate_up_proj``/``down_proj``, float32 or SM100
  scales) and every ``fuse-shared`` output, BF16 ones included. Engines mis-read them silently — SGLang
  drops stacked experts or their ``_scale_inv`` scales with at most a warning, transformers on CPU loads
  stacked FP8 bytes as plain weights, and no engine adds fused slots to the routed sum as moetool's
  contract says — so they carry a refusal marker, and ``moetool.layout`` (or a DeepGEMM/FlashInfer
  runtime) reads them.

The marker is ``quantization_config.activation_scheme``: a sentence naming the layout and the fix, put
where every engine validates it before reading a weight and prints it in its error —
transformers ``FineGrainedFP8Config.post_init`` ("Activation scheme ... not supported"), SGLang and vLLM
``Fp8Config.__init__`` ("Unsupported activation scheme ..."). An unknown ``quant_method`` would not do:
transformers only warns about one, then loads the FP8 bytes as plain weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

ENGINES = "sglang, vllm or transformers"
#: The part every refusal sentence starts with (lower case: transformers lower-cases the value it prints).
REFUSED = "not an engine checkpoint"


def refusal(layout: str, *, fused: bool, scale_layout: str = "sm90") -> str | None:
    """The ``activation_scheme`` sentence that makes engines refuse an output, or ``None`` for an engine
    checkpoint. ``layout`` is the output's expert layout (``hf``, ``packed``, ``deepgemm``)."""
    if fused:
        return (
            f"moetool fuse-shared output, {REFUSED}: shared experts folded into expert slots are read by "
            f"moetool.layout; {ENGINES} load the checkpoint from before fuse-shared"
        )
    if layout == "deepgemm":
        what = "deepgemm layout with sm100 packed scales" if scale_layout == "sm100" else "deepgemm layout"
        return f"moetool {what}, {REFUSED}: for {ENGINES} run moetool quantize with --layout hf"
    return None


def refusal_of(config: Mapping[str, Any]) -> str | None:
    """The refusal sentence a ``config.json`` carries, if any."""
    qc = config.get("quantization_config")
    scheme = qc.get("activation_scheme") if isinstance(qc, Mapping) else None
    return scheme if isinstance(scheme, str) and REFUSED in scheme else None


def marked(config: Mapping[str, Any], reason: str | None) -> dict[str, Any]:
    """A copy of ``config`` whose ``quantization_config`` (and ``text_config``'s, where it has one) carries
    ``reason`` (see :func:`refusal`).

    A config without ``quantization_config`` (a BF16 output) gains the bare marker
    ``{"quant_method": "fp8", "activation_scheme": reason}``: it declares no FP8 weight (no
    ``weight_block_size``, see :func:`declares_fp8`) and exists only to be refused. ``reason=None`` gives
    back an unchanged copy.
    """
    out = copy.deepcopy(dict(config))
    if reason is None:
        return out
    qc = out.get("quantization_config")
    if isinstance(qc, dict):
        qc["activation_scheme"] = reason
    else:
        out["quantization_config"] = {"quant_method": "fp8", "activation_scheme": reason}
    text = out.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("quantization_config"), dict):
        # a wrapper's text model may carry its own copy, which SGLang reads over the top-level one
        text["quantization_config"]["activation_scheme"] = reason
    return out


def declares_fp8(config: Mapping[str, Any]) -> bool:
    """Whether ``config.json`` declares block-FP8 weights (a ``quantization_config`` with a
    ``weight_block_size``), as opposed to carrying no quantization or only a refusal marker."""
    qc = config.get("quantization_config")
    return isinstance(qc, Mapping) and qc.get("weight_block_size") is not None


def transformers_cpu_reading(shape: tuple[int, ...] | list[int]) -> str:
    """How transformers 5.24 dequantizes a block-FP8 weight ``[..., N, K]`` stored with its 128x128 ceil
    scale grid ``[ceil(N/128), ceil(K/128)]`` when it loads on CPU (``Fp8Dequantize._dequantize_one``):
    it derives the block from the grid, ``N // ceil(N/128)`` rows by ``K // ceil(K/128)`` columns.

    - ``"right"``: both dimensions are multiples of 128, or one block covers the whole dimension;
    - ``"raises"``: a dimension is not a multiple of its grid (DeepSeek's 576-row ``kv_a_proj_with_mqa``:
      5 row blocks) — transformers refuses the checkpoint ("not divisible by scale grid");
    - ``"misreads"``: the grid divides a dimension into blocks of other than 128 (192 rows: 2 blocks of
      96) — transformers loads it and applies scales to the wrong rows, silently.

    SGLang, vLLM and transformers on GPU take the block size from ``weight_block_size`` and read all three
    right.
    """
    result = "right"
    for d in tuple(shape)[-2:]:
        grid = -(-d // 128)
        if d % grid:
            return "raises"
        if grid > 1 and d // grid != 128:
            result = "misreads"
    return result
