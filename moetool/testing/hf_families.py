"""Tiny checkpoints of the MoE families of 2026, written by transformers' own classes (transformers >= 5.24),
and the release formats they ship in: block FP8 (DeepSeek-V3.2, GLM-5, MiniMax-M2) and INT4
compressed-tensors (Kimi-K2.5, written with compressed-tensors' own compressor).

Like the rest of ``moetool.testing`` this is an oracle: it reads neither ``configs/`` nor ``moetool.arch``.
Tensor names are whatever transformers writes; the only edit is Kimi-K2.5's, whose ``save_pretrained``
(5.24) writes ``language_model.model.blocks.*`` where the releases (and its own loader) say
``language_model.model.layers.*``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetool.testing.fp8 import FP8_BLOCK


@dataclass(frozen=True)
class NewFamily:
    """How transformers builds one family: ``text`` makes the text model's config keys from the
    dimensions, ``wrapper`` (if any) the vision-language wrapper's, around them; ``layers`` finds the
    decoder layers of a loaded model; ``moe_layers``/``gdn_layers`` are the truth for the tiny model."""

    model_type: str
    text: Callable[[dict[str, int]], dict[str, Any]]
    wrapper: Callable[[dict[str, Any]], dict[str, Any]] | None
    layers: Callable[[Any], Any]
    moe_layers: tuple[int, ...]
    gdn_layers: tuple[int, ...]
    shared: bool


#: dimensions of the tiny models: experts 128-aligned (the deepgemm layout), attention tiny
DIMS = {"hidden": 256, "inter": 128, "experts": 8, "top_k": 2, "vocab": 512}

_MLA = {
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 64,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16,
    "v_head_dim": 16,
    "max_position_embeddings": 4096,
}


def _dsa(d: dict[str, int], model_type: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "vocab_size": d["vocab"],
        "hidden_size": d["hidden"],
        "intermediate_size": 3 * d["inter"],
        "moe_intermediate_size": d["inter"],
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "n_routed_experts": d["experts"],
        "num_experts_per_tok": d["top_k"],
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "index_n_heads": 2,
        "index_head_dim": 32,
        # the indexer keeps every token of a test prompt: a top-k cut would turn FP8 rounding into a
        # different choice of tokens, and the logits into a step function of the weights
        "index_topk": 2048,
        **_MLA,
        **extra,
    }


def _minimax(d: dict[str, int]) -> dict[str, Any]:
    return {
        "model_type": "minimax_m2",
        "vocab_size": d["vocab"],
        "hidden_size": d["hidden"],
        "intermediate_size": d["inter"],
        "num_hidden_layers": 2,
        "num_local_experts": d["experts"],
        "num_experts_per_tok": d["top_k"],
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
    }


def _qwen35_text(d: dict[str, int]) -> dict[str, Any]:
    return {
        "model_type": "qwen3_5_moe_text",
        "vocab_size": d["vocab"],
        "hidden_size": d["hidden"],
        "moe_intermediate_size": d["inter"],
        "shared_expert_intermediate_size": 2 * d["inter"],  # two fused slots
        "num_hidden_layers": 3,
        "layer_types": ["linear_attention", "linear_attention", "full_attention"],
        "num_experts": d["experts"],
        "num_experts_per_tok": d["top_k"],
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
    }


def _kimi_text(d: dict[str, int]) -> dict[str, Any]:
    return {
        "model_type": "deepseek_v3",
        "vocab_size": d["vocab"],
        "hidden_size": d["hidden"],
        "intermediate_size": 3 * d["inter"],
        "moe_intermediate_size": d["inter"],
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "n_routed_experts": d["experts"],
        "num_experts_per_tok": d["top_k"],
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.827,
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False,
        **_MLA,
    }


def _qwen35_wrapper(text: dict[str, Any]) -> dict[str, Any]:
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2}
    return {
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": {**vision, "out_hidden_size": text["hidden_size"]},
    }


def _kimi_wrapper(text: dict[str, Any]) -> dict[str, Any]:
    vision = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    return {
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": vision,
        "projection_hidden_size": 32,
        "tie_word_embeddings": False,
    }


def _causal_layers(model: Any) -> Any:
    return model.model.layers


def _wrapped_layers(model: Any) -> Any:
    return model.model.language_model.layers


FAMILIES: dict[str, NewFamily] = {
    "deepseek_v32": NewFamily(
        "deepseek_v32",
        lambda d: _dsa(d, "deepseek_v32", n_group=4, topk_group=2),
        None,
        _causal_layers,
        (1, 2),
        (),
        True,
    ),
    # layer 2 reuses layer 1's indexer ("shared"): it carries no indexer weights
    "glm_moe_dsa": NewFamily(
        "glm_moe_dsa",
        lambda d: _dsa(d, "glm_moe_dsa", n_group=1, topk_group=1, indexer_types=["full", "full", "shared"]),
        None,
        _causal_layers,
        (1, 2),
        (),
        True,
    ),
    "minimax_m2": NewFamily("minimax_m2", _minimax, None, _causal_layers, (0, 1), (), False),
    "qwen3_5_moe": NewFamily(
        "qwen3_5_moe", _qwen35_text, _qwen35_wrapper, _wrapped_layers, (0, 1, 2), (0, 1), True
    ),
    "kimi_k25": NewFamily("kimi_k25", _kimi_text, _kimi_wrapper, _wrapped_layers, (1,), (), True),
}


def config_dict(family: str, *, wrapped: bool = True) -> dict[str, Any]:
    """The config kwargs of the tiny ``family`` model (the wrapper's, unless ``wrapped=False``)."""
    f = FAMILIES[family]
    text = f.text(dict(DIMS))
    return f.wrapper(text) if (f.wrapper and wrapped) else text


def _hf_config(cfg: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig

    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    return AutoConfig.for_model(str(cfg["model_type"]), **kwargs)


def build_model(
    family: str, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0, wrapped: bool = True
) -> Any:
    """The tiny model, initialised by transformers under ``torch.manual_seed(seed)`` (RNG restored),
    with every routing bias set to seeded non-zero values (zeros would hide a bias read wrongly)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = _hf_config(config_dict(family, wrapped=wrapped))
    auto = AutoModelForImageTextToText if (FAMILIES[family].wrapper and wrapped) else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(cfg, dtype=dtype).eval()
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.05)
    return model


def save(model: Any, out: str | Path, *, packed: bool = False) -> Path:
    """``save_pretrained`` as the releases store it (see the module doc for Kimi-K2.5); ``packed``
    keeps transformers' stacked experts (``experts.gate_up_proj``), as Qwen3.5-MoE releases ship."""
    out = Path(out)
    model.save_pretrained(out, save_original_format=not packed)
    cfg = json.loads((out / "config.json").read_text())
    if cfg.get("model_type") == "kimi_k25":
        _rename(out, lambda n: n.replace("language_model.model.blocks.", "language_model.model.layers."))
        cfg["text_config"]["model_type"] = "kimi_k2"  # as Kimi-K2.5 ships
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def make_checkpoint(
    family: str, out: str | Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0, packed: bool = False
) -> Path:
    """``build_model`` then ``save``."""
    return save(build_model(family, dtype=dtype, seed=seed), out, packed=packed)


def load_model(path: str | Path, **kwargs: Any) -> Any:
    """``from_pretrained`` with the class the checkpoint's config asks for (vision-language wrappers
    through ``AutoModelForImageTextToText``)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = json.loads((Path(path) / "config.json").read_text())
    auto = AutoModelForImageTextToText if "text_config" in cfg else AutoModelForCausalLM
    qc = cfg.get("quantization_config") or {}
    on_cpu = "device_map" not in kwargs  # a caller that places the model on a GPU wants FP8 kept
    if (
        qc.get("quant_method") == "fp8"
        and torch.cuda.is_available()
        and on_cpu
        and "quantization_config" not in kwargs
    ):
        # with a GPU transformers would keep FP8 and run its kernels; ask for what it does on CPU
        from transformers import FineGrainedFP8Config

        kwargs["quantization_config"] = FineGrainedFP8Config(
            dequantize=True, modules_to_not_convert=qc.get("modules_to_not_convert")
        )
    return auto.from_pretrained(str(path), **kwargs)


def moe_block(model: Any, family: str, layer: int) -> Any:
    """transformers' MoE block module of ``layer``."""
    return FAMILIES[family].layers(model)[layer].mlp


def _rename(path: Path, fn: Callable[[str], str]) -> None:
    from safetensors.torch import load_file, save_file

    for f in sorted(path.glob("*.safetensors")):
        tensors = load_file(f)
        save_file({fn(k): v for k, v in tensors.items()}, f, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {fn(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")


# -- release formats ------------------------------------------------------------------------------


def _rewrite(src: Path, out: Path, fn: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    weight_map = {}
    for f in sorted(out.glob("*.safetensors")):
        new: dict[str, torch.Tensor] = {}
        for name, t in load_file(f).items():
            new.update(fn(name, t))
        save_file(new, f, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(new, f.name))
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        index.write_text(json.dumps(data, indent=2) + "\n")


def write_fp8_release(src: str | Path, out: str | Path, *, ue8m0: bool = False) -> Path:
    """``src`` as DeepSeek-V3.2, GLM-5 and MiniMax-M2 ship FP8: every Linear of the decoder layers whose
    two dimensions are multiples of 128 (the experts, here) as F8_E4M3 plus F32 ``weight_scale_inv``
    (128×128 blocks; with ``ue8m0`` power-of-two scales, ``scale_fmt: ue8m0`` as V3.1/V3.2 ship), and
    ``quantization_config`` naming the Linears left in BF16. The recipe is the kernels' torch reference."""
    from moetool.kernels.fp8_quant_ref import block_quant_ref

    src, out = Path(src), Path(out)
    kept: list[str] = []

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        linear = name.endswith(".weight") and t.dim() == 2 and ".layers." in name and "norm" not in name
        if linear and (".gate." in name or name.endswith(".gate.weight") or "shared_expert_gate" in name):
            linear = False  # routers and Qwen's shared-expert gate stay as they are
        if not linear:
            return {name: t}
        if t.shape[0] % FP8_BLOCK or t.shape[1] % FP8_BLOCK:
            kept.append(name[: -len(".weight")])
            return {name: t}
        q, s = block_quant_ref(t.float(), ue8m0=ue8m0, name=name)
        return {name: q, name + "_scale_inv": s}

    _rewrite(src, out, convert)
    cfg = json.loads((out / "config.json").read_text())
    qc: dict[str, Any] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        "modules_to_not_convert": sorted(kept),
    }
    if ue8m0:
        qc["scale_fmt"] = "ue8m0"
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def int4_quantization_config(group_size: int = 32) -> dict[str, Any]:
    """Kimi-K2.5's ``quantization_config`` (compressed-tensors, pack-quantized symmetric int4 groups on
    the routed experts; everything else ignored)."""
    return {
        "config_groups": {
            "group_0": {
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": False,
                    "group_size": group_size,
                    "num_bits": 4,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "strategy": "group",
                    "symmetric": True,
                    "type": "int",
                },
            }
        },
        "format": "pack-quantized",
        "ignore": [
            "lm_head",
            "re:.*self_attn.*",
            "re:.*shared_experts.*",
            r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
            r"re:.*mlp\.gate$",
            "re:.*vision_tower.*",
            "re:.*mm_projector.*",
        ],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def write_int4_release(src: str | Path, out: str | Path, *, group_size: int = 32) -> Path:
    """``src`` (a Kimi-K2.5-style checkpoint) with its routed experts as Kimi-K2.5 ships them:
    compressed-tensors ``pack-quantized`` INT4 (``weight_packed``, ``weight_scale`` BF16, ``weight_shape``),
    each quantized and packed by compressed-tensors' own ``PackedQuantizationCompressor``; the
    ``quantization_config`` goes into ``text_config`` as in the release."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    src, out = Path(src), Path(out)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if ".mlp.experts." not in name or not name.endswith(".weight"):
            return {name: t}
        w = t.to(torch.bfloat16)
        groups = w.float().reshape(w.shape[0], -1, group_size)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        state = {"weight": w, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero}
        packed = PackedQuantizationCompressor.compress(state, scheme)
        base = name[: -len("weight")]
        return {base + k: v.contiguous() for k, v in packed.items()}

    _rewrite(src, out, convert)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["quantization_config"] = int4_quantization_config(group_size)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits ``[T, V]`` of one sequence of token ids."""
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()
