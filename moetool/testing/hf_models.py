"""Tiny checkpoints written by transformers' own model classes: the reference that proves
:mod:`moetool.testing.factory` real-named, and models for end-to-end tests (needs the ``hf`` or
``test`` extra: transformers >= 5.0, accelerate).

The config comes from the factory's single table (:func:`moetool.testing.factory.family_config`), so
both writers build the same model; only the tensors' values differ (transformers initialises them).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moetool.testing.factory import family_config, family_defaults

#: config.json keys that describe the file rather than the model; transformers fills them itself.
_WRITER_KEYS = (
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
)
#: model_types transformers has no class for, built with the class they ship with.
_HF_MODEL_TYPE = {"kimi_k2": "deepseek_v3"}


def hf_available() -> bool:
    """Whether transformers >= 5.0 is importable."""
    if importlib.util.find_spec("transformers") is None:
        return False
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _require_hf() -> None:
    if not hf_available():
        raise ImportError("transformers >= 5.0 is needed: pip install 'moetool[hf]'")


def hf_config(config: Mapping[str, Any]) -> Any:
    """A transformers config object for a ``config.json`` dict (``kimi_k2`` as ``deepseek_v3``)."""
    _require_hf()
    from transformers import AutoConfig

    model_type = str(config["model_type"])
    kwargs = {k: v for k, v in config.items() if k not in _WRITER_KEYS}
    return AutoConfig.for_model(_HF_MODEL_TYPE.get(model_type, model_type), **kwargs)


def make_hf_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 256,
    moe_intermediate_size: int = 128,
    intermediate_size: int | None = None,
    num_experts: int = 4,
    top_k: int = 2,
    shared: int | None = None,
    dense_layers: int | None = None,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    packed_experts: bool = False,
    seed: int = 0,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Build ``family`` with ``AutoModelForCausalLM.from_config`` (weights initialised by transformers
    under ``torch.manual_seed(seed)``, the global RNG restored after) and ``save_pretrained`` it.

    Same dimension arguments as :func:`moetool.testing.factory.make_checkpoint`. ``packed_experts``
    saves the in-memory v5 layout (``save_original_format=False``: ``mlp.experts.gate_up_proj`` ...).
    ``kimi_k2`` is built with the DeepSeek-V3 classes and its config.json relabelled ``kimi_k2``, as
    Kimi-K2 ships. Returns ``out_dir`` as a Path.
    """
    _require_hf()
    from transformers import AutoModelForCausalLM

    config = family_config(
        family,
        num_layers=num_layers,
        hidden_size=hidden_size,
        moe_intermediate_size=moe_intermediate_size,
        intermediate_size=intermediate_size,
        num_experts=num_experts,
        top_k=top_k,
        shared=shared,
        dense_layers=dense_layers,
        vocab_size=vocab_size,
        dtype=dtype,
        config_overrides=config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype)
    out = Path(out_dir)
    if packed_experts:
        model.save_pretrained(out, save_original_format=False)
    else:
        model.save_pretrained(out)
    model_type = family_defaults(family).model_type
    if model_type in _HF_MODEL_TYPE:
        path = out / "config.json"
        written = json.loads(path.read_text())
        written["model_type"] = model_type
        path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    return out


def load_hf_model(path: str | Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, also for model_types transformers only
    knows under another name (``kimi_k2``). Pass ``output_loading_info=True`` to get
    ``(model, {"missing_keys", "unexpected_keys", "mismatched_keys", ...})``."""
    _require_hf()
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("model_type") in _HF_MODEL_TYPE and "config" not in kwargs:
        cfg = hf_config(config)
        if "quantization_config" in config:
            cfg.quantization_config = config["quantization_config"]
        kwargs["config"] = cfg
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
