"""Capture a Gated DeltaNet model's linear-attention state with transformers (optional extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moetool.errors import EnvironmentError_, InputError, UsageError
from moetool.io.checkpoint import Checkpoint
from moetool.ssm import StateMeta, conv_state_name, meta_from_config, recurrent_state_name

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _layer_states(cache: Any, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(recurrent [B, HV, K, V], conv [B, conv_dim, W]) of one layer, across transformers' cache APIs."""
    if hasattr(cache, "get_recurrent_state"):
        return cache.get_recurrent_state(layer, state_idx=0), cache.get_conv_state(layer, state_idx=0)
    layers = getattr(cache, "layers", None)
    if layers is not None and hasattr(layers[layer], "recurrent_states"):
        lay = layers[layer]
        rs, cs = lay.recurrent_states, getattr(lay, "conv_states", None)
        return (rs[0] if isinstance(rs, dict | list) else rs), (cs[0] if isinstance(cs, dict | list) else cs)
    if hasattr(cache, "recurrent_states"):
        return cache.recurrent_states[layer], cache.conv_states[layer]
    raise EnvironmentError_(
        f"this transformers version's cache ({type(cache).__name__}) exposes no linear-attention state",
        fix="use transformers >= 5.0",
    )


def capture_state(
    model_dir: str | Path,
    *,
    prompt: str | None = None,
    token_ids: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[dict[str, torch.Tensor], StateMeta]:
    """Run the model on one prompt and return its linear-attention states as a k-first state file's
    tensors (``[1, HV, K, V]`` per GDN layer, plus conv_state) and metadata."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise EnvironmentError_("capture-ssm needs transformers", fix="pip install 'moetool[hf]'") from None
    # stderr belongs to moetool: no loading bars or advice from transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model_dir = Path(model_dir)
    # What transformers will read is vetted first, as every input of moetool: config, index and shards
    # regular files inside the folder (a FIFO would hang the load, /dev/zero never end), JSON bounded,
    # safetensors headers sound, no pickle-only weights; the other files regular files too.
    with Checkpoint(model_dir) as ckpt:
        ckpt.other_files()
    if token_ids is None:
        if prompt is None:
            raise UsageError("give --prompt or --token-ids")
        if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
            raise InputError(
                "the model has no tokenizer files", file=str(model_dir), fix="pass --token-ids 1,2,3"
            )
        try:
            tok = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError):
            raise InputError(
                "the model's tokenizer cannot be loaded", file=str(model_dir), fix="pass --token-ids 1,2,3"
            ) from None
        token_ids = tok(prompt)["input_ids"]
    if not token_ids:
        raise UsageError("the prompt encodes to no tokens", file=str(model_dir), fix="pass --token-ids 1,2,3")
    model = (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True).to(device).eval()
    )
    config = model.config.to_dict()
    meta = meta_from_config(config, layout="k-first")
    types = config.get("layer_types") or []
    layers = [i for i, t in enumerate(types) if t == "linear_attention"]
    if not layers:
        raise InputError("the model has no linear_attention layers", file=str(model_dir / "config.json"))
    ids = torch.tensor([token_ids], device=device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        rs, cs = _layer_states(cache, layer)
        if rs is None:
            raise EnvironmentError_(f"layer {layer} produced no recurrent state")
        tensors[recurrent_state_name(layer)] = rs.detach().to("cpu", torch.float32).contiguous()
        if cs is not None:
            tensors[conv_state_name(layer)] = cs.detach().to("cpu", torch.float32).contiguous()
    return tensors, meta
